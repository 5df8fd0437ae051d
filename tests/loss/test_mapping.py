import twinkle.loss as L
from twinkle.loss import torch_loss_mapping
from twinkle.registry import resolve


def test_every_name_maps_to_a_registered_loss_class():
    assert torch_loss_mapping['cross_entropy'] is L.CrossEntropyLoss
    assert torch_loss_mapping['mse'] is L.MSELoss and torch_loss_mapping['gkd'] is L.GKDLoss
    for cls in torch_loss_mapping.values():
        assert issubclass(cls, L.Loss)
        assert resolve('loss', cls.__name__) is cls
