"""
Memory-efficient optimizers side by side: AdamW, SGD-SaI, Adam-mini, APOLLO, APOLLO-Mini, and the
baselines Muon and Adafactor, then the per-example optimizers. Read one section next to its
paper: each is the update function (the math of one tensor's step, testable on its own), then a
thin torch.optim.Optimizer class that keeps the state and calls it. The class docstring holds the
paper's pseudocode; comments tie each line of the math to it.

What each keeps per parameter tensor theta (APOLLO: per projected k x N matrix, k <= N, at rank
r; its other tensors keep AdamW's state):

| optimizer   | state per tensor                                   | floats            | vs AdamW |
|-------------|----------------------------------------------------|-------------------|----------|
| AdamW       | m (first moment), v (second moment)                | 2 |theta|         | 1.00x    |
| SGD-SaI     | m (momentum), scale (frozen g-SNR, one per tensor) | |theta| + 1       | ~0.50x   |
| Adam-mini   | m (first moment), v (one per block)                | |theta| + #blocks | ~0.50x   |
| APOLLO      | m, v of the rank-r projected gradient (r x N each) | 2 r N + 1         | r / k    |
|             | and the last update norm; r = k / 4 by default     |                   | (0.25x)  |
| APOLLO-Mini | as APOLLO with r = 1                               | 2 N + 1           | ~1 / k   |
| Muon        | B (momentum) per hidden matrix; AdamW's m, v else  | |theta| (matrix)   | ~0.50x   |
| Adafactor   | R (per row) and C (per column) per matrix, v per   | rows + cols       | ~0.01x   |
|             | vector                                             | (matrix)          |          |

Step counters (and APOLLO's projection seeds) are plain Python ints (no tensor), so `state_bytes`
counts exactly the floats above (4 bytes each in float32); APOLLO's projection P is drawn again
from its seed, not stored.

Which code runs. Each class's step gathers every tensor's arguments and hands them, with its
update function, to `BaseOptimizer.run_update` (engine/base.py), which runs the function as
written, one tensor at a time; or, for AdamW and Adam-mini by default, its foreach twin in
engine/foreach.py (the same ops over lists of tensors, held equal by tests/test_optim.py); or,
with fused=True (or fused=None from FUSED_MIN_NUMEL parameters on), the function compiled by
torch.compile into one pass over memory per tensor (held equal by tests/test_fused.py). Under
FSDP2 each rank steps its slice of a tensor; an update that needs a statistic of the whole tensor
takes `whole`, through which the engine sums it over the ranks (engine/sharding.py; the plain
operation in one process).

What every optimizer does on any model (frozen, NaN, float16 parameters): docs/optimizers.md.

The machinery is in engine/: the base class and step loop (base), compiling (compiled), the
foreach twins (foreach), FSDP2 (sharding), Adam-mini's block layouts (blocks), CPU row slices
(slices), parameter kinds and partitions (kinds), and the builder and accounting (build). Its
public names are importable from here too (optim.build_optimizer, optim.block_rules, ...).
"""
import math

import torch

from engine.base import BaseOptimizer, PerExampleOptimizer, param_name, params_with_grad
from engine.blocks import (block_count, block_layout, block_mean_sq, broadcast_blocks,
                           step_blocks)
from engine.build import (build, decay_groups, shard_dims, state_bytes, takes_per_example,
                          trainer_hparams)
from engine.checks import (check_adam_hparams, check_fused, check_int, check_lr_and_decay,
                           check_one_of, check_range)
from engine.compiled import FUSED_MIN_NUMEL
from engine.foreach import adam_mini_update_foreach, adamw_update_foreach
from engine.kinds import (KIND_RULES, PROJECTED_KINDS, block_rules, guess_param_kinds,
                          matrix_flag, param_kinds, partition_table, projected_params, rule_for)
from engine.slices import row_slices
from engine.sharding import (WHOLE, all_finite, block_means_over_ranks, local, reduced_zeros,
                             replicated_state, require_sliced_along, shard_of, sliced_state,
                             whole_of)

# What users and the trainers call as optim.<name>: the optimizers, their math, and the
# engine's builder, partition and accounting
__all__ = [
    "AdamW", "SGDSaI", "AdamMini", "Apollo", "apollo", "apollo_mini", "Muon", "Adafactor",
    "PerExampleSignSGD", "PerExampleAdam", "OPTIMIZERS", "PER_EXAMPLE_OPTIMIZERS",
    "adamw_update", "sai_scale", "sgd_sai_update", "adam_mini_update", "apollo_update",
    "newton_schulz", "muon_update", "adafactor_update", "per_example_sign_update",
    "per_example_adam_update", "build_optimizer", "trainer_hparams", "decay_groups",
    "shard_dims", "state_bytes", "takes_per_example", "block_layout", "block_rules",
    "param_kinds", "guess_param_kinds", "partition_table", "projected_params", "KIND_RULES",
    "PROJECTED_KINDS", "FUSED_MIN_NUMEL", "SAI_RULES", "GRANULARITIES", "SIGN_PLACEMENTS",
    "PRECONDITIONERS"]

# =============================================================================================
# AdamW: Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019, arXiv 1711.05101

def adam_step_numbers(step, lr, beta1, beta2):
    """The numbers of Adam's step t that are the same for every element: lr and the bias
    corrections 1 - b1^t and sqrt(1 - b2^t)."""
    return dict(lr=lr, bias_correction1=1 - beta1 ** step,
                bias_correction2_sqrt=math.sqrt(1 - beta2 ** step))


def adamw_update(param, grad, m, v, *, lr, bias_correction1, bias_correction2_sqrt, beta1,
                 beta2, eps, weight_decay):
    """One AdamW step for one tensor, in place, with step t's `adam_step_numbers`."""
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)                      # theta <- theta - lr*wd*theta
    m.lerp_(grad, 1 - beta1)                                   # m_t = b1 m + (1 - b1) g
    v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)        # v_t = b2 v + (1 - b2) g^2
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)       # sqrt(v_hat) + eps
    param.sub_((m / denom).mul_(lr / bias_correction1))        # theta -= lr * m_hat / denom


class AdamW(BaseOptimizer):
    r"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter, ICLR 2019, arXiv 1711.05101).

    .. code-block:: text

        input: lr (gamma), betas (b1, b2), eps, weight_decay (lambda), theta_0
        init:  m_0 <- 0, v_0 <- 0
        for t = 1, 2, ...:
            g_t      <- grad f(theta_{t-1})
            theta    <- theta_{t-1} - gamma * lambda * theta_{t-1}   # decoupled weight decay
            m_t      <- b1 m_{t-1} + (1 - b1) g_t
            v_t      <- b2 v_{t-1} + (1 - b2) g_t^2
            m_hat    <- m_t / (1 - b1^t)
            v_hat    <- v_t / (1 - b2^t)
            theta_t  <- theta - gamma * m_hat / (sqrt(v_hat) + eps)

    Args:
        params: parameters, (name, parameter) pairs, or param group dicts.
        lr: learning rate gamma.
        betas: (b1, b2), each in [0, 1).
        eps: added to sqrt(v_hat), >= 0.
        weight_decay: lambda, >= 0; applied as theta *= 1 - lr * lambda.
        fused: compile `adamw_update` into one pass per tensor (True), step eagerly (False), or
            compile where it pays (None: FUSED_MIN_NUMEL parameters or more, on a CPU or GPU).
        foreach: when eager, its foreach twin (engine/foreach.py) instead of one tensor at a time.

    Differences from torch.optim.AdamW (which it matches to float32 rounding): no amsgrad,
    maximize or capturable variants, no complex parameters.
    """

    float16_params = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 fused=None, foreach=True):
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        fused=fused, foreach=foreach)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group):
        check_adam_hparams(group)
        check_fused(group)

    def _update(self):
        for gi, group in enumerate(self.param_groups):
            calls = [adamw_call(p, grad, self.state[p], group)
                     for _, p, grad in params_with_grad(self, gi, group)]
            self.run_update(group, calls, adam_hparams(group), adamw_update,
                            adamw_update_foreach)


def adamw_call(p, grad, state, group):
    """((param, grad, m, v), adam_step_numbers) of one tensor's AdamW step, its state created at
    its first gradient (AdamW's tensors, and the tensors APOLLO and Muon leave to AdamW)."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)      # m, first moment
        state["exp_avg_sq"] = torch.zeros_like(p)   # v, second moment
    state["step"] += 1
    return ((p, grad, state["exp_avg"], state["exp_avg_sq"]),
            adam_step_numbers(state["step"], group["lr"], *group["betas"]))


def adam_hparams(group):
    """The hyperparameters of an Adam-like step that are not step numbers."""
    beta1, beta2 = group["betas"]
    return dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])


