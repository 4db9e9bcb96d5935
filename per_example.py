"""
Per-example gradient statistics of a batch (Roulet & Agarwala, "Per-example gradients: a new
frontier for understanding and improving optimizers", 2025, arXiv 2510.00236).

A plain backward gives the mean gradient of a batch, g = (1/B) sum_i g_i. The optimizers in
optim.py that need more (`PerExampleSignSGD`, `PerExampleAdam`) take, per parameter,

    mean      (1/B) sum_i g_i            (also written to p.grad, so clipping and logging work)
    sq_mean   (1/B) sum_i g_i^2          (elementwise)
    sign_mean (1/B) sum_i sign(g_i)      (elementwise)

from `batch_statistics`, two ways:

- surgery (the default; the paper's "surgery of the AD graph"): one ordinary forward and
  backward of the batch, in which each Linear, Embedding and LayerNorm forms its per-example
  weight gradients from its saved input and its output gradient (a Linear's: per example, the
  sum over positions of outer(output gradient, input)) in place of the batch's weight-gradient
  product, and adds them into the three sums. The extra work is elementwise, on one layer's
  per-example gradients at a time. A weight used by two layers (GPT's tied embedding) waits for
  both: its examples' gradients are summed before they are squared.
- vmap (the prototype): each example's gradient by torch.func, `vmap` of `grad` over the
  examples, in chunks: any model, at several times a plain backward.

A parameter no layer rule covers (a bare nn.Parameter, a layer of another type, a weight used
outside its layer's forward) is computed by vmap, with a warning naming it. Memory beyond a
plain step: the three sums, and one layer's per-example gradients for a piece of the batch.
`merge` adds the statistics of several micro-batches, and of several processes.
"""
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

KEYS = ("mean", "sq_mean", "sign_mean")
# Per-example gradients are formed and summed a piece of the batch at a time, the piece about
# PIECE_BYTES, so that it stays in the cache for its three sums (measured on a CPU: up to 3x
# faster than the whole batch at once); a Linear weight of ONE_BYTES or more one example at a
# time, summed in place (faster than sums over a piece's examples from that size on)
PIECE_BYTES, ONE_BYTES = 2 ** 19, 2 ** 16


@dataclass
class BatchStatistics:
    """Per parameter (keyed by the parameter): the mean gradient, the mean of squares and the
    mean of signs of the per-example gradients, over `n` examples; by_vmap names the parameters
    whose statistics the vmap path computed."""
    mean: dict
    sq_mean: dict
    sign_mean: dict
    n: int
    by_vmap: tuple = ()


def batch_statistics(model, loss_of, inputs, targets, chunk=None, write_grad=True,
                     method="surgery"):
    """Per-example gradient statistics of the batch (inputs[i], targets[i]), i < B, and their
    mean loss (a 0-d tensor). `loss_of(output, targets)` is the loss a plain step takes: the
    mean over the batch of each example's loss (of a batch of one: that example's loss). The
    batch dimension comes first in every layer's input. method: "surgery" (vmap for what no
    rule covers) or "vmap" (all of it); `chunk` examples at a time (all by default). With
    write_grad, adds the mean gradient into each p.grad (as backward would)."""
    if method not in ("surgery", "vmap"):
        raise ValueError(f"method must be surgery or vmap, got {method!r}")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    n = len(inputs)
    if n == 0:
        raise ValueError("per-example statistics of an empty batch")
    chunk = chunk or n
    if method == "surgery":
        sums, loss, by_vmap = surgery_sums(model, loss_of, inputs, targets, chunk)
    else:
        sums, loss, by_vmap = {}, None, list(params)
    if by_vmap:
        if method == "surgery":
            warnings.warn(f"per-example statistics: {', '.join(by_vmap)} not covered by a layer "
                          "rule (Linear, Embedding, LayerNorm); computed by vmap instead (slower)")
        vmap_sums, vmap_loss = vmap_statistics(model, loss_of, inputs, targets, chunk, by_vmap)
        sums.update({params[name]: s for name, s in vmap_sums.items()})
        loss = vmap_loss if loss is None else loss
    by_param = {key: {p: sums[p][k].div_(n) for p in params.values()}
                for k, key in enumerate(KEYS)}
    if write_grad:
        for p, g in by_param["mean"].items():
            p.grad = g.clone() if p.grad is None else p.grad + g
    return BatchStatistics(**by_param, n=n, by_vmap=tuple(by_vmap)), loss


