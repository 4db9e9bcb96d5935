"""The fused path (each update function compiled by torch.compile) against the eager one it
compiles, its fallback when no compiler works, and when it is chosen by default."""
import warnings

import pytest
import torch
from torch import nn

import engine.base
import optim
from tiny_models import batches, make_model, max_rel_diff, train_scheduled
from tolerance import F32_TRAINING, check

FUSED = ("adamw", "sgd_sai", "adam_mini", "apollo", "apollo_mini", "adafactor")
STEPS = 12


def build(name, model, fused):
    lr = 1e-3 if name == "sgd_sai" else 1e-2
    return optim.build_optimizer(name, model, lr=lr, weight_decay=0.1, fused=fused,
                                 **({"foreach": False} if name in ("adamw", "adam_mini") else {}))


@pytest.mark.parametrize("name", FUSED)
def test_fused_step_equals_the_eager_step_it_compiles(name):
    """Same losses and weights to float32 rounding over an lr that changes every step, and one
    compiled graph per param group: steps 2..N (new lr, new bias corrections) reuse step 1's."""
    data = batches(STEPS)
    warm = make_model()
    train_scheduled(warm, build(name, warm, True), data[:1])   # compiles: same shapes, same graph
    eager, fused = make_model(), make_model()
    eager_opt, fused_opt = build(name, eager, False), build(name, fused, True)
    eager_losses = train_scheduled(eager, eager_opt, data)
    with torch._dynamo.config.patch(error_on_recompile=True):
        fused_losses = train_scheduled(fused, fused_opt, data)
    assert fused_opt.fused() and getattr(fused_opt, "fused_error", None) is None
    # inductor's vectorised code rounds as the eager kernels do not (fused multiply-adds, its
    # own reduction order): float32 training's tolerance, far below a wrong compiled update
    family = f"compiled step = eager step, {STEPS} steps, float32"
    check(family, fused_losses, eager_losses, F32_TRAINING)
    check(family, fused, eager, F32_TRAINING)
    for p, eager_p in zip(fused.parameters(), eager.parameters()):   # the same state
        for key, value in fused_opt.state[p].items():
            ref = eager_opt.state[eager_p][key]
            if torch.is_tensor(value) and value.is_floating_point():
                check(family, value, ref, F32_TRAINING)
            else:
                assert torch.equal(value, ref) if torch.is_tensor(value) else value == ref


def test_a_failed_compile_warns_once_and_steps_eagerly(monkeypatch):
    """Where torch.compile cannot run (no C++ compiler, an unsupported device) the step is the
    eager one, after one warning, and the optimizer stays eager."""
    def no_compiler(device_type):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines")
        return fail

    monkeypatch.setattr(engine.base, "compiled_update_each", no_compiler)
    model, ref = make_model(), make_model()
    opt, ref_opt = build("adamw", model, True), build("adamw", ref, False)
    data = batches(3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = train_scheduled(model, opt, data)
    assert [str(w.message) for w in caught] == [
        "AdamW: the fused (compiled) step is unavailable here (RuntimeError: InvalidCxxCompiler: "
        "No working C++ compiler found); stepping eagerly, as fused=False"]
    assert not opt.fused()
    assert losses == train_scheduled(ref, ref_opt, data)      # bit for bit the eager step
    assert max_rel_diff(model, ref) == 0


def test_fused_by_default_only_where_it_pays():
    small = nn.Linear(64, 64)
    big = nn.Linear(1024, optim.FUSED_MIN_NUMEL // 1024)
    assert not optim.AdamW(small.parameters()).fused()
    assert optim.AdamW(big.parameters()).fused()
    assert optim.AdamW(small.parameters(), fused=True).fused()
    assert not optim.AdamW(big.parameters(), fused=False).fused()
    assert not optim.Muon(big.parameters()).fused()          # Muon: eager only
    with pytest.raises(ValueError, match="fused must be None"):
        optim.SGDSaI(small.parameters(), fused="yes")
