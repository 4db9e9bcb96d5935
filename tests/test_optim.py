"""optim.py pinned to its references (torch AdamW, official sgd-sai 1.0.3, official adam-mini
1.1.1) and to the properties the docstrings promise."""
import contextlib
import copy
import io
import math
from types import SimpleNamespace

import pytest
import torch
from adam_mini import Adam_mini
from sgd_sai import SGD_sai
from torch import nn

import engine.base
import engine.foreach
import optim
from tiny_models import batches, make_model, max_rel_diff, train, train_scheduled
from tolerance import BOTH_DTYPES, DTYPE_NAMES, F32_COMPUTATION, F32_TRAINING, TRAINING, check

STEPS = 50


def decay_groups(model, weight_decay):
    """The param groups build_optimizer makes, for the reference optimizers."""
    return optim.decay_groups(model.parameters(), weight_decay)


def quiet():
    """The official packages print on construction and first step."""
    return contextlib.redirect_stdout(io.StringIO())


@BOTH_DTYPES
@pytest.mark.parametrize("foreach", [False, True])
def test_adamw_matches_torch(foreach, dtype):
    ours, ref = make_model(dtype=dtype), make_model(dtype=dtype)
    opt = optim.build_optimizer("adamw", ours, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=0.1, foreach=foreach)
    ref_opt = torch.optim.AdamW(decay_groups(ref, 0.1), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                amsgrad=False, foreach=foreach)
    data = batches(STEPS)
    check(f"AdamW = torch's, {STEPS} steps, {DTYPE_NAMES[dtype]}", train_scheduled(ours, opt, data),
          train_scheduled(ref, ref_opt, data), TRAINING[dtype])
    check(f"AdamW = torch's, {STEPS} steps, {DTYPE_NAMES[dtype]}", ours, ref, TRAINING[dtype])


def test_adamw_foreach_matches_single_tensor():
    """torch's order of operations (foreach) against ours per tensor: float32 rounding apart."""
    single, multi = make_model(), make_model()
    data = batches(10)
    train(single, optim.AdamW(single.parameters(), lr=1e-2, foreach=False), data)
    train(multi, optim.AdamW(multi.parameters(), lr=1e-2, foreach=True), data)
    check("AdamW foreach = per tensor, 10 steps, float32", multi, single, F32_TRAINING)


@pytest.mark.parametrize("name", ["adamw", "adam_mini"])
def test_foreach_in_chunks_equals_foreach_at_once(name, monkeypatch):
    """The eager foreach path steps runs of ~FOREACH_CHUNK_NUMEL elements: the same ops on each
    tensor as one run over all of them, bit for bit."""
    data = batches(5)
    whole, chunked = make_model(), make_model()
    train_scheduled(whole, optim.build_optimizer(name, whole, lr=1e-2, fused=False), data)
    monkeypatch.setattr(engine.base, "FOREACH_CHUNK_NUMEL", 1000)    # the tiny model in ~20 runs
    assert len(list(engine.foreach.numel_chunks([(p,) for p in chunked.parameters()], 1000))) > 10
    train_scheduled(chunked, optim.build_optimizer(name, chunked, lr=1e-2, fused=False), data)
    assert max_rel_diff(whole, chunked) == 0


@BOTH_DTYPES
def test_sgd_sai_matches_reference(dtype):
    """Our scales are held in float32 at any dtype (the official code keeps them in the
    parameter's): in float64 the two differ by float32's rounding of the scale, so the scales
    and the training they steer are compared at float32's tolerances."""
    ours, ref = make_model(dtype=dtype), make_model(dtype=dtype)
    opt = optim.build_optimizer("sgd_sai", ours, lr=1e-3, momentum=0.9, weight_decay=0.1)
    ref_opt = SGD_sai(decay_groups(ref, 0.1), lr=1e-3, momentum=0.9, eps=1e-8)
    data = batches(STEPS)
    with quiet():
        ref_losses = train_scheduled(ref, ref_opt, data)
    family = f"SGD-SaI = sgd-sai 1.0.3's, {STEPS} steps, {DTYPE_NAMES[dtype]}"
    check(family, train_scheduled(ours, opt, data), ref_losses, F32_TRAINING)
    check(family, ours, ref, F32_TRAINING)
    for p, ref_p in zip(ours.parameters(), ref.parameters()):   # the frozen scales: its g-SNRs
        check("SGD-SaI's scale = sgd-sai 1.0.3's g-SNR", opt.state[p]["scale"],
              ref_opt.state[ref_p]["gsnr"], F32_COMPUTATION)


