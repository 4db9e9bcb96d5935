"""What each parameter of a model is (its kind: declared by the model, or guessed from module
types and names), and what the optimizers derive from it: Adam-mini's partition into blocks
(`block_rules`) and the matrices APOLLO projects and Muon orthogonalises (`projected_params`).
"""
from torch import nn

from engine.blocks import block_count, block_layout

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


def _first_count(modules, names):
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
        n_heads = _first_count(ancestors, HEAD_COUNTS)
        if leaf in K_NAMES:                  # grouped-query attention: K may have fewer heads
            q = next((modules[f"{parent}.{name}".lstrip(".")] for name in Q_NAMES
                      if f"{parent}.{name}".lstrip(".") in modules), None)
            n_kv = _first_count(ancestors, KV_HEAD_COUNTS)
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
        blocks = block_count(block_layout(rule, tuple(p.shape)))
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


def matrix_flag(selected, p, given, what):
    """Whether p is updated as a matrix (APOLLO's projection, Muon's orthogonalisation): `given`
    if the group says so, else whether p is in `selected` (None: every 2-D parameter)."""
    flag = given if given is not None else (p.dim() == 2 if selected is None else p in selected)
    if not isinstance(flag, bool):
        raise ValueError(f"its {what} flag must be True or False, got {flag!r}")
    if flag and p.dim() != 2:
        raise ValueError(f"has shape {tuple(p.shape)}, but {what} applies to matrices only; "
                         f"leave it out of `{what}`")
    return flag