def add_statistics(sums, g):
    """Add the examples of g (c, *shape), one parameter's per-example gradients, into its
    [sum, sum of squares, sum of signs]."""
    g = g.to(sums[0].dtype)
    sums[0] += g.sum(0)
    sums[1] += g.square().sum(0)
    sums[2] += g.sign_().sum(0)


def add_example(sums, g):
    """add_statistics of one example's gradient g (*shape), in place."""
    g = g.to(sums[0].dtype)
    sums[0] += g
    sums[1].addcmul_(g, g)
    sums[2] += g.sign_()


def merge(parts, sum_over_ranks=None):
    """The statistics of all the examples of `parts` (a step's micro-batches); with
    sum_over_ranks (a function summing a tensor over the processes, e.g. parallel's) those of
    every rank's examples, the same on each rank."""
    if len(parts) == 1 and sum_over_ranks is None:
        return parts[0]
    params = list(parts[0].mean)
    # each mean times its count is a sum over examples: sums add across parts and ranks
    sums = [sum(getattr(part, key)[p] * part.n for part in parts) for key in KEYS for p in params]
    n = sum(part.n for part in parts)
    if sum_over_ranks is not None:   # one all-reduce: every sum, then the count
        flat = sum_over_ranks(torch.cat([s.flatten() for s in sums] + [sums[0].new_tensor([n])]))
        *pieces, total = flat.split([s.numel() for s in sums] + [1])
        sums, n = [piece.view_as(s) for piece, s in zip(pieces, sums)], round(total.item())
    means = iter([s.round() / n if k >= 2 * len(params) else s / n   # sign sums: whole numbers
                  for k, s in enumerate(sums)])
    return BatchStatistics(**{key: {p: next(means) for p in params} for key in KEYS}, n=n,
                           by_vmap=parts[0].by_vmap)


# ---------------------------------------------------------------------------------------------
# the vmap path: each example's gradient by torch.func

def example_gradients(model, loss_of, inputs, targets, names=None):
    """{name: (B, *shape)}: each example's gradient of loss_of(model(example), target), for the
    B examples of (inputs, targets), of the parameters `names` (default all), in one vmap (B
    copies of those gradients)."""
    weights = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    chosen = {name: weights.pop(name) for name in (names or list(weights))}
    buffers = dict(model.named_buffers())

    def one_loss(chosen, x, y):
        return loss_of(functional_call(model, ({**weights, **chosen}, buffers),
                                       (x.unsqueeze(0),)), y.unsqueeze(0))

    with warnings.catch_warnings():
        # vmap runs scaled_dot_product_attention example by example (it has no batching rule
        # on the CPU yet): correct; its cost is in bench.py --what=per_example
        warnings.filterwarnings("ignore", message="There is a performance drop")
        grads, losses = vmap(grad_and_value(one_loss), in_dims=(None, 0, 0),
                             randomness="different")(chosen, inputs, targets)
    return grads, losses


def vmap_statistics(model, loss_of, inputs, targets, chunk, names):
    """{name: [sum, sum of squares, sum of signs]} of the parameters `names` over the examples,
    `chunk` at a time through `example_gradients`, and the mean loss."""
    params = dict(model.named_parameters())
    sums = {name: [torch.zeros_like(params[name]) for _ in KEYS] for name in names}
    losses = []
    for start in range(0, len(inputs), chunk):
        grads, chunk_losses = example_gradients(model, loss_of, inputs[start:start + chunk],
                                                targets[start:start + chunk], names)
        with torch.no_grad():
            losses.append(chunk_losses.sum())
            for name, g in grads.items():                # g: (chunk, *shape)
                add_statistics(sums[name], g)
    return sums, torch.stack(losses).sum().detach() / len(inputs)


# ---------------------------------------------------------------------------------------------
# the surgery path: each layer's per-example weight gradients inside the ordinary backward

