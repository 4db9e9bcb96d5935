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
import math
import warnings
from dataclasses import dataclass

import torch
from torch.func import functional_call, grad_and_value, vmap


@dataclass
class BatchStatistics:
    """Per parameter (keyed by the parameter): the mean gradient, the mean of squares and the
    mean of signs of the per-example gradients, over `n` examples."""
    mean: dict
    sq_mean: dict
    sign_mean: dict
    n: int


def example_gradients(model, loss_of, inputs, targets):
    """{name: (B, *shape)}: each example's gradient of loss_of(model(example), target), for the
    B examples of (inputs, targets), in one vmap (B copies of the model's gradients)."""
    weights = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    buffers = dict(model.named_buffers())

    def one_loss(weights, x, y):
        return loss_of(functional_call(model, (weights, buffers), (x.unsqueeze(0),)),
                       y.unsqueeze(0))

    with warnings.catch_warnings():
        # vmap runs scaled_dot_product_attention example by example (it has no batching rule
        # on the CPU yet): correct; its cost is in bench.py --what=per_example
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads, losses = vmap(grad_and_value(one_loss), in_dims=(None, 0, 0),
                             randomness="different")(weights, inputs, targets)
    return grads, losses


def batch_statistics(model, loss_of, inputs, targets, chunk=None, write_grad=True):
    """Per-example gradient statistics of the batch (inputs[i], targets[i]), i < B, and their
    mean loss (a 0-d tensor). `loss_of(output, target)` is one example's loss, computed from the
    model's output for that example alone (a batch of one); its mean over the batch is the loss
    a plain backward would take. The examples go through `example_gradients` `chunk` at a time
    (all at once by default). With write_grad, adds the mean gradient into each p.grad (as
    backward would)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    n = len(inputs)
    chunk = chunk or n
    sums = {key: {name: torch.zeros_like(p) for name, p in params.items()}
            for key in ("mean", "sq_mean", "sign_mean")}
    chunk_losses = []
    for start in range(0, n, chunk):
        grads, losses = example_gradients(model, loss_of, inputs[start:start + chunk],
                                          targets[start:start + chunk])
        with torch.no_grad():
            chunk_losses.append(losses.sum())
            for name, g in grads.items():                # g: (chunk, *shape)
                sums["mean"][name] += g.sum(0)
                sums["sq_mean"][name] += g.square().sum(0)
                sums["sign_mean"][name] += g.sign().sum(0)
    by_param = {key: {params[name]: total / n for name, total in values.items()}
                for key, values in sums.items()}
    if write_grad:
        for p, g in by_param["mean"].items():
            p.grad = g.clone() if p.grad is None else p.grad + g
    return BatchStatistics(**by_param, n=n), torch.stack(chunk_losses).sum() / n


def noise_scale(statistics, params=None):
    """McCandlish et al. (2018)'s simple noise scale B_simple = tr(Sigma) / |G|^2 over `params`
    (default: all), with Sigma the per-example gradients' covariance and G the true gradient:
    the batch size at which the batch mean's noise equals its signal. Both from the batch's
    statistics without bias (float64):
        tr(Sigma) = B / (B - 1) * mean_i ||g_i - g||^2    (= sum sq_mean - ||g||^2, times B/(B-1))
        |G|^2     = ||g||^2 - tr(Sigma) / B              (||g||^2 is high by the mean's variance)
    inf when the |G|^2 estimate is not positive (this batch's noise hides the signal)."""
    params = list(statistics.mean) if params is None else params
    b = statistics.n
    if b < 2:
        raise ValueError("the noise scale needs per-example gradients of >= 2 examples")
    signal = sum(statistics.mean[p].double().square().sum().item() for p in params)
    spread = max(sum(statistics.sq_mean[p].double().sum().item() for p in params) - signal, 0.0)
    trace = b / (b - 1) * spread
    true_signal = signal - trace / b
    return trace / true_signal if true_signal > 0 else math.inf


def block_diagnostics(model, statistics):
    """{name: {...}} per parameter tensor, from a batch's statistics (float64):
      gsnr            ||g|| / std(g) of the mean gradient g: SGD-SaI's statistic, now at any step
      gsnr_identity   sqrt((n - 1) + n mean(g)^2 / std(g)^2), n its numel: the same number
      gsnr_per_sqrt_n gsnr / sqrt(n): 1 unless the tensor's mean gradient rivals its spread
      example_snr     ||g||^2 / noise, noise = (1/B) mean_i ||g_i - g||^2 (snr.py's)
      noise_scale     the block's B_simple (noise_scale above)"""
    out = {}
    for name, p in model.named_parameters():
        if p not in statistics.mean:
            continue
        g = statistics.mean[p].double().flatten()
        n, b = g.numel(), statistics.n
        signal = g.square().sum().item()
        spread = max(statistics.sq_mean[p].double().sum().item() - signal, 0.0)  # mean ||g_i-g||^2
        std = g.std().item() if n > 1 else 0.0
        out[name] = dict(
            gsnr=math.sqrt(signal) / std if std > 0 else math.inf,
            gsnr_identity=math.sqrt(n - 1 + n * g.mean().item() ** 2 / std ** 2)
            if std > 0 else math.inf,
            gsnr_per_sqrt_n=math.sqrt(signal / n) / std if std > 0 else math.inf,
            example_snr=signal * b / spread if spread > 0 else math.inf,
            noise_scale=noise_scale(statistics, [p]))
    return out