def matrices_then_adamw(optimizer, group_index, group, flag):
    """Yield (index, param, grad, state) of the params with a gradient that group[flag] marks as
    the optimizer's own matrices (APOLLO's projected, Muon's orthogonalized); the others
    (embeddings, head, norms, biases) take one AdamW step together once the loop has ended."""
    adamw_calls = []
    for i, p, grad in params_with_grad(optimizer, group_index, group):
        if group[flag][i]:
            yield i, p, grad, optimizer.state[p]
        else:
            adamw_calls.append(adamw_call(p, grad, optimizer.state[p], group))
    optimizer.run_update(group, adamw_calls, adam_hparams(group), adamw_update,
                         adamw_update_foreach)


# =============================================================================================
# SGD-SaI: Xu, Xiang, Cai & Wen, "No More Adam: Learning Rate Scaling at Initialization is All
# You Need", 2024, arXiv 2412.11768

SAI_RULES = ("gsnr", "gsnr_max", "sqrt_numel", "none")
# A block has no spread when std(g) <= ZERO_STD_EPS * eps(dtype) * rms(g): differences at the
# level of the gradient's own rounding (a float32 constant computed in float32 shows a std of
# ~1e-7 of its value: noise, which would make g-SNR ~1e7). 8 float32 eps = 9.5e-7 of the rms.
ZERO_STD_EPS = 8


def sai_scale(grad, rule, eps=1e-8, whole=WHOLE):
    """The learning-rate scale s_i SGD-SaI freezes for one block, as a float32 0-d tensor.

    "gsnr" and "gsnr_max" return the raw g-SNR ||g||_2 / (std(g) + eps), std unbiased (the
    caller divides "gsnr_max" by the maximum over blocks). Since ||g||^2 = (n - 1) std^2 +
    n mean^2, g-SNR = sqrt((n - 1) + n mean^2 / std^2) (eps aside): at least sqrt(n - 1), and about
    sqrt(n) unless the block's mean gradient rivals its spread. The sums behind the norm and std
    are taken in float64 (no overflow for any finite gradient, no rounding noise of their own).
    A block with one element (std undefined) or no spread (std <= ZERO_STD_EPS eps rms, see
    above; all zeros included) has no g-SNR; it gets sqrt(numel), the value g-SNR approximates
    for zero-mean gradients (scale 1 for a scalar).
    """
    check_one_of("sai_rule", rule, SAI_RULES)
    n = whole.numel(grad)
    sqrt_numel = torch.tensor(math.sqrt(n), dtype=torch.float32, device=grad.device)
    if rule == "none":
        return torch.ones_like(sqrt_numel)
    if rule == "sqrt_numel" or n == 1:
        return sqrt_numel
    # float64 where the device has it (MPS does not: there the once-per-block work is on the CPU)
    g = grad.detach().to("cpu" if grad.device.type == "mps" else grad.device, torch.float64)
    mean = whole.sum(g.sum()) / n
    sums = whole.sum(torch.stack([g.square().sum(), (g - mean).square().sum()]))
    norm, std = sums[0].sqrt(), (sums[1] / (n - 1)).sqrt()          # ||g||_2, std(g)
    no_spread = std <= ZERO_STD_EPS * torch.finfo(grad.dtype).eps * norm / math.sqrt(n)
    return torch.where(no_spread, math.sqrt(n), norm / (std + eps)).float().to(grad.device)


def sgd_sai_update(param, grad, m, scale, *, lr, momentum, weight_decay):
    """One SGD-SaI step for one tensor, in place. `scale` is its frozen s_i (a 0-d tensor)."""
    m.lerp_(grad, 1 - momentum)                        # m_t = mu m_{t-1} + (1 - mu) g_t
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)              # theta <- theta (1 - lr wd)
    param.sub_(m * (lr * scale))                       # theta <- theta - lr * s_i * m_t


class SGDSaI(BaseOptimizer):
    r"""SGD-SaI: SGD with momentum and learning-rate Scaling at Initialization.

    Xu, Xiang, Cai & Wen, "No More Adam: Learning Rate Scaling at Initialization is All You
    Need", 2024, arXiv 2412.11768. The paper's Algorithm 1 (sai_rule="gsnr_max"):

    .. code-block:: text

        input: lr (eta), momentum (mu), weight_decay (lambda), eps, blocks i (one per tensor)
        for t = 1, 2, ...:
            g_t <- grad f(theta_{t-1})
            if t = 1:                                              # frozen from now on
                gsnr_i <- ||g_i||_2 / (std(g_i) + eps)  for each block i
                s_i    <- gsnr_i / max_j gsnr_j
            m_t <- g_t                       if t = 1
                   mu m_{t-1} + (1 - mu) g_t otherwise
            theta_t <- theta_{t-1} (1 - eta lambda) - eta s_i m_t  # decoupled weight decay

    No second moment: the state is m plus one float per block, half of AdamW's. sai_rule picks
    s_i, the ablation this sandbox exists for (the usable lr differs by orders of magnitude
    between rules; docs/results.md):

    - "gsnr" (default; the official package sgd-sai 1.0.3): s_i = gsnr_i, not normalised.
    - "gsnr_max" (Algorithm 1): s_i = gsnr_i / max_j gsnr_j. The maximum is frozen at the first
      step (in every param group, "gsnr_max"); a block whose first gradient comes later is
      divided by it.
    - "sqrt_numel" (a later official version): s_i = sqrt(numel), g-SNR's approximation.
    - "none": s_i = 1, plain SGD with (dampened) momentum.

    Args:
        params: parameters, (name, parameter) pairs (names appear in errors), or group dicts.
        lr: learning rate eta, >= 0.
        momentum: mu in [0, 1).
        weight_decay: lambda, >= 0.
        eps: added to std(g) in the g-SNR, >= 0.
        sai_rule: one of SAI_RULES.
        fused: compile `sgd_sai_update` (True), step eagerly (False), or where it pays (None),
            as AdamW's.

    Deliberate differences from sgd-sai 1.0.3: docs/optimizers.md.
    """

    float32_cpu_state = ("scale",)   # a bfloat16 copy would move the step size by up to 0.4%

    def __init__(self, params, lr=1e-2, momentum=0.9, weight_decay=1e-2, eps=1e-8,
                 sai_rule="gsnr", fused=None):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps,
                        sai_rule=sai_rule, fused=fused)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group):
        check_lr_and_decay(group)
        check_fused(group)
        check_range("eps", group["eps"], 0.0)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_one_of("sai_rule", group["sai_rule"], SAI_RULES)

    def _freeze_new_scales(self):
        """Compute s_i for every block that has its first gradient now; all or nothing."""
        if all("scale" in self.state[p] for group in self.param_groups
               for p in group["params"] if p.grad is not None):
            return   # every step after the first
        new = []
        for gi, group in enumerate(self.param_groups):
            for i, p, grad in params_with_grad(self, gi, group):
                if "scale" in self.state[p]:
                    continue
                name = param_name(group, gi, i)
                if not all_finite(grad):
                    raise FloatingPointError(
                        f"SGD-SaI: the gradient of {name} (shape {tuple(p.shape)}) contains NaN "
                        "or Inf at the step its learning-rate scale is computed; freezing it would "
                        "poison this block for the rest of training. Fix the loss or lower the lr.")
                rule = group["sai_rule"]
                scale = sai_scale(local(grad), rule, group["eps"], whole=whole_of(grad))
                new.append((name, p, rule, scale))
        # gsnr_max's maximum is frozen with the first scales and kept in every param group (so
        # it travels with state_dict); a block or group that comes later is divided by it too
        frozen = next((g["gsnr_max"] for g in self.param_groups if "gsnr_max" in g), None)
        normalised = [s for _, _, rule, s in new if rule == "gsnr_max"]
        if frozen is None and normalised:
            frozen = torch.stack(normalised).max().item()
        for name, p, rule, s in new:
            if rule == "gsnr_max":
                s = s / frozen
            if not torch.isfinite(s):
                raise FloatingPointError(f"SGD-SaI: the learning-rate scale of {name} is "
                                         f"{s.item()} from a finite gradient; use sai_rule="
                                         "'sqrt_numel' or rescale the loss")
            self.state[p]["scale"] = s.cpu()
        if frozen is not None:
            for group in self.param_groups:
                group["gsnr_max"] = frozen

    def _update(self):
        self._freeze_new_scales()
        for gi, group in enumerate(self.param_groups):
            calls = []
            for _, p, grad in params_with_grad(self, gi, group):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()   # m_1 = g_1; the lerp below keeps it
                calls.append(((p, grad, state["momentum_buffer"], state["scale"]),
                              dict(lr=group["lr"])))
            self.run_update(group, calls, dict(momentum=group["momentum"],
                                               weight_decay=group["weight_decay"]),
                            sgd_sai_update)


