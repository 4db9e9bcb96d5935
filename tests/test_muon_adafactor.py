"""Muon and Adafactor pinned to torch.optim.Muon and torch.optim.Adafactor over 50 steps of a
small transformer under a changing lr, with exact state bytes and their documented splits."""
import pytest
import torch

import optim
from tiny_models import batches, make_model, train, train_scheduled
from tolerance import BOTH_DTYPES, DTYPE_NAMES, TRAINING, check

STEPS, N_PARAMS = 50, 28_928             # TinyLM: vocab 50, width 32, 2 layers, 4 heads


def hidden_and_other(model, weight_decay):
    """torch's Muon takes matrices only: the attention and MLP ones, as optim's split; the rest
    goes to torch's AdamW, with the same lr and decoupled weight decay (no decay on vectors)."""
    hidden = set(optim.projected_params(model))
    others = [p for p in model.parameters() if p not in hidden]
    return ([p for p in model.parameters() if p in hidden],
            optim.decay_groups(others, weight_decay))


@pytest.mark.parametrize("lr_rule,adjust_lr_fn", [("match_rms_adamw", "match_rms_adamw"),
                                                  ("original", "original")])
@pytest.mark.parametrize("nesterov", [True, False])
@BOTH_DTYPES
def test_muon_matches_torch(lr_rule, adjust_lr_fn, nesterov, dtype):
    """Newton-Schulz runs in bfloat16 in both (on float64 weights too): the two agree to the
    last bit there, so float64 keeps its tight tolerance."""
    ours, ref = make_model(dtype=dtype), make_model(dtype=dtype)
    opt = optim.build_optimizer("muon", ours, lr=1e-2, weight_decay=0.1, momentum=0.9,
                                nesterov=nesterov, lr_rule=lr_rule, betas=(0.9, 0.95))
    hidden, other_groups = hidden_and_other(ref, 0.1)
    ref_opts = [torch.optim.Muon(hidden, lr=1e-2, weight_decay=0.1, momentum=0.9,
                                 nesterov=nesterov, adjust_lr_fn=adjust_lr_fn),
                torch.optim.AdamW(other_groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8)]
    data = batches(STEPS)
    ref_losses = train_scheduled(ref, ref_opts, data)          # both under the same warmup
    family = f"Muon = torch's, {STEPS} steps, {DTYPE_NAMES[dtype]}"
    check(family, train_scheduled(ours, opt, data), ref_losses, TRAINING[dtype])
    check(family, ours, ref, TRAINING[dtype])


@BOTH_DTYPES
def test_adafactor_matches_torch(dtype):
    ours, ref = make_model(dtype=dtype), make_model(dtype=dtype)
    opt = optim.build_optimizer("adafactor", ours, lr=2e-2, weight_decay=0.1)
    ref_opt = torch.optim.Adafactor(optim.decay_groups(ref.parameters(), 0.1), lr=2e-2,
                                    foreach=False)
    data = batches(STEPS)
    family = f"Adafactor = torch's, {STEPS} steps, {DTYPE_NAMES[dtype]}"
    check(family, train_scheduled(ours, opt, data), train_scheduled(ref, ref_opt, data),
          TRAINING[dtype])
    check(family, ours, ref, TRAINING[dtype])


@pytest.mark.parametrize("shape", [(96, 600), (600, 96), (40, 256)])
def test_newton_schulz_by_column_blocks_is_torchs(shape):
    """On a CPU, X <- a X + B X runs in place NS_COLUMN_SLICE columns at a time, on its own
    copy: bit-identical to torch's whole-matrix iteration where the wide side is cut into blocks
    (the last one partial) or is exactly one, and a bfloat16 input (a bfloat16 matrix's momentum
    buffer) is left as it was, where torch's divides it in place."""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    assert max(shape) >= optim.NS_COLUMN_SLICE              # one slice or more
    ref = torch.optim._muon._zeropower_via_newtonschulz(g, optim.MUON_NS_COEFFICIENTS, 5, 1e-7)
    assert torch.equal(optim.newton_schulz(g, steps=5), ref)
    g16 = g.bfloat16()
    before = g16.clone()
    assert torch.equal(optim.newton_schulz(g16, steps=5), ref)
    assert torch.equal(g16, before)


