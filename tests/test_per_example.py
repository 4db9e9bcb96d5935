"""Per-example gradient statistics (per_example.py) and the optimizers that take them, against
plain references written here: a loop over the examples, each one's gradient by autograd, in
float64, on a tiny GPT; then the GPT trainer driving them."""
import dataclasses
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import nanogpt_sai
import optim
import per_example
import snr
import tiny_models
import vit_sai
from cli import optimizer_names
from fake_data import write_corpus, write_fashion_mnist
from nanogpt_sai import GPT, Config
from run_helpers import is_png, records
from tolerance import F32_COMPUTATION, F32_TRAINING, F64_COMPUTATION, F64_TRAINING, check

# |mean|^2 - trace / B cancels: up to ~1e3 float64 roundings (measured 6e-14); a wrong count
# (B for B - 1) is off by 20%
NOISE_SCALE = 1e3 * F64_COMPUTATION
CFG = dataclasses.replace(Config(), n_layer=1, n_head=2, n_embd=8, block_size=6)
VOCAB, B = 11, 5


def make_model(seed=0):
    torch.manual_seed(seed)
    return GPT(CFG, VOCAB).double()


def batch(seed, n=B):
    g = torch.Generator().manual_seed(seed)
    xy = torch.randint(0, VOCAB, (n, CFG.block_size + 1), generator=g)
    return xy[:, :-1], xy[:, 1:]


def loss_of(out, y):                     # one example's mean token loss (GPT returns a pair)
    return F.cross_entropy(out[0].flatten(0, 1), y.flatten())


def example_grads(model, x, y):
    """[{param: g_i}] by a plain loop: one backward per example."""
    params = [p for p in model.parameters()]
    out = []
    for i in range(len(x)):
        grads = torch.autograd.grad(loss_of(model(x[i:i + 1]), y[i:i + 1]), params)
        out.append(dict(zip(params, grads)))
    return out


@pytest.mark.parametrize("method", ["surgery", "vmap"])
def test_statistics_equal_a_loop_over_examples_and_p_grad_the_plain_backward(method):
    model = make_model()
    x, y = batch(1)
    grads = example_grads(model, x, y)
    loss_of(model(x), y).backward()       # the plain batch gradient (the GPT's own loss is
                                          # float32: its logits are cast for autocast)
    plain = {p: p.grad.clone() for p in model.parameters()}
    model.zero_grad(set_to_none=True)
    for chunk in (None, 2):                                    # whole batch, and 2 + 2 + 1
        stats, loss = per_example.batch_statistics(model, loss_of, x, y, chunk=chunk,
                                                   method=method)
        assert stats.n == B and stats.by_vmap == (() if method == "surgery" else tuple(
            name for name, _ in model.named_parameters()))
        family = "per-example statistics = a loop over examples, float64"
        check(family, loss, loss_of(model(x), y).detach(), F64_COMPUTATION)
        for p in model.parameters():
            gs = torch.stack([g[p] for g in grads])
            check(family, stats.mean[p], gs.mean(0), F64_COMPUTATION)
            check(family, stats.sq_mean[p], gs.square().mean(0), F64_COMPUTATION)
            assert torch.equal(stats.sign_mean[p], gs.sign().mean(0))
            check(family, p.grad, plain[p], F64_COMPUTATION)
        model.zero_grad(set_to_none=True)


def assert_statistics_equal(stats, grads, family, tolerance):
    """stats (BatchStatistics) against per-example gradients [{param: g_i}]: signs exactly,
    except where an example's gradient is within rounding of 0."""
    for p in stats.mean:
        gs = torch.stack([g[p] for g in grads])
        check(family, stats.mean[p], gs.mean(0), tolerance)
        check(family, stats.sq_mean[p], gs.square().mean(0), tolerance)
        # an example's gradient within rounding of 0, measured against the tensor's largest
        # (the key bias's gradient is 0 in exact arithmetic: its per-example values are rounding
        # noise of ~1e-22, whose signs differ between CPUs)
        near_zero = (gs.abs() <= tolerance * gs.abs().amax()).any(0)
        assert torch.equal(stats.sign_mean[p][~near_zero], gs.sign().mean(0)[~near_zero])


