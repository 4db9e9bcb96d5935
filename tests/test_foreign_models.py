"""Every optimizer through the same contract on models this project did not write (no
param_kinds(): the kinds are guessed): the partition and projected set the papers' rules give,
checkpoints through torch.save / torch.load(weights_only=True) and torch.distributed.checkpoint,
param groups added late, lr = 0, missing, zero, constant and non-finite gradients, and low
precision. Expected block counts are written out from the rules, not computed by optim.py."""
import copy
import io
import math
import pickle
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

import optim
from tolerance import F32_COMPUTATION, check

NAMES = sorted(optim.OPTIMIZERS)
LR = 1e-2


class Attention(nn.Module):
    """LLaMA-style attention, HF names, grouped-query: 4 query heads share 2 K/V heads."""

    def __init__(self, dim=32, n_heads=4, n_kv_heads=2):
        super().__init__()
        self.q_heads, self.kv_heads, head = n_heads, n_kv_heads, dim // n_heads   # unguessed
        self.q_proj = nn.Linear(dim, n_heads * head, bias=False)
        self.k_proj = nn.Linear(dim, n_kv_heads * head, bias=False)
        self.v_proj = nn.Linear(dim, n_kv_heads * head, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x):
        q = rearrange(self.q_proj(x), "b t (h d) -> b h t d", h=self.q_heads)
        k, v = (rearrange(f(x), "b t (h d) -> b h t d", h=self.kv_heads)
                for f in (self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        return self.o_proj(rearrange(y, "b h t d -> b t (h d)"))


class Llama(nn.Module):
    """Head counts live only in an HF-style config on the model, as in transformers."""

    def __init__(self, vocab=40, dim=32, layers=2):
        super().__init__()
        self.config = SimpleNamespace(num_attention_heads=4, num_key_value_heads=2)
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            input_layernorm=nn.RMSNorm(dim), self_attn=Attention(dim),
            post_attention_layernorm=nn.RMSNorm(dim), gate_proj=nn.Linear(dim, 64, bias=False),
            up_proj=nn.Linear(dim, 64, bias=False), down_proj=nn.Linear(64, dim, bias=False)))
            for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        x = self.embed_tokens(idx)
        for layer in self.layers:
            x = x + layer["self_attn"](layer["input_layernorm"](x))
            h = layer["post_attention_layernorm"](x)
            x = x + layer["down_proj"](F.silu(layer["gate_proj"](h)) * layer["up_proj"](h))
        return self.lm_head(self.norm(x))


def encoder():
    return nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True,
                                                            dropout=0.0), 2)


def mlp():
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(),
                         nn.Linear(32, 4))


def convnet():
    return nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


MODELS = {"encoder": encoder, "llama": Llama, "mlp": mlp, "convnet": convnet}

# Adam-mini's blocks per tensor, from the paper's rules: Q and K one block per head (grouped-query
# K: per K head), V / output projection / MLP / conv one per output neuron or channel,
# embeddings and head one per token, biases one per element (official 1.1.1), norm gains one.
ENCODER_LAYER_BLOCKS = {"self_attn.in_proj_weight": 4 + 4 + 32, "self_attn.in_proj_bias": 96,
                        "self_attn.out_proj.weight": 32, "self_attn.out_proj.bias": 32,
                        "linear1.weight": 64, "linear1.bias": 64, "linear2.weight": 32,
                        "linear2.bias": 32, "norm1.weight": 1, "norm1.bias": 32,
                        "norm2.weight": 1, "norm2.bias": 32}
LLAMA_LAYER_BLOCKS = {"input_layernorm.weight": 1, "self_attn.q_proj.weight": 4,
                      "self_attn.k_proj.weight": 2, "self_attn.v_proj.weight": 16,
                      "self_attn.o_proj.weight": 32, "post_attention_layernorm.weight": 1,
                      "gate_proj.weight": 64, "up_proj.weight": 64, "down_proj.weight": 32}
