"""bench.py runs end to end and reports every optimizer and every target (timings untested)."""
import bench


def test_bench_reports_every_optimizer_and_target(capsys):
    assert bench.main(["--steps=1", "--rounds=1"]) == 0
    out = capsys.readouterr().out
    for row in ("torch AdamW (foreach)", "SGD-SaI (ours)", "Adam-mini (ours)",
                "Adam-mini (ours, per-tensor)", "APOLLO (ours)", "APOLLO-Mini (ours)",
                "SGD_sai (official 1.0.3)", "Adam_mini (official 1.1.1)"):
        assert f"| {row} |" in out
    assert out.count("(target <=") == 6
    # the state column is the exact byte count of each optimizer's state
    adamw_line = next(line for line in out.splitlines() if "| AdamW (ours, foreach) |" in line)
    assert adamw_line.split("|")[5].strip() == f"{2 * 10_745_088 * 4 / 2**20:.2f}"


def test_bench_rejects_unknown_mode(capsys):
    assert bench.main(["--what=everything"]) == 2
    assert "--what must be steps or overhead" in capsys.readouterr().err
