"""Optimizer state in checkpoints, loadable under any world size.

Two layouts exist. ``optimizer.pt`` is ``optimizer.state_dict()`` written by one rank (one process,
DDP: every rank holds the same state). ``optimizer/`` is a ``torch.distributed.checkpoint`` folder
keyed by parameter names, written by every rank in parallel (FSDP2: each rank holds a shard).
``load`` reads either into any layout: DCP reshards by name, and the plain file is mapped from
parameter positions to names when the target is sharded.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Set, cast

import torch
from torch import nn

from ...checkpoint import CheckpointError

OPTIMIZER_FILE = 'optimizer.pt'
OPTIMIZER_DCP = 'optimizer'


def save_plain(folder: Path, optimizer: torch.optim.Optimizer, is_main_process: bool) -> None:
    if is_main_process:
        torch.save(optimizer.state_dict(), Path(folder) / OPTIMIZER_FILE)


def save_sharded(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = get_optimizer_state_dict(module, optimizer)
    dcp.save({'optimizer': state}, checkpoint_id=str(Path(folder) / OPTIMIZER_DCP), no_dist=not _distributed())


def _distributed() -> bool:
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


def is_sharded(module: nn.Module) -> bool:
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in module.parameters())


def load(folder: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Restore ``optimizer`` (built over ``module``'s parameters) from either layout."""
    folder = Path(folder)
    if (folder / OPTIMIZER_DCP).is_dir():
        _load_sharded(folder / OPTIMIZER_DCP, module, optimizer)
    elif (folder / OPTIMIZER_FILE).exists():
        state = torch.load(folder / OPTIMIZER_FILE, map_location='cpu', weights_only=False)
        if is_sharded(module):
            _load_plain_into_sharded(state, module, optimizer)
        else:
            optimizer.load_state_dict(state)
    else:
        raise CheckpointError(f'{folder} has neither {OPTIMIZER_FILE} nor {OPTIMIZER_DCP}/: it was saved without '
                              f'save_optimizer=True; resume with resume_only_model=True')


def _load_sharded(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict
    # The current (freshly initialised) state is the template DCP fills in, resharding by name.
    # torch types the values as its own union; this state holds the param groups' lists of names.
    state = cast(Dict[str, Any], get_optimizer_state_dict(module, optimizer))
    renamed = _adapter_renaming(_saved_names(path), [n for g in state['param_groups'] for n in g['params']])
    if renamed:
        state = _rename(state, renamed)
    try:
        dcp.load({'optimizer': state}, checkpoint_id=str(path), no_dist=not _distributed())
    except Exception as exc:
        raise CheckpointError(f'optimizer state in {path} does not fit this model ({exc}); was it saved with '
                              f'other trainable parameters (adapter, target_modules)?') from exc
    if renamed:
        state = _rename(state, {saved: own for own, saved in renamed.items()})
    set_optimizer_state_dict(module, optimizer, cast(Any, state))


def _saved_names(path: Path) -> Set[str]:
    """The parameter names a DCP optimizer folder holds state for."""
    import torch.distributed.checkpoint as dcp
    prefix = 'optimizer.state.'
    keys = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    return {k[len(prefix):].rsplit('.', 1)[0] for k in keys if k.startswith(prefix)}


def _adapter_renaming(saved: Set[str], own: List[str]) -> Dict[str, str]:
    """``{own name: saved name}`` when the checkpoint holds the same parameters under another adapter name
    (one name segment, the adapter's, differs the same way in every name), e.g. a run created from another
    run's checkpoint; empty when the names already match or differ otherwise."""
    missing = [n for n in own if n not in saved]
    if not missing or len(saved) != len(own):
        return {}
    parts = missing[0].split('.')
    for candidate in saved:
        theirs = candidate.split('.')
        differ = [i for i, (a, b) in enumerate(zip(parts, theirs)) if a != b] if len(theirs) == len(parts) else []
        if len(differ) != 1:
            continue
        new, old = parts[differ[0]], theirs[differ[0]]
        if new.isdigit() or old.isdigit():  # another layer's parameter, not another adapter name
            continue
        mapping = {n: '.'.join(old if seg == new else seg for seg in n.split('.')) for n in own}
        if set(mapping.values()) == saved:
            return mapping
    return {}


def _rename(state: Dict[str, Any], names: Dict[str, str]) -> Dict[str, Any]:
    return {'state': {names.get(k, k): v for k, v in state['state'].items()},
            'param_groups': [{**g, 'params': [names.get(n, n) for n in g['params']]} for g in state['param_groups']]}


def _param_names(module: nn.Module, optimizer: torch.optim.Optimizer) -> List[str]:
    names = {id(p): n for n, p in module.named_parameters()}
    try:
        return [names[id(p)] for group in optimizer.param_groups for p in group['params']]
    except KeyError:
        raise CheckpointError('the optimizer holds a parameter the model does not have') from None


def _load_plain_into_sharded(state: Dict[str, Any], module: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    # Positions in a state_dict follow the param groups' order, which is the same on every world size
    # (parameters are collected by name in module order), so position i names the same parameter.
    names = _param_names(module, optimizer)
    saved = [i for g in state['param_groups'] for i in g['params']]
    if len(saved) != len(names):
        raise CheckpointError(f'the checkpoint optimizer covers {len(saved)} parameters, this model trains '
                              f'{len(names)}: were they saved with other trainable parameters?')
    by_pos = dict(zip(saved, names))
    named: Dict[str, Any] = {
        'state': {by_pos[i]: s for i, s in state['state'].items()},
        'param_groups': [{**g, 'params': [by_pos[i] for i in g['params']]} for g in state['param_groups']],
    }
    for group in named['param_groups']:
        group.pop('param_names', None)
    set_optimizer_state_dict(module, optimizer, named, options=StateDictOptions(full_state_dict=True))
