"""Build a torch optimizer from a name or class, with weight decay kept off biases and norms."""
from __future__ import annotations

from typing import Any, Iterable, List, Tuple, Type, Union

import torch
from torch import nn

from ..registry import RegistryError, available, resolve


def _is_no_decay(name: str, param: nn.Parameter) -> bool:
    # Biases, norm scales and other vectors are not weight matrices: decaying them only hurts.
    lowered = name.lower()
    return param.ndim < 2 or lowered.endswith('.bias') or 'norm' in lowered


def param_groups_without_decay(named_params: Iterable[Tuple[str, nn.Parameter]],
                               weight_decay: float) -> List[dict]:
    decay: List[nn.Parameter] = []
    no_decay: List[nn.Parameter] = []
    for name, param in named_params:
        if param.requires_grad:
            (no_decay if _is_no_decay(name, param) else decay).append(param)
    groups = []
    if decay:
        groups.append({'params': decay, 'weight_decay': weight_decay})
    if no_decay:
        groups.append({'params': no_decay, 'weight_decay': 0.0})
    return groups


def resolve_optimizer_cls(optimizer_cls: Union[str, Type[torch.optim.Optimizer]]) -> Type[torch.optim.Optimizer]:
    if not isinstance(optimizer_cls, str):
        return optimizer_cls
    try:
        return resolve('optimizer', optimizer_cls)
    except RegistryError:
        pass
    found = getattr(torch.optim, optimizer_cls, None)
    if isinstance(found, type) and issubclass(found, torch.optim.Optimizer):
        return found
    import difflib
    names = [n for n in dir(torch.optim) if isinstance(getattr(torch.optim, n), type)
             and issubclass(getattr(torch.optim, n), torch.optim.Optimizer) and n != 'Optimizer']
    names += available('optimizer')
    close = difflib.get_close_matches(optimizer_cls, names, n=3, cutoff=0.5)
    hint = f' Did you mean {", ".join(map(repr, close))}?' if close else ''
    raise ValueError(f'unknown optimizer {optimizer_cls!r}.{hint} Use a torch.optim class name '
                     f'({", ".join(sorted(names))}) or pass the class itself.')


def build_optimizer(optimizer_cls: Union[str, Type[torch.optim.Optimizer]],
                    named_params: Iterable[Tuple[str, nn.Parameter]], **kwargs: Any) -> torch.optim.Optimizer:
    """``weight_decay`` (default: the optimizer's own default) applies to weight matrices only."""
    cls = resolve_optimizer_cls(optimizer_cls)
    named_params = [(n, p) for n, p in named_params if p.requires_grad]
    if not named_params:
        raise ValueError('no trainable parameters to optimize: add an adapter with add_adapter_to_model, '
                         'or train all parameters by not adding one')
    import inspect
    default_wd = inspect.signature(cls.__init__).parameters.get('weight_decay')
    weight_decay = kwargs.pop('weight_decay', default_wd.default if default_wd is not None else None)
    _no_foreach_over_mixed_tensors(cls, [p for _, p in named_params], kwargs)
    _foreach_on_cpu(cls, [p for _, p in named_params], kwargs)
    if weight_decay is None or weight_decay is inspect.Parameter.empty:
        optimizer = cls([p for _, p in named_params], **kwargs)
    else:
        optimizer = cls(param_groups_without_decay(named_params, float(weight_decay)), **kwargs)
    _keep_kernel_choice(optimizer)
    return optimizer


def _no_foreach_over_mixed_tensors(cls: Type[torch.optim.Optimizer], params: List[nn.Parameter],
                                   kwargs: dict) -> None:
    """Tensor parallelism leaves replicated parameters plain next to sharded DTensors; foreach and fused
    kernels (the GPU default) refuse a list mixing both, so such optimizers step per tensor. The param
    groups stay as in any other layout, so checkpoints resume across layouts."""
    from torch.distributed.tensor import DTensor
    kinds = {isinstance(p, DTensor) for p in params}
    if len(kinds) < 2:
        return
    for option in ('foreach', 'fused'):
        if kwargs.get(option):
            raise ValueError(f'{option}=True cannot step a mix of DTensor (tensor-parallel) and plain parameters; '
                             f'leave {option} unset under tensor parallelism')
    import inspect
    if 'foreach' in inspect.signature(cls.__init__).parameters:
        kwargs['foreach'] = False


def _foreach_on_cpu(cls: Type[torch.optim.Optimizer], params: List[nn.Parameter], kwargs: dict) -> None:
    """torch steps with its foreach kernels by default on accelerators only; on CPU it loops over the tensors in
    Python, which costs a LoRA step (hundreds of small tensors) a few percent. The foreach step computes the
    same numbers (bit for bit), so it is the default here too unless the caller chose."""
    import inspect

    from torch.distributed.tensor import DTensor
    if 'foreach' in kwargs or kwargs.get('fused') or 'foreach' not in inspect.signature(cls.__init__).parameters:
        return
    if params and all(p.device.type == 'cpu' and not isinstance(p, DTensor) for p in params):
        kwargs['foreach'] = True


_KERNEL_OPTIONS = ('foreach', 'fused')


def _keep_kernel_choice(optimizer: torch.optim.Optimizer) -> None:
    """A loaded state dict brings the saving optimizer's ``foreach`` / ``fused`` choice with its param groups;
    that choice belongs to the layout it was made for (tensor parallelism cannot step foreach, CPU steps
    foreach here), not to the numbers, so the loading optimizer keeps its own."""
    chosen = [{k: group[k] for k in _KERNEL_OPTIONS if k in group} for group in optimizer.param_groups]

    def keep(opt: torch.optim.Optimizer) -> None:
        for group, options in zip(opt.param_groups, chosen):
            group.update(options)

    optimizer.register_load_state_dict_post_hook(keep)
