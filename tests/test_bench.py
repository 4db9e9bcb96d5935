"""bench.py runs end to end, and its report holds together: every optimizer and target is there,
each ratio is its row's time over the baseline's, each target line agrees with the table, and
the state column is the exact byte count (timings themselves are not tested)."""
import re

import pytest

import bench

N_PARAMS, N_TENSORS, MIB = 10_745_088, 39, 2 ** 20      # GPT 6x384, vocab 65, no biases
ROWS = ("torch AdamW (foreach)", "torch AdamW (per-tensor)", "AdamW (ours, foreach)",
        "AdamW (ours, per-tensor)", "SGD-SaI (ours)", "Adam-mini (ours)",
        "Adam-mini (ours, per-tensor)", "APOLLO (ours)", "APOLLO-Mini (ours)",
        "SGD_sai (official 1.0.3)", "Adam_mini (official 1.1.1)", "Muon (ours, + AdamW)",
        "torch Muon (+ torch AdamW)", "Adafactor (ours)", "torch Adafactor (foreach)")


def test_bench_report_is_complete_and_consistent(capsys):
    assert bench.main(["--steps=1", "--rounds=1"]) == 0
    out = capsys.readouterr().out
    table = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in ROWS:
            table[cells[0]] = dict(ms=float(cells[1]), ratio=float(cells[3].rstrip("x")),
                                   mib=float(cells[4]), vs_adamw=float(cells[5].rstrip("x")))
    assert set(table) == set(ROWS)
    base = table["torch AdamW (foreach)"]["ms"]
    for name, row in table.items():          # printed at 2 decimals, from unrounded times
        assert row["ratio"] == pytest.approx(row["ms"] / base, abs=0.006 + 0.01 * row["ratio"])
    assert table["AdamW (ours, foreach)"]["mib"] == round(2 * N_PARAMS * 4 / MIB, 2)
    assert table["SGD-SaI (ours)"]["mib"] == round((N_PARAMS + N_TENSORS) * 4 / MIB, 2)
    assert table["SGD-SaI (ours)"]["vs_adamw"] == 0.5

    targets = re.findall(r"^- (.+): ([\d.]+)x (.+) \(target <= ([\d.]+)x\): (met|MISSED)$", out,
                         re.MULTILINE)
    assert len(targets) == 6
    for what, ratio, against, target, verdict in targets:
        assert verdict == ("met" if float(ratio) <= float(target) else "MISSED")
    step_targets = {(w, a): float(r) for w, r, a, _, _ in targets if w.endswith("step")}
    sai = table["SGD-SaI (ours)"]["ms"]
    assert step_targets[("SGD-SaI step", "torch AdamW (foreach)")] == pytest.approx(
        sai / base, rel=0.02, abs=0.002)
    assert step_targets[("SGD-SaI step", "official SGD_sai")] == pytest.approx(
        sai / table["SGD_sai (official 1.0.3)"]["ms"], rel=0.02, abs=0.002)


def test_bench_rejects_unknown_mode(capsys):
    assert bench.main(["--what=everything"]) == 2
    assert "--what must be steps or overhead" in capsys.readouterr().err
