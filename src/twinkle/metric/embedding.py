"""Quality of sentence embeddings trained contrastively."""
from __future__ import annotations

from typing import Any, Dict, Mapping

import torch
import torch.nn.functional as F

from ..registry import register
from .sums import SumsMetric, ratio


@register('metric')
class EmbeddingMetric(SumsMetric):
    """Rows of ``outputs['embeddings']`` [N, D] come in groups of ``group_size``: an anchor, its
    positive, then negatives. Reports the mean cosine similarity of anchor-positive and of
    anchor-negative pairs, their margin, and the in-batch retrieval accuracy: the share of anchors
    whose positive is the most similar of all non-anchor rows of the batch.
    """
    name = 'embedding'
    keys = ('anchors', 'pos_sim', 'negs', 'neg_sim', 'correct')

    def __init__(self, group_size: int = 2, device_mesh: Any = None, process_group: Any = None,
                 **kwargs: Any) -> None:
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise ValueError(f'EmbeddingMetric group_size must be an int >= 2 (anchor, positive, negatives...); '
                             f'got {group_size!r}')
        self.group_size = group_size
        super().__init__(device_mesh=device_mesh, process_group=process_group)

    def accumulate(self, inputs: Mapping[str, Any], outputs: Mapping[str, Any], **kwargs: Any) -> None:
        emb = kwargs.get('embeddings', outputs.get('embeddings') if outputs is not None else None)
        if emb is None:
            raise ValueError('EmbeddingMetric needs outputs["embeddings"] ([rows, dim]) or embeddings=...')
        emb = F.normalize(torch.as_tensor(emb).detach().double(), dim=-1)
        g = self.group_size
        if emb.dim() != 2 or emb.shape[0] % g:
            raise ValueError(f'EmbeddingMetric: embeddings of shape {tuple(emb.shape)} must be [rows, dim] with '
                             f'rows a multiple of group_size={g}')
        groups = emb.view(-1, g, emb.shape[-1])
        anchors = groups[:, 0]
        sim = anchors @ groups.reshape(-1, emb.shape[-1])[torch.arange(emb.shape[0]) % g != 0].T
        # Column block of group i: positives at i*(g-1), then its negatives.
        n = anchors.shape[0]
        pos_cols = torch.arange(n) * (g - 1)
        pos = sim[torch.arange(n), pos_cols]
        neg = groups[:, 2:]
        neg_sim = (anchors[:, None, :] * neg).sum(-1)
        self.add(anchors=n, pos_sim=pos.sum(), negs=neg_sim.numel(), neg_sim=neg_sim.sum(),
                 correct=(sim.argmax(dim=1) == pos_cols).sum())

    def finish(self, sums: Dict[str, float]) -> Dict[str, float]:
        out = {'pos_similarity': ratio(sums['pos_sim'], sums['anchors']),
               'retrieval_accuracy': ratio(sums['correct'], sums['anchors'])}
        if sums['negs']:
            out['neg_similarity'] = ratio(sums['neg_sim'], sums['negs'])
            out['similarity_margin'] = out['pos_similarity'] - out['neg_similarity']
        return out
