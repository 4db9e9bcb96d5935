"""sweep.py (grids, skip on re-run, divergence) and snr.py (per-example SNR, SaI scales)."""
import csv
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch
import torch.nn.functional as F

import cli
import nanogpt_sai
import optim
import per_example
import snr
import sweep
from fake_data import write_corpus
from run_helpers import ctrl_c_after_step, is_png
from tiny_models import batches, make_model
from tolerance import F32_COMPUTATION, F64_COMPUTATION, check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_GPT = ("n_layer=1 n_head=2 n_embd=16 block_size=16 batch_size=4 max_iters=6 "
            "eval_interval=3 eval_iters=2 warmup_iters=0 sample_tokens=0 device=cpu")


@pytest.fixture
def text(tmp_path):
    path = write_corpus(tmp_path / "input.txt")
    return f"data_path={path} data_dir={tmp_path / 'cache'}"


def test_parse_grid_is_a_union_of_products():
    assert sweep.parse_grid("a=1,2 b=x | a=3") == [
        {"a": "1", "b": "x"}, {"a": "2", "b": "x"}, {"a": "3"}]
    with pytest.raises(ValueError, match="'lr' is not key=value"):
        sweep.parse_grid("optimizer=adamw lr")


def test_sweep_runs_skips_finished_runs_and_records_divergence(tmp_path, text, capsys):
    """2 optimizers x 2 learning rates, one forced to diverge (lr 1e12)."""
    out = tmp_path / "sweep"
    args = ["--grid=optimizer=adamw,sgd_sai lr=1e-3,1e12", "--seeds=1",
            f"--set={TINY_GPT} {text}", f"--sweep_dir={out}"]
    assert sweep.main(args) == 0
    with open(out / "runs.jsonl") as f:
        runs = [json.loads(line) for line in f]
    assert [(r["setting"]["optimizer"], r["setting"]["lr"], r["status"]) for r in runs] == [
        ("adamw", "1e-3", "finished"), ("adamw", "1e12", "diverged"),
        ("sgd_sai", "1e-3", "finished"), ("sgd_sai", "1e12", "diverged")]
    with open(out / "summary.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and [t["diverged"] for t in table] == ["0", "1", "0", "1"]
    assert float(table[0]["final_val_loss"]) == runs[0]["final_val_loss"]
    text = (out / "summary.md").read_text()
    regime = text.splitlines()[0]       # the regime, stated above the table
    assert regime.startswith("Regime: GPT ") and "6 steps of 64 tokens" in regime
    assert "Baseline: optimizer=adamw lr=1e-3 " in text   # adamw's best of its two settings
    header, _, *lines = [line for line in text.splitlines() if line.startswith("|")]
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[:4] == ["optimizer", "lr", "final_val_loss", "best_val_loss"]
    assert columns[-1] == "diverged"
    for line, run in zip(lines, runs, strict=True):
        cells = [c.strip() for c in line.strip("|").split("|")]
        if run["status"] == "diverged":               # no loss to report, and counted
            assert cells[2:4] == ["diverged", "diverged"] and cells[-1] == "1"
        else:
            assert cells[2] == f"{run['final_val_loss']:.4g} ± 0" and cells[-1] == "0"
            assert cells[4] == ("baseline" if run["setting"]["optimizer"] == "adamw" else
                                f"{run['final_val_loss'] - runs[0]['final_val_loss']:+.3f} "
                                "(1 seed: no interval)")
    assert (out / "lr_sensitivity.png").exists()

    mtimes = {d: os.path.getmtime(out / d / "metrics.jsonl") for d in os.listdir(out)
              if (out / d).is_dir()}
    capsys.readouterr()
    assert sweep.main(args) == 0                      # a re-run skips all four
    assert capsys.readouterr().out.count("(skipped)") == 4
    assert mtimes == {d: os.path.getmtime(out / d / "metrics.jsonl") for d in mtimes}


def test_sweep_resumes_a_stopped_run_from_its_checkpoint(tmp_path, text, monkeypatch):
    """A run stopped at step 4 (Ctrl-C) is resumed by the re-run and ends as if never stopped."""
    args = ["--grid=optimizer=sgd_sai", "--seeds=3", f"--set={TINY_GPT} {text}"]
    assert sweep.main(args + [f"--sweep_dir={tmp_path / 'straight'}"]) == 0

    run_dir = tmp_path / "sweep" / sweep.run_name({"optimizer": "sgd_sai"}, 3)
    ctrl_c_after_step(monkeypatch, 4)
    trainer_args = [f"--{kv}" for kv in f"{TINY_GPT} {text}".split()]
    assert nanogpt_sai.main(trainer_args + ["--optimizer=sgd_sai", "--seed=3", "--log_interval=1",
                                            f"--out_dir={run_dir}"]) == 130
    monkeypatch.undo()
    assert cli.last_status(run_dir) == "stopped"

    assert sweep.main(args + ["--set=" + f"{TINY_GPT} {text} log_interval=1",
                              f"--sweep_dir={tmp_path / 'sweep'}"]) == 0
    assert cli.last_status(run_dir) == "finished"
    resumed = torch.load(run_dir / "ckpt.pt")["model"]
    straight = torch.load(tmp_path / "straight" / run_dir.name / "ckpt.pt")["model"]
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_redraw_draws_the_runs_that_ended_and_starts_none(tmp_path, text, capsys):
    """A sweep stopped part way: --redraw tables what has ended, says how many runs it lacks,
    and starts none; with nothing ended (of a grid, or of a search) it says so in one line."""
    out = tmp_path / "sweep"
    args = [f"--set={TINY_GPT} {text}", "--seeds=1", f"--sweep_dir={out}"]
    assert sweep.main(args + ["--grid=optimizer=sgd_sai", "--redraw=True"]) == 1
    assert "none of the sweep's 1 runs" in capsys.readouterr().err and not out.exists()
    assert sweep.main(args + ["--grid=optimizer=adamw"]) == 0
    assert sweep.main(args + ["--grid=optimizer=adamw,sgd_sai", "--redraw=True"]) == 0
    assert sorted(os.listdir(out)) == ["optimizer=adamw-seed1", "runs.jsonl", "summary.csv",
                                       "summary.md", "sweep.json"]
    table = (out / "summary.md").read_text()
    assert "Partial: 1 of the sweep's 2 runs have ended" in table
    assert [line.split("|")[1].strip() for line in table.splitlines()
            if line.startswith("| adamw") or line.startswith("| sgd_sai")] == ["adamw"]
    assert sweep.main(args + ["--tune=adamw", "--redraw=True"]) == 1   # no trial has run
    assert "no run of the search" in capsys.readouterr().err


def test_a_run_the_ctrl_c_reaches_as_it_starts_is_stopped_not_crashed(tmp_path):
    """The sweep's Ctrl-C goes to its runs too; one that gets it before it can catch it (as
    Python starts) dies of SIGINT: stopped (resumed by the next sweep), not a crash."""
    script = tmp_path / "trainer.py"
    # Python's own Ctrl-C handler, as under a terminal (a background job starts with it ignored)
    script.write_text("import os, signal\nsignal.signal(signal.SIGINT, signal.default_int_handler)"
                      "\nos.kill(os.getpid(), signal.SIGINT)\n")
    run = sweep.Run({"optimizer": "adamw"}, 1, str(tmp_path / "run"), [], {})
    status, how = sweep.run_one(type("Trainer", (), {"__file__": str(script)}), run, 1, True)
    assert (status, how) == ("stopped", "Ctrl-C as it started")


def test_study_options_add_to_the_studys_own(tmp_path, text, monkeypatch):
    monkeypatch.setitem(sweep.STUDIES, "tiny", dict(grid="optimizer=sgd_sai", seeds="1",
                                                    set=TINY_GPT))
    out = tmp_path / "sweep"
    assert sweep.main(["--study=tiny", f"--set={text} max_iters=3", f"--sweep_dir={out}"]) == 0
    with open(out / "optimizer=sgd_sai-seed1" / "config.json") as f:
        config = json.load(f)
    assert (config["max_iters"], config["n_embd"]) == (3, 16)     # user's, and the study's
    assert config["data_path"] == text.split()[0].split("=", 1)[1]


def test_a_study_refuses_the_offline_stand_in_for_its_data(tmp_path, monkeypatch, capsys):
    """Offline, with nothing in the cache, a trainer falls back to a stand-in (Python's manual
    for tiny shakespeare): fine for a quick look, never for a study's table. The study stops
    before any run, in one line (a study with its data runs: the test above)."""
    def refuse(url, timeout=None):
        raise urllib.error.URLError("network blocked by the test")
    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    cache = f"data_dir={tmp_path / 'cache'}"
    monkeypatch.setitem(sweep.STUDIES, "tiny", dict(grid="optimizer=sgd_sai", seeds="1",
                                                    set=f"{TINY_GPT} {cache}"))
    out = tmp_path / "sweep"
    assert sweep.main(["--study=tiny", f"--sweep_dir={out}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --study=tiny: its data could not be found or downloaded")
    assert "pydoc_topics" in err[-1] and not out.exists()


def test_sweep_refuses_to_report_runs_made_with_other_options(tmp_path, text, capsys):
    """A re-run with a changed --set must not call the old runs its own: refused, nothing
    touched; the same options again are skipped; checkpoints kept unless told."""
    out = tmp_path / "sweep"
    args = ["--grid=optimizer=adamw", "--seeds=1,2", f"--sweep_dir={out}"]
    assert sweep.main(args + [f"--set={TINY_GPT} {text}", "--keep_checkpoints=False"]) == 0
    assert not list(out.glob("*/ckpt.pt")) and len(list(out.glob("*/metrics.jsonl"))) == 2
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert sweep.main(args + [f"--set={TINY_GPT} {text} max_iters=3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds 2 of these runs made with other options" in err
    assert "max_iters: 6 -> 3" in err
    assert before == {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert sweep.main(args + [f"--set={TINY_GPT} {text}"]) == 0
    assert capsys.readouterr().out.count("(skipped)") == 2
    # the same runs moved elsewhere (a study's results in another clone) are still these runs
    moved = tmp_path / "elsewhere" / "sweep"
    shutil.copytree(out, moved)
    assert sweep.main(["--grid=optimizer=adamw", "--seeds=1,2", f"--sweep_dir={moved}",
                       f"--set={TINY_GPT} {text}"]) == 0
    assert capsys.readouterr().out.count("(skipped)") == 2


@pytest.mark.parametrize("grid,message", [
    ("optimiser=adamw", "'optimiser=adamw' with --set: unknown option --optimiser; did you mean "
                        "--optimizer?"),
    ("optimizer=adamw lr=fast", "--lr expects float, got 'fast'"),
    ("optimizer=adamw,sgdsai", "unknown optimizer 'sgdsai'"),
    ("optimizer=adamw out_dir=x", "--out_dir is the sweep's to set"),
])
def test_sweep_checks_every_run_before_starting_any(grid, message, tmp_path, text, capsys):
    out = tmp_path / "sweep"
    assert sweep.main([f"--grid={grid}", "--seeds=1", f"--set={TINY_GPT} {text}",
                       f"--sweep_dir={out}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err
    assert not out.exists()


def test_a_crashed_run_is_not_called_diverged(tmp_path, text, capsys):
    """A run that fails (its data file vanished) is 'crashed' in the summary, with the reason
    from its log, and the sweep exits 1."""
    out = tmp_path / "sweep"
    assert sweep.main(["--grid=optimizer=adamw", "--seeds=1", f"--sweep_dir={out}",
                       f"--set={TINY_GPT} data_path={tmp_path / 'gone.txt'} "
                       f"data_dir={tmp_path / 'cache'}"]) == 1
    captured = capsys.readouterr()
    assert "crashed (exit 2: error: --data_path" in captured.out
    assert "1 of 1 runs crashed" in captured.err
    row = [line for line in (out / "summary.md").read_text().splitlines() if "| adamw" in line][0]
    assert "| crashed | crashed |" in row and "diverged" not in row


def test_bad_sweep_arguments(capsys):
    assert sweep.main(["--study=everything"]) == 2
    assert ("--study must be one of lr, sai_rule, per_example, tune, vit_tune, duration, "
            "batch") in capsys.readouterr().err
    assert sweep.main(["--grid=lr=1", "--seeds=a,b"]) == 2
    assert "--seeds must be comma-separated ints" in capsys.readouterr().err
    assert sweep.main(["--grid=lr=1", "--tune=adamw"]) == 2
    assert "give --tune (tune each optimizer's lr and weight decay) or --grid" in \
        capsys.readouterr().err
    assert sweep.main(["--tune=adamw", "--max_extra=-1"]) == 2
    assert "--max_extra must be >= 0, got -1" in capsys.readouterr().err
    assert sweep.main(["--grid=lr=1", "--baseline=adamw"]) == 2
    assert "--baseline: 'adamw' is not key=value" in capsys.readouterr().err
    assert sweep.main(["--tune=adam"]) == 2
    assert "unknown optimizer 'adam'" in capsys.readouterr().err


def loss_fn(out, y):
    return F.cross_entropy(out.flatten(0, 1), y.flatten())


def test_per_example_snr_matches_a_loop_over_examples():
    model = make_model().double()
    xy = batches(1, batch=5)[0]
    x, y = xy[:, :-1], xy[:, 1:]
    fast, _ = per_example.example_gradients(model, loss_fn, x, y)
    names = [name for name, _ in model.named_parameters()]
    slow = {name: [] for name in names}
    for i in range(len(x)):                                # one example at a time
        model.zero_grad()
        loss_fn(model(x[i:i + 1]), y[i:i + 1]).backward()
        for name, p in model.named_parameters():
            slow[name].append(p.grad.clone())
    for name in names:
        check("per-example gradients = a loop over examples, float64", fast[name],
              torch.stack(slow[name]), F64_COMPUTATION)
    stats = snr.gradient_snr(fast)
    for name in names:                                     # the documented definition
        g = torch.stack(slow[name])
        mean = g.mean(0)
        power = (mean ** 2).sum().item()
        noise = sum(((gi - mean) ** 2).sum().item() for gi in g) / len(g) / len(g)
        check("gradient SNR = its definition, float64", stats[name], (power, noise, power / noise),
              F64_COMPUTATION)


@pytest.mark.parametrize("rule", optim.SAI_RULES)
def test_sai_scales_plotted_equal_those_the_optimizer_froze(rule):
    model = make_model()
    xy = batches(1, batch=6)[0]
    x, y = xy[:, :-1], xy[:, 1:]
    grads, _ = per_example.example_gradients(model, loss_fn, x, y)
    plotted = snr.sai_scales({n: g.mean(0) for n, g in grads.items()})[rule]
    opt = optim.SGDSaI(model.named_parameters(), lr=1e-3, sai_rule=rule)
    loss_fn(model(x), y).backward()                        # the batch gradient, as in training
    opt.step()
    for name, p in model.named_parameters():
        # the mean of per-example gradients against the batch backward: float32 sums in
        # another order, so a float32 computation's tolerance (a wrong rule is off by >= 2x)
        check("plotted SaI scale = the frozen one, float32", opt.state[p]["scale"],
              plotted[name], F32_COMPUTATION)


def test_snr_command_writes_table_and_figure(tmp_path, text):
    data_path = text.split()[0].split("=", 1)[1]
    out = tmp_path / "snr"
    data_dir = text.split()[1].split("=", 1)[1]
    assert snr.main(["--batch_size=4", f"--data_path={data_path}", f"--data_dir={data_dir}",
                     f"--out_dir={out}"]) == 0
    with open(out / "snr.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["kind"] for r in rows} == {"embedding", "position", "norm", "qkv", "proj", "mlp"}
    assert all(float(r["example_snr"]) > 0 for r in rows)
    assert is_png(out / "snr.png")


def test_a_packed_study_redraws_its_table_and_runs_only_what_it_lacks(tmp_path, text, capsys):
    """A study's logs packed into one file (tools/pack_study.py: the same bytes twice) give the
    same table from the pack as from the folder, and a run missing from the pack is run."""
    out = tmp_path / "study"
    args = ["--grid=optimizer=adamw,sgd_sai", "--seeds=1", f"--set={TINY_GPT} {text}"]
    assert sweep.main(args + [f"--sweep_dir={out}"]) == 0
    def losses(folder):
        with open(folder / "summary.csv") as f:
            return [(row["optimizer"], row["final_val_loss"]) for row in csv.DictReader(f)]
    table = losses(out)
    shutil.rmtree(out / "optimizer=sgd_sai-seed1")            # a run the pack will lack
    pack = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pack_study.py"),
                           str(out)], capture_output=True, text=True)
    assert pack.returncode == 0, pack.stderr
    first = (tmp_path / "study.tar.xz").read_bytes()
    subprocess.run([sys.executable, os.path.join(ROOT, "tools", "pack_study.py"), str(out)],
                   check=True, capture_output=True)
    assert (tmp_path / "study.tar.xz").read_bytes() == first
    capsys.readouterr()
    again = tmp_path / "unpacked"
    assert sweep.main(args + [f"--pack={tmp_path / 'study.tar.xz'}",
                              f"--sweep_dir={again}"]) == 0
    said = capsys.readouterr().out
    assert "unpacked" in said and "optimizer=adamw-seed1: finished (skipped" in said
    assert "optimizer=sgd_sai-seed1: finished (exit 0)" in said      # run again, fresh
    assert losses(again) == table                                   # CPU runs are exact
    assert sweep.main(args + [f"--pack={tmp_path / 'nowhere.tar.xz'}",
                              f"--sweep_dir={again}"]) == 2
    assert "--pack=" in capsys.readouterr().err
