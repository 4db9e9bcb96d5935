"""From a model and a trainer's options to an optimizer, and what it keeps: the param groups
(`decay_groups`), the trainers' option mapping (`trainer_hparams`), the builder, FSDP2's slicing
(`shard_dims`) and the state's bytes (`state_bytes`). optim.build_optimizer gives the builder
optim.py's optimizers by name."""
import inspect
import warnings

import torch

from engine.compiled import FUSED_MIN_NUMEL
from engine.kinds import block_rules, matrix_table, partition_table, projected_params
from engine.sharding import local

APOLLO_NAMES = ("apollo", "apollo_mini")


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
    preconditioner are the per-example optimizers' (sign_sgd's momentum is beta1); eps, where
    set (> 0), is the Adam family's (AdamW, Adam-mini, APOLLO, Muon's AdamW part, adam_pe)."""
    hparams = dict(lr=options.lr, weight_decay=options.weight_decay)
    if getattr(options, "eps", 0) > 0 and name in ("adamw", "adam_mini", "apollo",
                                                   "apollo_mini", "muon", "adam_pe"):
        hparams["eps"] = options.eps
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


def build(classes, name, model, log=None, kinds=None, **hparams):
    """optim.build_optimizer, given optim's {name: class}."""
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
                          stacklevel=3)
    if name in APOLLO_NAMES + ("muon",):
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
    if name in APOLLO_NAMES:
        dims.update({p: 1 for p in projected_params(model) if p.shape[0] < p.shape[1]})
    return dims


def state_bytes(optimizer, params=None):
    """Bytes of every tensor in the optimizer's state (not parameters or gradients), or only in
    the state of `params`; of a sharded (DTensor) tensor, the bytes this rank holds."""
    def tensor_bytes(value):
        if isinstance(value, torch.Tensor):
            return local(value).numel() * value.element_size()
        if isinstance(value, dict):
            return sum(tensor_bytes(v) for v in value.values())
        if isinstance(value, (list, tuple)):
            return sum(tensor_bytes(v) for v in value)
        return 0
    if params is None:
        return tensor_bytes(dict(optimizer.state))
    return sum(tensor_bytes(optimizer.state[p]) for p in params if p in optimizer.state)


def takes_per_example(optimizer):
    """Whether `optimizer.step` needs per_example.batch_statistics' result."""
    return getattr(optimizer, "per_example", False)