def test_newton_schulz_orthogonalises():
    """Singular values of NS(G) lie in the band Jordan's coefficients aim for (~0.7 to ~1.2),
    for wide and tall matrices; the singular vectors are G's (NS(G) G^T is symmetric PSD)."""
    g = torch.randn(24, 40, generator=torch.Generator().manual_seed(0))
    for m in (g, g.T):
        o = optim.newton_schulz(m, steps=5).float()
        s = torch.linalg.svdvals(o)
        assert s.min() > 0.6 and s.max() < 1.25
        sym = o @ m.T if m.shape[0] <= m.shape[1] else m.T @ o
        torch.testing.assert_close(sym, sym.T, rtol=0.05, atol=0.05 * sym.abs().max().item())


def test_state_bytes_exact():
    """TinyLM, float32. Muon: a momentum per attention / MLP matrix (per layer q, k, v, o 32 x 32
    and the MLP's 128 x 32 and 32 x 128: 24,576 floats over both layers), AdamW's 2 floats for
    the other 4,352 parameters. Adafactor: rows + columns per matrix, v per vector."""
    counts = {}
    for name in ("muon", "adafactor"):
        model = make_model()
        opt = optim.build_optimizer(name, model, lr=1e-3)
        train(model, opt, batches(1))
        counts[name] = optim.state_bytes(opt)
    assert counts["muon"] == 4 * (24_576 + 2 * (N_PARAMS - 24_576))
    # matrices: embed 50 x 32, lm_head 50 x 32, wpe 16 x 32, per layer 4 x (32 + 32) and
    # 2 x (128 + 32); vectors: the final norm 2 x 32, per layer 2 norms x 2 x 32 + biases 128 + 32
    matrices = 82 + 82 + 48 + 2 * (4 * 64 + 2 * 160)
    vectors = 64 + 2 * (128 + 160)
    assert counts["adafactor"] == 4 * (matrices + vectors)
    assert counts["muon"] / (8 * N_PARAMS) == pytest.approx(0.575, abs=0.001)


def test_muon_orthogonalises_the_hidden_matrices_only():
    model = make_model()
    opt = optim.build_optimizer("muon", model, lr=1e-3)
    train(model, opt, batches(1))
    hidden = set(optim.projected_params(model))
    for group in opt.param_groups:
        for p, flag in zip(group["params"], group["orthogonalized"]):
            assert flag == (p in hidden)
            assert set(opt.state[p]) == ({"momentum_buffer"} if flag else
                                         {"step", "exp_avg", "exp_avg_sq"})


@pytest.mark.parametrize("name,hparams,message", [
    ("muon", {"lr_rule": "spectral"}, r"lr_rule='spectral' is not one of"),
    ("muon", {"ns_steps": 0}, r"ns_steps=0 .*int >= 1"),
    ("muon", {"momentum": 1.0}, r"momentum=1\.0 .*\[0\.0, 1\.0\)"),
    ("adafactor", {"d": 0.5}, r"d=0\.5 is outside the allowed range \[1\.0, inf\]"),
    ("adafactor", {"beta2_decay": 0.1}, r"beta2_decay=0\.1"),
    ("adafactor", {"eps": (-1.0, 1e-3)}, r"eps\[0\]=-1\.0"),
])
def test_bad_hyperparameters_raise_specific_errors(name, hparams, message):
    with pytest.raises(ValueError, match=message):
        optim.build_optimizer(name, make_model(), **{"lr": 1e-3, **hparams})


def test_one_cycle_lr_cycles_the_adamw_parts_beta1_not_muons_momentum():
    """As Muon's docstring says: OneCycleLR finds betas in the groups and cycles betas[0]; mu
    stays (torch.optim.Muon, which has no betas, would get mu cycled)."""
    model = make_model()
    opt = optim.build_optimizer("muon", model, lr=1e-2, momentum=0.95, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10,
                                                    base_momentum=0.85, max_momentum=0.95)
    beta1s = []
    for xy in batches(5):
        train(model, opt, [xy])
        scheduler.step()
        beta1s.append(opt.param_groups[0]["betas"][0])
    assert len(set(beta1s)) == 5 and min(beta1s) >= 0.85 and max(beta1s) <= 0.95
    assert all(group["momentum"] == 0.95 for group in opt.param_groups)
