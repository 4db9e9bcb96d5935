"""More than one process: 2 ranks under torchrun (gloo, CPU, one thread each) against one process.

The optimizers (tests/distributed_worker.py) train a GPT whose shard boundary falls inside an
attention head, under DDP and FSDP2, and must end where one process does; both trainers must
write the losses of one process, from rank 0 only; a Ctrl-C on one rank stops both at the same
step and --resume goes on exactly; checkpoints move between 1 and 2 processes.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import nanogpt_sai
import optim
import parallel
import vit_sai
from cli import ConfigError
from fake_data import write_corpus, write_fashion_mnist
from run_helpers import ctrl_c_after_step, records
from tolerance import F32_TRAINING, check
from train_helpers import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# float64 on 2 ranks against one process: gradients summed over ranks in another order differ
# by float64's rounding, and the steps carry it: measured <= 5e-12 (APOLLO), 2e-14 the others.
# Adafactor alone turns it into ~1e-6: with eps1 = 1e-30 a gradient element that is 0 in one
# order and 1e-17 in the other takes an O(1) scale-free step. A block statistic summed over one
# rank's slice only is off by 1e-2 or more.
TWO_RANKS_F64 = {"adafactor": 1e-4}
TWO_RANKS_F64_OTHERS = 1e-9
TINY = ["--n_layer=1", "--n_head=3", "--n_embd=12", "--block_size=16", "--batch_size=4",
        "--eval_iters=3", "--warmup_iters=2", "--sample_tokens=20", "--device=cpu",
        "--max_iters=6", "--log_interval=2", "--eval_interval=3", "--grad_accum=2",
        "--eval_sample_tokens=0"]


def torchrun(*args, timeout=240):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", *args], cwd=ROOT, env=env, timeout=timeout,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def optimizer_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist") / "results.json"
    done = torchrun("tests/distributed_worker.py", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
@pytest.mark.parametrize("name", list(optim.OPTIMIZERS))
def test_every_optimizer_on_two_ranks_ends_where_one_process_does(optimizer_results, name, mode):
    """10 steps of 4 micro-batches (2 per rank) in float64: every parameter within 1e-9
    (relative; Adafactor 1e-4) of the one-process run, where a block statistic summed over one
    rank's slice only (Adam-mini's Q/K head cut by the shard edge, APOLLO-Mini's norms, SGD-SaI's
    std) is off by 1e-2 or more; the optimizer state per rank is all of it under DDP, about half
    under FSDP2."""
    result = optimizer_results[f"{name}/{mode}"]
    family = f"2 ranks ({mode}) = one process, 10 steps, float64, {name}"
    tolerance = TWO_RANKS_F64.get(name, TWO_RANKS_F64_OTHERS)
    check(family, result["param_rel_diff"], 0.0, tolerance)
    check(family, result["loss_rel_diff"], 0.0, tolerance)
    one = result["state_bytes_one_process"]
    if mode == "ddp":
        assert result["state_bytes"] == one
    else:
        assert 0.45 * one < result["state_bytes"] < 0.65 * one
        assert result["state_bytes_total"] < 1.25 * one   # replicated: Adam-mini's v and the like


@pytest.mark.parametrize("name", list(optim.PER_EXAMPLE_OPTIMIZERS))
def test_per_example_optimizers_on_two_ranks_end_where_one_process_does(optimizer_results,
                                                                         name):
    """10 steps of 4 micro-batches (2 per rank) in float64: the statistics merged over the
    micro-batches and the ranks give one process's steps (a rank's own statistics alone are
    off by far more: half the examples)."""
    check(f"2 ranks (ddp) = one process, 10 steps, float64, {name}",
          optimizer_results[f"{name}/ddp"]["param_rel_diff"], 0.0, TWO_RANKS_F64_OTHERS)


def test_per_example_trainer_with_diagnostics_on_two_ranks_logs_one_process(tmp_path):
    """adam_pe with --grad_accum=2 (a micro-batch per rank) and --diagnostics under DDP: rank 0
    logs the losses and the per-block g-SNR of one process."""
    corpus = write_corpus(tmp_path / "input.txt")
    args = TINY + ["--optimizer=adam_pe", "--diagnostics=True", f"--data_path={corpus}",
                   f"--data_dir={tmp_path / 'cache'}"]
    assert nanogpt_sai.main(args + [f"--out_dir={tmp_path / 'one'}"]) == 0
    done = torchrun("nanogpt_sai.py", *args, "--parallel=ddp", f"--out_dir={tmp_path / 'ddp'}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_losses(tmp_path / "one", tmp_path / "ddp")
    evals = [[r for r in records(tmp_path / run) if r["event"] == "eval"]
             for run in ("one", "ddp")]
    for a, b in zip(*evals):
        assert a["diagnostics"].keys() == b["diagnostics"].keys()
        for name, block in a["diagnostics"].items():
            check("2 ranks' logged g-SNR = one process's, float32",
                  b["diagnostics"][name]["gsnr"], block["gsnr"], F32_TRAINING)


@pytest.mark.parametrize("args", [["--optimizer=sign_sgd"], ["--diagnostics=True"]])
def test_per_example_statistics_under_fsdp_are_a_clear_error(monkeypatch, args):
    """FSDP2 slices each parameter over the ranks; the per-example pass needs the whole model
    in each process: one line naming --parallel=ddp (as a rank under torchrun would see it)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    cfg = nanogpt_sai.resolve_config(["--device=cpu", "--parallel=fsdp"] + args)
    with pytest.raises(ConfigError, match=r"use --parallel=ddp, not fsdp$"):
        parallel.check_mode(cfg, "nanogpt_sai.py")
    cfg = nanogpt_sai.resolve_config(["--device=cpu", "--parallel=ddp"] + args)
    assert parallel.check_mode(cfg, "nanogpt_sai.py") == "ddp"