# =============================================================================================
# Adam-mini: Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More", 2024,
# arXiv 2406.16793

def adam_mini_block_lrs(v, block_mean, *, lr, bias_correction1, bias_correction2_sqrt, beta2,
                        eps):
    """v updated in place with this step's mean(g^2) per block; returns each block's step size
    lr / (1 - b1^t) / (sqrt(v_hat) + eps)."""
    v.mul_(beta2).add_(block_mean, alpha=1 - beta2)               # v_t = b2 v + (1 - b2) mean(g^2)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)          # sqrt(v_hat) + eps, per block
    return (lr / bias_correction1) / denom                        # one lr per block


def adam_mini_update(param, grad, m, v, layout, *, lr, bias_correction1, bias_correction2_sqrt,
                     beta1, beta2, eps, weight_decay):
    """One Adam-mini step for one tensor, in place, with step t's `adam_step_numbers`; v holds
    one value per block of `layout` (engine/blocks.py: block_layout)."""
    grad = grad.contiguous()
    step_size = adam_mini_block_lrs(v, block_mean_sq(grad, layout), lr=lr, beta2=beta2, eps=eps,
                                    bias_correction1=bias_correction1,
                                    bias_correction2_sqrt=bias_correction2_sqrt)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)                         # theta <- theta - lr*wd*theta
    m.lerp_(grad, 1 - beta1)                                      # m_t = b1 m + (1 - b1) g
    param.sub_(m * broadcast_blocks(step_size, layout, param.shape))  # theta -= lr_b * m_hat
    return step_size   # for the fused path: computed once per block (engine/compiled.py)


def adam_mini_update_slice(param, grad, m, v, slice_layout, ids, block_mean, *, lr,
                           bias_correction1, bias_correction2_sqrt, beta1, beta2, eps,
                           weight_decay):
    """adam_mini_update for a slice of a tensor (rows of it: param, grad, m) whose blocks'
    mean(g^2) come given: block_mean and v cover every block of the whole tensor; slice_layout
    tiles the slice (a block cut by its edge counted with the elements it has), ids are its
    blocks' indices among the whole tensor's (engine/sharding.py: block_means_over_ranks)."""
    step_size = adam_mini_block_lrs(v, block_mean, lr=lr, beta2=beta2, eps=eps,
                                    bias_correction1=bias_correction1,
                                    bias_correction2_sqrt=bias_correction2_sqrt)[ids]
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    m.lerp_(grad, 1 - beta1)
    step_blocks(param, m, step_size, slice_layout)


class AdamMini(BaseOptimizer):
    r"""Adam-mini: Adam with one second-moment value per block of the Hessian's structure.

    Zhang et al., "Adam-mini: Use Fewer Learning Rates To Gain More", 2024, arXiv 2406.16793
    (Algorithm 1; official package adam-mini 1.1.1).

    .. code-block:: text

        input: lr (eta), betas (b1, b2), eps, weight_decay (lambda), blocks b of each tensor
        init:  m_0 <- 0 (per element), v_0 <- 0 (one per block)
        for t = 1, 2, ...:
            g_t   <- grad f(theta_{t-1})
            for each block b:  v_b <- b2 v_b + (1 - b2) mean(g_t[b]^2)
            theta <- theta_{t-1} - eta lambda theta_{t-1}             # decoupled weight decay
            m_t   <- b1 m_{t-1} + (1 - b1) g_t
            theta_t[b] <- theta[b] - eta / (1 - b1^t) * m_t[b] / (sqrt(v_b / (1 - b2^t)) + eps)

    Blocks follow the Hessian's near block-diagonal structure (engine/blocks.py: block_layout
    lists the rules): Q and K one block per head; V, attention output and MLP weights one per
    output neuron; token embedding and output head one per token; biases one per element; other
    tensors (norm gains, position embeddings) one per tensor.

    Args:
        params: parameters, (name, parameter) pairs, or param group dicts.
        lr, betas, eps, weight_decay: as AdamW.
        block_rules: {parameter: rule}, e.g. `block_rules(model)`; a parameter not in it gets
            "rows" with two or more dimensions, else "full". Each parameter's rule is stored in
            its param group ("block_rules", aligned with "params"): it travels with state_dict().
        fused: compile `adam_mini_update` (True), step eagerly (False), or where it pays
            (None), as AdamW's.
        foreach: when eager, its foreach twin (engine/foreach.py) instead of one tensor at a time.

    Deliberate differences from adam-mini 1.1.1: docs/optimizers.md.
    """

    float16_params = False

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 block_rules=None, fused=None, foreach=True):
        self._rules_by_param = block_rules or {}
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        fused=fused, foreach=foreach)
        super().__init__(params, defaults)

    _check_group = staticmethod(AdamW._check_group)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._set_per_param("block_rules", self._rule)

    def _rule(self, p, name, given):
        rule = rule_for(self._rules_by_param, p) if given is None else given
        block_layout(rule, tuple(p.shape))                 # raises if the rule does not fit
        if not p.is_contiguous():
            raise ValueError("is not contiguous; Adam-mini updates blocks through views")
        return rule

    def _update(self):
        for gi, group in enumerate(self.param_groups):
            calls = []       # ((param, grad, m, v, layout), step numbers) per param with a grad
            sharded = []     # (name, (param, grad, m, v, layout), step numbers) under FSDP2
            for i, p, grad in params_with_grad(self, gi, group):
                layout = block_layout(group["block_rules"][i], tuple(p.shape))
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = replicated_state(p, torch.zeros(   # one per block
                        block_count(layout), dtype=p.dtype, device=p.device))
                state["step"] += 1
                args = (p, grad, state["exp_avg"], state["exp_avg_sq"], layout)
                step_numbers = adam_step_numbers(state["step"], group["lr"], *group["betas"])
                if shard_of(p) is None:
                    calls.append((args, step_numbers))
                else:
                    sharded.append((param_name(group, gi, i), args, step_numbers))
            self.run_update(group, calls, adam_hparams(group),
                            adam_mini_update, adam_mini_update_foreach)
            slices = block_means_over_ranks([(name, args) for name, args, _ in sharded])
            for slice_args, (_, _, step_numbers) in zip(slices, sharded):
                adam_mini_update_slice(*slice_args, **step_numbers, **adam_hparams(group))