def linear_example_grads(module, k, x, gy):
    """y = x W^T + b, x (c, ..., in), gy (c, ..., out): per example, W's gradient (k = 0) is the
    sum over its positions of outer(gy, x), b's (k = 1) the sum of gy."""
    x, gy = x.reshape(len(x), -1, x.shape[-1]), gy.reshape(len(gy), -1, gy.shape[-1])
    return torch.bmm(gy.transpose(1, 2), x.to(gy.dtype)) if k == 0 else gy.sum(1)


def embedding_example_grads(module, k, idx, gy):
    """y = W[idx], idx (c, ...), gy (c, ..., dim): per example, each row of W gathers the
    output gradients of the positions that read it (none at padding_idx)."""
    rows, gy = embedding_rows(module, idx, gy)
    g = gy.new_zeros(len(idx) * module.num_embeddings, gy.shape[-1])
    return g.index_add_(0, rows, gy).view(len(idx), *module.weight.shape)


def embedding_rows(module, idx, gy):
    """The row of a (c * num_embeddings, dim) stack of per-example tables that each position's
    output gradient goes to, and those gradients, flat."""
    if module.padding_idx is not None:
        gy = gy.masked_fill((idx == module.padding_idx).unsqueeze(-1), 0)
    offsets = module.num_embeddings * torch.arange(len(idx), device=idx.device)
    rows = (idx.reshape(len(idx), -1) + offsets.unsqueeze(1)).flatten()
    return rows, gy.reshape(-1, gy.shape[-1])


def embedding_statistics(module, idx, gy, sums):
    """add_statistics of an Embedding's per-example gradients without forming them whole: each
    example's gradient is non-zero only in the rows its positions read."""
    rows, gy = embedding_rows(module, idx, gy)
    touched, where = torch.unique(rows, return_inverse=True)
    g = gy.new_zeros(len(touched), gy.shape[-1]).index_add_(0, where, gy).to(sums[0].dtype)
    table_rows = touched % module.num_embeddings
    sums[0].index_add_(0, table_rows, g)
    sums[1].index_add_(0, table_rows, g.square())
    sums[2].index_add_(0, table_rows, g.sign_())


def layer_norm_example_grads(module, k, xhat, gy):
    """y = xhat * w + b over the normalised shape, xhat the normalised input: per example,
    w's gradient (k = 0) is the sum over its positions of gy * xhat, b's (k = 1) the sum of
    gy."""
    shape = (len(gy), -1, *module.normalized_shape)
    return (gy * xhat if k == 0 else gy).reshape(shape).sum(1)


class LayerWithExampleGrads(torch.autograd.Function):
    """A layer's forward; its backward gives the input's gradient (to the layers below) and
    hands (input, output gradient) to the surgery instead of the weights' batch gradients (a
    LayerNorm hands its normalised input)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, surgery, module, x, *weights):
        ctx.surgery, ctx.module = surgery, module
        if isinstance(module, nn.LayerNorm):   # float32 under autocast, as F.layer_norm
            x, bias = x.to(weights[0].dtype), weights[1] if len(weights) > 1 else None
            y, mean, rstd = torch.native_layer_norm(x, module.normalized_shape, weights[0], bias,
                                                    module.eps)
            ctx.save_for_backward(x, mean, rstd, *weights)
            return y
        ctx.save_for_backward(x, *weights)
        if isinstance(module, nn.Linear):
            return F.linear(x, *weights)
        return F.embedding(x, weights[0], module.padding_idx)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, gy):
        module, gx = ctx.module, None
        if isinstance(module, nn.LayerNorm):
            x, mean, rstd, *weights = ctx.saved_tensors
            if ctx.needs_input_grad[2]:
                gx = torch.ops.aten.native_layer_norm_backward(
                    gy, x, module.normalized_shape, mean, rstd, weights[0],
                    weights[1] if len(weights) > 1 else None, [True, False, False])[0]
            ctx.surgery.record(module, (x - mean) * rstd, gy)
        else:
            x, *weights = ctx.saved_tensors
            if ctx.needs_input_grad[2]:   # a Linear's (an Embedding's input is indices)
                gx = gy.matmul(weights[0].to(gy.dtype))
            ctx.surgery.record(module, x, gy)
        return (None, None, gx) + (None,) * len(weights)


RULES = {nn.Linear: linear_example_grads, nn.Embedding: embedding_example_grads,
         nn.LayerNorm: layer_norm_example_grads}


def covered(module):
    """Whether a layer rule computes this module's per-example gradients."""
    if type(module) not in RULES or "forward" in vars(module):
        return False
    if isinstance(module, nn.Embedding):
        return module.max_norm is None and not module.sparse and not module.scale_grad_by_freq
    if isinstance(module, nn.LayerNorm):
        return module.elementwise_affine
    return True