@BOTH_DTYPES
@pytest.mark.parametrize("foreach", [False, True])
def test_adam_mini_matches_reference(foreach, dtype):
    ours, ref = make_model(dtype=dtype), make_model(dtype=dtype)
    opt = optim.build_optimizer("adam_mini", ours, lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                                weight_decay=0.1, foreach=foreach)
    with quiet():
        ref_opt = Adam_mini(ref.named_parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1, dim=32, n_heads=4)
        data = batches(STEPS)
        ref_losses = train_scheduled(ref, ref_opt, data)
    family = f"Adam-mini = adam-mini 1.1.1's, {STEPS} steps, {DTYPE_NAMES[dtype]}"
    check(family, train_scheduled(ours, opt, data), ref_losses, TRAINING[dtype])
    check(family, ours, ref, TRAINING[dtype])


def test_adam_mini_foreach_matches_single_tensor():
    """The batched path equals the per-tensor reference to float32 rounding, one tensor for
    every rule."""
    rules = {(12, 4): ("qkv", 2), (8, 4): ("heads", 2), (6, 4): "rows", (5, 3): "tensor",
             (7,): "full"}
    torch.manual_seed(0)
    initial = [torch.randn(shape) for shape in rules]
    grads = [[torch.randn(shape) * torch.rand(1) for shape in rules] for _ in range(10)]
    results = []
    for foreach in (False, True):
        params = [nn.Parameter(t.clone()) for t in initial]
        opt = optim.AdamMini(params, lr=1e-2, weight_decay=0.1, foreach=foreach,
                             block_rules=dict(zip(params, rules.values())))
        for step_grads in grads:
            for p, g in zip(params, step_grads):
                p.grad = g
            opt.step()
        results.append(params)
    for single, multi in zip(*results):   # foreach: addcmul_ on views; per tensor: sub_ of a cat
        check("Adam-mini foreach = per tensor, 10 steps of one tensor, float32", multi, single,
              F32_COMPUTATION)


def test_adam_mini_with_element_blocks_is_adamw():
    """Blocks of one element make Adam-mini's v exactly Adam's: the two must agree."""
    mini, adamw = make_model(), make_model()
    rules = {p: "full" for p in mini.parameters()}
    data = batches(10)
    train(mini, optim.AdamMini(mini.parameters(), lr=1e-2, weight_decay=0.1, block_rules=rules),
          data)
    train(adamw, optim.AdamW(adamw.parameters(), lr=1e-2, weight_decay=0.1), data)
    check("Adam-mini with element blocks = AdamW, 10 steps, float32", mini, adamw, F32_TRAINING)


def test_adam_mini_fused_qkv_equals_separate_q_k_v():
    """("qkv", n) on a fused [Q; K; V] weight must give the same steps as ("heads", n) on Q and
    K and "rows" on V held as separate tensors."""
    torch.manual_seed(0)
    n_head, dim = 4, 16
    fused = nn.Parameter(torch.randn(3 * dim, dim))
    q, k, v = (nn.Parameter(t.clone()) for t in fused.detach().split(dim))
    opt_fused = optim.AdamMini([fused], lr=1e-2, block_rules={fused: ("qkv", n_head)})
    opt_split = optim.AdamMini([q, k, v], lr=1e-2, block_rules={
        q: ("heads", n_head), k: ("heads", n_head), v: "rows"})
    for _ in range(5):
        grad = torch.randn(3 * dim, dim) * torch.rand(3 * dim, 1)   # rows of different scales
        fused.grad = grad.clone()
        q.grad, k.grad, v.grad = (g.clone() for g in grad.split(dim))
        opt_fused.step()
        opt_split.step()
    torch.testing.assert_close(fused.detach(), torch.cat([q, k, v]).detach(), rtol=0, atol=0)
    assert opt_fused.state[fused]["exp_avg_sq"].numel() == n_head + n_head + dim


