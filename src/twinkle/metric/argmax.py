"""Whether the label is the argmax of its logits, exactly as ``logits.argmax(-1) == label``, but fast on CPU.

On CPU, ``argmax`` over the last dimension runs about ten times slower than ``amax`` (the index has to be
carried along); for a [tokens, vocabulary] block of logits it is most of the token-accuracy metric's
cost. The label is the argmax when its logit is the row's maximum and no other entry of the row reaches
it: two vectorised ``amax`` passes decide that, the second with the label's entry set to -inf for the
moment. Rows those passes cannot settle (a tie for the maximum, where argmax takes the first index, and
rows holding NaN, which argmax counts as the maximum) go through ``argmax`` itself.
"""
from __future__ import annotations

import torch


def _fast_path(logits: torch.Tensor) -> bool:
    # The second pass writes into the logits' storage (and restores it): only for plain contiguous
    # floating-point CPU tensors that may be written outside inference mode.
    return (type(logits) is torch.Tensor and logits.device.type == 'cpu' and logits.is_floating_point()
            and logits.is_contiguous() and not logits.is_inference() and logits.dim() >= 1
            and logits.numel() > 0)


@torch.no_grad()
def argmax_equals(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bool tensor of ``target``'s shape: ``logits.argmax(-1) == target`` (first index of the maximum; a
    target outside ``[0, vocabulary)`` never matches). ``logits`` [..., vocabulary]; they come back unchanged,
    bit for bit, and autograd does not see the temporary write."""
    if not _fast_path(logits):
        return logits.argmax(dim=-1) == target.to(logits.device)
    vocab = logits.shape[-1]
    # ``.data`` has a version counter of its own: a graph that saved the logits stays valid.
    flat = logits.data.view(-1, vocab)
    tgt = target.to(logits.device).reshape(-1)
    valid = (tgt >= 0) & (tgt < vocab)
    safe = torch.where(valid, tgt, torch.zeros_like(tgt))
    top = flat.amax(dim=-1)
    picked = flat.gather(1, safe.unsqueeze(1)).squeeze(1)
    hits = valid & (picked == top)  # the label reaches the maximum (never in a row holding NaN)
    rows = hits.nonzero().squeeze(1)
    if rows.numel():
        cols, values = safe[rows], picked[rows]
        flat.index_put_((rows, cols), torch.tensor(float('-inf'), dtype=flat.dtype))
        try:
            others = flat.amax(dim=-1)[rows]  # the maximum of every entry but the label's
        finally:
            flat.index_put_((rows, cols), values)
        tied = rows[others == values]
        if tied.numel():  # another entry also holds the maximum: argmax decides which comes first
            hits[tied] = flat[tied].argmax(dim=-1) == tgt[tied]
    nan_rows = (valid & torch.isnan(top)).nonzero().squeeze(1)
    if nan_rows.numel():
        hits[nan_rows] = flat[nan_rows].argmax(dim=-1) == tgt[nan_rows]
    return hits.view(target.shape)