# =============================================================================================
# APOLLO and APOLLO-Mini: Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance",
# MLSys 2025, arXiv 2412.05270

GRANULARITIES = ("channel", "tensor")
MAX_NORM_GROWTH = 1.01                                 # gamma of the norm-growth limiter


def projection_rank(rank, shape):
    """r for a matrix of `shape`: `rank` capped at its smaller dimension k, or k // 4 (at least
    1) when `rank` is None."""
    k = min(shape)
    return max(1, k // 4) if rank is None else min(rank, k)


def random_projection(rank, dim, seed, regeneration):
    """P (rank x dim) with entries N(0, 1/rank): the `regeneration`-th projection of the
    parameter whose seed is `seed`. Drawn on the CPU, so every device gets the same P."""
    # torch's CPU generator keeps only the low 32 bits of a seed (seeds 1 and 1 + 2**32 draw the
    # same numbers), so fold the pair into 32 bits. The multiplier, 2**32 / golden ratio, spreads
    # consecutive parameter seeds apart: 1000 consecutive parameter seeds stay distinct for
    # their first 1.9 million regenerations.
    generator = torch.Generator().manual_seed((seed * 0x9E3779B9 + regeneration) % 2 ** 32)
    return torch.randn(rank, dim, generator=generator) / math.sqrt(rank)


def apollo_update(param, grad, proj, m, v, update_norm, channel_dim, *, lr, bias_correction1,
                  bias_correction2_sqrt, beta1, beta2, eps, weight_decay, granularity, alpha,
                  whole=WHOLE):
    """One APOLLO step for one matrix, in place, with step t's `adam_step_numbers`.

    channel_dim is 0 if the matrix has at least as many rows as columns (one channel per row:
    R = G P^T), else 1 (one channel per column: R = P G); proj is P (r x k), k the other
    dimension. m, v have R's shape. update_norm is the norm of the previous step's
    update U (a 0-d tensor, 0 before the first step); it is overwritten with this step's.
    Returns the gradient's scale sqrt(alpha) diag(s) / limiter (compiled, a result of the graph
    is computed once, where an intermediate would be recomputed for every element of the update).
    """
    rows_are_channels = channel_dim == 0
    dim = 1 - channel_dim                                          # the projected dimension
    # ||G||^2 (below) per channel; APOLLO-Mini needs only its sum, taken along the rows: along
    # the columns a compiled reduction is a strided loop (docs/performance.md)
    norm_dim = 1 if granularity == "tensor" else dim
    if proj.shape[0] == 1 and norm_dim == dim and torch.compiler.is_compiling():
        # rank 1, compiled: R_t as a reduction that shares its pass over G with ||G||^2's
        r_grad = ((grad * proj).sum(1, keepdim=True) if rows_are_channels
                  else (proj.T * grad).sum(0, keepdim=True))
    else:
        r_grad = grad @ proj.T if rows_are_channels else proj @ grad    # R_t = G_t P^T or P G_t
    m.lerp_(r_grad, 1 - beta1)                                     # m_t = b1 m + (1 - b1) R_t
    v.mul_(beta2).addcmul_(r_grad, r_grad, value=1 - beta2)        # v_t = b2 v + (1 - b2) R_t^2
    denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)           # sqrt(v_hat) + eps
    r_adam = (m / bias_correction1).div_(denom)                    # R~_t = m_hat / denom
    # per channel or per row, not whole: a whole-tensor norm would read G once more, compiled
    grad_norm_sq = torch.linalg.vector_norm(grad, dim=norm_dim, keepdim=True).square_()
    if granularity == "channel":                # norms along the projected dimension
        r_adam_norm = torch.linalg.vector_norm(r_adam, dim=dim, keepdim=True)
        r_norm = torch.linalg.vector_norm(r_grad, dim=dim, keepdim=True)
    else:                                       # one norm each over the whole matrix
        r_adam_norm, r_norm = whole.norm(r_adam), whole.norm(r_grad)
        grad_norm_sq = whole.sum(grad_norm_sq.sum())
    # s = ||R~|| / ||R||; a channel whose projected gradient is exactly 0 gets s = 0
    s = torch.where(r_norm > 0, r_adam_norm / r_norm, 0.0)
    coeff = s * math.sqrt(alpha)                                   # U = sqrt(alpha) G_t diag(s)
    norm_sq = (coeff.square() * grad_norm_sq).sum()                # ||U||^2, without forming U
    if granularity == "channel":
        norm_sq = whole.sum(norm_sq)                               # over every channel
    norm = norm_sq.sqrt()
    limiter = torch.where(update_norm > 0,                         # growth over gamma, >= 1
                          (norm / (MAX_NORM_GROWTH * update_norm)).clamp_(min=1.0), 1.0)
    coeff = coeff / limiter                                        # U <- U / limiter
    update_norm.copy_(norm / limiter)                              # ||U_t||, for step t + 1
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)                          # theta <- theta - lr*wd*theta
    param.addcmul_(grad, coeff * lr, value=-1)                     # theta_t <- theta - lr U
    return coeff