def test_block_layout_rules():
    assert optim.block_layout("full", (6,)) == [(6, 1)]
    assert optim.block_layout("tensor", (4, 5)) == [(1, 20)]
    assert optim.block_layout("rows", (4, 5)) == [(4, 5)]
    assert optim.block_layout(("heads", 2), (4, 5)) == [(2, 10)]
    # fused (3 x 8, 5) with 2 heads: Q 2 heads of 4 rows, K likewise, V 8 rows
    assert optim.block_layout(("qkv", 2), (24, 5)) == [(2, 20), (2, 20), (8, 5)]


@pytest.mark.parametrize("rule", optim.SAI_RULES)
def test_sgd_sai_sai_rules(rule):
    """The first step moves each block by exactly lr * s_i * g_1 (m_1 = g_1, no weight decay),
    with s_i as the rule defines it."""
    model = make_model().double()       # float64, so p0 - p1 is not lost to rounding
    before = [p.detach().clone() for p in model.parameters()]
    opt = optim.SGDSaI(model.parameters(), lr=1e-3, weight_decay=0.0, sai_rule=rule)
    xy = batches(1)[0]
    loss = nn.functional.cross_entropy(model(xy[:, :-1]).flatten(0, 1), xy[:, 1:].flatten())
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    gsnr = [g.float().norm() / (g.float().std() + 1e-8) for g in grads]   # s_i in float32
    expected = {"gsnr": gsnr,
                "gsnr_max": [s / max(gsnr) for s in gsnr],
                "sqrt_numel": [torch.tensor(math.sqrt(g.numel())) for g in grads],
                "none": [torch.tensor(1.0) for _ in grads]}[rule]
    for p, p0, g, s in zip(model.parameters(), before, grads, expected):
        assert opt.state[p]["scale"].dtype == torch.float32
        check("SGD-SaI's scale by its rule, float32", opt.state[p]["scale"], s, F32_COMPUTATION)
        # float64 weights and steps; lr * s is a float32 product (s is held in float32)
        check("SGD-SaI's first step = lr s g, float64 (lr s in float32)", p0 - p.detach(),
              1e-3 * opt.state[p]["scale"].double() * g, F32_COMPUTATION)


def test_sgd_sai_degenerate_blocks_take_finite_sgd_sized_steps():
    """A scalar and a zero-spread gradient have no g-SNR: the scale falls back to sqrt(numel)
    (the official code would scale by ~1e8, 1 / eps, or freeze the block at 0)."""
    scalar = nn.Parameter(torch.tensor(1.0))
    flat = nn.Parameter(torch.zeros(16))
    zero = nn.Parameter(torch.ones(9))
    opt = optim.SGDSaI([scalar, flat, zero], lr=0.1, weight_decay=0.0)
    scalar.grad = torch.tensor(0.5)
    flat.grad = torch.full((16,), 0.25)            # constant: std = 0
    zero.grad = torch.zeros(9)                     # all zero: std = 0, norm = 0
    opt.step()
    assert [opt.state[p]["scale"].item() for p in (scalar, flat, zero)] == [1.0, 4.0, 3.0]
    check("SGD-SaI's step on degenerate blocks, float32", scalar, 1.0 - 0.1 * 1.0 * 0.5,
          F32_COMPUTATION)
    check("SGD-SaI's step on degenerate blocks, float32", flat,
          torch.full((16,), -0.1 * 4.0 * 0.25), F32_COMPUTATION)
    assert torch.equal(zero.detach(), torch.ones(9))       # a zero gradient: no step