BLOCKS = {
    "encoder": {f"layers.{i}.{k}": v for i in range(2) for k, v in ENCODER_LAYER_BLOCKS.items()},
    "llama": {"embed_tokens.weight": 40, "norm.weight": 1, "lm_head.weight": 40,
              **{f"layers.{i}.{k}": v for i in range(2) for k, v in LLAMA_LAYER_BLOCKS.items()}},
    "mlp": {"0.weight": 32, "0.bias": 32, "2.weight": 32, "2.bias": 32, "4.weight": 4,
            "4.bias": 4},
    "convnet": {"0.weight": 8, "0.bias": 8, "1.weight": 1, "1.bias": 8, "3.weight": 8,
                "3.bias": 8, "5.weight": 10, "5.bias": 10},
}
# APOLLO's projected matrices: every 2-D Linear weight that is not an embedding or output head.
PROJECTED = {
    "encoder": {f"layers.{i}.{k}" for i in range(2) for k in (
        "self_attn.in_proj_weight", "self_attn.out_proj.weight", "linear1.weight",
        "linear2.weight")},
    "llama": {f"layers.{i}.{k}" for i in range(2) for k in (
        "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight", "gate_proj.weight", "up_proj.weight", "down_proj.weight")},
    "mlp": {"0.weight", "2.weight", "4.weight"},       # a Sequential's last layer is no "head"
    "convnet": {"5.weight"},                           # convolutions take AdamW steps
}


def make(kind, seed=0):
    torch.manual_seed(seed)
    return MODELS[kind]()