class Apollo(BaseOptimizer):
    r"""APOLLO: AdamW's moments kept in a random low-rank space, used only to scale the gradient.

    Zhu et al., "APOLLO: SGD-like Memory, AdamW-level Performance", MLSys 2025, arXiv 2412.05270
    (Algorithm 1; official package apollo-torch 1.0.3, file apollo_torch/apollo.py).

    .. code-block:: text

        input: lr (eta), betas (b1, b2), eps, weight_decay (lambda), rank r, alpha,
               update_proj_gap (T); a matrix W with gradient G, projected along its
               smaller dimension k (the other one, N, holds the channels)
        init:  m_0 <- 0, v_0 <- 0 (both r x N), ||U_0|| <- none
        for t = 1, 2, ...:
            if (t - 1) mod T = 0:                       # also at t = 1
                P <- N(0, 1/r)^{r x k}, from the seed (parameter seed, (t - 1) // T)
            R_t     <- P G_t                            # G_t P^T when k is the columns
            m_t     <- b1 m_{t-1} + (1 - b1) R_t
            v_t     <- b2 v_{t-1} + (1 - b2) R_t^2
            R~_t    <- (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)
            s       <- ||R~_t[:, j]|| / ||R_t[:, j]|| for each channel j     # APOLLO
                       ||R~_t|| / ||R_t||                                    # APOLLO-Mini
            U_t     <- sqrt(alpha) G_t diag(s)
            if ||U_t|| > 1.01 ||U_{t-1}||:  U_t <- U_t * 1.01 ||U_{t-1}|| / ||U_t||
            theta   <- theta_{t-1} - eta lambda theta_{t-1}                 # decoupled decay
            theta_t <- theta - eta U_t

    A channel is a row or column along the dimension that is not projected (N): the moments
    estimate, per channel, how much AdamW would shrink or stretch the gradient, and the full-rank
    gradient is scaled by that amount. Every other tensor (embeddings, head, norms, biases) gets
    plain AdamW (`adamw_update`), as the official code does outside its APOLLO group. P is
    redrawn every T steps from a seed and never stored; it is cached outside `self.state`
    (r x k floats per matrix, rebuilt lazily, e.g. after load_state_dict).

    Args:
        params: parameters, (name, parameter) pairs, or param group dicts.
        lr, betas, eps, weight_decay: as AdamW (also for the tensors that are not projected).
        granularity: "channel" (APOLLO: s per channel) or "tensor" (APOLLO-Mini: one s).
        rank: r, an int >= 1, capped at each matrix's smaller dimension; None: a quarter of it.
        alpha: > 0, the paper's scaling factor; the update is multiplied by sqrt(alpha).
        update_proj_gap: T >= 1, steps between regenerations of P.
        proj_seed: int >= 0; the seed of a parameter is proj_seed + its index over all groups.
        projected: the parameters to project (each must be 2-D); None: every 2-D parameter.
            Each parameter's flag is stored in its param group ("projected", aligned with
            "params"): it travels with state_dict().
        fused: compile `apollo_update` and the AdamW part (True), step eagerly (False), or
            where it pays (None), as AdamW's.

    Deliberate differences from apollo-torch 1.0.3: docs/optimizers.md.
    """

    float16_params = False
    _caches = {"_projections": dict}

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2,
                 granularity="channel", rank=None, alpha=1.0, update_proj_gap=200, proj_seed=0,
                 projected=None, fused=None):
        self._projected = None if projected is None else set(projected)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        granularity=granularity, rank=rank, alpha=alpha,
                        update_proj_gap=update_proj_gap, proj_seed=proj_seed, fused=fused)
        super().__init__(params, defaults)
        self._projections = {}      # param -> ((seed, regeneration, rank), P); not state

    @staticmethod
    def _check_group(group):
        AdamW._check_group(group)
        check_one_of("granularity", group["granularity"], GRANULARITIES)
        if group["rank"] is not None:
            check_int("rank", group["rank"], 1)         # None: a quarter of each matrix's width
        check_range("alpha", group["alpha"], 0.0, low_open=True)
        check_int("update_proj_gap", group["update_proj_gap"], 1)
        check_int("proj_seed", group["proj_seed"], 0)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._set_per_param("projected", lambda p, name, given: matrix_flag(
            self._projected, p, given, "projected"))

    def projection(self, p, group):
        """P for parameter p of param group `group` at p's current step (a cache hit unless the
        seed, the regeneration index or the rank changed)."""
        state = self.state[p]
        key = (state["seed"], (state["step"] - 1) // group["update_proj_gap"],
               projection_rank(group["rank"], p.shape))
        cached = self._projections.get(p)
        if cached is None or cached[0] != key:
            seed, regeneration, rank = key
            proj = random_projection(rank, min(p.shape), seed, regeneration)
            cached = self._projections[p] = (key, proj.to(p.device, p.dtype))
        return cached[1]

    def _update(self):
        first_index = 0             # index of the group's first param over all groups (seeds)
        for gi, group in enumerate(self.param_groups):
            calls = []
            for i, p, grad, state in matrices_then_adamw(self, gi, group, "projected"):
                channel_dim = 0 if p.shape[0] >= p.shape[1] else 1
                if not state:   # a parameter's slicing is fixed: checked once, with its state
                    require_sliced_along(p, channel_dim, f"Apollo: {param_name(group, gi, i)}",
                                         "APOLLO projects the other dimension")
                    rank = projection_rank(group["rank"], p.shape)
                    rows, cols = local(p).shape                 # this rank's channels
                    shape = (rows, rank) if channel_dim == 0 else (rank, cols)
                    zeros = dict(dtype=p.dtype, device=p.device)
                    state["step"] = 0
                    state["seed"] = group["proj_seed"] + first_index + i
                    state["exp_avg"] = sliced_state(p, torch.zeros(shape, **zeros))     # m of R
                    state["exp_avg_sq"] = sliced_state(p, torch.zeros(shape, **zeros))  # v of R
                    state["update_norm"] = replicated_state(p, torch.zeros((), **zeros))  # ||U||
                state["step"] += 1
                calls.append(((p, grad, self.projection(p, group), state["exp_avg"],
                               state["exp_avg_sq"], state["update_norm"], channel_dim),
                              adam_step_numbers(state["step"], group["lr"], *group["betas"])))
            hparams = dict(adam_hparams(group), alpha=group["alpha"],
                             granularity=group["granularity"])
            # above rank 1 one matrix at a time: compiled as one graph, the projected
            # temporaries (R, R~: half a matrix at rank k / 4) of every matrix would be alive
            for part in [calls] if group["rank"] == 1 else [[call] for call in calls]:
                self.run_update(group, part, hparams, apollo_update)
            first_index += len(group["params"])


def apollo(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, rank=None,
           alpha=1.0, update_proj_gap=200, proj_seed=0, projected=None, fused=None):
    """APOLLO: channel-wise scaling, alpha 1, rank None (a quarter of each matrix's smaller
    dimension, where the paper's LLaMA runs use 256 on widths 512-2048). See `Apollo`."""
    return Apollo(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                  granularity="channel", rank=rank, alpha=alpha, update_proj_gap=update_proj_gap,
                  proj_seed=proj_seed, projected=projected, fused=fused)


def apollo_mini(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, rank=1,
                alpha=128.0, update_proj_gap=200, proj_seed=0, projected=None, fused=None):
    """APOLLO-Mini: tensor-wise scaling, rank 1, alpha 128 (the paper's). See `Apollo`."""
    return Apollo(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                  granularity="tensor", rank=rank, alpha=alpha, update_proj_gap=update_proj_gap,
                  proj_seed=proj_seed, projected=projected, fused=fused)


# =============================================================================================
# Muon: Jordan et al. 2024 (github.com/KellerJordan/Muon); Liu et al., "Muon is Scalable for LLM
# Training", 2025, arXiv 2502.16982

MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)    # (a, b, c) of Jordan et al.'s quintic
MUON_LR_RULES = ("match_rms_adamw", "original")
NS_COLUMN_SLICE = 256      # on a CPU, X <- a X + B X runs in place this many columns at a time


