"""
Memory-efficient optimizers side by side: AdamW, SGD-SaI, Adam-mini, APOLLO, APOLLO-Mini, and the
baselines Muon and Adafactor.

Each optimizer is one pure update function (the math, testable on its own) under a thin
torch.optim.Optimizer class (state bookkeeping only). What each keeps per parameter tensor theta
(APOLLO: per projected k x N matrix, k <= N, at rank r; its other tensors keep AdamW's state):

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

What every optimizer here does on any model (tests/test_foreign_models.py): a parameter whose
.grad is None is skipped (no state, no update, no weight decay); lr = 0 leaves a group unchanged;
all-zero gradients move nothing. A NaN or Inf gradient is written into the tensor that has it
(Adam-mini: its block; APOLLO: its matrix) and nowhere else, as in torch.optim; SGD-SaI raises
instead at the step that freezes its scale (the trainers stop on a non-finite loss before any
step). State takes the parameter's dtype: bfloat16 parameters work (SGD-SaI's scales stay
float32); float16 parameters are refused by AdamW, Adam-mini and APOLLO, whose eps and small
second moments underflow there, and accepted by SGD-SaI. Keep float32 parameters under
bfloat16 / float16 autocast for the best of both, as the trainers do.

Speed: AdamW, SGD-SaI, Adam-mini, APOLLO and Adafactor take `fused=`: their update function, as
written, compiled by torch.compile into one pass over memory per tensor (by default where it
pays; see FUSED_MIN_NUMEL); eager, the same function runs op by op.

Everything that knows optimizer names is at the bottom: `build_optimizer` (what the trainers
call), `trainer_hparams` (their options -> each optimizer's arguments), the parameter kinds
behind Adam-mini's partition and APOLLO's projected set (declared by a model, or guessed).
"""
import inspect
import math
import warnings
from itertools import chain
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate
from torch.optim import Optimizer


def _check_range(name, value, low, high=math.inf, high_open=False, low_open=False):
    """Raise a ValueError naming the argument, its value and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    ok = (low < value if low_open else low <= value) and \
        (value < high if high_open else value <= high)
    if not ok:  # also catches NaN, which fails every comparison
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} is outside the allowed range "
                         f"{left}{low}, {high}{right}")


def _check_int(name, value, low):
    """Raise a ValueError naming the argument and its value unless it is an int >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is not allowed: it must be an int >= {low}")


