"""
Per-example gradient statistics of a batch (Roulet & Agarwala, "Per-example gradients: a new
frontier for understanding and improving optimizers", 2025, arXiv 2510.00236).

A plain backward gives the mean gradient of a batch, g = (1/B) sum_i g_i. The optimizers in
optim.py that need more (`PerExampleSignSGD`, `PerExampleAdam`) take, per parameter,

    mean      (1/B) sum_i g_i            (also written to p.grad, so clipping and logging work)
    sq_mean   (1/B) sum_i g_i^2          (elementwise)
    sign_mean (1/B) sum_i sign(g_i)      (elementwise)

from `batch_statistics`, which computes the g_i with torch.func (vmap of grad over the examples)
in chunks of `chunk` examples, adding each chunk's sums into one buffer per statistic: memory is
the model's size times chunk (plus the three sums), never times B.
"""
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad, vmap


@dataclass
class BatchStatistics:
    """Per parameter (keyed by the parameter): the mean gradient, the mean of squares and the
    mean of signs of the per-example gradients, over `n` examples."""
    mean: dict
    sq_mean: dict
    sign_mean: dict
    n: int


def batch_statistics(model, loss_of, inputs, targets, chunk=None):
    """Per-example gradient statistics of the batch (inputs[i], targets[i]), i < B, and their
    mean loss (a 0-d tensor). `loss_of(output, target)` is one example's loss, computed from the
    model's output for that example alone (a batch of one); its mean over the batch is the loss
    a plain backward would take. Writes the mean gradient into each p.grad (accumulating, like
    backward)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def one_loss(weights, x, y):
        out = functional_call(model, (weights, buffers), (x.unsqueeze(0),))
        return loss_of(out, y.unsqueeze(0))

    per_example = vmap(grad(one_loss, has_aux=False), in_dims=(None, 0, 0), randomness="different")
    loss_fn = vmap(one_loss, in_dims=(None, 0, 0), randomness="different")
    weights = {name: p.detach() for name, p in params.items()}
    n = len(inputs)
    chunk = chunk or n
    sums = {key: {name: torch.zeros_like(p) for name, p in weights.items()}
            for key in ("mean", "sq_mean", "sign_mean")}
    chunk_losses = []
    for start in range(0, n, chunk):
        x, y = inputs[start:start + chunk], targets[start:start + chunk]
        grads = per_example(weights, x, y)                 # name -> (chunk, *shape)
        with torch.no_grad():
            chunk_losses.append(loss_fn(weights, x, y).sum())
            for name, g in grads.items():
                sums["mean"][name] += g.sum(0)
                sums["sq_mean"][name] += g.square().sum(0)
                sums["sign_mean"][name] += g.sign().sum(0)
    by_param = {key: {params[name]: total / n for name, total in values.items()}
                for key, values in sums.items()}
    for p, g in by_param["mean"].items():
        p.grad = g.clone() if p.grad is None else p.grad + g
    return BatchStatistics(**by_param, n=n), torch.stack(chunk_losses).sum() / n