def newton_schulz(g, steps, coefficients=MUON_NS_COEFFICIENTS, eps=1e-7, overwrite=False):
    """An approximately orthogonal matrix with g's singular vectors: for g = U S V^T, about
    U S' V^T with S' between ~0.7 and ~1.2, from `steps` quintic Newton-Schulz iterations in
    bfloat16 (the polynomial's coefficients trade exactness for speed; Jordan et al. 2024).
    overwrite=True: g is a bfloat16 matrix its caller no longer needs (Muon's Nesterov blend),
    and X is normalised in it where it is row-major on the wide side, instead of in a copy."""
    a, b, c = coefficients
    tall = g.shape[0] > g.shape[1]
    x = g.bfloat16()
    x = x.T if tall else x                  # iterate on the wide side: X X^T is the small Gram
    norm = x.norm().clamp(min=eps)          # ||X||_2 <= ||X||_F = 1: inside the convergence range
    # X row-major and ours to write (on a CPU the loop writes it in place; on X^T's strides the
    # products would copy their operands): g's bfloat16 copy, or g itself with overwrite=True
    if x.is_contiguous() and (overwrite or g.dtype != torch.bfloat16):
        x.div_(norm)
    else:
        x = torch.div(x, norm, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
    for _ in range(steps):
        gram = x @ x.T                                          # A = X X^T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)   # B = b A + c A^2
        if x.device.type != "cpu":
            x = torch.addmm(x, poly, x, beta=a)                 # X <- a X + B X
            continue
        # the same in place, a slice of columns at a time (a column of B X needs only that
        # column of X): no second matrix-sized X. On a GPU each slice would be a launch.
        for cols in x.split(NS_COLUMN_SLICE, dim=1):
            cols.copy_(torch.addmm(cols, poly, cols, beta=a))
    return x.T if tall else x


def muon_lr_ratio(shape, rule):
    """How Muon scales the lr for a (rows x cols) matrix. "match_rms_adamw" (Liu et al. 2025):
    0.2 sqrt(max(rows, cols)), which gives the update the RMS of a typical AdamW update, so Muon
    can share AdamW's lr and weight decay; "original" (Jordan et al.): sqrt(max(1, rows / cols))."""
    rows, cols = shape[:2]
    if rule == "original":
        return math.sqrt(max(1, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


def muon_update(param, grad, buf, *, lr, momentum, nesterov, weight_decay, ns_steps,
                ns_coefficients, ns_eps, lr_rule, whole=WHOLE):
    """One Muon step for one matrix, in place; buf is the momentum B. Newton-Schulz needs the
    whole update matrix (`whole.gather`: a sharded matrix's slices, gathered on every rank), of
    which this tensor keeps its own part."""
    buf.lerp_(grad, 1 - momentum)                                # B_t = mu B + (1 - mu) g_t
    if nesterov:        # (1 - mu) g_t + mu B_t, in Newton-Schulz's dtype and layout (its X)
        rows, cols = buf.shape
        update = (torch.empty(cols, rows, dtype=torch.bfloat16, device=buf.device).T
                  if rows > cols else torch.empty_like(buf, dtype=torch.bfloat16))
        for g, b, u in row_slices(grad, buf, update):
            torch.lerp(g, b, momentum, out=u)
    else:
        update = buf                                             # or B_t
    ortho = whole.own_part(newton_schulz(whole.gather(update), steps=ns_steps,   # O_t = NS(.)
                                         coefficients=ns_coefficients, eps=ns_eps,
                                         overwrite=nesterov))
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)                        # theta <- theta (1 - lr wd)
    ratio = muon_lr_ratio(whole.shape(param), lr_rule)           # of the whole matrix
    for p, o in row_slices(param, ortho):
        p.add_(o, alpha=-lr * ratio)                             # theta -= lr r O_t


class Muon(BaseOptimizer):
    r"""Muon: momentum, then the update orthogonalised by Newton-Schulz, for hidden matrices.

    Jordan et al., "Muon: An optimizer for hidden layers in neural networks", 2024 (blog post
    and github.com/KellerJordan/Muon); Liu et al., "Muon is Scalable for LLM Training", 2025,
    arXiv 2502.16982 (the lr ratio that lets it share AdamW's lr and weight decay). Pinned to
    torch.optim.Muon.

    .. code-block:: text

        input: lr (eta), momentum (mu), nesterov, weight_decay (lambda), ns_steps (k),
               (a, b, c); a hidden matrix W (rows x cols) with gradient g
        init:  B_0 <- 0
        for t = 1, 2, ...:
            B_t   <- mu B_{t-1} + (1 - mu) g_t
            M_t   <- (1 - mu) g_t + mu B_t   if nesterov   else B_t
            X     <- M_t / ||M_t||_F  (transposed if tall, in bfloat16)
            k times:  A <- X X^T;  X <- a X + (b A + c A^2) X        # Newton-Schulz
            theta <- theta_{t-1} (1 - eta lambda)                     # decoupled weight decay
            theta_t <- theta - eta r X,  r = 0.2 sqrt(max(rows, cols))   ("match_rms_adamw")
                                           or sqrt(max(1, rows / cols))   ("original")

    Muon updates the parameters flagged "orthogonalized" (`build_optimizer`: the attention and
    MLP matrices, PROJECTED_KINDS); every other tensor (embeddings, head, norms, biases) takes
    an AdamW step with the same lr and weight decay and `betas`, `eps`, in the same object. A
    fused [Q; K; V] weight is orthogonalised as one matrix, as torch.optim.Muon does. State: B
    per matrix (|theta|), AdamW's m and v for the rest.

    Args:
        params: parameters, (name, parameter) pairs, or param group dicts.
        lr, weight_decay: shared by the Muon and the AdamW parts (with "match_rms_adamw").
        momentum: mu in [0, 1) (0.95, as the references).
        nesterov: use the Nesterov blend M_t (default, as the references).
        ns_steps, ns_coefficients, ns_eps: the Newton-Schulz iteration (5, Jordan's (a, b, c),
            the floor of ||M||_F).
        lr_rule: "match_rms_adamw" (default) or "original", torch's adjust_lr_fn.
        betas, eps: the AdamW part's. A momentum schedule (OneCycleLR's cycle_momentum) finds
            betas in the groups and so cycles betas[0], the AdamW part's beta1, and leaves mu
            as it is (torch.optim.Muon has no betas: there it cycles mu); to schedule mu, set
            group["momentum"] in a scheduler of your own.
        orthogonalized: the matrices Muon updates; None: every 2-D parameter. Each parameter's
            flag is stored in its param group ("orthogonalized"): it travels with state_dict().

    Deliberate differences from torch.optim.Muon: docs/optimizers.md.
    """

    float16_params = False

    def __init__(self, params, lr=1e-3, momentum=0.95, nesterov=True, weight_decay=0.1,
                 ns_steps=5, ns_coefficients=MUON_NS_COEFFICIENTS, ns_eps=1e-7,
                 lr_rule="match_rms_adamw", betas=(0.9, 0.95), eps=1e-8, orthogonalized=None):
        self._orthogonalized = None if orthogonalized is None else set(orthogonalized)
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients),
                        ns_eps=ns_eps, lr_rule=lr_rule, betas=tuple(betas), eps=eps)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group):
        check_adam_hparams(group)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_int("ns_steps", group["ns_steps"], 1)
        check_range("ns_eps", group["ns_eps"], 0.0)
        check_one_of("lr_rule", group["lr_rule"], MUON_LR_RULES)
        if len(group["ns_coefficients"]) != 3:
            raise ValueError(f"ns_coefficients must be (a, b, c), got {group['ns_coefficients']}")

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._set_per_param("orthogonalized", lambda p, name, given: matrix_flag(
            self._orthogonalized, p, given, "orthogonalized"))

    def _update(self):
        for gi, group in enumerate(self.param_groups):
            calls = []
            for _, p, grad, state in matrices_then_adamw(self, gi, group, "orthogonalized"):
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)   # B, momentum
                calls.append(((p, grad, state["momentum_buffer"]), {}))
            self.run_update(group, calls, dict(
                lr=group["lr"], momentum=group["momentum"], nesterov=group["nesterov"],
                weight_decay=group["weight_decay"], ns_steps=group["ns_steps"],
                ns_coefficients=group["ns_coefficients"], ns_eps=group["ns_eps"],
                lr_rule=group["lr_rule"]), muon_update)