def _check_one_of(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def _check_lr_and_decay(group):
    """lr and weight_decay, which every optimizer here takes: >= 0."""
    _check_range("lr", group["lr"], 0.0)
    _check_range("weight_decay", group["weight_decay"], 0.0)


def _check_adam_hparams(group):
    """lr, betas, eps and weight_decay, as AdamW, Adam-mini, APOLLO and Muon take them."""
    _check_lr_and_decay(group)
    _check_range("eps", group["eps"], 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    _check_range("betas[0]", betas[0], 0.0, 1.0, high_open=True)
    _check_range("betas[1]", betas[1], 0.0, 1.0, high_open=True)


def _param_name(group, group_index, i):
    names = group.get("param_names")
    return names[i] if names else f"param_groups[{group_index}]['params'][{i}]"


def _params_with_grad(optimizer, group_index, group):
    """Yield (index, param, grad) for the params of a group that have a gradient."""
    for i, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise ValueError(f"{type(optimizer).__name__}: {_param_name(group, group_index, i)} "
                             "has a sparse gradient, which is not supported; use dense "
                             "gradients (nn.Embedding(sparse=False))")
        yield i, p, p.grad


def _columns(rows):
    """[(a1, b1, ...), (a2, b2, ...)] -> [a1, a2], [b1, b2], ...: one tuple per tensor, as the
    optimizers gather them, turned into the lists a foreach update takes."""
    return [list(column) for column in zip(*rows)]


# Sharded parameters: under FSDP2 (torch.distributed.fsdp.fully_shard) a parameter, its gradient
# and the state made with zeros_like are DTensors, of which each rank holds a slice along one
# dimension. The update functions run on those slices (`_local`), which is exact for elementwise
# math; a statistic over a whole tensor or block (SGD-SaI's g-SNR, Adam-mini's block means,
# APOLLO's norms, Muon's orthogonalisation, Adafactor's factors) is summed over the ranks with
# an explicit all-reduce, named where it happens. Without FSDP every such step is skipped.

class Shard:
    """Where this rank's slice of a sharded tensor lies: indices start ... stop of dimension
    `dim` of the whole tensor (of shape `shape`, placed like `like`); `ranks` is the process
    group that holds the other slices."""

    def __init__(self, like):
        (placement,) = like.placements
        self.like, self.dim, self.shape = like, placement.dim, like.shape
        self.ranks = like.device_mesh.get_group()
        size = -(-self.shape[self.dim] // like.device_mesh.size())   # torch.chunk's split
        self.start = min(like.device_mesh.get_local_rank() * size, self.shape[self.dim])
        self.stop = self.start + like.to_local().shape[self.dim]

    def sum(self, x):
        """x (this rank's partial sums), summed over the ranks, in place."""
        dist.all_reduce(x, group=self.ranks)
        return x

    def whole(self, part):
        """The whole tensor of which `part` is this rank's slice (every rank gets it)."""
        return DTensor.from_local(part, self.like.device_mesh, self.like.placements,
                                  shape=self.shape, stride=self.like.stride()).full_tensor()


def shard_of(p):
    """p's Shard if p is a DTensor sliced along one dimension (FSDP2), else None (a plain
    tensor, or a DTensor every rank holds whole)."""
    if not isinstance(p, DTensor) or all(isinstance(q, Replicate) for q in p.placements):
        return None
    if len(p.placements) != 1 or not p.placements[0].is_shard():
        raise ValueError(f"a DTensor placed {p.placements} is not supported: the optimizers "
                         "here take FSDP2's one-dimensional sharding (Shard(dim) on a 1-D mesh)")
    return Shard(p)


def _local(t):
    """A DTensor's slice on this rank (a view: writing it writes the DTensor); others as they
    are."""
    return t.to_local() if isinstance(t, DTensor) else t


def _sharded_state(p, part):
    """A state tensor of p, given as this rank's `part`, sliced along p's sharded dimension as p
    is: a DTensor placed like p, so that torch.distributed.checkpoint's helpers gather and place
    it whole; `part` itself for a p that is not sharded."""
    shard = shard_of(p)
    if shard is None:
        return part
    shape = list(part.shape)
    shape[shard.dim] = p.shape[shard.dim]
    return DTensor.from_local(part, p.device_mesh, p.placements, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def _replicated_state(p, t):
    """A state tensor every rank keeps whole and equal (a replicated DTensor for a DTensor p)."""
    if not isinstance(p, DTensor):
        return t
    return DTensor.from_local(t, p.device_mesh, [Replicate()] * p.device_mesh.ndim,
                              run_check=False)


# The fused path: each optimizer's update function, as written, compiled by torch.compile into
# one graph per param group, in which inductor fuses each tensor's elementwise ops into one pass
# over memory (eager, AdamW's ops move ~3x the bytes). What changes every step (lr, bias
# corrections) goes in as 0-d tensors, not Python floats: a float becomes a constant of the
# graph, and a new value a recompile. A compile costs ~10 s per param group on a CPU, so by
# default (fused=None) an optimizer compiles only from FUSED_MIN_NUMEL parameters on, where the
# eager step costs a few ms (README, "Optimizer step time and memory").
FUSED_MIN_NUMEL = 2 ** 20
FUSED_DEVICES = ("cpu", "cuda")
# On a CPU, inductor fuses loops that share as little as 10 bytes: the 0-d step numbers every
# tensor reads then join the loops of same-shaped tensors (a GPT's layers) into one, with up to
# 8 tensors' memory streams at once, more than the prefetchers follow. Fused only where they share
# a KiB or more, each tensor is its own loop: at 85M parameters AdamW's step went from 1.06-1.10x
# to 1.03-1.04x torch's fused AdamW, Adam-mini's from 1.06-1.11x to 0.97-0.98x (README,
# "Optimizer step time and memory"). On a GPU a joint kernel saves launches: inductor's default.
# Inductor's size asserts re-check every input's shape and strides on each call, which dynamo's
# guards (dynamic=False) have already checked: ~50 us a step of a 39-tensor GPT, where torch's
# fused SGD takes ~60 us in all.
FUSED_COMPILE_OPTIONS = {"cpu": {"score_fusion_memory_threshold": 1024, "size_asserts": False},
                         "cuda": {"size_asserts": False}}
_compiled_update_each = {}   # device type: _update_each compiled for it


def _update_each(update, rows, numbers, constants):
    """update(*row, **row's numbers, **constants) for every row, and what each returned: the
    loop the fused path compiles (torch.compile unrolls it into one graph). An update returns
    a small tensor it scales by (APOLLO, Adafactor) so that, as an output of the graph, it is
    computed once: an intermediate would be inlined into, and recomputed by, every element."""
    return [update(*row, **row_numbers, **constants) for row, row_numbers in zip(rows, numbers)]


def _compiled(device_type):
    if device_type not in _compiled_update_each:
        # one graph per update function and param group shares _update_each's code object: let
        # a process hold more than torch's default 8 (several optimizers in a test or notebook)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_update_each[device_type] = torch.compile(
            _update_each, fullgraph=True, dynamic=False,
            options=FUSED_COMPILE_OPTIONS.get(device_type, {}))
    return _compiled_update_each[device_type]


def _number_tensors(numbers, device):
    """Each row's step numbers as 0-d float32 tensors on `device`, one tensor per distinct name
    and value (the rows of a group usually share a step). torch.full launches a fill, where
    torch.tensor(x, device="cuda") would copy from the host and wait for the GPU."""
    made = {}
    out = []
    for row_numbers in numbers:
        out.append({})
        for name, value in row_numbers.items():
            key = (name, float(value))
            if key not in made:
                made[key] = torch.full((), key[1], dtype=torch.float32, device=device)
            out[-1][name] = made[key]
    return out


# The eager foreach path steps its tensors in runs of about this many elements: its temporaries
# (AdamW's sqrt(v)) are then that small, not model-sized, and the allocator reuses them, where a
# model-sized one would be mapped afresh and page-faulted every step.
FOREACH_CHUNK_NUMEL = 2 ** 20


def _numel_chunks(rows, limit):
    """Runs of consecutive row indices whose tensors (row[0]) hold about `limit` elements (a
    bigger tensor is a run of its own)."""
    chunk, numel = [], 0
    for i, row in enumerate(rows):
        if chunk and numel + row[0].numel() > limit:
            yield chunk
            chunk, numel = [], 0
        chunk.append(i)
        numel += row[0].numel()
    if chunk:
        yield chunk


def _check_fused(group):
    if group.get("fused") not in (None, True, False):
        raise ValueError(f"fused must be None (compile where it pays), True or False, got "
                         f"{group['fused']!r}")


class _SandboxOptimizer(Optimizer):
    """Optimizer base: every param group (also one added later, or loaded) is checked by the
    subclass's `_check_group`, the closure is run, and each optimizer's `_update` does the step
    itself. Optimizers whose eps cannot live in float16 set float16_params = False."""

    float16_params = True
    fused_error = None      # why compiling failed here, once it has (the step is eager from then)
    _caches = {}            # attribute -> its empty value, for caches a copy does not carry

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        for i, p in enumerate(group["params"]):
            if p.is_complex():
                raise ValueError(
                    f"{type(self).__name__}: {_param_name(group, len(self.param_groups) - 1, i)} "
                    f"is complex ({p.dtype}), which these optimizers do not step; hold it as a "
                    "real parameter of its real and imaginary parts (torch.view_as_real) and "
                    "form the complex tensor in forward (torch.view_as_complex)")
            if p.dtype == torch.float16 and not self.float16_params:
                raise ValueError(
                    f"{type(self).__name__}: {_param_name(group, len(self.param_groups) - 1, i)} "
                    "is float16, where eps and small second moments underflow to 0 (and the "
                    "update to NaN or Inf); keep float32 (or bfloat16) parameters and train "
                    "under float16 autocast, as the trainers do")

    def __getstate__(self):
        """torch's Optimizer copies and pickles defaults, state and param_groups only: the
        settings a subclass keeps for later add_param_group calls (its attributes named _...)
        and a failed compile travel with them; a cache (APOLLO's projections) starts empty."""
        kept = {k: v for k, v in self.__dict__.items()
                if k.startswith("_") and not k.startswith("_optimizer_") and k not in self._caches}
        return {**super().__getstate__(), **kept, "fused_error": self.fused_error}

    def __setstate__(self, state):
        super().__setstate__(state)
        for name, empty in self._caches.items():
            setattr(self, name, empty())

    def load_state_dict(self, state_dict):
        """As torch's, and a saved group's hyperparameters are checked as given ones are (a
        KeyError names one that this version takes and the checkpoint lacks)."""
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            self._check_group(group)

    def _set_per_param(self, key, value_for):
        """A per-parameter setting (Adam-mini's block rule, APOLLO's projected flag) kept as a
        list in the newest group under group[key], aligned with "params", so it travels with
        state_dict(). A group that brings its own list keeps it: value_for(param, name, given)
        checks the given value (None when the group has none) and returns the one to keep; its
        ValueError is re-raised naming the parameter."""
        gi = len(self.param_groups) - 1
        group = self.param_groups[gi]
        given = group.get(key)
        if given is not None and (not isinstance(given, (list, tuple))
                                  or len(given) != len(group["params"])):
            raise ValueError(f"{type(self).__name__}: param_groups[{gi}][{key!r}] must be a list "
                             f"with one entry per parameter ({len(group['params'])}), got "
                             f"{given!r}")
        values = []
        for i, p in enumerate(group["params"]):
            name = _param_name(group, gi, i)
            try:
                values.append(value_for(p, name, None if given is None else given[i]))
            except ValueError as err:
                raise ValueError(f"{type(self).__name__}: {name}: {err}") from None
        group[key] = values

    def fused(self):
        """Whether steps run compiled: group["fused"] True or False, or None for "where it pays"
        (FUSED_MIN_NUMEL parameters or more, all on FUSED_DEVICES); False for good once a
        compile has failed here, and for sharded (DTensor) parameters, which step eagerly."""
        params = [p for group in self.param_groups for p in group["params"]]
        if self.fused_error is not None or any(isinstance(p, DTensor) for p in params):
            return False
        wanted = {group.get("fused", False) for group in self.param_groups}
        if wanted == {None}:
            return (sum(p.numel() for p in params) >= FUSED_MIN_NUMEL
                    and all(p.device.type in FUSED_DEVICES for p in params))
        return True in wanted

    def _step_rows(self, group, rows, constants, update, update_foreach=None):
        """One step for a param group's rows. A row is (tensors and fixed per-tensor values that
        `update` takes first, that tensor's step numbers: a dict of what changes every step);
        `constants` holds the group's other hyperparameters. Compiled if self.fused(), else all
        at once with update_foreach if group["foreach"], else row by row. If the compile fails
        (no C++ compiler, an unsupported device), one warning, and eager from then on. Sharded
        tensors are stepped through their local slices."""
        if not rows:
            return
        tensors, numbers = _columns(rows)
        if self.fused():   # never for sharded tensors (see fused): no local slices to take
            try:
                device = tensors[0][0].device
                _compiled(device.type)(update, tensors, _number_tensors(numbers, device),
                                       constants)
                return
            except Exception as err:   # compiling happens before any tensor is written
                self.fused_error = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
                warnings.warn(f"{type(self).__name__}: the fused (compiled) step is unavailable "
                              f"here ({self.fused_error}); stepping eagerly, as fused=False",
                              stacklevel=4)
        tensors = [[_local(t) for t in row] for row in tensors]
        if update_foreach is not None and group.get("foreach", True):
            for chunk in _numel_chunks(tensors, FOREACH_CHUNK_NUMEL):
                update_foreach(*_columns([tensors[i] for i in chunk]), **constants,
                               **{name: [numbers[i][name] for i in chunk] for name in numbers[0]})
        else:
            for row, row_numbers in zip(tensors, numbers):
                update(*row, **row_numbers, **constants)

    @torch.no_grad()
    def step(self, closure=None):
        """One step; `closure`, if given, re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update()
        return loss


# ---------------------------------------------------------------------------------------------
# AdamW

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


def adamw_update_foreach(params, grads, ms, vs, *, lr, bias_correction1, bias_correction2_sqrt,
                         beta1, beta2, eps, weight_decay):
    """adamw_update over lists of tensors with torch._foreach_* ops (the step's numbers are lists
    too, one per tensor), in torch.optim.AdamW's order of operations."""
    if weight_decay != 0:
        torch._foreach_mul_(params, [1 - x * weight_decay for x in lr])
    torch._foreach_lerp_(ms, grads, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    denoms = torch._foreach_sqrt(vs)
    torch._foreach_div_(denoms, bias_correction2_sqrt)
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, ms, denoms, [-x / b for x, b in zip(lr, bias_correction1)])


def _adamw_row(p, grad, state, group):
    """((param, grad, m, v), adam_step_numbers) of one tensor's AdamW step, its state created at
    its first gradient (AdamW's tensors, and the tensors APOLLO and Muon leave to AdamW)."""
    if not state:
        state["step"] = 0
        state["exp_avg"] = torch.zeros_like(p)      # m, first moment
        state["exp_avg_sq"] = torch.zeros_like(p)   # v, second moment
    state["step"] += 1
    return ((p, grad, state["exp_avg"], state["exp_avg_sq"]),
            adam_step_numbers(state["step"], group["lr"], *group["betas"]))


def _adam_constants(group):
    """The hyperparameters of an Adam-like step that are not step numbers."""
    beta1, beta2 = group["betas"]
    return dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])


def _matrices_then_adamw(optimizer, group_index, group, flag):
    """Yield (index, param, grad, state) of the params with a gradient that group[flag] marks as
    the optimizer's own matrices (APOLLO's projected, Muon's orthogonalized); the others
    (embeddings, head, norms, biases) take one AdamW step together once the loop has ended."""
    adamw_rows = []
    for i, p, grad in _params_with_grad(optimizer, group_index, group):
        if group[flag][i]:
            yield i, p, grad, optimizer.state[p]
        else:
            adamw_rows.append(_adamw_row(p, grad, optimizer.state[p], group))
    optimizer._step_rows(group, adamw_rows, _adam_constants(group), adamw_update,
                         adamw_update_foreach)


class AdamW(_SandboxOptimizer):
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
        foreach: when eager, the multi-tensor path (torch._foreach_*) instead of the per-tensor
            loop.

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
        _check_adam_hparams(group)
        _check_fused(group)

    def _update(self):
        for gi, group in enumerate(self.param_groups):
            rows = [_adamw_row(p, grad, self.state[p], group)
                    for _, p, grad in _params_with_grad(self, gi, group)]
            self._step_rows(group, rows, _adam_constants(group), adamw_update,
                            adamw_update_foreach)


# ---------------------------------------------------------------------------------------------
# SGD-SaI

SAI_RULES = ("gsnr", "gsnr_max", "sqrt_numel", "none")
# A block has no spread when std(g) <= ZERO_SPREAD_EPS * eps(dtype) * rms(g): differences at the
# level of the gradient's own rounding (a float32 constant computed in float32 shows a std of
# ~1e-7 of its value: noise, which would make g-SNR ~1e7). 8 float32 eps = 9.5e-7 of the rms.
ZERO_SPREAD_EPS = 8


def sai_scale(grad, rule, eps=1e-8):
    """The learning-rate scale s_i SGD-SaI freezes for one block, as a float32 0-d tensor.

    "gsnr" and "gsnr_max" return the raw g-SNR ||g||_2 / (std(g) + eps), std unbiased (the
    caller divides "gsnr_max" by the maximum over blocks). Since ||g||^2 = (n - 1) std^2 +
    n mean^2, g-SNR = sqrt((n - 1) + n mean^2 / std^2) (eps aside): at least sqrt(n - 1), and about
    sqrt(n) unless the block's mean gradient rivals its spread. The norm and std are reduced in
    float64 (no overflow for any finite gradient, no rounding noise of their own). A block with
    one element (std undefined) or no spread (std <= ZERO_SPREAD_EPS eps rms, see above; all
    zeros included) has no g-SNR; it gets sqrt(numel), the value g-SNR approximates for
    zero-mean gradients (scale 1 for a scalar).
    """
    _check_one_of("sai_rule", rule, SAI_RULES)
    n = grad.numel()                        # of the whole tensor, also when it is sharded
    sqrt_numel = torch.tensor(math.sqrt(n), dtype=torch.float32, device=grad.device)
    if rule == "none":
        return torch.ones_like(sqrt_numel)
    if rule == "sqrt_numel" or n == 1:
        return sqrt_numel
    # float64 where the device has it (MPS does not: there the once-per-block work is on the CPU)
    g = _local(grad).detach().to("cpu" if grad.device.type == "mps" else grad.device,
                                 torch.float64)
    shard = shard_of(grad)
    if shard is None:
        norm, std = g.norm(), g.std()
    else:   # sums over the ranks' slices: sum g first (for the mean), then sum g^2, (g - mean)^2
        mean = shard.sum(g.sum()) / n
        sums = shard.sum(torch.stack([g.square().sum(), (g - mean).square().sum()]))
        norm, std = sums[0].sqrt(), (sums[1] / (n - 1)).sqrt()
    no_spread = std <= ZERO_SPREAD_EPS * torch.finfo(grad.dtype).eps * norm / math.sqrt(n)
    return torch.where(no_spread, math.sqrt(n), norm / (std + eps)).float().to(grad.device)


def _all_finite(t):
    """Whether every element of t is finite (of every rank's slice, for a sharded t)."""
    shard = shard_of(t)
    if shard is None:
        return bool(torch.isfinite(t).all())
    # a float64 sum of float32 (or narrower) values is finite exactly when they all are
    return bool(torch.isfinite(shard.sum(_local(t).detach().sum(dtype=torch.float64))))


def sgd_sai_update(param, grad, m, scale, *, lr, momentum, weight_decay):
    """One SGD-SaI step for one tensor, in place. `scale` is its frozen s_i (a 0-d tensor)."""
    m.lerp_(grad, 1 - momentum)                        # m_t = mu m_{t-1} + (1 - mu) g_t
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)              # theta <- theta (1 - lr wd)
    param.sub_(m * (lr * scale))                       # theta <- theta - lr * s_i * m_t


