"""bench.py runs end to end, and its report holds together: the rows asked for are there, each
ratio is its row's time over the baseline's, each target line agrees with the table, and the
state column is the exact byte count (timings themselves are not tested)."""
import re

import pytest

import bench

MIB = 2 ** 20
ROWS = ("torch_adamw_fused", "torch_sgd_fused", "adamw_eager", "sgd_sai_fused",
        "apollo_mini_eager")


def table_of(out):
    table = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] in bench.ROWS.values():
            table[cells[0]] = dict(ms=float(cells[2]), ratio=float(cells[4].rstrip("x")),
                                   peak=float(cells[6]), mib=float(cells[7]))
    return table


def test_bench_report_is_complete_and_consistent(capsys):
    assert bench.main(["--sizes=4x128", f"--rows={','.join(ROWS)}", "--steps=2",
                       "--rounds=1"]) == 0
    out = capsys.readouterr().out
    assert "| 1 threads |" in out and "load average" in out
    table = table_of(out)
    assert set(table) == {bench.ROWS[row] for row in ROWS}
    base = table["torch AdamW (fused)"]["ms"]
    for row in table.values():  # printed at 2 decimals, from unrounded times: +-0.005 each
        rounding = row["ratio"] * (0.005 / row["ms"] + 0.005 / base) + 0.005
        assert row["ratio"] == pytest.approx(row["ms"] / base, abs=rounding)
        assert row["peak"] >= 0
    model = bench.gpt("4x128", "meta")
    n_params = sum(p.numel() for p in model.parameters())
    n_tensors = len(list(model.parameters()))
    assert table["AdamW (ours, eager foreach)"]["mib"] == round(2 * n_params * 4 / MIB, 2)
    assert table["SGD-SaI (ours, fused)"]["mib"] == round((n_params + n_tensors) * 4 / MIB, 2)

    targets = re.findall(r"^- (.+): ([\d.]+)x (.+) \(target <= ([\d.]+)x\): (met|MISSED)$", out,
                         re.MULTILINE)
    # SGD-SaI (fused, its default path) against torch's fused SGD, its bound and peak memory;
    # APOLLO-Mini's state
    assert [(what, against) for what, _, against, _, _ in targets] == [
        ("SGD-SaI (ours, fused) step", "torch SGD momentum (fused)"),
        ("SGD-SaI (ours, fused) step", "its memory-traffic bound"),
        ("SGD-SaI (ours, fused) peak extra memory", "the model's size"),
        ("APOLLO-Mini state of the 16 projected matrices", "AdamW's for the same matrices")]
    for what, ratio, against, target, verdict in targets:
        assert verdict == ("met" if float(ratio) <= float(target) else "MISSED")
    sai, sgd = table["SGD-SaI (ours, fused)"]["ms"], table["torch SGD momentum (fused)"]["ms"]
    assert float(targets[0][1]) == pytest.approx(sai / sgd, abs=0.0005 + float(targets[0][1])
                                                 * (0.005 / sai + 0.005 / sgd))


@pytest.mark.parametrize("argv, message", [
    (["--what=everything"], "--what must be steps, overhead or per_example"),
    (["--sizes=7x7"], "--sizes: unknown size '7x7'"),
    (["--rows=adamw"], "--rows: unknown row 'adamw'"),
    (["--threads=-1"], "--threads must be >= 0"),
])
def test_bench_rejects_bad_options(capsys, argv, message):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err