def test_sgd_sai_late_block_gets_its_scale_at_its_first_gradient():
    early, late = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))
    for rule in ("gsnr", "gsnr_max"):
        opt = optim.SGDSaI([early, late], lr=1e-2, sai_rule=rule)
        early.grad, late.grad = torch.randn(8, 8), None
        opt.step()
        assert "scale" not in opt.state[late] and "momentum_buffer" not in opt.state[late]
        early_scale = opt.state[early]["scale"].clone()
        early.grad, late.grad = torch.randn(8, 8), torch.randn(8, 8) * 3 + 1
        before = late.detach().clone()
        opt.step()
        raw = late.grad.norm() / (late.grad.std() + 1e-8)
        reference = opt.param_groups[0]["gsnr_max"] if rule == "gsnr_max" else 1.0
        check("SGD-SaI's scale by its rule, float32", opt.state[late]["scale"], raw / reference,
              F32_COMPUTATION)
        assert torch.equal(opt.state[early]["scale"], early_scale)   # frozen
        assert torch.equal(opt.state[late]["momentum_buffer"], late.grad)   # m_1 = g_k
        expected = (before.double() * (1 - 1e-2 * 1e-2)
                    - 1e-2 * opt.state[late]["scale"].double() * late.grad.double())
        check("SGD-SaI's first step = lr s g, float32", late, expected, F32_COMPUTATION)


def test_sgd_sai_nan_gradient_at_scale_step_raises_naming_the_parameter():
    model = make_model()
    opt = optim.build_optimizer("sgd_sai", model, lr=1e-3)
    before = copy.deepcopy(model.state_dict())
    xy = batches(1)[0]
    nn.functional.cross_entropy(model(xy[:, :-1]).flatten(0, 1), xy[:, 1:].flatten()).backward()
    model.blocks[1].v_proj.weight.grad[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"blocks\.1\.v_proj\.weight.*NaN or Inf"):
        opt.step()
    assert all(not s for s in opt.state.values())          # nothing frozen, all or nothing
    for k, v in model.state_dict().items():                 # nothing updated
        assert torch.equal(v, before[k])


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_state_dict_round_trip_continues_identically(name):
    model = make_model()
    hp = {"lr": 1e-3} if name == "sgd_sai" else {"lr": 1e-2}
    opt = optim.build_optimizer(name, model, weight_decay=0.1, **hp)
    data = batches(20)
    train(model, opt, data[:10])
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    uninterrupted = train(model, opt, data[10:])

    resumed = make_model(seed=123)                          # different init, then loaded
    resumed.load_state_dict(saved_model)
    resumed_opt = optim.build_optimizer(name, resumed, weight_decay=0.0, lr=5.0)
    resumed_opt.load_state_dict(saved_opt)                  # hyperparameters come back too
    assert train(resumed, resumed_opt, data[10:]) == uninterrupted
    assert max_rel_diff(resumed, model) == 0.0


def test_sgd_sai_scales_stay_float32_through_state_dict():
    p = nn.Parameter(torch.randn(64, dtype=torch.bfloat16))
    opt = optim.SGDSaI([p], lr=1e-3)
    p.grad = torch.randn(64, dtype=torch.bfloat16)
    opt.step()
    scale = opt.state[p]["scale"]
    restored = optim.SGDSaI([p], lr=1e-3)
    restored.load_state_dict(opt.state_dict())
    assert restored.state[p]["scale"].dtype == torch.float32
    assert torch.equal(restored.state[p]["scale"], scale)


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_params_without_grad_are_skipped(name):
    """A parameter whose .grad is None gets no state and no update (not even weight decay)."""
    model = make_model()
    opt = optim.build_optimizer(name, model, lr=1e-2, weight_decay=0.1)
    before = copy.deepcopy(model.state_dict())
    model.embed.weight.grad = torch.ones_like(model.embed.weight)
    opt.step()
    assert [p for p, s in opt.state.items() if s] == [model.embed.weight]
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]) != (key == "embed.weight"), key

    train(model, opt, batches(1))                     # now every parameter has state
    model.lm_head.weight.grad = None
    model.embed.weight.grad = torch.ones_like(model.embed.weight)
    head = model.lm_head.weight.detach().clone()
    opt.step()
    assert torch.equal(model.lm_head.weight, head)


