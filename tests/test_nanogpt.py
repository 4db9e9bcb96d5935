"""nanogpt_sai.py through its command line: runs, logs, plots, exact resume, divergence, errors."""
import json
import os
import urllib.error
import urllib.request

import pytest
import torch

import nanogpt_sai
import optim
from fake_data import write_corpus
from run_helpers import ctrl_c_after_step, is_png, records

TINY = ["--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=4",
        "--eval_iters=2", "--warmup_iters=2", "--sample_tokens=20", "--device=cpu"]


@pytest.fixture
def corpus(tmp_path):
    """A 20k-character text file and an empty data cache, so no test touches the network."""
    path = write_corpus(tmp_path / "input.txt")
    return ["--data_path=" + str(path), "--data_dir=" + str(tmp_path / "cache")]


def run(args):
    return nanogpt_sai.main(args)


@pytest.mark.parametrize("optimizer", sorted(optim.OPTIMIZERS))
def test_few_iterations_of_each_optimizer(optimizer, corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(TINY + corpus + [f"--optimizer={optimizer}", "--max_iters=6", "--eval_interval=3",
                                "--log_interval=2", f"--out_dir={out}"]) == 0
    recs = records(out)
    train = [r for r in recs if r["event"] == "train"]
    evals = [r for r in recs if r["event"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in evals] == [0, 3, 6]
    assert recs[-1] == {"event": "end", "step": 6, "status": "finished",
                        "train_s": pytest.approx(train[-1]["train_s"])}
    for r in train:
        assert set(r) >= {"loss", "lr", "ms", "tokens", "train_s", "wall_s", "param_bytes",
                          "grad_bytes", "state_bytes", "peak_bytes", "peak_kind"}
        assert r["tokens"] == r["step"] * 4 * 16
    for r in evals:
        assert set(r) >= {"train_loss", "val_loss", "best_val_loss", "state_bytes"}
    n_params = torch.load(out / "ckpt.pt")["model"]
    param_bytes = 4 * sum(v.numel() for k, v in n_params.items() if k != "lm_head.weight")
    assert train[-1]["param_bytes"] == param_bytes
    if optimizer in ("sgd_sai", "adamw", "adam_mini"):
        ratio = {"sgd_sai": 0.5, "adamw": 1.0, "adam_mini": 0.5}[optimizer]
        assert train[-1]["state_bytes"] / (2 * param_bytes) == pytest.approx(ratio, abs=0.03)
    else:   # APOLLO keeps AdamW state only for the embedding and norms of this tiny model
        assert train[-1]["state_bytes"] < 2 * param_bytes
    assert is_png(out / "loss.png") and is_png(out / "memory.png")
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("iter 6 |")][0]
    assert " | lr " in line and " ms | " in line and "tok/s" in line and "x AdamW" in line


def test_resume_is_exact(corpus, tmp_path, monkeypatch):
    """Stop with Ctrl-C after step 5, resume: every later loss equals the uninterrupted run's
    (dropout on, so the RNG state must come back too)."""
    common = TINY + corpus + ["--max_iters=10", "--eval_interval=4", "--log_interval=1",
                              "--dropout=0.1", "--optimizer=sgd_sai"]
    assert run(common + [f"--out_dir={tmp_path / 'straight'}"]) == 0

    ctrl_c_after_step(monkeypatch, 5)
    stopped = tmp_path / "stopped"
    assert run(common + [f"--out_dir={stopped}"]) == 130
    assert torch.load(stopped / "ckpt.pt")["step"] == 5
    assert records(stopped)[-1]["status"] == "stopped"
    monkeypatch.undo()
    assert run([f"--resume={stopped}"]) == 0

    def losses(run_dir):
        return [(r["event"], r["step"], r.get("loss"), r.get("val_loss"))
                for r in records(run_dir) if r["event"] != "end"]
    assert losses(stopped) == losses(tmp_path / "straight")
    a = torch.load(tmp_path / "straight" / "ckpt.pt")
    b = torch.load(stopped / "ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])


def test_divergence_stops_cleanly_and_keeps_the_last_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    args = TINY + corpus + ["--optimizer=sgd_sai", "--lr=1e12", "--warmup_iters=0",
                            "--max_iters=50", "--eval_interval=50", f"--out_dir={out}"]
    assert run(args) == 3
    assert "diverged" in capsys.readouterr().err
    end = records(out)[-1]
    assert end["status"] == "diverged" and 0 < end["step"] < 50
    ckpt = torch.load(out / "ckpt.pt")                       # the step-0 checkpoint, intact
    assert ckpt["step"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_offline_default_falls_back_to_the_python_manual(tmp_path, monkeypatch, capsys):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    out = tmp_path / "run"
    assert run(TINY + [f"--data_dir={tmp_path / 'cache'}", "--max_iters=2",
                       f"--out_dir={out}"]) == 0
    with open(out / "run.json") as f:
        assert json.load(f)["data_source"] == "pydoc_topics"
    assert "--data_path" in capsys.readouterr().out


def test_compare_runs_each_optimizer_and_draws_one_figure(corpus, tmp_path):
    out = tmp_path / "cmp"
    assert run(TINY + corpus + ["--optimizer=sgd_sai,adam_mini", "--max_iters=2",
                                "--eval_interval=2", f"--out_dir={out}"]) == 0
    first = [records(out / name)[0] for name in ("sgd_sai", "adam_mini")]
    assert first[0]["val_loss"] == first[1]["val_loss"]       # same initial weights and batches
    assert is_png(out / "loss.png") and is_png(out / "memory.png")


def test_plots_redraw_from_logs(corpus, tmp_path):
    out = tmp_path / "run"
    assert run(TINY + corpus + ["--max_iters=2", f"--out_dir={out}"]) == 0
    from plots.figures import draw_all
    paths = draw_all([str(out), str(out)], str(tmp_path / "figs"))
    assert [os.path.basename(p) for p in paths] == ["loss.png", "memory.png"]
    assert all(is_png(p) for p in paths)


@pytest.mark.parametrize("args,message", [
    (["--n_layers=2"], "unknown option --n_layers; did you mean --n_layer?"),
    (["--n_layer=two"], "--n_layer expects int, got 'two'"),
    (["--lr=1e-3x"], "--lr expects float"),
    (["--compile=maybe"], "--compile expects True or False"),
    (["--n_embd=30", "--n_head=4"], "--n_embd=30 must be divisible by --n_head=4"),
    (["--optimizer=adam"], "unknown optimizer 'adam'; choose from adamw, sgd_sai, adam_mini, "
                            "apollo, apollo_mini"),
    (["--lr=-1.0"], "--lr must be >= 0"),
    (["--beta2=1.0"], "--beta2 must be in [0, 1)"),
    (["--sai_rule=max"], "--sai_rule must be one of gsnr, gsnr_max, sqrt_numel, none"),
    (["--dataset=wiki"], "--dataset must be shakespeare_char or shakespeare"),
    (["--max_iters=0"], "--max_iters must be > 0"),
    (["--device=tpu"], "--device must be auto, cpu, cuda, cuda:N or mps"),
    (["--dtype=bfloat16"], "--dtype=bfloat16 is for CUDA autocast"),
    (["max_iters=3"], "arguments are --key=value"),
    (["--block_size=30000"], "--block_size=30000 needs more tokens than the 2000"),
    (["--resume=/nonexistent"], "no config.json there"),
])
def test_bad_command_line_gets_a_one_line_error(args, message, corpus, tmp_path, capsys):
    assert run(TINY + corpus + [f"--out_dir={tmp_path / 'run'}"] + args
               if not args[0].startswith("--resume") else args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_resume_rejects_other_options(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert run(TINY + corpus + ["--max_iters=2", f"--out_dir={out}"]) == 0
    assert run([f"--resume={out}", "--lr=0.5"]) == 2
    assert "drop --lr" in capsys.readouterr().err
    assert run(TINY + corpus + ["--max_iters=2", f"--out_dir={out}"]) == 2   # never overwritten
    assert "already holds a run" in capsys.readouterr().err


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for name in nanogpt_sai.Config.__dataclass_fields__:
        assert f"--{name}=" in out


def test_adam_mini_partition_of_the_gpt():
    cfg = nanogpt_sai.Config(n_layer=1, n_head=4, n_embd=32, block_size=8, bias=True)
    model = nanogpt_sai.GPT(cfg, vocab_size=10)
    assert len(optim.param_kinds(model)) == len(list(model.parameters()))   # every one named
    rules = optim.block_rules(model)
    block = model.transformer.h[0]
    assert rules[block.attn.c_attn.weight] == ("qkv", 4)
    assert rules[model.transformer.wte.weight] == "rows" and model.lm_head.weight is \
        model.transformer.wte.weight
    assert rules[model.transformer.wpe.weight] == "tensor"
    assert rules[block.ln_1.weight] == "tensor" and rules[block.ln_1.bias] == "full"
    assert rules[block.mlp.c_fc.weight] == "rows" and rules[block.attn.c_proj.weight] == "rows"
    assert rules[block.mlp.c_fc.bias] == "full" and rules[block.attn.c_attn.bias] == "full"