class SGDSaI(_SandboxOptimizer):
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
    between rules; see the README):

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

    Deliberate differences from the official code (each tested):
    - s_i is reduced in float64 (norm and std) whatever the gradient dtype, and kept as a 0-d
      float32 tensor at any parameter dtype (the official code keeps the parameter's dtype).
    - Degenerate blocks (one element, or zero spread) get s_i = sqrt(numel) (`sai_scale`); the
      official code divides by eps there (a step ~1e8 too far) or freezes the block at 0.
    - A block whose first gradient arrives at step k > 1 gets its scale at step k (the official
      code raises KeyError).
    - A NaN or Inf in a gradient at the step its scale is computed raises FloatingPointError
      naming the parameter, before anything is updated, instead of freezing a NaN scale.
    - Left out: Nesterov momentum, coupled (L2) weight decay; at momentum = 0 the buffer is
      still kept, so memory is the same for every momentum.
    """

    def __init__(self, params, lr=1e-2, momentum=0.9, weight_decay=1e-2, eps=1e-8,
                 sai_rule="gsnr", fused=None):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eps=eps,
                        sai_rule=sai_rule, fused=fused)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group):
        _check_lr_and_decay(group)
        _check_fused(group)
        _check_range("eps", group["eps"], 0.0)
        _check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        _check_one_of("sai_rule", group["sai_rule"], SAI_RULES)

    def _freeze_new_scales(self):
        """Compute s_i for every block that has its first gradient now; all or nothing."""
        if all("scale" in self.state[p] for group in self.param_groups
               for p in group["params"] if p.grad is not None):
            return   # every step after the first
        new = []
        for gi, group in enumerate(self.param_groups):
            for i, p, grad in _params_with_grad(self, gi, group):
                if "scale" in self.state[p]:
                    continue
                name = _param_name(group, gi, i)
                if not _all_finite(grad):
                    raise FloatingPointError(
                        f"SGD-SaI: the gradient of {name} (shape {tuple(p.shape)}) contains NaN "
                        "or Inf at the step its learning-rate scale is computed; freezing it would "
                        "poison this block for the rest of training. Fix the loss or lower the lr.")
                rule = group["sai_rule"]
                new.append((name, p, rule, sai_scale(grad, rule, group["eps"])))
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
            rows = []
            for _, p, grad in _params_with_grad(self, gi, group):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()   # m_1 = g_1; the lerp below keeps it
                rows.append(((p, grad, state["momentum_buffer"], state["scale"]),
                             dict(lr=group["lr"])))
            self._step_rows(group, rows, dict(momentum=group["momentum"],
                                              weight_decay=group["weight_decay"]),
                            sgd_sai_update)

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        # torch casts floating state to each parameter's dtype and device; the frozen scales stay
        # float32 on the CPU (a bf16 copy would move the step size by up to 0.4%).
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            if "scale" in saved:
                self.state[p]["scale"] = saved["scale"].detach().to("cpu", torch.float32).clone()


# ---------------------------------------------------------------------------------------------
# Adam-mini

def block_layout(rule, shape):
    """Split a tensor of `shape` into Adam-mini blocks by `rule`.

    Returns chunks [(n_blocks, block_numel), ...] that tile the flattened tensor in order: each
    chunk is a contiguous run of n_blocks equal blocks. Rules:
      "full"         one block per element (plain Adam; biases)
      "tensor"       one block for the whole tensor (norm gains, position embeddings)
      "rows"         one block per row = output neuron or token (V, proj, MLP, embeddings, head)
      ("heads", n)   n blocks of equal consecutive rows (a Q or K weight with n heads)
      ("qkv", n)     a fused [Q; K; V] weight stacked on dim 0: Q and K one block per head,
                     V one block per row
    """
    numel = math.prod(shape)
    rows = shape[0] if len(shape) > 0 else 1
    if rule == "full":
        return [(numel, 1)]
    if rule == "tensor":
        return [(1, numel)]
    if rule == "rows":
        return [(rows, numel // rows)]
    kind, n = rule if isinstance(rule, (tuple, list)) and len(rule) == 2 else (rule, None)
    if kind not in ("heads", "qkv") or not isinstance(n, int) or n < 1:
        raise ValueError(f"block rule {rule!r} is not one of 'full', 'tensor', 'rows', "
                         "('heads', n) or ('qkv', n) with n a positive int")
    if kind == "heads":
        if rows % n:
            raise ValueError(f"block rule {rule!r}: {n} heads do not divide the {rows} rows of "
                             f"a tensor of shape {tuple(shape)}")
        return [(n, numel // n)]
    if rows % (3 * n):
        raise ValueError(f"block rule {rule!r}: a fused QKV weight needs rows divisible by "
                         f"3 x {n} heads, got shape {tuple(shape)}")
    d = rows // 3                                   # rows of each of Q, K, V
    cols = numel // rows
    return [(n, d * cols // n), (n, d * cols // n), (d, cols)]


def _chunk_views(t, layout):
    """Views of a contiguous tensor as (n_blocks, block_numel) matrices, one per chunk."""
    if len(layout) == 1:
        return [t.view(layout[0])]
    flat, views, offset = t.view(-1), [], 0
    for n, k in layout:
        views.append(flat[offset:offset + n * k].view(n, k))
        offset += n * k
    return views


def block_mean_sq(grad, layout):
    """mean(g^2) over each block of `layout`, one value per block (grad contiguous)."""
    return torch.cat([torch.linalg.vector_norm(g, dim=1).square_().div_(g.shape[1])
                      for g in _chunk_views(grad, layout)])


def _spread(block_values, layout, shape):
    """One value per block of `layout` -> one per row of a tensor of `shape` (a block of whole
    rows repeats its value), shaped to broadcast against it; one per element where blocks are
    smaller than a row. What the fused path multiplies by, in the same pass as the update."""
    cols = math.prod(shape[1:])
    if any(k % cols for _, k in layout):                       # element blocks of a matrix
        return block_values.view(shape)
    per_row = torch.cat([values.repeat_interleave(k // cols) for values, (_, k) in
                         zip(block_values.split([n for n, _ in layout]), layout)])
    return per_row.view(-1, *[1] * (len(shape) - 1))


def _step_blocks(param, m, step_size, layout):
    """theta[b] -= step_size[b] * m[b] for every block b of `layout`, through views (eager: no
    temporary)."""
    sizes = [n for n, _ in layout]
    for p, m_chunk, s in zip(_chunk_views(param, layout), _chunk_views(m, layout),
                             step_size.split(sizes)):
        p.addcmul_(m_chunk, s[:, None], value=-1)


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
    one value per block of `layout`."""
    grad = grad.contiguous()
    step_size = adam_mini_block_lrs(v, block_mean_sq(grad, layout), lr=lr, beta2=beta2, eps=eps,
                                    bias_correction1=bias_correction1,
                                    bias_correction2_sqrt=bias_correction2_sqrt)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)                         # theta <- theta - lr*wd*theta
    m.lerp_(grad, 1 - beta1)                                      # m_t = b1 m + (1 - b1) g
    param.sub_(m * _spread(step_size, layout, param.shape))       # theta -= lr_b * m_hat
    return step_size   # for the fused path: computed once per block (see _update_each)