def test_state_bytes_exact():
    """Exact optimizer-state bytes for TinyLM (vocab 50, width 32, 4 heads, 2 layers, 16 positions),
    float32: N = 28,928 parameters in 29 tensors."""
    counts = {}
    for name in optim.OPTIMIZERS:
        model = make_model()
        opt = optim.build_optimizer(name, model, lr=1e-3)
        train(model, opt, batches(1))
        counts[name] = optim.state_bytes(opt)
    n_params = sum(p.numel() for p in make_model().parameters())
    assert n_params == 28_928
    assert counts["adamw"] == 2 * n_params * 4
    assert counts["sgd_sai"] == n_params * 4 + 29 * 4          # momentum + one scale per tensor
    # Adam-mini blocks: wpe 1, embed 50 rows, lm_head 50 rows, final norm 1 + 32 (bias, full),
    # per layer: norms 2 x (1 + 32), q and k 4 heads each, v and o 32 rows each,
    # mlp 128 rows + 128 bias + 32 rows + 32 bias = 458; total 1 + 50 + 50 + 33 + 2 x 458 = 1050
    assert counts["adam_mini"] == n_params * 4 + 1050 * 4
    assert counts["sgd_sai"] / counts["adamw"] == pytest.approx(0.5, abs=0.01)


def test_partition_table_lists_every_parameter():
    model = make_model()
    table = optim.partition_table(model, optim.block_rules(model))
    assert "blocks.0.q_proj.weight" in table and "('heads', 4)" in table
    assert table.splitlines()[-1].split()[-1] == "1050"
    assert "declared by TinyLM.param_kinds()" in table.splitlines()[0]
    assert len(table.splitlines()) == 3 + len(list(model.parameters()))


BAD_HPARAMS = [
    ("adamw", {"lr": -1.0}, ValueError, r"lr=-1\.0 .*\[0\.0"),
    ("adamw", {"lr": float("nan")}, ValueError, r"lr=nan"),
    ("adamw", {"lr": "0.1"}, TypeError, r"lr must be a number"),
    ("adamw", {"betas": (1.0, 0.99)}, ValueError, r"betas\[0\]=1\.0 .*\[0\.0, 1\.0\)"),
    ("adam_mini", {"betas": (0.9, -0.1)}, ValueError, r"betas\[1\]=-0\.1"),
    ("sgd_sai", {"momentum": 1.0}, ValueError, r"momentum=1\.0 .*\[0\.0, 1\.0\)"),
    ("sgd_sai", {"eps": -1e-8}, ValueError, r"eps=-1e-08"),
    ("adamw", {"weight_decay": -0.1}, ValueError, r"weight_decay=-0\.1"),
    ("sgd_sai", {"sai_rule": "snr"}, ValueError, r"sai_rule='snr' .*'gsnr'"),
    ("sgd_sai", {"betas": (0.9, 0.99)}, TypeError, r"does not take \['betas'\].*momentum"),
]


@pytest.mark.parametrize("name,hparams,error,message", BAD_HPARAMS)
def test_bad_hyperparameters_raise_specific_errors(name, hparams, error, message):
    with pytest.raises(error, match=message):
        optim.build_optimizer(name, make_model(), **{"lr": 1e-3, **hparams})


def test_unknown_optimizer_lists_valid_names():
    with pytest.raises(ValueError, match=r"'adam'.*\['adafactor', 'adam_mini', 'adam_pe', "
                                         r"'adamw', 'apollo', 'apollo_mini', 'muon', 'sgd_sai', "
                                         r"'sign_sgd'\]"):
        optim.build_optimizer("adam", make_model(), lr=1e-3)


@pytest.mark.filterwarnings("ignore:Adam-mini found no Q or K")
@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_sparse_gradient_is_rejected(name):
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Linear(4, 4))
    opt = optim.build_optimizer(name, model, lr=1e-3)
    model(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match=r"0\.weight has a sparse gradient"):
        opt.step()