def vit_case(dtype, dropout=0.0):
    cfg = dataclasses.replace(vit_sai.Config(), dim=16, depth=2, heads=2, dropout=dropout)
    torch.manual_seed(0)
    model = vit_sai.ViT(cfg, image_size=8, channels=3, num_classes=5).to(dtype)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 3, 8, 8, generator=g).to(dtype)
    y = torch.randint(0, 5, (6,), generator=g)
    return model, lambda out, t: F.cross_entropy(out, t, label_smoothing=0.1), x, y


def gpt_case(dtype, dropout=0.0, bias=True):
    cfg = dataclasses.replace(CFG, n_layer=2, bias=bias, dropout=dropout)
    torch.manual_seed(0)
    return (GPT(cfg, VOCAB).to(dtype), loss_of) + batch(1)


def foreign_case(dtype):
    """tests/tiny_models' TinyLM: its position embedding is a bare nn.Parameter, which no layer
    rule covers."""
    model = tiny_models.make_model(dtype=dtype, vocab=13, dim=8, n_heads=2, block_size=6)
    g = torch.Generator().manual_seed(3)
    xy = torch.randint(0, 13, (5, 7), generator=g)
    return (model, lambda out, t: F.cross_entropy(out.flatten(0, 1), t.flatten()),
            xy[:, :-1], xy[:, 1:])


CASES = {"gpt": gpt_case, "gpt_no_bias": lambda dtype: gpt_case(dtype, bias=False),
         "vit": vit_case, "foreign": foreign_case}
# float32: the surgery and vmap sum the same products in other orders; measured up to 1.3e-6
# relative to each tensor's largest value (a wrong rule or count is off by 1e-1 or more)
SURGERY_F32 = 1e-5


