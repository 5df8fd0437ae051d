"""Run by test_distributed.py under ``torch.distributed.run --nproc_per_node 2``: rank 0 trains (a PEFT
model whose base and adapter are perturbed), rank 1 samples; weights go over gloo broadcasts."""
from __future__ import annotations

import gc
import json
import os
import sys

import torch
import torch.distributed as dist

SEQS = [[1, 672, 207, 27, 19, 28, 37, 2, 207, 1, 716, 207, 31, 2], [1, 672, 207, 40, 41, 2, 207, 1, 716, 207, 55]]


def perturb(module, keyword, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if keyword in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def logps(module, adapter=True):
    from twinkle.loss.utils import token_logprobs
    out = []
    for s in SEQS:
        ids = torch.tensor([s])
        with torch.no_grad():
            if adapter:
                logits = module(input_ids=ids).logits
            else:
                with module.disable_adapter():
                    logits = module(input_ids=ids).logits
        out.append(token_logprobs(logits, ids)[0][0, 1:].tolist())
    return out


def main() -> None:
    out_dir, port = sys.argv[1], int(sys.argv[2])
    dist.init_process_group('gloo')
    rank = dist.get_rank()
    from twinkle.checkpoint_engine import DistributedCheckpointEngine
    from twinkle.hub import resolve
    model_dir = resolve('builtin://tiny-qwen3')
    engine = DistributedCheckpointEngine(bucket_mb=0.5)
    report = {'rank': rank, 'syncs': []}
    trainer = sampler = None
    if rank == 0:
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        trainer = AutoModelForCausalLM.from_pretrained(model_dir)
        perturb(trainer, 'mlp', 0)  # the base differs from the files the sampler loads
        torch.manual_seed(0)
        trainer = get_peft_model(trainer, LoraConfig(r=4, target_modules='all-linear', init_lora_weights=False))
    else:
        from twinkle.sampler import TorchSampler
        sampler = TorchSampler(model_dir)

    def check(stats, tag):
        expected = [logps(trainer), logps(trainer, adapter=False)] if rank == 0 else None
        box = [expected]
        dist.broadcast_object_list(box, src=0)
        entry = {'tag': tag, 'stats': stats}
        if rank == 1:
            got = [sampler.compute_logprobs(SEQS, adapter_name='default'), sampler.compute_logprobs(SEQS)]
            entry['max_diff_adapter'] = max(abs(a - b) for e, g in zip(box[0][0], got[0]) for a, b in zip(e, g[1:]))
            entry['max_diff_base'] = max(abs(a - b) for e, g in zip(box[0][1], got[1]) for a, b in zip(e, g[1:]))
        report['syncs'].append(entry)

    check(engine.sync(model=trainer, sampler=sampler), 'first')
    if rank == 0:
        perturb(trainer, 'lora_B', 1)
    check(engine.sync(model=trainer, sampler=sampler), 'lora_only')
    private = DistributedCheckpointEngine.standalone('127.0.0.1', port, rank, 2, backend='gloo', bucket_mb=4)
    if rank == 0:
        perturb(trainer, 'lora_A', 2)
    check(private.sync(model=trainer, sampler=sampler, full=True), 'standalone_full')
    with open(os.path.join(out_dir, f'rank{rank}.json'), 'w') as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == '__main__':
    main()
    gc.freeze()  # exit without the collector's passes over torch and transformers (about a second)