def weights(module):
    return [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]


class Surgery:
    """One batch's surgery: each covered module's forward goes through LayerWithExampleGrads;
    each use's (input, output gradient) is turned into per-example gradients and summed into
    [sum, sum of squares, sum of signs] per parameter as soon as every use of it has been
    through the backward (one, except for tied weights)."""

    def __init__(self, model, n, chunk):
        self.model, self.n, self.chunk = model, n, chunk
        self.uses, self.waiting, self.sums = {}, {}, {}
        self.patched = [m for m in model.modules()
                        if covered(m) and any(p.requires_grad for p in weights(m))]

    def __enter__(self):
        for module in self.patched:
            module.forward = self.forward_of(module)
        return self

    def __exit__(self, *exc):
        for module in self.patched:
            del module.forward

    def forward_of(self, module):
        plain = type(module).forward.__get__(module)

        def forward(x):
            if len(x) != self.n:   # not the batch's examples: autograd's gradient, then vmap
                return plain(x)
            for p in weights(module):
                self.uses[p] = self.uses.get(p, 0) + 1
            return LayerWithExampleGrads.apply(self, module, x, *weights(module))
        return forward

    def record(self, module, x, gy):
        """One use's backward: its per-example gradients now, or when its weight's other uses
        have come (the per-example gradient of a tied weight is the sum over its uses)."""
        for k, p in enumerate(weights(module)):
            self.waiting.setdefault(p, []).append((module, k, x, gy))
            if len(self.waiting[p]) == self.uses[p]:
                self.finish(p)

    def finish(self, p):
        uses = self.waiting.pop(p)
        sums = self.sums.setdefault(p, [torch.zeros_like(p) for _ in KEYS])
        module, k, x, gy = uses[0]
        if len(uses) == 1 and isinstance(module, nn.Embedding):
            embedding_statistics(module, x, gy, sums)
            return
        size = p.numel() * p.element_size()
        piece = max(1, min(self.chunk, PIECE_BYTES // size))
        if size >= ONE_BYTES and len(uses) == 1 and isinstance(module, nn.Linear) and k == 0:
            # one example at a time, each one's gradient summed in place
            x, gy = (t.reshape(len(t), -1, t.shape[-1]) for t in (x, gy))
            for x_one, gy_one in zip(x, gy):
                add_example(sums, gy_one.t().mm(x_one.to(gy_one.dtype)))
        else:
            for a in range(0, self.n, piece):
                b = min(a + piece, self.n)
                g = RULES[type(module)](module, k, x[a:b], gy[a:b])
                for other, j, x_other, gy_other in uses[1:]:
                    g += RULES[type(other)](other, j, x_other[a:b], gy_other[a:b])
                add_statistics(sums, g)

    def finish_all(self):
        """The weights some of whose uses never reached the loss."""
        for p in list(self.waiting):
            self.finish(p)


def surgery_sums(model, loss_of, inputs, targets, chunk):
    """{param: [sum, sum of squares, sum of signs]} over the examples from one forward and
    backward of the batch, its mean loss, and the names of the parameters that need vmap: those
    autograd gave a gradient (used outside a rule's forward)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    kept = {p: p.grad for p in params.values()}
    for p in params.values():
        p.grad = None
    try:
        with torch.enable_grad(), Surgery(model, len(inputs), chunk) as surgery:
            loss = loss_of(model(inputs), targets)
            (loss * len(inputs)).backward()   # the sum of the examples' losses: their own grads
            surgery.finish_all()
        by_vmap = [name for name, p in params.items() if p.grad is not None]
    finally:
        for p in params.values():
            p.grad = kept[p]
    sums = {p: s for p, s in surgery.sums.items()}
    for name, p in params.items():   # unused by the loss: zero, as a plain backward's None
        if name not in by_vmap and p not in sums:
            sums[p] = [torch.zeros_like(p) for _ in KEYS]
    return sums, loss.detach(), by_vmap


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