@pytest.mark.parametrize("rule,message", [
    (("heads", 5), r"blocks\.0\.q_proj\.weight: .*5 heads do not divide the 32 rows"),
    (("qkv", 4), r"fused QKV weight needs rows divisible by 3 x 4"),
    ("per_head", r"'per_head' is not one of"),
])
def test_bad_partition_rule_names_parameter(rule, message):
    model = make_model()
    rules = {**optim.block_rules(model), model.blocks[0].q_proj.weight: rule}
    with pytest.raises(ValueError, match=message):
        optim.AdamMini(model.named_parameters(), lr=1e-3, block_rules=rules)


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_trainer_options_map_onto_each_optimizers_arguments(name):
    """beta1 is SGD-SaI's momentum and the others' b1; sai_rule reaches SGD-SaI only, beta2 the
    others only; weight decay goes to the matrices' group, never to biases and norms."""
    options = SimpleNamespace(lr=0.01, weight_decay=0.2, beta1=0.8, beta2=0.95,
                              sai_rule="gsnr_max")
    opt = optim.build_optimizer(name, make_model(), **optim.trainer_hparams(name, options))
    matrices, vectors = opt.param_groups
    assert (matrices["lr"], matrices["weight_decay"], vectors["weight_decay"]) == (0.01, 0.2, 0)
    assert all(p.dim() >= 2 for p in matrices["params"])
    assert all(p.dim() < 2 for p in vectors["params"])
    if name == "sgd_sai":
        assert (matrices["momentum"], matrices["sai_rule"]) == (0.8, "gsnr_max")
        assert "betas" not in matrices
    elif name == "adafactor":                        # no first moment, its own b2 schedule
        assert "betas" not in matrices and "momentum" not in matrices
    else:                                            # Muon: its AdamW part's; momentum its own
        assert matrices["betas"] == (0.8, 0.95) and "sai_rule" not in matrices
        assert matrices.get("momentum", 0.95) == 0.95


@pytest.mark.parametrize("name", sorted(optim.OPTIMIZERS))
def test_build_optimizer_logs_the_partition_or_projection_it_uses(name):
    model, lines = make_model(), []
    opt = optim.build_optimizer(name, model, log=lines.append, lr=1e-3)
    n_params = sum(p.numel() for p in model.parameters())
    step_line = [f"optimizer step: eager ({n_params:,} parameters; fused=None compiles from "
                 "1,048,576 on a CPU or GPU, fused=True always)"] if name != "muon" else []
    assert lines[len(lines) - len(step_line):] == step_line     # the tiny model: not worth it
    lines = lines[:len(lines) - len(step_line)]
    if name == "adam_mini":
        assert lines == [optim.partition_table(model, optim.block_rules(model))]
    elif name in ("apollo", "apollo_mini", "muon"):
        by, key = ("Muon", "orthogonalized") if name == "muon" else ("APOLLO", "projected")
        table = lines[0].splitlines()
        assert len(lines) == 1 and table[-1] == f"12 of 29 tensors updated by {by}"
        rows = {row.split()[0]: row.split()[-1] for row in table[2:-1]}
        flags = dict(zip(opt.param_groups[0]["params"], opt.param_groups[0][key]))
        for param_name, p in model.named_parameters():
            assert rows[param_name] == (by if flags.get(p) else "AdamW")
    else:
        assert lines == []


def test_partition_figure_colors_every_block_of_the_gpt():
    """plots/partition.py's block ids: as many as Adam-mini keeps second moments, each a
    contiguous run (Q and K per head, V per row of a fused QKV)."""
    from nanogpt_sai import GPT, Config
    from plots import partition
    model = GPT(Config(), vocab_size=65)
    rules = optim.block_rules(model)
    for name, p in model.named_parameters():
        ids = partition.block_ids(rules[p], tuple(p.shape)).flatten()
        n_blocks = sum(n for n, _ in optim.block_layout(rules[p], tuple(p.shape)))
        assert ids.unique().numel() == n_blocks and bool((ids.diff() >= 0).all())
    qkv = partition.block_ids(("qkv", 4), (384, 128))
    assert qkv[:32].unique().tolist() == [0] and qkv[352:].unique().numel() == 32