def losses(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    return [(r["event"], r["step"], r.get("loss"), r.get("val_loss"), r.get("train_loss"))
            for r in records if r["event"] in ("train", "eval")]


@pytest.fixture(scope="module")
def trainer_runs(tmp_path_factory):
    """The tiny GPT trained with Adam-mini by one process, and by 2 ranks under DDP and FSDP2."""
    base = tmp_path_factory.mktemp("trainer")
    corpus = write_corpus(base / "input.txt")
    args = TINY + ["--optimizer=adam_mini", f"--data_path={corpus}",
                   f"--data_dir={base / 'cache'}"]
    assert nanogpt_sai.main(args + [f"--out_dir={base / 'one'}"]) == 0
    launches = {}
    for mode in ("ddp", "fsdp"):
        launches[mode] = torchrun("nanogpt_sai.py", *args, f"--parallel={mode}",
                                  f"--out_dir={base / mode}")
    return base, launches


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_trainer_on_two_ranks_logs_the_losses_of_one_process_from_rank_0(trainer_runs, mode):
    base, launches = trainer_runs
    assert launches[mode].returncode == 0, launches[mode].stderr[-3000:]
    assert_same_losses(base / "one", base / mode)
    info = json.loads((base / mode / "run.json").read_text())
    assert (info["world_size"], info["backend"], info["parallel"]) == (2, "gloo", mode)
    assert json.loads((base / mode / "config.json").read_text())["parallel"] == mode
    # rank 0 alone writes: one run directory, nothing under out/, one console summary
    assert sorted(p.name for p in base.iterdir()) == ["cache", "ddp", "fsdp", "input.txt", "one"]
    assert launches[mode].stdout.count("--- sample ---") == 1
    record = [json.loads(line) for line in open(base / mode / "metrics.jsonl")][-2]
    assert record["param_bytes_all_ranks"] == json.loads(
        (base / "one" / "metrics.jsonl").read_text().splitlines()[-2])["param_bytes"] * (
        2 if mode == "ddp" else 1)


def test_two_rank_fsdp_checkpoint_loads_in_one_process(trainer_runs):
    """The FSDP2 run's checkpoint (whole tensors, gathered by rank 0) restores, in one process,
    the model and optimizer state the one-process run ended with."""
    base, launches = trainer_runs
    assert launches["fsdp"].returncode == 0, launches["fsdp"].stderr[-3000:]
    states = []
    for run in ("one", "fsdp"):
        cfg = nanogpt_sai.resolve_config([f"--resume={base / run}"])
        vocab = json.loads((base / run / "run.json").read_text())["vocab_size"]
        model = nanogpt_sai.GPT(cfg, vocab)
        opt = optim.build_optimizer("adam_mini", model, **optim.trainer_hparams("adam_mini", cfg))
        scaler = torch.amp.GradScaler("cuda", enabled=False)
        load_checkpoint(str(base / run), model, opt, scaler, parallel.World())
        states.append((model.state_dict(), opt.state_dict()["state"]))
    (model_one, opt_one), (model_two, opt_two) = states
    family = "FSDP2 checkpoint = one process's, 6 steps, float32"
    for key in model_one:
        check(family, model_two[key], model_one[key], F32_TRAINING)
    assert opt_one.keys() == opt_two.keys()
    for i in opt_one:
        for key, value in opt_one[i].items():
            check(family, opt_two[i][key], value, F32_TRAINING)


def test_parallel_modes_without_torchrun_are_clear_errors(capsys):
    for mode, words in [("ddp", "torchrun"), ("fsdp", "torchrun"), ("both", "must be one of")]:
        assert nanogpt_sai.main([f"--parallel={mode}", "--device=cpu"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: --parallel") and words in err and len(err.splitlines()) == 1


def test_micro_batches_that_do_not_divide_over_the_ranks_are_a_clear_error(tmp_path):
    """--grad_accum=3 on 2 ranks, fresh or resumed: one line naming the fix, exit status 2 from
    each rank, before anything is written (no run directory; the resumed run's files unchanged)."""
    corpus = write_corpus(tmp_path / "input.txt")
    common = TINY + ["--max_iters=2", "--grad_accum=3", f"--data_path={corpus}",
                     f"--data_dir={tmp_path / 'cache'}"]
    fresh = torchrun("nanogpt_sai.py", *common, f"--out_dir={tmp_path / 'fresh'}")
    assert fresh.returncode != 0 and not (tmp_path / "fresh").exists()
    expected = ("error: --grad_accum=3 (micro-batches per step, over all ranks) must be "
                "divisible by the 2 processes: pass e.g. --grad_accum=4")
    assert fresh.stderr.count(expected) == 2, fresh.stderr[-3000:]
    one = tmp_path / "one"
    assert nanogpt_sai.main(common + [f"--out_dir={one}"]) == 0
    before = {f.name: f.read_bytes() for f in one.iterdir()}
    resumed = torchrun("nanogpt_sai.py", f"--resume={one}", "--parallel=fsdp")
    assert resumed.returncode != 0 and resumed.stderr.count(expected) == 2
    assert {f.name: f.read_bytes() for f in one.iterdir()} == before


def test_ctrl_c_on_one_rank_stops_both_and_resume_equals_an_uninterrupted_run(tmp_path):
    """FSDP2 with dropout on (every rank's RNG state must come back): Ctrl-C on rank 0 after step
    5, then --resume under torchrun, gives the uninterrupted run's losses and final weights."""
    corpus = write_corpus(tmp_path / "input.txt")
    common = TINY + ["--optimizer=sgd_sai", "--max_iters=10", "--eval_interval=4",
                     "--log_interval=1", "--dropout=0.1", "--parallel=fsdp",
                     f"--data_path={corpus}", f"--data_dir={tmp_path / 'cache'}"]
    straight = torchrun("nanogpt_sai.py", *common, f"--out_dir={tmp_path / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-3000:]
    stopped = tmp_path / "stopped"
    done = torchrun("tests/ctrl_c_worker.py", "5", *common, f"--out_dir={stopped}")
    assert done.returncode != 0                      # torchrun reports the ranks' exit 130
    assert records(stopped)[-1]["status"] == "stopped"
    assert torch.load(stopped / "ckpt.pt")["step"] == 5
    resumed = torchrun("nanogpt_sai.py", f"--resume={stopped}", "--parallel=fsdp")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(stopped) == losses(tmp_path / "straight")
    a, b = (torch.load(d / "ckpt.pt")["model"] for d in (tmp_path / "straight", stopped))
    assert all(torch.equal(a[k], b[k]) for k in a)


def assert_same_losses(run_dir, other):
    """The same events and steps, and float32 training's tolerance on every logged loss (a
    rank's gradient averaged in over the other's is off by ~1e-2)."""
    one, two = losses(run_dir), losses(other)
    assert [r[:2] for r in one] == [r[:2] for r in two]
    for a, b in zip(one, two):
        for x, y in zip(a[2:], b[2:]):
            assert (x is None) == (y is None)
            if x is not None:
                check("2 ranks' logged losses = one process's, float32", y, x, F32_TRAINING)


@pytest.fixture(scope="module")
def straight_one_process(tmp_path_factory):
    """A one-process APOLLO-Mini run that never stops, and its options."""
    base = tmp_path_factory.mktemp("straight")
    corpus = write_corpus(base / "input.txt")
    common = TINY + ["--optimizer=apollo_mini", "--max_iters=8", "--eval_interval=4",
                     "--log_interval=1", f"--data_path={corpus}", f"--data_dir={base / 'cache'}"]
    assert nanogpt_sai.main(common + [f"--out_dir={base / 'straight'}"]) == 0
    return base / "straight", common


def test_one_process_checkpoint_resumes_on_two_ranks(straight_one_process, tmp_path, monkeypatch):
    """Stopped in one process after step 3, resumed by 2 FSDP2 ranks: the losses of the run
    that never stopped, to 1e-5."""
    straight, common = straight_one_process
    ctrl_c_after_step(monkeypatch, 3)
    stopped = tmp_path / "stopped"
    assert nanogpt_sai.main(common + [f"--out_dir={stopped}"]) == 130
    monkeypatch.undo()
    resumed = torchrun("nanogpt_sai.py", f"--resume={stopped}", "--parallel=fsdp")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "saved by 1 processes, now 2" in resumed.stdout
    assert_same_losses(straight, stopped)


def test_two_rank_checkpoint_resumes_in_one_process(straight_one_process, tmp_path):
    """Stopped on 2 FSDP2 ranks after step 3 (Ctrl-C on rank 0), resumed by one process: the
    losses of the one-process run that never stopped, to 1e-5."""
    straight, common = straight_one_process
    stopped = tmp_path / "stopped"
    done = torchrun("tests/ctrl_c_worker.py", "3", *common, "--parallel=fsdp",
                    f"--out_dir={stopped}")
    assert records(stopped)[-1]["status"] == "stopped", done.stderr[-3000:]
    assert nanogpt_sai.main([f"--resume={stopped}"]) == 0
    assert_same_losses(straight, stopped)


@pytest.mark.parametrize("mode, optimizer", [("ddp", "adam_mini"), ("fsdp", "adam_mini"),
                                             ("ddp", "adam_pe")])
def test_vit_on_two_ranks_logs_the_losses_of_one_process(tmp_path, mode, optimizer):
    """61 training images in batches of 16 (the last, 13, splits 7 | 6 between the ranks), and
    2,100 validation images (each epoch) and 2,100 test images (at the end) in chunks of 1000
    (three chunks: the ranks run two forwards each); the
    per-example optimizer's statistics merged over the ranks by their counts, with
    --diagnostics."""
    write_fashion_mnist(tmp_path / "fmnist", n_train=2161, n_test=2100)
    args = ["--dim=12", "--depth=1", "--heads=3", "--mlp_ratio=2", "--batch_size=16",
            "--val_images=2100", "--warmup_iters=2", "--log_interval=2", "--device=cpu",
            "--max_iters=8", f"--optimizer={optimizer}", f"--data_path={tmp_path / 'fmnist'}",
            f"--data_dir={tmp_path / 'cache'}"]
    args += ["--diagnostics=True"] if optimizer == "adam_pe" else []
    assert vit_sai.main(args + [f"--out_dir={tmp_path / 'one'}"]) == 0
    done = torchrun("vit_sai.py", *args, f"--parallel={mode}", f"--out_dir={tmp_path / mode}")
    assert done.returncode == 0, done.stderr[-3000:]

    def metrics(run_dir):
        return [(r["event"], r["step"], r.get("loss"), r.get("train_loss"),
                 r.get("val_loss", r.get("test_loss")), r.get("val_acc", r.get("test_acc")),
                 r.get("confusion")) for r in records(run_dir) if r["event"] != "end"]
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / mode)
    assert [r[:2] for r in one] == [r[:2] for r in two]
    for a, b in zip(one, two):
        assert a[5:] == b[5:]                                  # accuracy and confusion matrix
        for x, y in zip(a[2:5], b[2:5]):
            assert (x is None) == (y is None) and (x is None or abs(x - y) <= 1e-5 * abs(x))
    assert {p.name for p in tmp_path.iterdir()} <= {"cache", "fmnist", mode, "one"}   # rank 0's
