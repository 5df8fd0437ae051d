"""The training core every backend facade shares.

``TrainingCore`` holds one ``AdapterState`` per adapter (or one for full training) and implements
what does not depend on how the module is built or run: choosing the session an ``adapter_name``
means, losses and metrics, the accumulation window and ``clip_grad_and_step``, and the checkpoint
save / load / resume flow (``twinkle.model.checkpoint``). A backend supplies the module, the forward
and these hooks:

* ``comm``: its communication half (``twinkle.model.communication.Communication``);
* ``_normalise_window`` / ``_clip_and_step``: turn the window's gradients into its objective, then
  clip and apply the optimizer (``_finish_window`` runs the two; a backend may fuse them);
* ``_gather_weights`` / ``_write_weights`` / ``_load_weights``, ``_save_optimizer_state`` /
  ``_load_optimizer_state``, ``_trainer_state_extra`` and ``_check_resume_layout``: how state is
  gathered, written and read back;
* ``_holds_outputs`` / ``_share_metrics``: which ranks see the losses (the last pipeline stage under
  pipeline parallelism) and how the others learn the figures.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..registry import resolve
from ..runtime.remote import remote_function
from . import checkpoint
from .adapter_state import AdapterState
from .base import TwinkleModel
from .communication import Communication
from .components import TemplateProcessorMixin

logger = logging.getLogger(__name__)


def select_adapter(adapter_names: List[str], adapter_name: Optional[str]) -> Optional[str]:
    """The adapter an ``adapter_name`` means: the name itself; for None the only adapter, else the one
    named 'default', else None (full-parameter training) when there is no adapter at all."""
    if adapter_name is not None or not adapter_names:
        return adapter_name
    if len(adapter_names) == 1:
        return adapter_names[0]
    if 'default' in adapter_names:
        return 'default'
    raise ValueError(f'several adapters exist ({", ".join(adapter_names)}): pass adapter_name=')


class TrainingCore(TemplateProcessorMixin, TwinkleModel):
    """Shared state and behaviour of the backend facades (see the module docstring for the hooks)."""

    comm: Communication
    model_id: Optional[str]
    model_dir: Optional[str]
    output_dir: Path

    def _init_core(self, own: Dict[str, Any], run_name: str) -> None:
        """The shared state; ``own`` holds the constructor's Twinkle options (``output_dir``, ``log_dir``,
        ``report_to_tensorboard``). Needs ``comm``: only the main process writes metric logs."""
        from ..metric import MetricWriter
        from ..settings import get_settings
        self.output_dir = Path(own.get('output_dir') or 'output')
        self.sessions: Dict[Optional[str], AdapterState] = {}
        self._template: Any = None
        self._processor: Any = None
        self._patches: List[Any] = []
        log_dir = own.get('log_dir') or str(get_settings().log_dir / f'{time.strftime("%Y%m%d-%H%M%S")}-{run_name}')
        self._writer = MetricWriter(log_dir, enabled=own.get('report_to_tensorboard', True)
                                    and self.comm.is_main_process)

    # ------------------------------------------------------------------ sessions
    @property
    def adapter_names(self) -> List[str]:
        return [n for n in self.sessions if n is not None]

    def _session(self, adapter_name: Optional[str]) -> AdapterState:
        name = select_adapter(self.adapter_names, adapter_name)
        if name is None:
            if None not in self.sessions:  # full-parameter training starts on first use
                self.sessions[None] = AdapterState(name=None)
            return self.sessions[None]
        if name not in self.sessions:
            raise ValueError(f'adapter {name!r} does not exist; adapters: {self.adapter_names or "none"}. '
                             f'Add it with add_adapter_to_model({name!r}, LoraConfig(...)) first')
        return self.sessions[name]

    def _new_adapter_session(self, adapter_name: str, gradient_accumulation_steps: int) -> None:
        self.sessions[adapter_name] = AdapterState(name=adapter_name,
                                                   gradient_accumulation_steps=int(gradient_accumulation_steps))

    # ------------------------------------------------------------------ loss and metrics
    @remote_function(dispatch='all', collect='first')
    def set_loss(self, loss: Any, *, adapter_name: Optional[str] = None, **kwargs: Any) -> None:
        loss_obj = resolve('loss', loss)
        if isinstance(loss_obj, type):
            loss_obj = loss_obj(**kwargs)
        elif not callable(loss_obj):
            raise TypeError(f'loss must be a twinkle.loss.Loss, a registered name or a callable; got {loss!r}')
        self._session(adapter_name).set_loss(loss_obj)

    @remote_function(dispatch='all', collect='first')
    def add_metric(self, metric: Any, *, adapter_name: Optional[str] = None, is_training: bool = True,
                   **kwargs: Any) -> None:
        metric_obj = resolve('metric', metric)
        if isinstance(metric_obj, type):
            metric_obj = metric_obj(**kwargs)
        session = self._session(adapter_name)
        (session.metrics if is_training else session.eval_metrics).append(metric_obj)

    @property
    def _holds_outputs(self) -> bool:
        """Whether this rank sees the losses and metric inputs (all ranks, but for pipeline parallelism)."""
        return True

    def _share_metrics(self, metrics: Optional[Dict[str, float]]) -> Dict[str, float]:
        """The figures of the ranks that hold outputs, on every rank."""
        if metrics is None:
            raise RuntimeError(f'{type(self).__name__}: this rank holds no metrics; a model whose _holds_outputs '
                               f'can be False must override _share_metrics to receive them from a rank that does')
        return metrics

    @remote_function(dispatch='all', collect='first')
    def calculate_metric(self, is_training: bool = True, *, adapter_name: Optional[str] = None) -> Dict[str, float]:
        import torch
        session = self._session(adapter_name)
        metrics: Optional[Dict[str, float]] = None
        if self._holds_outputs:
            metrics = {}
            for metric in (session.metrics if is_training else session.eval_metrics):
                metrics.update(metric.compute(self.comm.reduce_sum))
                if not is_training:
                    metric.reset()
            if is_training:
                elapsed = max(time.perf_counter() - session.report_started, 1e-9)
                tokens = float(self.comm.reduce_sum(torch.tensor(float(session.tokens_since_report),
                                                                 dtype=torch.float64)))
                metrics['tokens_per_s'] = tokens / elapsed
        metrics = self._share_metrics(metrics)
        if is_training:
            if session.optimizer is not None:
                metrics['lr'] = float(session.optimizer.param_groups[0]['lr'])
            if session.last_grad_norm is not None:
                metrics['grad_norm'] = session.last_grad_norm
            metrics['step'] = session.optimizer_step
            metrics['micro_step'] = session.micro_step
            session.reset_report()
        if self.comm.is_main_process:
            self._writer.write(metrics, session.optimizer_step,
                               prefix=f'{"train" if is_training else "eval"}/{session.name or "full"}')
        return metrics

    # ------------------------------------------------------------------ the accumulation window
    def _check_norm_type(self, norm_type: float) -> None:
        """Refuse a norm the backend cannot clip by (before anything of the window is touched)."""

    def _normalise_window(self, session: AdapterState) -> bool:
        """Turn the accumulated gradients into those of the window's objective (see twinkle.loss.base);
        False if a 'mean' window had no units (the step is skipped)."""
        raise NotImplementedError

    def _clip_and_step(self, session: AdapterState, max_grad_norm: float, norm_type: float) -> Optional[float]:
        """Clip (when ``max_grad_norm`` > 0) and apply the optimizer; the gradient norm, if measured."""
        raise NotImplementedError

    def _finish_window(self, session: AdapterState, max_grad_norm: float,
                       norm_type: float) -> Tuple[bool, Optional[float]]:
        """``_normalise_window`` then ``_clip_and_step``: (False, None) when the window had no units and
        nothing was applied, else (True, the gradient norm if measured). A backend may fuse the two."""
        if not self._normalise_window(session):
            return False, None
        return True, self._clip_and_step(session, max_grad_norm, norm_type)

    @remote_function(dispatch='all', collect='first')
    def clip_grad_and_step(self, max_grad_norm: float = 1.0, norm_type: float = 2.0, *,
                           adapter_name: Optional[str] = None,
                           gradient_accumulation_steps: Optional[int] = None) -> Dict[str, Any]:
        session = self._session(adapter_name)
        if gradient_accumulation_steps is not None:
            session.gradient_accumulation_steps = int(gradient_accumulation_steps)
        if session.window_micro_steps == 0 or not session.at_accumulation_boundary:
            return {'stepped': False, 'micro_steps_in_window': session.window_micro_steps}
        self._check_norm_type(norm_type)
        stepped, grad_norm = self._finish_window(session, max_grad_norm, norm_type)
        if not stepped:
            logger.warning('accumulation window had no label tokens: optimizer step skipped')
            self.zero_grad(adapter_name=session.name)
            return {'stepped': False, 'micro_steps_in_window': 0}
        self.lr_step(adapter_name=session.name)
        self.zero_grad(adapter_name=session.name)
        return {'stepped': True, 'step': session.optimizer_step, 'grad_norm': grad_norm}

    # ------------------------------------------------------------------ checkpoint hooks
    def _gather_weights(self, session: AdapterState) -> Optional[Dict[str, Any]]:
        """The weights to save (collective); None on ranks that do not write them."""
        raise NotImplementedError

    def _write_weights(self, folder: Path, session: AdapterState, weights: Dict[str, Any]) -> None:
        """Write the weights (and the tokenizer) in the format plain tools read; the main rank only."""
        raise NotImplementedError

    def _load_weights(self, folder: Path, session: AdapterState) -> None:
        raise NotImplementedError

    def _save_optimizer_state(self, folder: Path, session: AdapterState) -> None:
        raise NotImplementedError

    def _load_optimizer_state(self, folder: Path, session: AdapterState) -> None:
        raise NotImplementedError

    def _trainer_state_extra(self) -> Dict[str, Any]:
        """What ``trainer_state.json`` records of the layout (world size, strategy)."""
        return {}

    def _check_resume_layout(self, folder: Path, trainer_state: Dict[str, Any]) -> None:
        """Refuse optimizer state saved under a layout this one cannot read."""

    # ------------------------------------------------------------------ checkpoints
    @remote_function(dispatch='all', collect='first')
    def save(self, name: str, output_dir: Optional[str] = None, save_optimizer: bool = False,
             consumed_train_samples: Optional[int] = None, *, adapter_name: Optional[str] = None) -> str:
        """Write a checkpoint folder atomically: weights (and tokenizer); with ``save_optimizer`` the
        optimizer, scheduler, scaler, every rank's RNG state and ``trainer_state.json``; then the manifest.
        Collective: every rank calls it."""
        import torch
        session = self._session(adapter_name)
        target = checkpoint.checkpoint_path(name, output_dir, self.output_dir)
        if session.window_micro_steps:
            logger.warning('saving with %d micro-steps of gradients not yet applied; they are not part of the '
                           'checkpoint (save after clip_grad_and_step)', session.window_micro_steps)
        weights = self._gather_weights(session)
        rng_states = self.comm.gather_object(checkpoint.capture_rng_state())
        main = self.comm.is_main_process
        with self.comm.shared_folder(target) as folder:
            if main and weights is not None:
                self._write_weights(folder, session, weights)
            if save_optimizer:
                if session.optimizer is None:
                    raise ValueError('save_optimizer=True but no optimizer was set (call set_optimizer first)')
                self._save_optimizer_state(folder, session)
                if main:
                    if session.scheduler is not None:
                        torch.save(session.scheduler.state_dict(), folder / checkpoint.SCHEDULER_FILE)
                    if session.scaler is not None:
                        torch.save(session.scaler.state_dict(), folder / checkpoint.SCALER_FILE)
                    torch.save(rng_states, folder / checkpoint.RNG_FILE)
                    checkpoint.write_json(folder / checkpoint.TRAINER_STATE, {
                        **session.progress(), 'consumed_train_samples': int(consumed_train_samples or 0),
                        'adapter_name': session.name, **self._trainer_state_extra()})
            self.comm.barrier()
            if main:
                checkpoint.write_manifest(folder, kind='adapter' if session.name else 'full',
                                          extra={'resumable': bool(save_optimizer), 'model_id': self.model_id})
        return str(target)

    @remote_function(dispatch='all', collect='first')
    def load(self, checkpoint_dir: str, *, adapter_name: Optional[str] = None) -> None:
        session = self._session(adapter_name)
        self._load_weights(checkpoint.weights_folder(checkpoint_dir, session), session)

    @remote_function(dispatch='all', collect='first')
    def resume_from_checkpoint(self, checkpoint_dir: str, resume_only_model: bool = False, *,
                               adapter_name: Optional[str] = None) -> Dict[str, int]:
        session = self._session(adapter_name)
        folder = Path(checkpoint_dir)
        _, progress = checkpoint.open_for_resume(folder, session)
        self._load_weights(checkpoint.weights_folder(folder, session), session)
        if resume_only_model:
            return progress
        trainer_state = checkpoint.read_trainer_state(folder)
        if session.optimizer is None:
            raise ValueError('call set_optimizer(...) (and set_lr_scheduler) before resume_from_checkpoint so the '
                             'optimizer state has somewhere to go; or pass resume_only_model=True')
        self._check_resume_layout(folder, trainer_state)
        self._load_optimizer_state(folder, session)
        checkpoint.restore_training_state(folder, session, trainer_state, progress, self.comm.rank)
        return progress

    # ------------------------------------------------------------------ components
    def apply_patch(self, patch: Any, **kwargs: Any) -> Any:
        patch_obj = resolve('patch', patch)
        if isinstance(patch_obj, type):
            patch_obj = patch_obj(**kwargs)
        patch_obj.apply(self)
        self._patches.append(patch_obj)
        return patch_obj


__all__ = ['TrainingCore', 'select_adapter']