@pytest.mark.parametrize("case", list(CASES))
def test_surgery_equals_vmap_and_single_example_backwards(case):
    """The surgery path against a loop of single-example backwards and against the vmap path,
    on both trainers' models (the GPT's tied embedding, with and without biases; the ViT's
    patch embedding, class token and positions) and on a foreign model whose bare parameter
    falls back to vmap, with a warning naming it: float64 to 1e-12 (signs exact), float32 to
    a margin."""
    model, loss_fn, x, y = CASES[case](torch.float64)
    params = list(model.parameters())
    grads = [dict(zip(params, torch.autograd.grad(loss_fn(model(x[i:i + 1]), y[i:i + 1]),
                                                  params))) for i in range(len(x))]
    if case == "foreign":
        with pytest.warns(UserWarning, match=r"wpe not covered by a layer rule"):
            stats, _ = per_example.batch_statistics(model, loss_fn, x, y, write_grad=False)
        assert stats.by_vmap == ("wpe",)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            stats, _ = per_example.batch_statistics(model, loss_fn, x, y, write_grad=False)
        assert stats.by_vmap == ()
    assert_statistics_equal(stats, grads, "surgery = single-example backwards, float64",
                            F64_COMPUTATION)
    vmap_stats, _ = per_example.batch_statistics(model, loss_fn, x, y, write_grad=False,
                                                 method="vmap")
    for key in per_example.KEYS:
        for p in params:
            check("surgery = vmap, float64", getattr(stats, key)[p], getattr(vmap_stats, key)[p],
                  F64_COMPUTATION)

    model32, loss_fn, x, y = CASES[case](torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours, _ = per_example.batch_statistics(model32, loss_fn, x, y, write_grad=False)
    for key in ("mean", "sq_mean"):
        for p, p64 in zip(model32.parameters(), params):
            scale = getattr(stats, key)[p64].abs().max().clamp(min=1e-30)
            check("surgery float32 = float64, relative to the tensor's largest value",
                  (getattr(ours, key)[p].double() - getattr(stats, key)[p64]).abs().max() / scale,
                  0.0, SURGERY_F32)


@pytest.mark.parametrize("case", ["gpt", "vit"])
def test_surgery_with_dropout_equals_backwards_through_the_same_forward(case):
    """With dropout each example keeps its own mask: the surgery's statistics equal each
    example's gradient taken through the same batched forward (the same seed draws the same
    masks), float64."""
    model, loss_fn, x, y = (gpt_case if case == "gpt" else vit_case)(torch.float64,
                                                                     dropout=0.3)
    model.train()
    params = list(model.parameters())
    torch.manual_seed(7)
    out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    grads = []
    for i in range(len(x)):
        one = (logits[i:i + 1],) if isinstance(out, tuple) else logits[i:i + 1]
        grads.append(dict(zip(params, torch.autograd.grad(loss_fn(one, y[i:i + 1]), params,
                                                          retain_graph=True))))
    torch.manual_seed(7)
    stats, _ = per_example.batch_statistics(model, loss_fn, x, y, write_grad=False)
    assert_statistics_equal(stats, grads, "surgery with dropout = backwards through the same "
                            "forward, float64", F64_COMPUTATION)
    torch.manual_seed(8)   # another draw of the masks: other statistics
    other, _ = per_example.batch_statistics(model, loss_fn, x, y, write_grad=False)
    assert not torch.allclose(other.sq_mean[params[0]], stats.sq_mean[params[0]])


def test_merged_micro_batches_equal_one_batch():
    """merge: the statistics of two micro-batches together are those of their examples as one
    batch (the count weighs each), signs exact."""
    model, _, x, y = gpt_case(torch.float64)
    whole, _ = per_example.batch_statistics(model, loss_of, x, y, write_grad=False)
    parts = [per_example.batch_statistics(model, loss_of, x[a:b], y[a:b], write_grad=False)[0]
             for a, b in ((0, 2), (2, 5))]
    merged = per_example.merge(parts)
    assert merged.n == whole.n == 5
    for key in per_example.KEYS:
        for p in whole.mean:
            check("merged micro-batches = one batch, float64", getattr(merged, key)[p],
                  getattr(whole, key)[p], F64_COMPUTATION)
    assert all(torch.equal(merged.sign_mean[p], whole.sign_mean[p]) for p in whole.mean)
    with pytest.raises(ValueError, match="method must be surgery or vmap"):
        per_example.batch_statistics(model, loss_of, x, y, method="hooks")


def reference_sign_step(params, grads, ms, lr, momentum, wd, placement):
    for p in params:
        gs = torch.stack([g[p] for g in grads])
        mean = gs.mean(0)
        if placement == "signum":
            ms[p] = momentum * ms[p] + (1 - momentum) * mean
            d = ms[p].sign()
        else:
            signs = mean.sign() if placement == "sign_of_mean" else gs.sign().mean(0)
            ms[p] = momentum * ms[p] + (1 - momentum) * signs
            d = ms[p]
        p.mul_(1 - lr * wd).sub_(lr * d)


def reference_adam_step(params, grads, ms, vs, t, lr, b1, b2, eps, wd, preconditioner):
    for p in params:
        gs = torch.stack([g[p] for g in grads])
        n, mean = len(gs), gs.mean(0)
        s2 = gs.var(0, unbiased=True) if n > 1 else torch.zeros_like(mean)
        term = {"batch": mean ** 2, "mean_sq": mean ** 2 - s2 / n, "variance": s2 / n,
                "second_moment": (gs ** 2).mean(0)}[preconditioner]
        ms[p] = b1 * ms[p] + (1 - b1) * mean
        vs[p] = b2 * vs[p] + (1 - b2) * term
        m_hat, v_hat = ms[p] / (1 - b1 ** t), vs[p].clamp(min=0) / (1 - b2 ** t)
        p.mul_(1 - lr * wd).sub_(lr * m_hat / (v_hat.sqrt() + eps))


def run_both(make_opt, reference, steps=3, n=B):
    """Our optimizer through batch_statistics and the reference loop, from the same weights."""
    ours, ref = make_model(), make_model()
    opt = make_opt(ours)
    ref_state = {}
    for step in range(steps):
        x, y = batch(10 + step, n)
        stats, _ = per_example.batch_statistics(ours, loss_of, x, y)
        opt.step(stats)
        opt.zero_grad(set_to_none=True)
        grads = example_grads(ref, x, y)
        with torch.no_grad():
            reference(list(ref.parameters()), grads, ref_state, step + 1)
    return ours, ref, opt


@pytest.mark.parametrize("placement", optim.SIGN_PLACEMENTS)
def test_sign_sgd_equals_the_reference(placement):
    hp = dict(lr=1e-2, momentum=0.9, weight_decay=0.1)

    def reference(params, grads, state, t):
        ms = state.setdefault("m", {p: torch.zeros_like(p) for p in params})
        reference_sign_step(params, grads, ms, hp["lr"], hp["momentum"], hp["weight_decay"],
                            placement)
    ours, ref, opt = run_both(lambda m: optim.PerExampleSignSGD(m.parameters(), **hp,
                                                                placement=placement), reference)
    check("per-example sign SGD = its reference, 3 steps, float64", ours, ref, F64_TRAINING)
    n_params = sum(p.numel() for p in ours.parameters())
    assert optim.state_bytes(opt) == 8 * n_params                 # m, float64


@pytest.mark.parametrize("preconditioner", optim.PRECONDITIONERS)
def test_per_example_adam_equals_the_reference(preconditioner):
    """eps 1e-4: "mean_sq" and "variance" make v 0 where one part vanishes, and a step of
    lr m / eps then amplifies rounding beyond any comparison."""
    hp = dict(lr=1e-2, b1=0.9, b2=0.99, eps=1e-4, wd=0.1)

    def reference(params, grads, state, t):
        ms = state.setdefault("m", {p: torch.zeros_like(p) for p in params})
        vs = state.setdefault("v", {p: torch.zeros_like(p) for p in params})
        reference_adam_step(params, grads, ms, vs, t, hp["lr"], hp["b1"], hp["b2"], hp["eps"],
                            hp["wd"], preconditioner)
    ours, ref, opt = run_both(lambda m: optim.PerExampleAdam(
        m.parameters(), lr=hp["lr"], betas=(hp["b1"], hp["b2"]), eps=hp["eps"],
        weight_decay=hp["wd"], preconditioner=preconditioner), reference)
    check("per-example Adam = its reference, 3 steps, float64", ours, ref, F64_TRAINING)
    n_params = sum(p.numel() for p in ours.parameters())
    assert optim.state_bytes(opt) == 2 * 8 * n_params             # m and v, float64


def test_with_one_example_the_two_sign_placements_coincide():
    ones = [run_both(lambda m: optim.PerExampleSignSGD(m.parameters(), lr=1e-2,
                                                        placement=placement),
                     lambda *args: None, n=1)[0] for placement in ("sign_of_mean",
                                                                   "mean_of_signs")]
    for a, b in zip(*(m.parameters() for m in ones)):
        assert torch.equal(a, b)


def test_with_equal_examples_the_preconditioners_are_adam():
    """Every example the same (zero variance): batch, mean_sq and second_moment all take
    AdamW's step; and mean_sq's v plus variance's v is batch's v on any batch."""
    x, y = batch(3, n=1)
    x, y = x.repeat(4, 1), y.repeat(4, 1)
    models = {}
    for preconditioner in ("batch", "mean_sq", "second_moment"):
        model = make_model()
        opt = optim.PerExampleAdam(model.parameters(), lr=1e-2, eps=1e-8,
                                   preconditioner=preconditioner)
        for _ in range(3):
            opt.step(per_example.batch_statistics(model, loss_of, x, y)[0])
            opt.zero_grad(set_to_none=True)
        models[preconditioner] = model
    adamw_model = make_model()
    adamw = optim.AdamW(adamw_model.parameters(), lr=1e-2, fused=False)
    for _ in range(3):
        loss_of(adamw_model(x), y).backward()
        adamw.step()
        adamw.zero_grad(set_to_none=True)
    for model in models.values():
        check("per-example Adam with equal examples = AdamW, 3 steps, float64", model,
              adamw_model, F64_TRAINING)

    model = make_model()
    stats, _ = per_example.batch_statistics(model, loss_of, *batch(4))
    vs = {}
    for preconditioner in ("batch", "mean_sq", "variance"):
        p0 = next(iter(stats.mean))
        vs[preconditioner] = optim.per_example_v_term(stats.mean[p0], stats.sq_mean[p0],
                                                      stats.n, preconditioner)
    check("mean_sq + variance = batch, float64", vs["mean_sq"] + vs["variance"], vs["batch"],
          F64_COMPUTATION)


def test_without_statistics_each_grad_is_a_batch_of_one():
    """step() alone (as torch.distributed.checkpoint's state initialisation calls it) takes
    .grad as one example's gradient: the step of batch_statistics on that one example."""
    x, y = batch(5, n=1)
    models = [make_model(), make_model()]
    opts = [optim.PerExampleAdam(m.parameters(), lr=1e-2) for m in models]
    opts[0].step(per_example.batch_statistics(models[0], loss_of, x, y)[0])
    loss_of(models[1](x), y).backward()
    opts[1].step()
    check("per-example step of one example = step(), float64", models[0], models[1],
          F64_COMPUTATION)


def test_bad_input_is_a_clear_error():
    model = make_model()
    opt = optim.PerExampleSignSGD(model.parameters())
    with pytest.raises(TypeError, match="takes the batch's per-example statistics"):
        opt.step({"mean": {}})
    with pytest.raises(ValueError, match="placement='sign'"):
        optim.PerExampleSignSGD(model.parameters(), placement="sign")
    with pytest.raises(ValueError, match="preconditioner='mean'"):
        optim.PerExampleAdam(model.parameters(), preconditioner="mean")


@pytest.fixture
def corpus(tmp_path):
    path = write_corpus(tmp_path / "input.txt")
    return ["--data_path=" + str(path), "--data_dir=" + str(tmp_path / "cache")]


TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
        "--eval_iters=2", "--warmup_iters=2", "--sample_tokens=0", "--device=cpu",
        "--max_iters=6", "--log_interval=2"]