def shard_blocks(layout, shape, start, stop):
    """The blocks of `layout` (of a tensor of `shape`) that rows start ... stop meet, for a rank
    that holds only those rows: (local layout, ids). The local layout tiles the rank's slice in
    order, a block cut by the slice's edge counted with the elements it has here; ids are the
    blocks' indices among the whole tensor's (a LongTensor, one per local block)."""
    cols = math.prod(shape[1:])
    lo, hi = start * cols, stop * cols          # the slice's elements in the flattened tensor
    local, ids, offset, first_id = [], [], 0, 0
    for n, k in layout:
        pos, end = max(lo, offset), min(hi, offset + n * k)
        while pos < end:
            block, into = divmod(pos - offset, k)
            count = 1 if into or end - pos < k else (end - pos) // k   # cut block, or whole ones
            size = min(k - into, end - pos) if count == 1 else k
            local.append((count, size))
            ids.append(torch.arange(first_id + block, first_id + block + count))
            pos += count * size
        offset, first_id = offset + n * k, first_id + n
    return local, torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)


def adam_mini_update_shard(param, grad, m, v, local_layout, ids, block_mean, *, lr,
                           bias_correction1, bias_correction2_sqrt, beta1, beta2, eps,
                           weight_decay):
    """adam_mini_update for a rank's slice of a sharded tensor (its rows: param, grad, m):
    block_mean and v cover every block of the whole tensor (block_mean summed over the ranks, so
    v stays the same on each); local_layout and ids are `shard_blocks`'."""
    step_size = adam_mini_block_lrs(v, block_mean, lr=lr, beta2=beta2, eps=eps,
                                    bias_correction1=bias_correction1,
                                    bias_correction2_sqrt=bias_correction2_sqrt)[ids]
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    m.lerp_(grad, 1 - beta1)
    _step_blocks(param, m, step_size, local_layout)


def adam_mini_update_foreach(params, grads, ms, vs, layouts, *, lr, bias_correction1,
                             bias_correction2_sqrt, beta1, beta2, eps, weight_decay):
    """adam_mini_update over lists of tensors (the step's numbers are lists too): the arithmetic
    on the small per-block vectors v with torch._foreach_* ops (a few calls instead of a dozen
    per tensor), then the per-element work tensor by tensor, so that each tensor's theta, m and
    g stay in cache between ops."""
    grads = [g.contiguous() for g in grads]
    torch._foreach_mul_(vs, beta2)
    torch._foreach_add_(vs, [block_mean_sq(g, layout) for g, layout in zip(grads, layouts)],
                        alpha=1 - beta2)
    step_sizes = torch._foreach_sqrt(vs)                           # sqrt(v_hat) + eps, per block
    torch._foreach_div_(step_sizes, bias_correction2_sqrt)
    torch._foreach_add_(step_sizes, eps)
    # lr / (1 - b1^t) / that, as reciprocal then multiply: bit-identical to adam_mini_update's
    # (lr / bc1) / denom, because torch evaluates float / tensor as reciprocal(tensor) * float
    torch._foreach_reciprocal_(step_sizes)
    torch._foreach_mul_(step_sizes, [x / b for x, b in zip(lr, bias_correction1)])
    for param, grad, m, step_size, layout, x in zip(params, grads, ms, step_sizes, layouts, lr):
        if weight_decay != 0:
            param.mul_(1 - x * weight_decay)
        m.lerp_(grad, 1 - beta1)
        _step_blocks(param, m, step_size, layout)


class AdamMini(_SandboxOptimizer):
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

    Blocks follow the Hessian's near block-diagonal structure (`block_layout` lists the rules):
    Q and K one block per head; V, attention output and MLP weights one per output neuron;
    token embedding and output head one per token; biases one per element; other tensors (norm
    gains, position embeddings) one per tensor.

    Args:
        params: parameters, (name, parameter) pairs, or param group dicts.
        lr, betas, eps, weight_decay: as AdamW.
        block_rules: {parameter: rule}, e.g. `block_rules(model)`; a parameter not in it gets
            "rows" with two or more dimensions, else "full". Each parameter's rule is stored in
            its param group ("block_rules", aligned with "params"): it travels with state_dict().
        fused: compile `adam_mini_update` (True), step eagerly (False), or where it pays
            (None), as AdamW's.
        foreach: when eager, batch the per-block arithmetic (`adam_mini_update_foreach`) instead
            of the per-tensor loop (`adam_mini_update`); the two agree to float32 rounding.

    Deliberate differences from the official code:
    - The partition is given, not matched on parameter names: `block_rules(model)` derives it
      from the model's parameter kinds (declared, or guessed from module types), so nanoGPT's
      fused `c_attn` and nn.MultiheadAttention's `in_proj_weight` get Q and K per head, where the
      official name matching gives them one value (its issue #30); a grouped-query K gets one
      block per K head.
    - Model sharding is FSDP2's (a block cut by a shard edge sums its squares over the ranks);
      left out: the automatic no-decay-by-name (the trainers' param groups put norms and biases
      at weight_decay 0, as nanoGPT does for AdamW).
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
            rows = []        # ((param, grad, m, v, layout), step numbers) per param with a grad
            sharded = []     # (name, row) for the params FSDP2 shards
            for i, p, grad in _params_with_grad(self, gi, group):
                layout = block_layout(group["block_rules"][i], tuple(p.shape))
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["exp_avg_sq"] = _replicated_state(p, torch.zeros(   # one per block
                        sum(n for n, _ in layout), dtype=p.dtype, device=p.device))
                state["step"] += 1
                row = ((p, grad, state["exp_avg"], state["exp_avg_sq"], layout),
                       adam_step_numbers(state["step"], group["lr"], *group["betas"]))
                if shard_of(p) is None:
                    rows.append(row)
                else:
                    sharded.append((_param_name(group, gi, i), row))
            self._step_rows(group, rows, _adam_constants(group),
                            adam_mini_update, adam_mini_update_foreach)
            self._step_sharded(group, sharded)

    def _step_sharded(self, group, named_rows):
        """The step of sharded tensors: each rank sums g^2 over its part of every block, one
        all-reduce per param group adds the parts, and each rank steps its rows."""
        if not named_rows:
            return
        parts, sums, shards = [], [], []
        for name, ((p, grad, m, v, layout), numbers) in named_rows:
            shard = shard_of(p)
            if shard.dim != 0:
                raise ValueError(f"AdamMini: {name} is sharded along dim {shard.dim}; Adam-mini's "
                                 "blocks are rows, so shard it along dim 0 (FSDP2's default)")
            local_layout, ids = shard_blocks(layout, p.shape, shard.start, shard.stop)
            grad = _local(grad).contiguous()
            local_sums = torch.cat([grad.new_zeros(0)] + [
                torch.linalg.vector_norm(g, dim=1).square_() for g in
                _chunk_views(grad, local_layout)])   # sum g^2 of each local (part of a) block
            sums.append(torch.zeros(v.shape, dtype=v.dtype, device=grad.device)
                        .index_add_(0, ids.to(grad.device), local_sums))
            parts.append((p, grad, m, v, local_layout, ids.to(grad.device), layout, numbers))
            shards.append(shard)
        total = shards[0].sum(torch.cat(sums)).split([s.numel() for s in sums])
        for (p, grad, m, v, local_layout, ids, layout, numbers), block_sum in zip(parts, total):
            block_numel = torch.cat([torch.full((n,), k, dtype=v.dtype, device=grad.device)
                                     for n, k in layout])
            adam_mini_update_shard(_local(p), grad, _local(m), _local(v), local_layout, ids,
                                   block_sum / block_numel, **numbers, **_adam_constants(group))


# ---------------------------------------------------------------------------------------------
# APOLLO and APOLLO-Mini

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


def apollo_update(param, grad, proj, m, v, update_norm, channel_dim, shard, *, lr,
                  bias_correction1, bias_correction2_sqrt, beta1, beta2, eps, weight_decay,
                  granularity, alpha):
    """One APOLLO step for one matrix, in place, with step t's `adam_step_numbers`.

    channel_dim is 0 if the matrix has at least as many rows as columns (one channel per row:
    R = G P^T), else 1 (one channel per column: R = P G); proj is P (r x k), k the other
    dimension. m, v have R's shape. update_norm is the norm of the previous step's
    update U (a 0-d tensor, 0 before the first step); it is overwritten with this step's.
    `shard` is None, or the Shard of a matrix sharded along its channels (the tensors are then
    this rank's channels, and the norms that span channels are summed over the ranks). Returns
    the gradient's scale sqrt(alpha) diag(s) / limiter (compiled, a result of the graph is
    computed once, where an intermediate would be recomputed for every element of the update).
    """
    rows_are_channels = channel_dim == 0
    dim = 1 - channel_dim                                          # the projected dimension
    # ||G||^2 (below) per channel; APOLLO-Mini needs only its sum, taken along the rows: along
    # the columns a compiled reduction reads G 1.6x slower (a strided loop)
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
    elif shard is None:
        r_adam_norm = torch.linalg.vector_norm(r_adam)
        r_norm = torch.linalg.vector_norm(r_grad)
        grad_norm_sq = grad_norm_sq.sum()
    else:                                       # the three sums over every rank's channels
        sums = shard.sum(torch.stack([r_adam.square().sum(), r_grad.square().sum(),
                                      grad_norm_sq.sum()]))
        r_adam_norm, r_norm, grad_norm_sq = sums[0].sqrt(), sums[1].sqrt(), sums[2]
    # s = ||R~|| / ||R||; a channel whose projected gradient is exactly 0 gets s = 0
    s = torch.where(r_norm > 0, r_adam_norm / r_norm, 0.0)
    coeff = s * math.sqrt(alpha)                                   # U = sqrt(alpha) G_t diag(s)
    norm_sq = (coeff.square() * grad_norm_sq).sum()                # ||U||^2, without forming U
    if shard is not None and granularity == "channel":
        norm_sq = shard.sum(norm_sq)                               # over every rank's channels
    norm = norm_sq.sqrt()
    limiter = torch.where(update_norm > 0,                         # growth over gamma, >= 1
                          (norm / (MAX_NORM_GROWTH * update_norm)).clamp_(min=1.0), 1.0)
    coeff = coeff / limiter                                        # U <- U / limiter
    update_norm.copy_(norm / limiter)                              # ||U_t||, for step t + 1
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)                          # theta <- theta - lr*wd*theta
    param.addcmul_(grad, coeff * lr, value=-1)                     # theta_t <- theta - lr U
    return coeff