# =============================================================================================
# Adafactor: Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost",
# ICML 2018, arXiv 1804.04235

def adafactor_step_numbers(step, lr, beta2_decay):
    """The numbers of Adafactor's step t: lr, 1 - b2_t = t^beta2_decay and the relative step
    size rho_t = min(lr, 1 / sqrt(t)) (and eps1, which the optimizer adds: it follows the dtype)."""
    return dict(lr=lr, beta2_complement=step ** beta2_decay, rho=min(lr, 1 / math.sqrt(step)))


def adafactor_update(param, grad, row_v, col_v, v, *, lr, beta2_complement, rho, eps1, eps2, d,
                     weight_decay, whole=WHOLE):
    """One Adafactor step for one tensor, in place, with step t's `adafactor_step_numbers`. A
    matrix (or a stack of them: the last two dimensions) keeps row_v (..., R, 1) and col_v
    (..., 1, C), v is None; a vector keeps v. Returns the step alpha_t / clip and a matrix's row
    and column factors of 1 / sqrt(v_hat) (compiled, a result of the graph is computed once, not
    for every element)."""
    n = whole.numel(param)
    rms = whole.norm_by_rows(param) / math.sqrt(n)
    alpha = rms.clamp(min=eps2) * rho                            # max(eps2, RMS(theta)) rho
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)                        # theta <- theta (1 - lr wd)
    if v is None:                                                # factored second moment
        rows_sq = torch.linalg.vector_norm(grad, dim=-1, keepdim=True).square_()
        cols_sq = torch.linalg.vector_norm(grad, dim=-2, keepdim=True).square_()
        rows_sq, cols_sq = whole.sum_along(rows_sq, -1), whole.sum_along(cols_sq, -2)
        n_rows, n_cols = whole.shape(grad)[-2:]
        row_v.lerp_(rows_sq.div_(n_cols), beta2_complement)      # R_t: mean over columns of g^2
        col_v.lerp_(cols_sq.div_(n_rows), beta2_complement)      # C_t: mean over rows of g^2
        row_mean = whole.mean_along(row_v, -2)
        # 1 / sqrt(v_hat) = 1 / sqrt(R C / mean(R)) factors as v_hat does: a square root per
        # row and per column, none per element (a sqrt and a division per element bound the
        # compiled step on a CPU by its vector unit, not by memory)
        factors = ((row_v / row_mean.clamp_(min=eps1)).rsqrt_(), col_v.rsqrt())
        rsqrt_v_hat = factors[0] * factors[1]
    else:
        v.lerp_(grad * grad, beta2_complement)                   # v_t, unfactored
        factors = ()
        rsqrt_v_hat = v.rsqrt()
    # U = g / sqrt(max(v_hat, eps1^2)), the floor as a cap on 1 / sqrt(v_hat)
    update = rsqrt_v_hat.clamp_(max=1 / eps1).mul_(grad)
    clip = (whole.norm_by_rows(update) / (math.sqrt(n) * d)).clamp(min=1.0)   # max(1, RMS(U) / d)
    step_size = alpha / clip
    param.sub_(update * step_size)                               # theta_t <- theta - alpha U / clip
    return step_size, *factors


class Adafactor(BaseOptimizer):
    r"""Adafactor: Adam's second moment factored into row and column statistics, no momentum.

    Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost", ICML 2018,
    arXiv 1804.04235 (Algorithms 4 and 5, with relative step sizes and update clipping). Pinned to
    torch.optim.Adafactor, whose variant (beta2 decay t^-0.8, no momentum, RMS of the parameter
    as the step's scale) this is.

    .. code-block:: text

        input: lr (rho_max), beta2_decay (-0.8), eps1, eps2, d, weight_decay (lambda)
        for t = 1, 2, ...:
            b2_hat <- 1 - t^beta2_decay;  rho_t <- min(lr, 1 / sqrt(t))
            alpha_t <- max(eps2, RMS(theta_{t-1})) rho_t
            theta <- theta_{t-1} (1 - lr lambda)
            for a matrix (the last two dims):
                R_t <- b2_hat R_{t-1} + (1 - b2_hat) mean_cols(g_t^2)      # one per row
                C_t <- b2_hat C_{t-1} + (1 - b2_hat) mean_rows(g_t^2)      # one per column
                v_hat <- R_t C_t / mean(R_t)
            for a vector:  v_hat <- v_t = b2_hat v_{t-1} + (1 - b2_hat) g_t^2
            U_t <- g_t / sqrt(max(v_hat, eps1^2))
            theta_t <- theta - alpha_t U_t / max(1, RMS(U_t) / d)

    State: R and C (rows + columns floats) per matrix, v per vector, a step count.

    Args:
        params: parameters, (name, parameter) pairs, or param group dicts.
        lr: rho_max, the cap of the relative step size (1e-2, torch's default).
        beta2_decay: <= 0; 1 - b2_hat = t^beta2_decay.
        eps: (eps1, eps2): eps1 the floor of v_hat's square root (None: the dtype's machine
            epsilon), eps2 the floor of RMS(theta).
        d: >= 1, the update clipping threshold.
        weight_decay: lambda, >= 0, applied as theta *= 1 - lr lambda.
        fused: compile `adafactor_update` (True), step eagerly (False), or where it pays (None),
            as AdamW's.

    Deliberate differences from torch.optim.Adafactor: docs/optimizers.md.
    """

    float16_params = False

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, fused=None):
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d,
                        weight_decay=weight_decay, fused=fused)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group):
        check_lr_and_decay(group)
        check_fused(group)
        check_range("beta2_decay", group["beta2_decay"], -math.inf, 0.0)
        eps1, eps2 = group["eps"]
        if eps1 is not None:
            check_range("eps[0]", eps1, 0.0)
        check_range("eps[1]", eps2, 0.0)
        check_range("d", group["d"], 1.0)

    def _update(self):
        for gi, group in enumerate(self.param_groups):
            eps1, eps2 = group["eps"]
            calls = []
            for _, p, grad in params_with_grad(self, gi, group):
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if p.dim() >= 2:
                        state["row_var"] = reduced_zeros(p, -1)     # R
                        state["col_var"] = reduced_zeros(p, -2)     # C
                    else:
                        state["variance"] = torch.zeros_like(p)     # v
                state["step"] += 1
                step_numbers = adafactor_step_numbers(state["step"], group["lr"],
                                                      group["beta2_decay"])
                step_numbers["eps1"] = torch.finfo(p.dtype).eps if eps1 is None else eps1
                calls.append(((p, grad, state.get("row_var"), state.get("col_var"),
                               state.get("variance")), step_numbers))
            self.run_update(group, calls, dict(eps2=eps2, d=group["d"],
                                               weight_decay=group["weight_decay"]),
                            adafactor_update)


# =============================================================================================
# Per-example optimizers: steps from statistics over the examples of a batch (Roulet & Agarwala
# 2025, arXiv 2510.00236)

SIGN_PLACEMENTS = ("sign_of_mean", "mean_of_signs", "signum")
PRECONDITIONERS = ("batch", "mean_sq", "variance", "second_moment")


def per_example_sign_update(param, mean, sign_mean, m, *, lr, momentum, weight_decay,
                            placement):
    """One sign-SGD step for one tensor, in place: mean and sign_mean are the batch's mean
    gradient and mean per-example sign (`per_example.batch_statistics`), m the momentum."""
    if placement == "signum":                       # the sign after momentum
        m.lerp_(mean, 1 - momentum)                 # m_t = mu m + (1 - mu) g
        direction = m.sign()                        # sign(m_t)
    else:                                           # the sign before momentum, of the mean or
        signs = mean.sign() if placement == "sign_of_mean" else sign_mean   # of each example
        m.lerp_(signs, 1 - momentum)                # m_t = mu m + (1 - mu) signs
        direction = m
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)           # theta <- theta (1 - lr wd)
    param.sub_(direction, alpha=lr)                 # theta_t <- theta - lr direction


