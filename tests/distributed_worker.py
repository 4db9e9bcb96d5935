"""Run by tests/test_distributed.py under torchrun (2 ranks, gloo): every optimizer trained 10
steps with gradient accumulation on a tiny GPT in one process (each rank on its own, the
reference), under DDP and under FSDP2 (the per-example two under DDP, from statistics merged
over the ranks); rank 0 writes the differences and state bytes as JSON.

    torchrun --standalone --nproc_per_node=2 tests/distributed_worker.py OUT.json [names...]
"""
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import optim  # noqa: E402
import parallel  # noqa: E402
import per_example  # noqa: E402
from nanogpt_sai import GPT, Config, sequence_loss  # noqa: E402

# 3 heads of 2 rows in each of Q, K, V: the 18 rows of c_attn split 9 | 9, inside K's second head;
# 65 embedding rows split 33 | 32; biases (one Adam-mini block per element) split 3 | 3
CFG = dataclasses.replace(Config(), n_layer=2, n_head=3, n_embd=6, block_size=8, bias=True)
VOCAB, STEPS, GRAD_ACCUM, BATCH = 65, 10, 4, 3
HPARAMS = {"sgd_sai": dict(lr=1e-2), "muon": dict(lr=1e-2)}


def batches(step):
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randint(0, VOCAB, (BATCH, CFG.block_size + 1), generator=g)
            for _ in range(GRAD_ACCUM)]


def train(name, world, mode):
    torch.manual_seed(0)
    model = GPT(CFG, VOCAB).double()   # float64: rounding is not what the test compares
    if mode != "none":
        world = dataclasses.replace(world, mode=mode)
    else:
        world = parallel.World()
    shard_dims = optim.shard_dims(name, model)
    net = parallel.wrap(model, world, model.transformer.h, shard_dims)
    opt = optim.build_optimizer(name, model, weight_decay=0.1,
                                **HPARAMS.get(name, dict(lr=3e-3)))
    on_this_rank = parallel.my_micro_batches(GRAD_ACCUM, world)
    share = GRAD_ACCUM // world.size
    losses = []
    for step in range(STEPS):
        loss = torch.zeros((), dtype=torch.float64)
        for i, xy in enumerate(batches(step)):
            if not on_this_rank[i]:
                continue
            with parallel.grad_sync(net, world, last=i >= GRAD_ACCUM - world.size):
                micro = net(xy[:, :-1], xy[:, 1:])[1]
                (micro / share).backward()
            loss += micro.detach() / share
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(parallel.mean_over_ranks(loss, world).item())
    params = [p.full_tensor() if hasattr(p, "full_tensor") else p.detach()
              for p in model.parameters()]
    state = optim.state_bytes(opt)
    return losses, params, state, parallel.sum_over_ranks(torch.tensor(state), world).item()


def train_per_example(name, world, mode):
    """The per-example optimizers: each rank's micro-batches' statistics, merged over the
    micro-batches and the ranks (as nanogpt_sai.py's forward_backward)."""
    torch.manual_seed(0)
    model = GPT(CFG, VOCAB).double()
    world = dataclasses.replace(world, mode=mode) if mode != "none" else parallel.World()
    parallel.wrap(model, world, model.transformer.h, optim.shard_dims(name, model))
    opt = optim.build_optimizer(name, model, weight_decay=0.1, lr=3e-3)
    on_this_rank = parallel.my_micro_batches(GRAD_ACCUM, world)
    over_ranks = (lambda t: parallel.sum_over_ranks(t, world)) if world.size > 1 else None
    for step in range(STEPS):
        parts = [per_example.batch_statistics(model, sequence_loss, xy[:, :-1], xy[:, 1:],
                                              write_grad=False)[0]
                 for i, xy in enumerate(batches(step)) if on_this_rank[i]]
        opt.step(per_example.merge(parts, over_ranks))
    return [p.detach() for p in model.parameters()]


def main():
    out, names = sys.argv[1], sys.argv[2:] or list(optim.OPTIMIZERS)
    world, _ = parallel.start("ddp", "cpu")
    results = {}
    for name in optim.PER_EXAMPLE_OPTIMIZERS:
        ref, ddp = (train_per_example(name, world, mode) for mode in ("none", "ddp"))
        results[f"{name}/ddp"] = dict(param_rel_diff=max(((a - b).norm() / b.norm()).item()
                                                         for a, b in zip(ddp, ref)))
    for name in names:
        ref_losses, ref_params, ref_state, _ = train(name, world, "none")
        for mode in ("ddp", "fsdp"):
            losses, params, state, total = train(name, world, mode)
            results[f"{name}/{mode}"] = dict(
                param_rel_diff=max(((a - b).norm() / b.norm()).item()
                                   for a, b in zip(params, ref_params)),
                loss_rel_diff=max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
                state_bytes=state, state_bytes_total=total, state_bytes_one_process=ref_state)
    if world.main:
        with open(out, "w") as f:
            json.dump(results, f, indent=1)
    parallel.finish(0, world)


if __name__ == "__main__":
    main()