def batch(kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "llama":
        return torch.randint(40, (3, 6), generator=g), torch.randint(40, (3, 6), generator=g)
    shape = {"encoder": (3, 5, 32), "mlp": (6, 8), "convnet": (4, 1, 8, 8)}[kind]
    out = {"encoder": (3, 5, 32), "mlp": (6, 4), "convnet": (4, 10)}[kind]
    return torch.randn(shape, generator=g), torch.randn(out, generator=g)


def loss_of(kind, model, x, y):
    out = model(x)
    if kind == "llama":
        return F.cross_entropy(out.flatten(0, 1), y.flatten())
    return F.mse_loss(out, y)


def build(name, model, **hp):
    with warnings.catch_warnings():    # Adam-mini warns on models with no Q/K (the MLP, convnet)
        warnings.filterwarnings("ignore", "Adam-mini found no Q or K")
        return optim.build_optimizer(name, model, **{"lr": LR, "weight_decay": 0.1, **hp})


def train(kind, model, opt, steps, first_seed=0):
    for s in range(first_seed, first_seed + steps):
        loss_of(kind, model, *batch(kind, s)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_all_finite(model):
    for n, p in model.named_parameters():
        assert torch.isfinite(p).all(), n


@pytest.mark.parametrize("kind", MODELS)
def test_adam_mini_partition_follows_the_papers_rules(kind):
    model = make(kind)
    rules = optim.block_rules(model)
    blocks = {n: sum(c for c, _ in optim.block_layout(optim.rule_for(rules, p), tuple(p.shape)))
              for n, p in model.named_parameters()}
    assert blocks == BLOCKS[kind]
    opt = build("adam_mini", model)
    train(kind, model, opt, 1)
    assert {n: opt.state[p]["exp_avg_sq"].numel() for n, p in model.named_parameters()} \
        == BLOCKS[kind]


@pytest.mark.parametrize("kind", MODELS)
def test_apollo_projects_the_attention_and_mlp_matrices(kind):
    model = make(kind)
    names = {p: n for n, p in model.named_parameters()}
    assert {names[p] for p in optim.projected_params(model)} == PROJECTED[kind]


def test_grouped_query_heads_come_from_the_shapes_when_no_count_is_given():
    model = make("llama")
    model.config = SimpleNamespace(num_attention_heads=4)        # no num_key_value_heads
    kinds = optim.guess_param_kinds(model)
    attn = model.layers[0]["self_attn"]
    assert kinds[attn.q_proj.weight] == ("qk", 4) and kinds[attn.k_proj.weight] == ("qk", 2)


def test_no_head_count_is_a_clear_error_for_adam_mini_only():
    model = make("llama")
    del model.config
    with pytest.raises(ValueError, match=r"'qk' parameter \(shape \(32, 32\)\) needs its head "
                                         r"count: .*num_heads"):
        build("adam_mini", model)
    build("apollo", model)                          # APOLLO needs no head count


def test_models_without_attention_warn_adam_mini_and_apollo_needs_a_matrix():
    with pytest.warns(UserWarning, match="Adam-mini found no Q or K weight in Sequential"):
        optim.build_optimizer("adam_mini", mlp(), lr=LR)
    with pytest.raises(ValueError, match="APOLLO has nothing to update in Embedding"):
        optim.build_optimizer("apollo_mini", nn.Embedding(5, 4), lr=LR)


@pytest.mark.parametrize("name", ["adam_mini", "apollo"])
def test_the_logged_table_says_the_kinds_were_guessed(name):
    lines = []
    build(name, make("encoder"), log=lines.append)
    assert "guessed from module types and names" in lines[0].splitlines()[0]


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_through_torch_save_with_weights_only_continues_identically(name, kind):
    model = make(kind)
    opt = build(name, model)
    train(kind, model, opt, 3)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
    train(kind, model, opt, 3, first_seed=3)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = make(kind, seed=1)
    resumed.load_state_dict(saved["model"])
    resumed_opt = build(name, resumed, lr=5.0)
    resumed_opt.load_state_dict(saved["opt"])
    train(kind, resumed, resumed_opt, 3, first_seed=3)
    assert all(torch.equal(a, b) for a, b in zip(params(model).values(),
                                                  params(resumed).values()))


@pytest.mark.parametrize("kind", ["encoder", "llama"])
@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_through_distributed_checkpoint_helpers(name, kind):
    hp = {"sai_rule": "gsnr_max"} if name == "sgd_sai" else {}   # its frozen max travels too
    model = make(kind)
    opt = build(name, model, **hp)
    train(kind, model, opt, 2)
    state = copy.deepcopy(get_optimizer_state_dict(model, opt))
    saved_model = copy.deepcopy(model.state_dict())
    train(kind, model, opt, 2, first_seed=2)

    resumed = make(kind, seed=1)
    resumed.load_state_dict(saved_model)
    resumed_opt = build(name, resumed, **hp)
    set_optimizer_state_dict(resumed, resumed_opt, state)
    train(kind, resumed, resumed_opt, 2, first_seed=2)
    assert all(torch.equal(a, b) for a, b in zip(params(model).values(),
                                                  params(resumed).values()))


@pytest.mark.parametrize("name", NAMES)
def test_a_group_added_after_steps_trains_with_its_own_settings(name):
    kind = "llama"
    model = make(kind)
    late = model.layers[1]["down_proj"].weight
    per_param = {"adam_mini": dict(block_rules=optim.block_rules(model)),
                 "apollo": dict(projected=optim.projected_params(model)),
                 "apollo_mini": dict(projected=optim.projected_params(model))}.get(name, {})
    opt = optim.OPTIMIZERS[name]([p for p in model.parameters() if p is not late], lr=LR,
                                 **per_param)
    train(kind, model, opt, 2)
    before = late.detach().clone()
    group = {"params": [late], "lr": 2 * LR}
    if name == "adam_mini":
        group["block_rules"] = ["tensor"]               # the group's own rule is kept
    if name.startswith("apollo"):
        group["projected"] = [False]                    # the group's own flag is kept
    opt.add_param_group(group)
    train(kind, model, opt, 2, first_seed=2)
    assert_all_finite(model)
    assert not torch.equal(late, before) and opt.param_groups[-1]["lr"] == 2 * LR
    if name == "adam_mini":
        assert opt.param_groups[-1]["block_rules"] == ["tensor"]
        assert opt.state[late]["exp_avg_sq"].numel() == 1
    if name.startswith("apollo"):
        assert opt.param_groups[-1]["projected"] == [False]
        assert opt.state[late]["exp_avg"].shape == late.shape       # AdamW's moments


@pytest.mark.parametrize("name", ["adam_mini", "apollo", "apollo_mini"])
def test_a_groups_own_list_must_fit_its_parameters(name):
    """Adam-mini's rules and APOLLO's flags, given with a group, are checked like computed ones."""
    opt = build(name, make("mlp"))
    key = "block_rules" if name == "adam_mini" else "projected"

    def group(values):
        return {"params": [("extra.w", nn.Parameter(torch.randn(3, 3))),
                           ("extra.b", nn.Parameter(torch.randn(3)))], key: values}
    with pytest.raises(ValueError, match=rf"\['{key}'\] must be a list with one entry per "
                                         r"parameter \(2\)"):
        opt.add_param_group(group(["rows"]))
    bad = ["rows", ("heads", 2)] if name == "adam_mini" else [False, True]
    message = r"2 heads do not divide" if name == "adam_mini" else r"matrices only"
    with pytest.raises(ValueError, match=r"extra\.b: .*" + message):
        opt.add_param_group(group(bad))


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("name", NAMES)
def test_lr_zero_group_and_missing_gradients_leave_parameters_alone(name, kind):
    model = make(kind)
    opt = build(name, model)
    opt.param_groups[0]["lr"] = 0.0                      # the matrices: frozen by lr = 0
    frozen = [p for p in opt.param_groups[0]["params"]]
    before = {p: p.detach().clone() for p in model.parameters()}
    train(kind, model, opt, 2)
    assert all(torch.equal(p, before[p]) for p in frozen)
    # a parameter whose grad is None on a step: no update, and its state does not move
    skipped = opt.param_groups[1]["params"][0] if len(opt.param_groups) > 1 else frozen[0]
    state = copy.deepcopy(opt.state[skipped])
    value = skipped.detach().clone()
    loss_of(kind, model, *batch(kind, 9)).backward()
    skipped.grad = None
    opt.step()
    assert torch.equal(skipped, value)
    assert state.keys() == opt.state[skipped].keys() and all(
        torch.equal(v, opt.state[skipped][k]) if torch.is_tensor(v) else v == opt.state[skipped][k]
        for k, v in state.items())
    assert_all_finite(model)


@pytest.mark.parametrize("kind", MODELS)
@pytest.mark.parametrize("name", NAMES)
def test_zero_and_constant_gradients_take_finite_bounded_steps(name, kind):
    """All-zero gradients move nothing. A constant gradient c has no spread: SGD-SaI's scale is
    sqrt(numel) (each element moves lr sqrt(numel) |c|), AdamW and Adam-mini move each element
    by at most lr at the first step; APOLLO's steps are finite."""
    model = make(kind)
    opt = build(name, model, weight_decay=0.0)
    before = params(model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())

    for c in (0.1, -3e-3, 7.0, 1e-20):
        model = make(kind)
        opt = build(name, model, weight_decay=0.0)
        before = params(model)
        for p in model.parameters():
            p.grad = torch.full_like(p, c)
        opt.step()
        assert_all_finite(model)
        for n, p in model.named_parameters():
            moved = (p - before[n]).abs().max().item()
            if name == "sgd_sai":
                assert moved <= LR * math.sqrt(p.numel()) * abs(c) * 1.0001 + 1e-7, (n, c)
            elif name in ("adamw", "adam_mini"):
                assert moved <= LR * 1.0001 + 1e-7, (n, c)


@pytest.mark.parametrize("name", NAMES)
def test_a_non_finite_gradient_follows_the_documented_rule(name):
    """SGD-SaI refuses one at the step that freezes its scale (nothing is updated). Later, as in
    torch.optim, a NaN gradient is written into the tensor that has it (Adam-mini: its block;
    APOLLO: the matrix) and into nothing else; the trainers stop on a non-finite loss first."""
    kind = "llama"
    model = make(kind)
    opt = build(name, model)
    target = model.layers[0]["gate_proj"].weight
    if name == "sgd_sai":
        before = params(model)
        loss_of(kind, model, *batch(kind, 0)).backward()
        target.grad[0, 0] = float("nan")
        with pytest.raises(FloatingPointError, match=r"layers\.0\.gate_proj\.weight"):
            opt.step()
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
        opt.zero_grad(set_to_none=True)
    train(kind, model, opt, 1)
    loss_of(kind, model, *batch(kind, 1)).backward()
    target.grad[0, 0] = float("nan")
    opt.step()
    assert not torch.isfinite(target).all()
    for n, p in model.named_parameters():
        if p is not target:
            assert torch.isfinite(p).all(), n


def test_sgd_sai_zero_spread_is_decided_at_the_gradients_own_resolution():
    """Constants of every size and shape: the scale is sqrt(numel) (in float32 the std of a
    constant is rounding noise, which made g-SNR ~1e7); a spread just above rounding is not."""
    for c in (0.1, 0.3, 1 / 3, 1e-30, 7.7e3, -2.5e30, 123.456):
        for shape in ((10,), (7, 3), (256, 65), (4, 1, 9)):
            for dtype in (torch.float32, torch.bfloat16, torch.float64):
                g = torch.full(shape, c, dtype=dtype)
                expected = math.sqrt(g.numel())
                check("SGD-SaI's scale of a constant = sqrt(numel) (float32 scale)",
                      optim.sai_scale(g, "gsnr"), expected, F32_COMPUTATION)
    g = torch.full((1000,), 0.5) + 1e-4 * torch.randn(1000, generator=torch.Generator()
                                                      .manual_seed(0))
    assert optim.sai_scale(g, "gsnr").item() > 1e3 * math.sqrt(1000)   # real, tiny spread


def test_g_snr_identity():
    """||g|| / std(g) = sqrt((n - 1) + n mean^2 / std^2), so g-SNR >= sqrt(n - 1)."""
    gen = torch.Generator().manual_seed(0)
    for n, mean in ((10, 0.0), (500, 0.3), (64, -2.0), (4096, 1e-3)):
        g = torch.randn(n, generator=gen, dtype=torch.float64) + mean
        identity = math.sqrt((n - 1) + n * g.mean().item() ** 2 / g.std().item() ** 2)
        scale = optim.sai_scale(g, "gsnr", eps=0.0)                 # held in float32
        check("g-SNR = its identity (float32 scale)", scale, identity, F32_COMPUTATION)
        assert scale.item() >= math.sqrt(n - 1) * (1 - F32_COMPUTATION)


def test_sgd_sai_scale_of_huge_finite_gradients_does_not_overflow():
    g = torch.randn(100, generator=torch.Generator().manual_seed(0)) * 1e19   # ||g||^2 > f32 max
    expected = (g.double().norm() / g.double().std()).item()
    check("g-SNR of huge gradients (float32 scale)", optim.sai_scale(g, "gsnr"), expected,
          F32_COMPUTATION)
    p = nn.Parameter(torch.zeros(100))
    p.grad = g
    optim.SGDSaI([p], lr=1e-30, weight_decay=0.0).step()
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("name", NAMES)
def test_low_precision_parameters(name):
    """bfloat16 parameters train, their state in bfloat16 (SGD-SaI's scales float32), within
    bfloat16 resolution of a float32 step; float16 is refused by the Adam family, whose eps and
    small second moments underflow there (SGD-SaI has no eps in its step)."""
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make("mlp").to(dtype)
        opt = build(name, model)
        for s in range(2):
            x, y = batch("mlp", s)
            loss_of("mlp", model, x.to(dtype), y.to(dtype)).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        results[dtype] = model
        for p in model.parameters():
            for key, value in opt.state[p].items():
                if torch.is_tensor(value):
                    want = torch.float32 if key == "scale" else dtype
                    assert value.dtype == want, (key, value.dtype)
    # bfloat16 keeps 8 significant bits: a step of 1e-2 on a weight of 0.3 is a couple of ulps,
    # and Adam's first steps are ~sign(g), which flips where g ~ 0. So: most elements within two
    # ulps, none further off than the float32 step itself, and the bfloat16 run moves as much
    initial = make("mlp")
    for a, b, p0 in zip(results[torch.float32].parameters(),
                        results[torch.bfloat16].parameters(), initial.parameters()):
        error, step = (b.float() - a).abs(), (a - p0).abs()
        assert (error <= 2 ** -6 * a.abs() + 1e-3).float().mean() >= 0.85
        assert error.max() <= 2 * step.max() + 2 ** -6 * a.abs().max()
        assert (b.float() - p0).abs().mean() >= 0.5 * step.mean()
    half = make("mlp").half()
    if name == "sgd_sai":
        opt = build(name, half)
        x, y = batch("mlp", 0)
        loss_of("mlp", half, x.half(), y.half()).backward()
        opt.step()
        assert_all_finite(half)
    else:
        with pytest.raises(ValueError, match=r"0\.weight is float16, where eps"):
            build(name, half)


ALL_NAMES = NAMES + sorted(optim.PER_EXAMPLE_OPTIMIZERS)


class ResNetLike(nn.Module):
    """torchvision's naming: the output layer is the model's own `fc`; an `fc` inside a block
    is an MLP layer."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.block = nn.ModuleDict(dict(fc=nn.Linear(4, 4)))
        self.fc = nn.Linear(4, 10)

    def forward(self, x):
        x = self.conv(x).mean((2, 3))
        return self.fc(torch.relu(self.block["fc"](x)))


def test_a_top_level_fc_is_the_output_layer():
    model = ResNetLike()
    kinds = optim.guess_param_kinds(model)
    assert kinds[model.fc.weight] == "head" and kinds[model.block["fc"].weight] == "linear"
    assert optim.projected_params(model) == [model.block["fc"].weight]
    assert optim.block_rules(model)[model.fc.weight] == "rows"      # one block per class


@pytest.mark.parametrize("name", ["apollo", "muon", "adam_mini"])
def test_kinds_given_to_build_optimizer_replace_the_guessed_ones(name):
    """A user's model whose output layer has no usual name: kinds= says it is the head, and the
    logged table says kinds were given."""
    model = mlp()
    logged = []
    opt = build(name, model, kinds={model[4].weight: "head"}, log=logged.append)
    if name == "adam_mini":
        assert opt.param_groups[0]["block_rules"][2] == "rows"
    else:
        key = "orthogonalized" if name == "muon" else "projected"
        flags = dict(zip(opt.param_groups[0]["params"], opt.param_groups[0][key]))
        assert not flags[model[4].weight] and flags[model[0].weight]
    assert "1 given as kinds=" in logged[0]
    with pytest.raises(ValueError, match=r"kinds= names a tensor of shape \(3,\) that is not a "
                                         r"parameter of Sequential"):
        build(name, model, kinds={torch.zeros(3): "head"})


class WithComplex(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.phase = nn.Parameter(torch.randn(4, 4, dtype=torch.complex64))


@pytest.mark.parametrize("name", ALL_NAMES)
def test_a_complex_parameter_is_refused_naming_it(name):
    """None of the optimizers steps complex numbers (AdamW's v would be complex g^2, SGD-SaI's
    std complex): one line at construction, naming the parameter and the way round it."""
    with pytest.raises(ValueError) as err:
        build(name, WithComplex())
    message = str(err.value)
    assert "phase is complex (torch.complex64)" in message and "view_as_real" in message
    assert "\n" not in message


def step_twice(name, model, opt, first_seed):
    for s in range(first_seed, first_seed + 2):
        loss_of("llama", model, *batch("llama", s)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return params(model)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("name", ALL_NAMES)
def test_every_optimizer_survives_deepcopy_and_pickle(name, how):
    """Copied with its model after 3 steps (APOLLO's projections drawn), the copy steps bit for
    bit as the original, and takes a new param group as the original would."""
    model = make("llama")
    opt = build(name, model, **({"update_proj_gap": 2} if name.startswith("apollo") else {}))
    train("llama", model, opt, 3)
    copied_model, copied_opt = (copy.deepcopy((model, opt)) if how == "deepcopy" else
                                pickle.loads(pickle.dumps((model, opt))))
    assert type(copied_opt) is type(opt)
    after = step_twice(name, model, opt, 3)
    assert all(torch.equal(p, after[n]) for n, p in
               step_twice(name, copied_model, copied_opt, 3).items())
    extra = nn.Parameter(torch.randn(8, 8))
    copied_opt.add_param_group({"params": [("extra", extra)]})
    assert len(copied_opt.param_groups) == len(opt.param_groups) + 1
