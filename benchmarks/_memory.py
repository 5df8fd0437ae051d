"""The transient memory of a training step in one process: its peak above what was held before it.

On CUDA that is ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``. On CPU it is the
kernel's high-water mark of the resident set (``VmHWM``), reset through ``/proc/self/clear_refs``; torch's
CPU tensors come straight from malloc, so the resident set follows live tensors once glibc serves large
blocks by mmap and hands them back on free: run the measured process with ``MALLOC_ENV`` (glibc's default
threshold adapts upwards and would keep freed activations mapped).
"""
from __future__ import annotations

MALLOC_ENV = {'MALLOC_MMAP_THRESHOLD_': str(256 * 1024), 'MALLOC_TRIM_THRESHOLD_': str(256 * 1024)}


def status_kib(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} not in /proc/self/status')


class StepPeak:
    """``start()`` before the step, ``stop()`` after it: the step's transient memory in MiB. ``before`` is
    what was held at ``start`` (bytes); ``reset`` is False where the CPU high-water mark could not be reset,
    so that the peak also covers what ran earlier."""

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.before = 0
        self.reset = True

    def start(self) -> None:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            self.before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return
        self.before = status_kib('VmRSS') * 1024
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # resets VmHWM to the current resident set
            self.reset = True
        except OSError:
            self.reset = False

    def stop(self) -> float:
        if self.cuda:
            import torch
            torch.cuda.synchronize()
            return (torch.cuda.max_memory_allocated() - self.before) / 2 ** 20
        return (status_kib('VmHWM') * 1024 - self.before) / 2 ** 20
