"""Fused expert weights in full-model checkpoints.

Recent transformers keep a mixture-of-experts layer's experts as two 3-D parameters
(``experts.gate_up_proj`` of ``(experts, 2 x inter, hidden)``, ``experts.down_proj`` of
``(experts, hidden, inter)``) but ``save_pretrained`` writes the per-expert layout of the released
checkpoints (``experts.<i>.gate_proj.weight``, ``up_proj``, ``down_proj``). Reading such a file back
into a live model (resuming) needs the experts fused again; that is all this module does.
"""
from __future__ import annotations

import re
from typing import Dict, Iterable

import torch

_PER_EXPERT = re.compile(r'^(?P<prefix>.+\.experts)\.(?P<index>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$')


def fuse_expert_weights(state: Dict[str, torch.Tensor], model_keys: Iterable[str]) -> Dict[str, torch.Tensor]:
    """``state`` with per-expert weights stacked into the fused parameters ``model_keys`` names;
    unchanged when the model has no fused experts or the file already holds them."""
    wanted = {k for k in model_keys if k.endswith(('.experts.gate_up_proj', '.experts.down_proj'))}
    if not wanted or all(k in state for k in wanted):
        return state
    grouped: Dict[str, Dict[str, Dict[int, torch.Tensor]]] = {}
    out = {}
    for key, value in state.items():
        match = _PER_EXPERT.match(key)
        if match is None or f'{match["prefix"]}.gate_up_proj' not in wanted:
            out[key] = value
            continue
        grouped.setdefault(match['prefix'], {}).setdefault(match['proj'], {})[int(match['index'])] = value
    for prefix, projs in grouped.items():
        count = len(projs.get('down_proj', {}))
        if any(sorted(projs.get(p, {})) != list(range(count)) for p in ('gate_proj', 'up_proj', 'down_proj')):
            raise ValueError(f'checkpoint has an incomplete set of experts under {prefix}: '
                             f'{ {p: sorted(v) for p, v in projs.items()} }')
        out[f'{prefix}.gate_up_proj'] = torch.stack(
            [torch.cat([projs['gate_proj'][i], projs['up_proj'][i]], dim=0) for i in range(count)])
        out[f'{prefix}.down_proj'] = torch.stack([projs['down_proj'][i] for i in range(count)])
    return out