def per_example_v_term(mean, sq_mean, n, preconditioner):
    """What Adam's second moment averages at this step, per element, from the batch's mean
    gradient g, mean square q = (1/n) sum_i g_i^2 and size n. With s^2 = n / (n - 1) (q - g^2)
    the examples' unbiased variance (0 for n = 1), g^2 = (g^2 - s^2 / n) + s^2 / n splits Adam's
    term into an unbiased estimate of the squared mean gradient and the variance of the mean:
      "batch"          g^2                (Adam)
      "mean_sq"        g^2 - s^2 / n      (the mean part only; may be negative)
      "variance"       s^2 / n            (the variance part only)
      "second_moment"  q = mu^2 + sigma^2 (the examples' own second moment)"""
    if preconditioner == "batch":
        return mean * mean
    if preconditioner == "second_moment":
        return sq_mean.clone()
    var_of_mean = (sq_mean - mean * mean) / (n - 1) if n > 1 else torch.zeros_like(mean)
    return mean * mean - var_of_mean if preconditioner == "mean_sq" else var_of_mean


def per_example_adam_update(param, mean, sq_mean, m, v, n, *, lr, bias_correction1,
                            bias_correction2_sqrt, beta1, beta2, eps, weight_decay,
                            preconditioner):
    """One Adam step for one tensor, in place, whose second moment averages
    `per_example_v_term` (a negative v, possible with "mean_sq", counts as 0)."""
    m.lerp_(mean, 1 - beta1)                                    # m_t = b1 m + (1 - b1) g
    v.mul_(beta2).add_(per_example_v_term(mean, sq_mean, n, preconditioner),
                       alpha=1 - beta2)                         # v_t = b2 v + (1 - b2) term
    denom = (v.clamp(min=0).sqrt() / bias_correction2_sqrt).add_(eps)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)                       # theta <- theta - lr*wd*theta
    param.addcdiv_(m, denom, value=-lr / bias_correction1)      # theta -= lr * m_hat / denom


class PerExampleSignSGD(PerExampleOptimizer):
    r"""Sign-SGD with momentum, the sign placed where `placement` says (arXiv 2510.00236, sec. 4).

    .. code-block:: text

        input: lr (eta), momentum (mu), weight_decay (lambda), placement; per step the batch's
               mean gradient g and per-example gradients g_i (i = 1 .. B)
        for t = 1, 2, ...:
            "sign_of_mean":   m_t <- mu m_{t-1} + (1 - mu) sign(g);            d <- m_t
            "mean_of_signs":  m_t <- mu m_{t-1} + (1 - mu) (1/B) sum_i sign(g_i); d <- m_t
            "signum":         m_t <- mu m_{t-1} + (1 - mu) g;                  d <- sign(m_t)
            theta_t <- theta_{t-1} (1 - eta lambda) - eta d

    With B = 1 "sign_of_mean" and "mean_of_signs" are the same step. The mean of signs is
    +-1 where the examples agree and near 0 where their signs are noise: a per-element
    signal-to-noise weighting the sign of the mean does not have. State: m (|theta|).
    """

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0,
                 placement="mean_of_signs"):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      placement=placement))

    @staticmethod
    def _check_group(group):
        check_lr_and_decay(group)
        check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        check_one_of("placement", group["placement"], SIGN_PLACEMENTS)

    def _update(self, statistics):
        for group, p, state, mean, _, sign_mean in self._rows(statistics):
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            per_example_sign_update(p, mean, sign_mean, state["momentum_buffer"],
                                    lr=group["lr"], momentum=group["momentum"],
                                    weight_decay=group["weight_decay"],
                                    placement=group["placement"])


class PerExampleAdam(PerExampleOptimizer):
    r"""AdamW whose second moment is built from per-example statistics (arXiv 2510.00236,
    sec. 5): Adam's g^2 split into its mean part and its variance part, or replaced by the
    examples' own second moment (`per_example_v_term`).

    .. code-block:: text

        input: lr, betas (b1, b2), eps, weight_decay (lambda), preconditioner; per step the
               batch's mean gradient g, q = (1/B) sum_i g_i^2 and s^2 = B/(B-1) (q - g^2)
        term <- g^2 ("batch": Adam) | g^2 - s^2/B ("mean_sq") | s^2/B ("variance") | q
        m_t <- b1 m + (1 - b1) g;  v_t <- b2 v + (1 - b2) term
        theta_t <- theta (1 - lr lambda) - lr m_t / (1 - b1^t) / (sqrt(max(v_t, 0) / (1 - b2^t))
                   + eps)

    "mean_sq" + "variance" = "batch" exactly (so their v add up to Adam's); with every example's
    gradient equal, "mean_sq", "batch" and "second_moment" are Adam. Where the mean gradient is
    below its noise, "mean_sq"'s v is 0 (and "variance"'s where there is no noise): the step is
    then lr m / eps, so these want an eps near the gradients' scale: the default is 1e-6, not
    Adam's 1e-8. State: m, v (AdamW's).
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-6, weight_decay=1e-2,
                 preconditioner="second_moment"):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps,
                                      weight_decay=weight_decay, preconditioner=preconditioner))

    @staticmethod
    def _check_group(group):
        check_adam_hparams(group)
        check_one_of("preconditioner", group["preconditioner"], PRECONDITIONERS)

    def _update(self, statistics):
        for group, p, state, mean, sq_mean, _ in self._rows(statistics):
            if not state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            per_example_adam_update(
                p, mean, sq_mean, state["exp_avg"], state["exp_avg_sq"], statistics.n,
                **adam_step_numbers(state["step"], group["lr"], *group["betas"]),
                **adam_hparams(group), preconditioner=group["preconditioner"])


# =============================================================================================
# The optimizers by name: what the trainers' --optimizer takes

OPTIMIZERS = {"adamw": AdamW, "sgd_sai": SGDSaI, "adam_mini": AdamMini, "apollo": apollo,
              "apollo_mini": apollo_mini, "muon": Muon, "adafactor": Adafactor}
# Their step takes the batch's per-example statistics (per_example.batch_statistics), not .grad
# alone: the trainers compute them for these (GPT only), and "all" leaves them out.
PER_EXAMPLE_OPTIMIZERS = {"sign_sgd": PerExampleSignSGD, "adam_pe": PerExampleAdam}


def build_optimizer(name, model, log=None, kinds=None, **hparams):
    """Optimizer `name` for `model`, as both trainers build it (engine/build.py).

    The params go in `decay_groups` with their names, so errors name them. Adam-mini gets its
    partition from `block_rules(model)`, APOLLO, APOLLO-Mini and Muon their matrices from
    `projected_params(model)`; `log` (e.g. print) is given the table, which says whether the
    parameter kinds were declared or guessed; `kinds` ({parameter: kind}, e.g.
    {model.out.weight: "head"}) replaces the kinds of those parameters (KIND_RULES lists the
    kinds). Adam-mini without a single Q/K split warns; APOLLO or Muon with no matrix is a
    ValueError. `hparams` are the optimizer's own keyword arguments; one it does not take is a
    TypeError listing those it does.
    """
    return build(OPTIMIZERS | PER_EXAMPLE_OPTIMIZERS, name, model, log, kinds, **hparams)