class Apollo(_SandboxOptimizer):
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
    plain AdamW (`adamw_update_foreach`), as the official code does outside its APOLLO group.
    P is redrawn every T steps from a seed and never stored; it is cached outside `self.state`
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

    Deliberate differences from the official code (the README explains each):
    - The seed of each regeneration is derived from the parameter's seed and (t - 1) // T
      (the official code chains seeds), so any step's P follows from the state.
    - m and v are bias-corrected before forming R~ (the paper's AdamW on R); the official code
      corrects the final step after the limiter, which changes what the limiter sees early on.
    - The limiter compares ||U|| before the learning rate (an lr warmup is not undone by it); a
      previous norm of 0 disables it for the next step (the official code divides by
      ||U_{t-1}|| + 1e-8). A channel whose projected gradient is exactly 0 gets s = 0 (the
      official code divides by ||R|| + 1e-8).
    - Weight decay is applied to theta_{t-1}, as in Algorithm 1; eps defaults to 1e-8 (1e-6).
    - Moments are kept at a regeneration of P, as the official code does.
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
        _check_one_of("granularity", group["granularity"], GRANULARITIES)
        if group["rank"] is not None:
            _check_int("rank", group["rank"], 1)        # None: a quarter of each matrix's width
        _check_range("alpha", group["alpha"], 0.0, low_open=True)
        _check_int("update_proj_gap", group["update_proj_gap"], 1)
        _check_int("proj_seed", group["proj_seed"], 0)

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._set_per_param("projected", lambda p, name, given: _matrix_flag(
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
            rows = []
            for i, p, grad, state in _matrices_then_adamw(self, gi, group, "projected"):
                channel_dim = 0 if p.shape[0] >= p.shape[1] else 1
                shard = shard_of(p)
                if shard is not None and shard.dim != channel_dim:
                    raise ValueError(
                        f"Apollo: {_param_name(group, gi, i)} (shape {tuple(p.shape)}) is sharded "
                        f"along dim {shard.dim}, which APOLLO projects; shard it along its "
                        f"channels, dim {channel_dim} (optim.shard_dims gives FSDP2 each "
                        "parameter's dim)")
                if not state:
                    rank = projection_rank(group["rank"], p.shape)
                    local = _local(p).shape                     # this rank's channels
                    shape = (local[0], rank) if channel_dim == 0 else (rank, local[1])
                    state["step"] = 0
                    state["seed"] = group["proj_seed"] + first_index + i
                    zeros = dict(dtype=p.dtype, device=p.device)
                    state["exp_avg"] = _sharded_state(p, torch.zeros(shape, **zeros))   # m of R
                    state["exp_avg_sq"] = _sharded_state(p, torch.zeros(shape, **zeros))  # v of R
                    state["update_norm"] = _replicated_state(p, torch.zeros((), **zeros))  # limiter
                state["step"] += 1
                rows.append(((p, grad, self.projection(p, group), state["exp_avg"],
                              state["exp_avg_sq"], state["update_norm"], channel_dim, shard),
                             adam_step_numbers(state["step"], group["lr"], *group["betas"])))
            constants = dict(_adam_constants(group), alpha=group["alpha"],
                             granularity=group["granularity"])
            # above rank 1 one matrix at a time: compiled as one graph, the projected
            # temporaries (R, R~: half a matrix at rank k / 4) of every matrix would be alive
            for part in [rows] if group["rank"] == 1 else [[row] for row in rows]:
                self._step_rows(group, part, constants, apollo_update)
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


# ---------------------------------------------------------------------------------------------
# Muon (hidden matrices) with AdamW (everything else)

MUON_NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)    # (a, b, c) of Jordan et al.'s quintic
MUON_LR_RULES = ("match_rms_adamw", "original")
NS_BLOCK_COLUMNS = 256     # on a CPU, X <- a X + B X runs in place this many columns at a time


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
        # the same in place, a block of columns at a time (a column of B X needs only that
        # column of X): no second matrix-sized X. On a GPU each block would be a launch.
        for cols in x.split(NS_BLOCK_COLUMNS, dim=1):
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


# On a CPU, an elementwise op that mixes bfloat16 and float32 copies its bfloat16 input to
# float32 first, and writes a bfloat16 result through a float32 temporary: a matrix-sized
# temporary each, 0.14x a 10.75M GPT for its largest matrix. Muon runs those two ops (M_t into
# bfloat16, O_t into theta) over blocks of rows of about this many elements. A GPU casts inside
# the kernel: there they run whole.
MIXED_DTYPE_BLOCK_NUMEL = 2 ** 16


def _row_blocks(*tensors):
    """The tensors (same shape) split alike into blocks of rows, MIXED_DTYPE_BLOCK_NUMEL
    elements or so each on a CPU, one block elsewhere: zip of the blocks."""
    if tensors[0].device.type != "cpu":
        return [tensors]
    rows = max(1, MIXED_DTYPE_BLOCK_NUMEL // math.prod(tensors[0].shape[1:]))
    return zip(*(t.split(rows) for t in tensors))


def muon_update(param, grad, buf, shard, *, lr, momentum, nesterov, weight_decay, ns_steps,
                ns_coefficients, ns_eps, lr_rule):
    """One Muon step for one matrix, in place; buf is the momentum B. `shard` is None, or the
    Shard of a sharded matrix (the tensors are this rank's slice): every rank orthogonalises the
    whole update matrix, gathered, and keeps its slice."""
    buf.lerp_(grad, 1 - momentum)                                # B_t = mu B + (1 - mu) g_t
    if nesterov:        # (1 - mu) g_t + mu B_t, in Newton-Schulz's dtype and layout (its X)
        rows, cols = buf.shape
        update = (torch.empty(cols, rows, dtype=torch.bfloat16, device=buf.device).T
                  if rows > cols else torch.empty_like(buf, dtype=torch.bfloat16))
        for g, b, u in _row_blocks(grad, buf, update):
            torch.lerp(g, b, momentum, out=u)
    else:
        update = buf                                             # or B_t
    ns = dict(steps=ns_steps, coefficients=ns_coefficients, eps=ns_eps, overwrite=nesterov)
    if shard is None:
        ortho = newton_schulz(update, **ns)                      # O_t = NS(update)
    else:
        ortho = newton_schulz(shard.whole(update), **ns).narrow(
            shard.dim, shard.start, shard.stop - shard.start)
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)                        # theta <- theta (1 - lr wd)
    shape = param.shape if shard is None else shard.shape       # the whole matrix's
    for p, o in _row_blocks(param, ortho):
        p.add_(o, alpha=-lr * muon_lr_ratio(shape, lr_rule))     # theta -= lr r O_t


def _matrix_flag(selected, p, given, what):
    """Whether p is updated as a matrix (APOLLO's projection, Muon's orthogonalisation): `given`
    if the group says so, else whether p is in `selected` (None: every 2-D parameter)."""
    flag = given if given is not None else (p.dim() == 2 if selected is None else p in selected)
    if not isinstance(flag, bool):
        raise ValueError(f"its {what} flag must be True or False, got {flag!r}")
    if flag and p.dim() != 2:
        raise ValueError(f"has shape {tuple(p.shape)}, but {what} applies to matrices only; "
                         f"leave it out of `{what}`")
    return flag


class Muon(_SandboxOptimizer):
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

    Deliberate differences from torch.optim.Muon: the other tensors are handled in the same
    object (torch's takes matrices only); Newton-Schulz writes only a copy of its own in place
    (torch's divides the bfloat16 cast in place, which for a bfloat16 matrix without Nesterov is
    the momentum buffer); the step holds one bfloat16 matrix, X (with Nesterov the blend,
    written in X's layout, becomes X), not the update, X, its successor and float32 temporaries
    (`python bench.py --sizes=6x384 --rows=muon,torch_muon`: 0.07-0.08x the GPT beyond its
    state, torch's 0.14-0.18x), with the same numbers.
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
        _check_adam_hparams(group)
        _check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        _check_int("ns_steps", group["ns_steps"], 1)
        _check_range("ns_eps", group["ns_eps"], 0.0)
        _check_one_of("lr_rule", group["lr_rule"], MUON_LR_RULES)
        if len(group["ns_coefficients"]) != 3:
            raise ValueError(f"ns_coefficients must be (a, b, c), got {group['ns_coefficients']}")

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        self._set_per_param("orthogonalized", lambda p, name, given: _matrix_flag(
            self._orthogonalized, p, given, "orthogonalized"))

    def _update(self):
        for gi, group in enumerate(self.param_groups):
            for _, p, grad, state in _matrices_then_adamw(self, gi, group, "orthogonalized"):
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)   # B, momentum
                muon_update(_local(p), _local(grad), _local(state["momentum_buffer"]),
                            shard_of(p), lr=group["lr"],
                            momentum=group["momentum"], nesterov=group["nesterov"],
                            weight_decay=group["weight_decay"], ns_steps=group["ns_steps"],
                            ns_coefficients=group["ns_coefficients"], ns_eps=group["ns_eps"],
                            lr_rule=group["lr_rule"])


# ---------------------------------------------------------------------------------------------
# Adafactor

def adafactor_step_numbers(step, lr, beta2_decay):
    """The numbers of Adafactor's step t: lr, 1 - b2_t = t^beta2_decay and the relative step
    size rho_t = min(lr, 1 / sqrt(t)) (and eps1, which the optimizer adds: it follows the dtype)."""
    return dict(lr=lr, beta2_complement=step ** beta2_decay, rho=min(lr, 1 / math.sqrt(step)))


def adafactor_update(param, grad, row_v, col_v, v, shard, *, lr, beta2_complement, rho, eps1,
                     eps2, d, weight_decay):
    """One Adafactor step for one tensor, in place, with step t's `adafactor_step_numbers`. A
    matrix (or a stack of them: the last two dimensions) keeps row_v (..., R, 1) and col_v
    (..., 1, C), v is None; a vector keeps v. `shard` is None, or the Shard of a sharded tensor
    (the tensors are this rank's slices; row_v or col_v whole where the slice cuts its rows or
    columns): the norms, and the means along the sliced dimension, are summed over the ranks.
    Returns the step alpha_t / clip and a matrix's row and column factors of 1 / sqrt(v_hat)
    (compiled, a result of the graph is computed once, not for every element)."""
    n = param.numel() if shard is None else math.prod(shard.shape)
    rms = _norm(param, shard) / math.sqrt(n)
    alpha = rms.clamp(min=eps2) * rho                            # max(eps2, RMS(theta)) rho
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)                        # theta <- theta (1 - lr wd)
    if v is None:                                                # factored second moment
        rows_sq = torch.linalg.vector_norm(grad, dim=-1, keepdim=True).square_()
        cols_sq = torch.linalg.vector_norm(grad, dim=-2, keepdim=True).square_()
        n_rows, n_cols = grad.shape[-2:] if shard is None else shard.shape[-2:]
        sliced = None if shard is None else shard.dim - grad.dim()   # -1 columns, -2 rows
        if sliced == -1:
            shard.sum(rows_sq)
        if sliced == -2:
            shard.sum(cols_sq)
        row_v.lerp_(rows_sq.div_(n_cols), beta2_complement)      # R_t: mean over columns of g^2
        col_v.lerp_(cols_sq.div_(n_rows), beta2_complement)      # C_t: mean over rows of g^2
        row_mean = (row_v.mean(dim=-2, keepdim=True) if sliced != -2 else
                    shard.sum(row_v.sum(dim=-2, keepdim=True)) / n_rows)
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
    clip = (_norm(update, shard) / (math.sqrt(n) * d)).clamp(min=1.0)   # max(1, RMS(U) / d)
    step_size = alpha / clip
    param.sub_(update * step_size)                               # theta_t <- theta - alpha U / clip
    return step_size, *factors


def _norm(t, shard):
    """||t||_2 of a tensor, or of the whole tensor of which t is a rank's slice. A matrix's is
    the norm of its rows' norms: compiled, a flat sum over U = g x row factor x column factor
    would find each element's factors by a division and a modulo of its flat index, where a
    sum along rows walks both dimensions: Adafactor's compiled matrix steps 1.28x and 1.30x
    faster at 10.75M and 85.2M parameters (one process, one thread, fastest of 40 and 12)."""
    if shard is not None:
        return shard.sum(t.square().sum()).sqrt()
    if t.dim() < 2:
        return t.norm()
    return torch.linalg.vector_norm(torch.linalg.vector_norm(t, dim=-1))


class Adafactor(_SandboxOptimizer):
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

    Deliberate differences from torch.optim.Adafactor: the step is a Python int and the RMS and
    clipping factors stay tensors (no host sync per tensor); no maximize or foreach variants.
    """

    float16_params = False

    def __init__(self, params, lr=1e-2, beta2_decay=-0.8, eps=(None, 1e-3), d=1.0,
                 weight_decay=0.0, fused=None):
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=tuple(eps), d=d,
                        weight_decay=weight_decay, fused=fused)
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(group):
        _check_lr_and_decay(group)
        _check_fused(group)
        _check_range("beta2_decay", group["beta2_decay"], -math.inf, 0.0)
        eps1, eps2 = group["eps"]
        if eps1 is not None:
            _check_range("eps[0]", eps1, 0.0)
        _check_range("eps[1]", eps2, 0.0)
        _check_range("d", group["d"], 1.0)

    @staticmethod
    def _factor(p, shard, dim):
        """Zeros shaped like p with dimension `dim` (-1: R, -2: C) reduced to 1: a sharded p's
        factor is sliced like p, unless p is sliced along `dim` (then every rank keeps it whole)."""
        if shard is not None and shard.dim == p.dim() + dim:
            shape = list(p.shape)
            shape[dim] = 1
            return _replicated_state(p, torch.zeros(shape, dtype=p.dtype, device=p.device))
        shape = list(_local(p).shape)
        shape[dim] = 1
        return _sharded_state(p, torch.zeros(shape, dtype=p.dtype, device=p.device))

    def _update(self):
        for gi, group in enumerate(self.param_groups):
            eps1, eps2 = group["eps"]
            rows = []
            for _, p, grad in _params_with_grad(self, gi, group):
                state = self.state[p]
                shard = shard_of(p)
                if not state:
                    state["step"] = 0
                    if p.dim() >= 2:
                        state["row_var"] = self._factor(p, shard, -1)     # R
                        state["col_var"] = self._factor(p, shard, -2)     # C
                    else:
                        state["variance"] = torch.zeros_like(p)           # v
                state["step"] += 1
                numbers = adafactor_step_numbers(state["step"], group["lr"], group["beta2_decay"])
                numbers["eps1"] = torch.finfo(p.dtype).eps if eps1 is None else eps1
                rows.append(((p, grad, state.get("row_var"), state.get("col_var"),
                              state.get("variance"), shard), numbers))
            self._step_rows(group, rows, dict(eps2=eps2, d=group["d"],
                                              weight_decay=group["weight_decay"]),
                            adafactor_update)


# ---------------------------------------------------------------------------------------------
# Per-example optimizers: steps from statistics over the examples of a batch

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


class _PerExampleOptimizer(_SandboxOptimizer):
    """Base of the optimizers whose step takes `per_example.batch_statistics`' result."""

    @torch.no_grad()
    def step(self, statistics=None, closure=None):
        """One step from `statistics` (per_example.batch_statistics'). Without them each .grad
        is taken as the gradient of a batch of one example (what torch.distributed.checkpoint's
        state initialisation needs: one step at lr 0 with zero gradients)."""
        if closure is not None:
            with torch.enable_grad():
                closure()
        if statistics is None:
            grads = {p: p.grad for group in self.param_groups for p in group["params"]
                     if p.grad is not None}
            statistics = SimpleNamespace(mean=grads, sq_mean={p: g * g for p, g in grads.items()},
                                         sign_mean={p: g.sign() for p, g in grads.items()}, n=1)
        if not hasattr(statistics, "sign_mean"):
            raise TypeError(f"{type(self).__name__}.step takes the batch's per-example "
                            "statistics: step(per_example.batch_statistics(model, loss_of, x, "
                            f"y)), got {statistics!r}")
        self._update(statistics)

    def _rows(self, statistics):
        """(group, param, state, mean, sq_mean, sign_mean) of every param with statistics."""
        for group in self.param_groups:
            for p in group["params"]:
                if p in statistics.mean:
                    yield (group, p, self.state[p], statistics.mean[p], statistics.sq_mean[p],
                           statistics.sign_mean[p])


class PerExampleSignSGD(_PerExampleOptimizer):
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
        _check_lr_and_decay(group)
        _check_range("momentum", group["momentum"], 0.0, 1.0, high_open=True)
        _check_one_of("placement", group["placement"], SIGN_PLACEMENTS)

    def _update(self, statistics):
        for group, p, state, mean, _, sign_mean in self._rows(statistics):
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            per_example_sign_update(p, mean, sign_mean, state["momentum_buffer"],
                                    lr=group["lr"], momentum=group["momentum"],
                                    weight_decay=group["weight_decay"],
                                    placement=group["placement"])


class PerExampleAdam(_PerExampleOptimizer):
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
        _check_adam_hparams(group)
        _check_one_of("preconditioner", group["preconditioner"], PRECONDITIONERS)

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
                **_adam_constants(group), preconditioner=group["preconditioner"])


# ---------------------------------------------------------------------------------------------
# What each parameter is: Adam-mini's partition and APOLLO's projected matrices

# Models say it in a `param_kinds()` method ({parameter: kind}) and carry `n_head`; a Q or K kind
# may carry its own head count, ("qk", n) or ("qkv", n) (e.g. grouped-query K with fewer heads).
KIND_RULES = {
    "embedding": "rows",        # token embedding (and a head tied to it): one block per token
    "head": "rows",             # output layer: one block per output (token or class)
    "qk": "heads",              # a Q or a K weight: one block per head
    "qkv": "qkv",               # fused [Q; K; V]: Q and K per head, V per row
    "v": "rows", "proj": "rows", "mlp": "rows", "linear": "rows",   # one block per neuron
    "conv": "rows",             # a convolution: one block per output channel
    "position": "tensor", "norm": "tensor", "other": "tensor",      # one block per tensor
    "bias": "full",             # one per element: plain Adam, as official 1.1.1
}
# APOLLO projects the 2-D weights of these kinds: every Linear that is not an embedding or head.
PROJECTED_KINDS = ("qkv", "qk", "v", "proj", "mlp", "linear")

# What guess_param_kinds recognises, for models that do not declare param_kinds(): the names
# of the usual LLaMA / GPT / BERT / DistilBERT / lucidrains code, and where head counts live.
Q_NAMES = ("q_proj", "query", "wq", "q_lin", "to_q")
K_NAMES = ("k_proj", "key", "wk", "k_lin", "to_k")
LINEAR_NAMES = {
    "qk": Q_NAMES + K_NAMES,
    "v": ("v_proj", "value", "wv", "v_lin", "to_v"),
    "proj": ("o_proj", "out_proj", "wo", "out_lin"),
    "head": ("lm_head", "head", "classifier", "output", "fc_out", "score"),
}
# An output layer by this name only as a direct child of the model (torchvision's ResNet's fc):
# deeper down, an fc is an MLP layer
TOP_HEAD_NAMES = ("fc",)
POSITION_NAMES = ("wpe", "pos_emb", "pos_embed", "pos_embedding", "position_embeddings",
                  "positional_embedding", "embed_positions")
HEAD_COUNTS = ("num_heads", "n_heads", "num_attention_heads", "n_head", "nhead", "heads")
KV_HEAD_COUNTS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_kv_head")
NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


def _kind_name(kind):
    return kind[0] if isinstance(kind, tuple) else kind


def _count(modules, names):
    """The first int attribute among `names` of the modules (or of their HF-style `config`)."""
    for module in modules:
        for holder in (module, getattr(module, "config", None)):
            for name in names:
                value = getattr(holder, name, None)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return None


def guess_param_kinds(model):
    """Kinds from module types and the usual names, for models without `param_kinds()`.

    nn.MultiheadAttention: in_proj_weight ("qkv", its num_heads), out_proj "proj". A Linear named
    as in LINEAR_NAMES: Q and K ("qk", n) with n from the attention module, a parent or the
    model (HEAD_COUNTS, or KV_HEAD_COUNTS for K; else K's heads from its rows over Q's head
    width: grouped-query attention), None where no count is found (Adam-mini then refuses); V
    "v"; output projection "proj"; output layer "head" (also TOP_HEAD_NAMES directly under
    the model). Other Linear weights "linear",
    Embedding weights "embedding" ("position" by name), convolutions "conv", norms "norm",
    biases "bias", the rest "other". A tied weight keeps its first kind (the embedding).
    """
    kinds, paths, modules = {}, {}, dict(model.named_modules())
    for path, module in modules.items():
        leaf = path.rsplit(".", 1)[-1]
        for name, p in module.named_parameters(recurse=False):
            if p in kinds:
                continue
            paths[p] = path
            if name == "bias" or name.endswith("_bias"):
                kinds[p] = "bias"
            elif isinstance(module, nn.MultiheadAttention):
                kinds[p] = {"in_proj_weight": ("qkv", module.num_heads),
                            "q_proj_weight": ("qk", module.num_heads),
                            "k_proj_weight": ("qk", module.num_heads)}.get(name, "v")
            elif isinstance(module, nn.Embedding):
                kinds[p] = "position" if leaf in POSITION_NAMES else "embedding"
            elif isinstance(module, nn.Linear):
                kinds[p] = "head" if path in TOP_HEAD_NAMES else next(
                    (k for k, names in LINEAR_NAMES.items() if leaf in names), "linear")
            elif isinstance(module, nn.modules.conv._ConvNd):
                kinds[p] = "conv"
            elif isinstance(module, NORMS) or type(module).__name__.endswith("Norm"):
                kinds[p] = "norm"
            else:
                kinds[p] = "other"
    for p, kind in kinds.items():            # head counts of separate Q and K projections
        if kind != "qk":
            continue
        path = paths[p]
        parent, _, leaf = path.rpartition(".")
        ancestors = [modules[".".join(path.split(".")[:i])]        # parent first, model last
                     for i in range(path.count("."), -1, -1)]
        n_heads = _count(ancestors, HEAD_COUNTS)
        if leaf in K_NAMES:                  # grouped-query attention: K may have fewer heads
            q = next((modules[f"{parent}.{name}".lstrip(".")] for name in Q_NAMES
                      if f"{parent}.{name}".lstrip(".") in modules), None)
            n_kv = _count(ancestors, KV_HEAD_COUNTS)
            if n_kv is None and n_heads and q is not None and q.weight.shape[0] % n_heads == 0:
                head_width = q.weight.shape[0] // n_heads
                n_kv = p.shape[0] // head_width if p.shape[0] % head_width == 0 else None
            n_heads = n_kv or n_heads
        kinds[p] = ("qk", n_heads)
    return kinds


def param_kinds(model, kinds=None):
    """{parameter: kind}: the model's own `param_kinds()`, else `guess_param_kinds`; `kinds`
    ({parameter: kind}, e.g. {model.out.weight: "head"}) replaces those parameters' kinds."""
    given, params = kinds or {}, set(model.parameters())
    strangers = [tuple(p.shape) for p in given if p not in params]
    if strangers:
        raise ValueError(f"kinds= names a tensor of shape {strangers[0]} that is not a "
                         f"parameter of {type(model).__name__}")
    found = model.param_kinds() if hasattr(model, "param_kinds") else guess_param_kinds(model)
    kinds = {**found, **given}
    for p, kind in kinds.items():
        with_count = isinstance(kind, tuple) and len(kind) == 2 and kind[0] in ("qk", "qkv") \
            and (kind[1] is None or isinstance(kind[1], int) and kind[1] >= 1)
        if not with_count and (not isinstance(kind, str) or kind not in KIND_RULES):
            raise ValueError(f"parameter kind {kind!r} (shape {tuple(p.shape)}) is not one of "
                             f"{sorted(KIND_RULES)} or ('qk' or 'qkv', head count)")
    return kinds


def rule_for(rules, p):
    """The rule of parameter p: its entry in `rules`, else "rows" for 2+ dims, else "full"."""
    return rules.get(p, "rows" if p.dim() >= 2 else "full")


def block_rules(model, kinds=None):
    """Adam-mini's partition of `model`: {parameter: rule} from each parameter's kind
    (param_kinds(model, kinds))."""
    rules = {}
    for p, kind in param_kinds(model, kinds).items():
        name, n_head = kind if isinstance(kind, tuple) else (kind, getattr(model, "n_head", None))
        rule = KIND_RULES[name]
        if rule in ("heads", "qkv"):
            if not isinstance(n_head, int):
                raise ValueError(
                    f"a {name!r} parameter (shape {tuple(p.shape)}) needs its head count: give "
                    "its attention module or the model an int attribute num_heads (and "
                    "num_key_value_heads for a grouped-query K), or declare param_kinds()")
            rule = (rule, n_head)
        rules[p] = rule
    return rules


def kinds_source(model, kinds=None):
    source = (f"declared by {type(model).__name__}.param_kinds()"
              if hasattr(model, "param_kinds") else "guessed from module types and names "
              "(build_optimizer(kinds=...) or a param_kinds() method changes them)")
    return source + (f"; {len(kinds)} given as kinds=" if kinds else "")


def partition_table(model, rules, kinds=None):
    """The Adam-mini partition as a text table: parameter, shape, rule, number of blocks."""
    lines = [f"Adam-mini blocks; parameter kinds {kinds_source(model, kinds)}",
             f"{'parameter':<40} {'shape':<16} {'rule':<14} {'blocks':>8}"]
    total = 0
    for name, p in model.named_parameters():
        rule = rule_for(rules, p)
        blocks = sum(n for n, _ in block_layout(rule, tuple(p.shape)))
        total += blocks
        lines.append(f"{name:<40} {str(tuple(p.shape)):<16} {str(rule):<14} {blocks:>8}")
    lines.append(f"{'total':<72} {total:>8}")
    return "\n".join(lines)


def projected_params(model, kinds=None):
    """The parameters APOLLO projects: 2-D weights whose kind (param_kinds(model, kinds)) is in
    PROJECTED_KINDS."""
    return [p for p, kind in param_kinds(model, kinds).items()
            if _kind_name(kind) in PROJECTED_KINDS and p.dim() == 2]


def matrix_table(model, selected, by, kinds=None):
    """Which parameters optimizer `by` (APOLLO, Muon) updates as matrices, the others taking
    AdamW steps, as a text table."""
    found, selected = param_kinds(model, kinds), set(selected)
    lines = [f"{by} matrices; parameter kinds {kinds_source(model, kinds)}",
             f"{'parameter':<40} {'shape':<16} {'kind':<14} {'update':>8}"]
    for name, p in model.named_parameters():
        kind = str(found.get(p, "other"))
        lines.append(f"{name:<40} {str(tuple(p.shape)):<16} {kind:<14} "
                     f"{by if p in selected else 'AdamW':>8}")
    lines.append(f"{len(selected)} of {len(list(model.parameters()))} tensors updated by {by}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Factory and accounting: the one place that dispatches on optimizer names

OPTIMIZERS = {"adamw": AdamW, "sgd_sai": SGDSaI, "adam_mini": AdamMini, "apollo": apollo,
              "apollo_mini": apollo_mini, "muon": Muon, "adafactor": Adafactor}
# Their step takes the batch's per-example statistics (per_example.batch_statistics), not .grad
# alone: the trainers compute them for these (GPT only), and "all" leaves them out.
PER_EXAMPLE_OPTIMIZERS = {"sign_sgd": PerExampleSignSGD, "adam_pe": PerExampleAdam}


def takes_per_example(optimizer):
    """Whether `optimizer.step` needs per_example.batch_statistics' result."""
    return isinstance(optimizer, _PerExampleOptimizer)


def decay_groups(params, weight_decay):
    """nanoGPT's two param groups: tensors with 2+ dims (matmul weights, embeddings) get
    `weight_decay`, the others (biases, norm gains) none. `params`: parameters or (name,
    parameter) pairs; an empty group is left out."""
    params = list(params)
    dims = [(p[1] if isinstance(p, tuple) else p).dim() for p in params]
    groups = [{"params": [p for p, d in zip(params, dims) if d >= 2],
               "weight_decay": weight_decay},
              {"params": [p for p, d in zip(params, dims) if d < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def trainer_hparams(name, options):
    """The trainers' optimizer options (`options` has lr, weight_decay, beta1, beta2 and
    sai_rule, as their Config) as the keyword arguments optimizer `name` takes: beta1 is
    SGD-SaI's momentum and b1 of the Adam family (Muon: of its AdamW part; its own momentum
    stays 0.95); sai_rule is SGD-SaI's only; Adafactor takes neither beta; sign_placement and
    preconditioner are the per-example optimizers' (sign_sgd's momentum is beta1)."""
    hparams = dict(lr=options.lr, weight_decay=options.weight_decay)
    if name == "sgd_sai":
        return hparams | dict(momentum=options.beta1, sai_rule=options.sai_rule)
    if name == "sign_sgd":
        return hparams | dict(momentum=options.beta1, placement=options.sign_placement)
    if name == "adam_pe":
        return hparams | dict(betas=(options.beta1, options.beta2),
                              preconditioner=options.preconditioner)
    if name == "adafactor":                    # no first moment; its b2 follows t^-0.8
        return hparams
    return hparams | dict(betas=(options.beta1, options.beta2))   # Muon: its AdamW part's


def build_optimizer(name, model, log=None, kinds=None, **hparams):
    """Optimizer `name` for `model`, as both trainers build it.

    The params go in `decay_groups` with their names, so errors name them. Adam-mini gets its
    partition from `block_rules(model)`, APOLLO, APOLLO-Mini and Muon their matrices from
    `projected_params(model)`; `log` (e.g. print) is given the table, which says whether the
    parameter kinds were declared or guessed; `kinds` ({parameter: kind}, e.g.
    {model.out.weight: "head"}) replaces the kinds of those parameters (KIND_RULES lists the
    kinds). Adam-mini without a single Q/K split warns; APOLLO
    or Muon with no matrix is a ValueError. `hparams` are the optimizer's own keyword
    arguments; one it does not take is a TypeError listing those it does.
    """
    classes = OPTIMIZERS | PER_EXAMPLE_OPTIMIZERS
    if name not in classes:
        raise ValueError(f"unknown optimizer {name!r}; choose one of {sorted(classes)}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = decay_groups(named, hparams.pop("weight_decay", 0.0))
    if name == "adam_mini":
        hparams["block_rules"] = block_rules(model, kinds)
        if log:
            log(partition_table(model, hparams["block_rules"], kinds))
        if not any(isinstance(rule, tuple) for rule in hparams["block_rules"].values()):
            warnings.warn(f"Adam-mini found no Q or K weight in {type(model).__name__} to split "
                          "per head: every matrix gets one block per row. If the model has "
                          "attention, declare param_kinds() ('qk', 'qkv' or ('qk', heads)).",
                          stacklevel=2)
    if name in ("apollo", "apollo_mini", "muon"):
        by, key = ("Muon", "orthogonalized") if name == "muon" else ("APOLLO", "projected")
        hparams[key] = projected_params(model, kinds)
        if log:
            log(matrix_table(model, hparams[key], by, kinds))
        if not hparams[key]:
            raise ValueError(f"{by} has nothing to update in {type(model).__name__}: no 2-D "
                             "attention, MLP or other Linear weight (embeddings and heads are "
                             "not matrices for it); declare param_kinds(), or use adamw")
    cls = classes[name]
    allowed = list(inspect.signature(cls).parameters)[1:]
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise TypeError(f"optimizer {name!r} does not take {unknown}; it takes {allowed}")
    optimizer = cls(groups, **hparams)
    if log and "fused" in allowed:
        n_params = sum(p.numel() for _, p in named)
        log("optimizer step: " + (
            "fused, compiled by torch.compile at the first step" if optimizer.fused() else
            "eager (fused=False)" if hparams.get("fused") is False else
            f"eager ({n_params:,} parameters; fused=None compiles from {FUSED_MIN_NUMEL:,} on a "
            "CPU or GPU, fused=True always)"))
    return optimizer


def shard_dims(name, model):
    """{parameter: dim} along which FSDP2 should slice each parameter (fully_shard's
    shard_placement_fn) so that optimizer `name` steps it exactly without gathering it: dim 0,
    except APOLLO's projected matrices with more columns than rows, whose channels are columns."""
    dims = {p: 0 for p in model.parameters()}
    if name in ("apollo", "apollo_mini"):
        dims.update({p: 1 for p in projected_params(model) if p.shape[0] < p.shape[1]})
    return dims


def state_bytes(optimizer, params=None):
    """Bytes of every tensor in the optimizer's state (not parameters or gradients), or only in
    the state of `params`; of a sharded (DTensor) tensor, the bytes this rank holds."""
    def tensor_bytes(value):
        if isinstance(value, torch.Tensor):
            return _local(value).numel() * value.element_size()
        if isinstance(value, dict):
            return sum(tensor_bytes(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(tensor_bytes(v) for v in value)
        return 0
    if params is None:
        return tensor_bytes(dict(optimizer.state))
    return sum(tensor_bytes(optimizer.state[p]) for p in params if p in optimizer.state)
