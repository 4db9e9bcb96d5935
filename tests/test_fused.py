"""The fused path (each update function compiled by torch.compile) against the eager one it
compiles, its fallback when no compiler works, and when it is chosen by default."""
import warnings

import pytest
import torch
from torch import nn

import optim
from tiny_models import batches, make_model, max_rel_diff, train_scheduled

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
    assert fused_losses == pytest.approx(eager_losses, rel=1e-6)
    assert max_rel_diff(fused, eager) < 1e-6
    for p in fused.parameters():        # the same state, compiled or not
        for key, value in fused_opt.state[p].items():
            ref = eager_opt.state[dict(zip(fused.parameters(), eager.parameters()))[p]][key]
            if torch.is_tensor(value):
                torch.testing.assert_close(value, ref, rtol=1e-5,
                                           atol=1e-6 * ref.abs().max().item())
            else:
                assert value == ref


def test_a_failed_compile_warns_once_and_steps_eagerly(monkeypatch):
    """Where torch.compile cannot run (no C++ compiler, an unsupported device) the step is the
    eager one, after one warning, and the optimizer stays eager."""
    def no_compiler(device_type):
        def fail(*args):
            raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found\nmore lines")
        return fail

    monkeypatch.setattr(optim, "_compiled", no_compiler)
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


def test_same_shaped_tensors_step_in_loops_of_their_own():
    """On a CPU the fused step gives each tensor its own loop (FUSED_COMPILE_OPTIONS): inductor's
    default joins same-shaped tensors into one loop because they read the same 0-d step numbers,
    and a loop over many tensors' memory streams at once runs slower."""
    from torch._inductor import metrics
    params = [nn.Parameter(torch.randn(48, 40)) for _ in range(2)]   # shapes no other test uses
    for p in params:
        p.grad = torch.randn_like(p)
    metrics.reset()
    with torch._inductor.config.patch(fx_graph_cache=False):         # generate the code anew
        optim.AdamW(params, lr=1e-2, fused=True).step()
    assert metrics.generated_cpp_vec_kernel_count == 2     # inductor's default makes it 1


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