@pytest.mark.parametrize("optimizer, variant", [("sign_sgd", "--sign_placement=mean_of_signs"),
                                                ("sign_sgd", "--sign_placement=signum"),
                                                ("adam_pe", "--preconditioner=variance")])
def test_the_gpt_trainer_steps_the_per_example_optimizers(corpus, tmp_path, optimizer, variant):
    out = tmp_path / "run"
    assert nanogpt_sai.main(TINY + corpus + [f"--optimizer={optimizer}", variant,
                                             f"--out_dir={out}"]) == 0
    logged = records(out)
    evals = [r for r in logged if r["event"] == "eval"]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]            # it learns
    config = json.loads((out / "config.json").read_text())
    assert config["optimizer"] == optimizer and variant.split("=")[1] in config.values()
    n_params = json.loads((out / "run.json").read_text())["n_params"]
    state = [r for r in logged if r["event"] == "train"][-1]["state_bytes"]
    assert state == (1 if optimizer == "sign_sgd" else 2) * 4 * n_params


@pytest.mark.parametrize("args, words", [
    (["--optimizer=adam_pe", "--preconditioner=mean"], "--preconditioner must be one of"),
    (["--optimizer=sign_sgd", "--sign_placement=late"], "--sign_placement must be one of")])
def test_per_example_options_refused_with_one_line(corpus, capsys, args, words):
    assert nanogpt_sai.main(TINY + corpus + args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and words in err and len(err.splitlines()) == 1


def test_grad_accum_steps_from_the_statistics_of_the_whole_step(corpus, tmp_path):
    """--grad_accum=2 micro-batches of 4 sequences take the step one batch of the same 8 takes
    (the statistics summed over the micro-batches, each weighed by its count): the same
    weights after 6 steps."""
    base = [a for a in TINY if not a.startswith("--batch_size")] + corpus + [
        "--optimizer=adam_pe", "--preconditioner=variance"]
    weights = {}
    for name, args in (("accum", ["--batch_size=4", "--grad_accum=2"]),
                       ("one", ["--batch_size=8"])):
        assert nanogpt_sai.main(base + args + [f"--out_dir={tmp_path / name}"]) == 0
        weights[name] = torch.load(tmp_path / name / "ckpt.pt")["model"]
    for key, value in weights["one"].items():
        check("grad_accum 2 x 4 = one batch of 8, 6 steps, float32", weights["accum"][key],
              value, F32_TRAINING)


def test_the_vit_steps_the_per_example_optimizers_with_diagnostics(tmp_path):
    """sign_sgd and adam_pe train the ViT (every parameter by the surgery: no vmap warning);
    --diagnostics logs each evaluation's per-block statistics and draws them."""
    write_fashion_mnist(tmp_path / "fmnist", n_train=64, n_test=32)
    common = ["--dim=16", "--depth=1", "--heads=2", "--batch_size=16", "--val_images=16",
              "--warmup_iters=2",
              "--log_interval=2", "--device=cpu", "--epochs=2",
              f"--data_path={tmp_path / 'fmnist'}", f"--data_dir={tmp_path / 'cache'}"]
    # lrs for this 6-step run of a 16-wide ViT (the defaults are the 3-epoch default model's)
    for optimizer, lr in (("sign_sgd", 1e-3), ("adam_pe", 4e-3)):
        out = tmp_path / optimizer
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)
            assert vit_sai.main(common + [f"--optimizer={optimizer}", f"--lr={lr}",
                                          "--diagnostics=True", f"--out_dir={out}"]) == 0
        evals = [r for r in records(out) if r["event"] == "eval"]
        assert [r["epoch"] for r in evals] == [0, 1, 2]
        names = [name for name, _ in vit_sai.ViT(vit_sai.resolve_config(common), 28, 1,
                                                 10).named_parameters()]
        for r in evals:
            assert list(r["diagnostics"]) == names and r["noise_scale"] > 0
        assert evals[-1]["val_loss"] < evals[0]["val_loss"]            # it learns
        n_params = json.loads((out / "run.json").read_text())["n_params"]
        assert evals[-1]["state_bytes"] == (1 if optimizer == "sign_sgd" else 2) * 4 * n_params
        assert is_png(out / "diagnostics.png")


