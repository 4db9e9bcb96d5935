"""memory.py: the model state's exact count, and LiveTensorBytes' count of what a step's
operations allocate at once, against allocations made by hand and against the resident set
(bench.py --what=memory)."""
import re

import pytest
import torch

import bench
import memory
import optim
from tiny_models import make_model

KIB = 1024


def test_live_tensor_bytes_counts_what_operations_create_alive_at_once():
    before = torch.zeros(256)                       # made before: writing into it adds nothing
    with memory.LiveTensorBytes() as live:
        a = torch.ones(1024)                        # 4 KiB
        b = a * 2                                   # 4 KiB more: 8 KiB alive
        view = b[:10]                               # a view of b: no new bytes
        before.add_(1)                              # in place on an older tensor: none
        del a                                       # 4 KiB freed
        c = torch.ones(512)                         # 2 KiB: 6 KiB alive, the peak stays 8
        del b                                       # b's storage lives on in `view`
        assert live.now == 6 * KIB
        del view
        assert live.now == 2 * KIB
    assert live.peak == 8 * KIB and c.numel() == 512


def test_model_state_bytes_is_params_grads_and_state():
    model = make_model()
    opt = optim.build_optimizer("adamw", model, lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    assert memory.model_state_bytes(model, opt) == dict(params=4 * n, grads=4 * n,
                                                        state=8 * n, total=16 * n)


def test_memory_report_is_complete_and_consistent(capsys):
    """--what=memory: a row per optimizer, (a) the exact count, (b) the parameters and state
    plus the counted step peak, the measured peak within the target of the counted one."""
    assert bench.main(["--what=memory", "--sizes=6x16", "--rows=adamw,sgd_sai"]) == 0
    out = capsys.readouterr().out
    rows = {cells[0]: [float(c.rstrip("x")) for c in cells[1:]] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
        if line.startswith("| adamw ") or line.startswith("| sgd_sai "))}
    assert set(rows) == {"adamw", "sgd_sai"}
    layers, heads, width = bench.SIZES["6x16"]
    with torch.device("meta"):                    # memory_row's GPT: context 64
        model = bench.GPT(bench.Config(n_layer=layers, n_head=heads, n_embd=width,
                                       block_size=64), vocab_size=65)
    params = sum(p.numel() for p in model.parameters()) * 4 / 2 ** 20
    state = {"adamw": 2 * params, "sgd_sai": params + len(list(model.parameters())) * 4 / 2**20}
    for name, (a, counted, measured, ratio, b, b_over_a) in rows.items():
        assert a == pytest.approx(2 * params + state[name], abs=0.006)      # 2 decimals
        assert b == pytest.approx(params + state[name] + counted, abs=0.02)
        assert ratio == pytest.approx(measured / counted, abs=0.002 + 0.01 / counted)
        assert b_over_a == pytest.approx(b / a, rel=0.01 / a + 0.002)   # a to 2 decimals
    worst = re.search(r"within ([\d.]+)% \(target <= (\d+)%\): (met|MISSED)", out)
    assert worst.group(3) == ("met" if float(worst.group(1)) <= float(worst.group(2))
                              else "MISSED")
