"""The base of every optimizer in optim.py: checked param groups, per-parameter settings that
travel with state_dict(), and the step loop that runs an update function over a group's tensors
(compiled, foreach, or one tensor at a time)."""
import functools
import inspect
import warnings
from itertools import chain
from types import SimpleNamespace

import torch
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from engine.compiled import FUSED_DEVICES, FUSED_MIN_NUMEL, compiled_update_each, number_tensors
from engine.foreach import FOREACH_CHUNK_NUMEL, numel_chunks
from engine.sharding import local, shard_of


def param_name(group, group_index, i):
    names = group.get("param_names")
    return names[i] if names else f"param_groups[{group_index}]['params'][{i}]"


def params_with_grad(optimizer, group_index, group):
    """Yield (index, param, grad) for the params of a group that have a gradient."""
    for i, p in enumerate(group["params"]):
        if p.grad is None:
            continue
        if p.grad.is_sparse:
            raise ValueError(f"{type(optimizer).__name__}: {param_name(group, group_index, i)} "
                             "has a sparse gradient, which is not supported; use dense "
                             "gradients (nn.Embedding(sparse=False))")
        yield i, p, p.grad


def by_position(tuples):
    """[(a1, b1, ...), (a2, b2, ...)] -> [a1, a2], [b1, b2], ...: one tuple per tensor, as the
    optimizers gather them, turned into the lists a foreach update takes."""
    return [list(column) for column in zip(*tuples)]


@functools.cache
def _takes_whole(update):
    return "whole" in inspect.signature(update).parameters


class BaseOptimizer(Optimizer):
    """Optimizer base: every param group (also one added later, or loaded) is checked by the
    subclass's `_check_group`, the closure is run, and each optimizer's `_update` does the step
    itself, mostly through `run_update`. Optimizers whose eps cannot live in float16 set
    float16_params = False; those whose step takes per-example statistics set per_example."""

    float16_params = True
    float32_cpu_state = ()  # state entries kept float32 on the CPU whatever the parameter's
    per_example = False
    fused_error = None      # why compiling failed here, once it has (the step is eager from then)
    _caches = {}            # attribute -> its empty value, for caches a copy does not carry

    def add_param_group(self, param_group):
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        self._check_group(group)
        for i, p in enumerate(group["params"]):
            if p.is_complex():
                raise ValueError(
                    f"{type(self).__name__}: {param_name(group, len(self.param_groups) - 1, i)} "
                    f"is complex ({p.dtype}), which these optimizers do not step; hold it as a "
                    "real parameter of its real and imaginary parts (torch.view_as_real) and "
                    "form the complex tensor in forward (torch.view_as_complex)")
            if p.dtype == torch.float16 and not self.float16_params:
                raise ValueError(
                    f"{type(self).__name__}: {param_name(group, len(self.param_groups) - 1, i)} "
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
        # torch casts floating state to each parameter's dtype and device: put back the entries
        # this optimizer keeps float32 on the CPU (SGD-SaI's frozen scales)
        saved_ids = chain.from_iterable(g["params"] for g in state_dict["param_groups"])
        params = chain.from_iterable(g["params"] for g in self.param_groups)
        for saved_id, p in zip(saved_ids, params):
            saved = state_dict["state"].get(saved_id, {})
            for key in self.float32_cpu_state:
                if key in saved:
                    self.state[p][key] = saved[key].detach().to("cpu", torch.float32).clone()

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
            name = param_name(group, gi, i)
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

    def run_update(self, group, calls, hparams, update, update_foreach=None):
        """One step of a param group's tensors: each call is (the args `update` takes first:
        the tensor, its gradient and state; the tensor's step numbers, a dict of what changes
        every step); `hparams` holds the group's other hyperparameters. Compiled if
        self.fused(), else all at once with update_foreach if group["foreach"], else one tensor
        at a time. If the compile fails (no C++ compiler, an unsupported device), one warning,
        and eager from then on. Sharded tensors step through their local slices, and an update
        that takes `whole` gets the slice's Shard (engine/sharding.py)."""
        if not calls:
            return
        args, step_numbers = by_position(calls)
        if self.fused():   # never for sharded tensors (see fused): no local slices to take
            try:
                device = args[0][0].device
                compiled_update_each(device.type)(
                    update, args, number_tensors(step_numbers, device), hparams)
                return
            except Exception as err:   # compiling happens before any tensor is written
                self.fused_error = f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
                warnings.warn(f"{type(self).__name__}: the fused (compiled) step is unavailable "
                              f"here ({self.fused_error}); stepping eagerly, as fused=False",
                              stacklevel=4)
        shards = [shard_of(a[0]) for a in args]
        args = [[local(t) for t in a] for a in args]
        if update_foreach is not None and group.get("foreach", True):
            for chunk in numel_chunks(args, FOREACH_CHUNK_NUMEL):
                update_foreach(*by_position([args[i] for i in chunk]), **hparams, **{
                    name: [step_numbers[i][name] for i in chunk] for name in step_numbers[0]})
            return
        for a, n, shard in zip(args, step_numbers, shards):
            if shard is not None and _takes_whole(update):
                update(*a, **n, **hparams, whole=shard)
            else:
                update(*a, **n, **hparams)

    @torch.no_grad()
    def step(self, closure=None):
        """One step; `closure`, if given, re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._update()
        return loss


class PerExampleOptimizer(BaseOptimizer):
    """Base of the optimizers whose step takes `per_example.batch_statistics`' result."""

    per_example = True

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