def test_all_means_the_seven_not_the_per_example_two():
    assert optimizer_names("all") == list(optim.OPTIMIZERS)
    assert not set(optim.PER_EXAMPLE_OPTIMIZERS) & set(optimizer_names("all"))


def test_block_diagnostics_follow_their_definitions():
    """g-SNR equals SGD-SaI's statistic and its sqrt((n-1) + n mean^2/std^2) identity; the
    per-example SNR is snr.py's; the noise scale is B_simple from unbiased estimates of the
    per-example covariance's trace and the true gradient's squared norm, per block and over the
    whole model."""
    model = make_model()
    x, y = batch(6)
    stats, _ = per_example.batch_statistics(model, loss_of, x, y, write_grad=False)
    assert all(p.grad is None for p in model.parameters())
    grads, _ = per_example.example_gradients(model, loss_of, x, y)
    snr_table = snr.gradient_snr(grads)
    diagnostics = per_example.block_diagnostics(model, stats)
    for name, p in model.named_parameters():
        d = diagnostics[name]
        check("per-example g-SNR = SGD-SaI's (float32 scale)", d["gsnr"],
              optim.sai_scale(stats.mean[p], "gsnr", eps=0), F32_COMPUTATION)
        family = "block diagnostics = their definitions, float64"
        check(family, d["gsnr_identity"], d["gsnr"], F64_COMPUTATION)
        check(family, d["gsnr_per_sqrt_n"], d["gsnr"] / p.numel() ** 0.5, F64_COMPUTATION)
        check(family, d["example_snr"], snr_table[name][2], F64_COMPUTATION)
        gs = grads[name].double().flatten(1)
        mean = gs.mean(0)
        trace = (gs - mean).square().sum().item() / (B - 1)
        true_signal = mean.square().sum().item() - trace / B
        if true_signal > 0:
            check("noise scale = its definition, float64", d["noise_scale"],
                  trace / true_signal, NOISE_SCALE)
        else:
            assert d["noise_scale"] == math.inf
    flat = torch.cat([grads[name].double().flatten(1) for name in grads], 1)
    trace = (flat - flat.mean(0)).square().sum().item() / (B - 1)
    true_signal = flat.mean(0).square().sum().item() - trace / B
    if true_signal > 0:
        check("noise scale = its definition, float64", per_example.noise_scale(stats),
              trace / true_signal, NOISE_SCALE)
    else:
        assert per_example.noise_scale(stats) == math.inf
    assert any(math.isfinite(d["noise_scale"]) for d in diagnostics.values())   # both cases
    assert any(math.isinf(d["noise_scale"]) for d in diagnostics.values())


def test_trainer_diagnostics_are_logged_at_each_evaluation_and_drawn(corpus, tmp_path):
    out = tmp_path / "run"
    assert nanogpt_sai.main(TINY + corpus + ["--optimizer=sgd_sai", "--eval_interval=3",
                                             "--diagnostics=True", f"--out_dir={out}"]) == 0
    evals = [r for r in records(out) if r["event"] == "eval"]
    assert [r["step"] for r in evals] == [0, 3, 6]
    names = [name for name, _ in nanogpt_sai.GPT(
        nanogpt_sai.resolve_config(TINY + corpus), 60).named_parameters()]
    for r in evals:
        assert list(r["diagnostics"]) == names and r["noise_scale"] > 0
    # SGD-SaI's frozen scales beside, from the first evaluation after the first step
    assert "sai_scale" not in evals[0]["diagnostics"][names[0]]
    scales = torch.load(out / "ckpt.pt")["optimizer"]["state"]
    assert evals[-1]["diagnostics"][names[0]]["sai_scale"] == scales[names[0]]["scale"].item()
    assert is_png(out / "diagnostics.png")
