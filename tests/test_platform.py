import pytest

from twinkle.platform import Platform


def test_cpu_platform(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    if getattr(torch, 'npu', None) is not None:
        monkeypatch.setattr(torch.npu, 'is_available', lambda: False)
    assert Platform.device_type() == 'cpu' and Platform.device_backend() == 'gloo'
    assert Platform.get_local_device() == torch.device('cpu') and Platform.visible_devices() == []


def test_cuda_platform_reads_visible_devices(monkeypatch):
    import torch
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setenv('CUDA_VISIBLE_DEVICES', '4,6')
    monkeypatch.setenv('LOCAL_RANK', '1')
    monkeypatch.setattr('twinkle.runtime.context.is_initialized', lambda: False)
    assert Platform.device_type() == 'cuda' and Platform.device_backend() == 'nccl'
    assert Platform.visible_devices() == [4, 6]
    assert Platform.get_local_device() == torch.device('cuda', 1)
    assert Platform.get_local_device(0) == torch.device('cuda', 0)
    monkeypatch.delenv('CUDA_VISIBLE_DEVICES')
    assert Platform.visible_devices() == [0, 1]


def test_get_platform_rejects_unknown_names():
    with pytest.raises(ValueError, match="platform='tpu'"):
        Platform.get_platform('tpu')
