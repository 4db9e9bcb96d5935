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
    (["--what=everything"], "--what must be steps, overhead, per_example or memory"),
    (["--sizes=7x7"], "--sizes: unknown size '7x7'"),
    (["--rows=adamw"], "--rows: unknown row 'adamw'"),
    (["--threads=-1"], "--threads must be >= 0"),
])
def test_bench_rejects_bad_options(capsys, argv, message):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


def test_bench_resumes_from_its_results_file(tmp_path, capsys, monkeypatch):
    """--results keeps each finished row: run again, only what is missing is measured (here a
    row whose line a kill cut short), the saved rows print as before; a file from other
    settings is refused, untouched."""
    path = tmp_path / "results.jsonl"
    argv = ["--sizes=6x16", "--rows=torch_sgd_fused,sgd_sai_eager", "--steps=2", "--rounds=1",
            f"--results={path}"]
    assert bench.main(argv) == 0
    first = table_of(capsys.readouterr().out)
    lines = path.read_text().splitlines()
    assert len(lines) == 4                        # settings, machine rates, the two rows
    path.write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:30])
    measured, time_in_process = [], bench.time_in_process
    monkeypatch.setattr(bench, "time_in_process", lambda *args: measured.append(args[3])
                        or time_in_process(*args))
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert measured == ["sgd_sai_eager"] and "2 results from" in out
    again = table_of(out)
    assert again["torch SGD momentum (fused)"] == first["torch SGD momentum (fused)"]
    assert set(again) == set(first)
    assert len(path.read_text().splitlines()) == 4
    before = path.read_text()
    assert bench.main(argv[:2] + ["--steps=4", "--rounds=1", f"--results={path}"]) == 2
    assert "holds results measured with other settings" in capsys.readouterr().err
    assert path.read_text() == before


def test_per_example_report_is_complete_and_consistent(capsys):
    """--what=per_example: a row per size with the three paths and the bound, each ratio its
    time over the plain pass's, the bound at least the plain pass, and a verdict per size that
    agrees with the target."""
    assert bench.main(["--what=per_example", "--sizes=6x16,vit", "--steps=1",
                       "--rounds=1"]) == 0
    out = capsys.readouterr().out
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| 6x16 ") or line.startswith("| vit ")]
    assert [r[0] for r in rows] == ["6x16", "vit"]
    for r in rows:
        plain = float(r[2])
        assert plain > 0
        for cell in r[3:6]:   # times to 4 significant figures, ratios to 2 decimals
            seconds, ratio = re.fullmatch(r"([\de.-]+) \(([\d.]+)x\)", cell).groups()
            assert float(ratio) == pytest.approx(float(seconds) / plain,
                                                 abs=1e-3 * float(ratio) + 0.005)
        assert float(re.match(r"[\de.-]+ \(([\d.]+)x\)", r[5]).group(1)) >= 1.0   # >= plain
        assert re.fullmatch(r"-?[\d.]+ / -?[\d.]+", r[6])   # below a plain pass: negative
    verdicts = re.findall(r"^- (\S+) surgery: ([\d.]+)x .* \(target <= ([\d.]+)x\): (met|MISSED)",
                          out, re.MULTILINE)
    assert [v[0] for v in verdicts] == ["6x16", "vit"]
    for _, ratio, target, verdict in verdicts:
        assert verdict == ("met" if float(ratio) <= float(target) else "MISSED")
