"""One forward (and backward) over a batch through megatron-core's pipeline schedules."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from ...loss.utils import token_logprobs

Batch = Dict[str, Any]


def pad_to_multiple(batch: Batch, multiple: int, pad_token_id: int) -> Batch:
    """Right-pad the sequence so sequence parallelism can split it evenly (padding takes no loss)."""
    seq = batch['input_ids'].shape[1]
    extra = (-seq) % multiple
    if not extra:
        return batch
    out = dict(batch)
    for key, value in (('input_ids', pad_token_id), ('labels', -100), ('attention_mask', 0)):
        if isinstance(batch.get(key), torch.Tensor):
            t = batch[key]
            out[key] = torch.cat([t, t.new_full((t.shape[0], extra), value)], dim=1)
    out.pop('position_ids', None)
    return out


def check_positions(batch: Batch) -> None:
    pos = batch.get('position_ids')
    if pos is None:
        return
    expected = torch.arange(pos.shape[-1], device=pos.device).expand_as(pos)
    real = batch.get('attention_mask')
    real = real.bool() if real is not None else torch.ones_like(pos, dtype=torch.bool)
    if not torch.equal(pos[real], expected[real]):
        raise ValueError('the batch has packed sequences (position_ids restart inside a row): MegatronModel runs '
                         'padded batches only; use InputProcessor with padding_free=False')


def attention_mask(batch: Batch) -> torch.Tensor:
    """megatron-core's boolean mask ``[b, 1, s, s]``, True where attention is forbidden: causal + padding."""
    ids = batch['input_ids']
    b, s = ids.shape
    causal = torch.ones(s, s, dtype=torch.bool, device=ids.device).triu(1)
    mask = causal[None, None].expand(b, 1, s, s)
    keys = batch.get('attention_mask')
    if keys is not None:
        mask = mask | ~keys.bool()[:, None, None, :]
    return mask


def split_microbatches(batch: Batch, n: int) -> List[Batch]:
    b = batch['input_ids'].shape[0]
    if n < 1 or b % n:
        raise ValueError(f'num_microbatches={n} must divide the batch size {b}')
    size = b // n
    out = []
    for i in range(n):
        mb = {k: (v[i * size:(i + 1) * size] if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == b
                  else v) for k, v in batch.items()}
        if mb.get('attention_mask') is not None:
            mb['num_tokens'] = int(mb['attention_mask'].sum())
        else:
            mb['num_tokens'] = mb['input_ids'].numel()
        out.append(mb)
    return out


def run_schedule(model: torch.nn.Module, microbatches: List[Batch], vocab_size: int,
                 loss_fn: Callable[[Batch, Dict[str, Any]], Any], forward_only: bool,
                 temperature: float = 1.0) -> List[Tuple[Batch, Dict[str, Any], Any]]:
    """Forward (and backward unless ``forward_only``) every micro-batch; on the last pipeline stage
    returns ``(micro_batch, outputs, loss_output)`` for each, elsewhere an empty list."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    collected: List[Tuple[Batch, Dict[str, Any], Any]] = []
    feed = iter(microbatches)

    def forward_step(data_iterator: Any, chunk: torch.nn.Module) -> Tuple[torch.Tensor, Callable]:
        mb = next(data_iterator)
        ids = mb['input_ids']
        positions = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand_as(ids)
        output = chunk(ids, positions, attention_mask(mb))

        def loss_func(logits: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, Any]]:
            logits = logits[..., :vocab_size].float()
            logps, mask = token_logprobs(logits, mb['labels'], temperature=temperature)
            outputs = {'logits': logits, 'logps': logps, 'mask': mask}
            loss_output = loss_fn(mb, outputs)
            collected.append((mb, outputs, loss_output))
            items = torch.as_tensor(loss_output.num_items, device=logits.device).to(torch.int)
            return loss_output.loss, items, {}

        return output, loss_func

    b, s = microbatches[0]['input_ids'].shape
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=feed, model=[model], num_microbatches=len(microbatches),
        seq_length=s, micro_batch_size=b, forward_only=forward_only)
    return collected


def broadcast_from_last_stage(obj: Optional[Any]) -> Any:
    """Send a picklable result from the last pipeline stage to every stage of this pipeline."""
    from megatron.core import parallel_state as ps
    if ps.get_pipeline_model_parallel_world_size() == 1:
        return obj
    import torch.distributed as dist
    box = [obj]
    dist.broadcast_object_list(box, src=ps.get_pipeline_model_parallel_last_rank(),
                               group=ps.get_pipeline_model_parallel_group())
    return box[0]
