"""
Sweeps and ablation studies: a grid of trainer settings x seeds, one process per run.

    python sweep.py --study=tune_v2     # protocol v2: held-out works, 15 trials each, 5 seeds
    python sweep.py --study=vit_tune_v2 # the same for the ViT (val split held out of training)
    python sweep.py --study=duration_v2 # the v2-tuned settings at 500..4000 steps, 5 seeds
    python sweep.py --study=batch_v2    # batch 12..96, same eval tokens, full sqrt rule, 5 seeds
    python sweep.py --study=per_example_v2  # sign placement and preconditioners, held-out works
    python sweep.py --study=iso_memory  # equal memory: each optimizer's widest model, or batch
    python sweep.py --study=lr          # LR sensitivity of every optimizer, 3 seeds
    python sweep.py --study=sai_rule    # SGD-SaI's scale rules, each over its own LR range
    python sweep.py --study=per_example # sign placement and per-example preconditioners
    python sweep.py --study=tune        # lr x weight decay per optimizer, then its best on 5 seeds
    python sweep.py --study=vit_tune    # the same for the ViT (3 epochs)
    python sweep.py --study=duration    # the tuned settings at 5 training lengths (250..4000 steps)
    python sweep.py --study=batch       # batch 12..96 at equal tokens, lr rules none/sqrt/linear
    python sweep.py --trainer=nanogpt --grid="optimizer=adamw lr=1e-3,3e-3 | optimizer=sgd_sai \
lr=1e-2" --seeds=1,2 --set="max_iters=300"   # any grid

A grid is sub-grids joined by "|"; each is "key=v1,v2 key=v3 ...", their cartesian product;
a key starting with "_" is a label (it names and groups runs, and is not a trainer option).
Runs go sequentially (or --jobs at a time), each in its own process (so each peak-memory figure
is its own), into
<sweep_dir>/<setting>-seed<k>/. Every run's options are checked by its trainer before any run
starts. Re-running skips finished and diverged runs and resumes crashed ones from their
checkpoint; a run directory that holds a run made with other options (a changed --set, a changed
default) is refused, never reported as the new result. --redraw=True starts no run: the tables
and figures of the runs that have ended (a tuning study's searches as far as their ended trials
go), each table saying how many it lacks (a study stopped part way). runs.jsonl records every
run's status; summary.md and summary.csv aggregate over seeds (mean and standard deviation),
state the regime (parameters, tokens or images per parameter), and compare every setting with a
baseline (--baseline, AdamW at its best by default) over paired seeds with a 95% t interval
(stats.py); the study's figures are drawn from the logs. --select=lr makes a grid a selection: each
setting's lr is chosen on the validation split, summary.md shows the validation split alone,
and selected.md reports the test split and the comparisons only at the chosen lrs.

Tuning (--tune, --study=tune): per optimizer, lr x weight decay on a log lattice (lr x2, wd x3
apart) from a 3 x 3 start around the trainer's defaults, one seed (--tune_seed); while the best
trial lacks a tried neighbour on either axis the missing neighbours are run (at most --max_extra
more trials: the summary says where that cap left a best value on an edge); then each
optimizer's best setting runs on --seeds (fresh seeds: the tuning seed's result is the one it
was chosen by, so it is biased low). Each optimizer's search goes on by itself, so the jobs stay
busy: its next trials start when its last ones have ended, its final runs when it has.
tuned.json keeps the chosen settings, which the duration and batch studies read (--tuned).
Exit status: 0 when every run finished or diverged, 1 when one crashed or none finished, 2 a bad
command line.
"""
import csv
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import signal
import statistics
import sys
import tarfile
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

from tqdm import tqdm

import iso_memory
import nanogpt_sai
import stats
import vit_sai
from cli import (
    ConfigError,
    check_positive,
    config_changes,
    last_status,
    optimizer_names,
    option,
    parse_args,
    run_in_process,
)
from plots import studies

TRAINERS = {"nanogpt": nanogpt_sai, "vit": vit_sai}


@dataclass
class SweepConfig:
    study: str = option("", "a preset study: tune_v2, vit_tune_v2, duration_v2, batch_v2, "
                            "per_example_v2, iso_memory (protocol v2); tune, "
                            "vit_tune, duration, batch, lr, sai_rule or per_example (sets "
                            "trainer, grid or tune, budget, seeds, set)")
    trainer: str = option("nanogpt", "nanogpt or vit")
    grid: str = option("", "settings to sweep, e.g. 'optimizer=adamw lr=1e-3,3e-3 | "
                           "optimizer=sgd_sai lr=1e-2'")
    tune: str = option("", "optimizers to tune instead of a grid (comma-separated, or all): lr "
                           "x weight decay for each, then its best on --seeds")
    tuned: str = option("out/sweep-tune", "duration and batch studies: the tuning sweep whose "
                                          "tuned.json gives each optimizer's lr and weight decay")
    optimizers: str = option("", "duration and batch studies: which of the tuned optimizers "
                                 "(comma-separated; default all)")
    seeds: str = option("1,2,3", "comma-separated seeds; every setting runs with each")
    tune_seed: int = option(1337, "tuning: the one seed every lr x weight decay trial runs with")
    tune_centre: str = option("", "tuning: the 3 x 3 start's centre, 'name=lr,wd ...' (default: "
                                  "the trainer's default lr and weight decay)")
    max_extra: int = option(12, "tuning: trials an optimizer may add to its 3 x 3 start while its "
                               "best sits on an edge")
    budget: int = option(0, "tuning: trials per optimizer, the same for every one (>= 9): the "
                            "3 x 3 start, then the untried neighbours of the best tried point "
                            "that has any, until spent; 0 = extend while the best sits on an "
                            "edge, up to --max_extra")
    select: str = option("", "grid keys chosen on validation per setting (e.g. lr): summary.md "
                             "then shows the validation split only, and selected.md each "
                             "setting at its chosen value, reported on test, with the "
                             "comparisons")
    baseline: str = option("optimizer=adamw", "compare every setting with the best one matching "
                                              "these key=value pairs, over paired seeds ('' = "
                                              "no comparison)")
    set: str = option("", "fixed trainer options for every run, e.g. 'max_iters=300' (with "
                          "--study: added to the study's)")
    sweep_dir: str = option("", "where runs and the summary go; default out/sweep-<study>")
    jobs: int = option(1, "runs at a time; above 1 each gets cores/jobs threads, and the "
                          "wall-clock figures are then those of a shared machine")
    pack: str = option("", "a study's packed logs (results/<study>.tar.xz, tools/pack_study.py): "
                           "unpacked into the sweep folder first, never over a file there, "
                           "then its tables and figures are redrawn and what it lacks is run")
    keep_checkpoints: bool = option(True, "keep each ended run's ckpt.pt (False deletes it "
                                          "once the run has finished or diverged)")
    redraw: bool = option(False, "start no run: draw the tables and figures from the runs that "
                                 "have ended (a study stopped part way, a tuning study's "
                                 "searches as far as their trials have ended; each table says "
                                 "how many of its runs it lacks)")


# The older studies, at nanoGPT's CPU baby size (4 layers, 128 wide, block 64, batch 12), 400
# steps: under a minute per run on 2 CPU cores, 0.4 tokens per parameter. LR grids are log-spaced
# (factors of ~3) around each optimizer's usable range.
BABY = ("max_iters=400 eval_interval=100 eval_iters=20 warmup_iters=40 log_interval=50 "
        "sample_tokens=0")
# The tuned studies run nanoGPT's CPU benchmark (2,000 steps of 768 tokens, 1.9 tokens per
# parameter) with 50 evaluation batches (less noise in the loss that picks the best trial) and
# no text samples
TUNE_SET = "sample_tokens=0 eval_sample_tokens=0 eval_iters=50 log_interval=100"
# Batch study: the baby GPT's gradient noise scale B_simple (per_example.noise_scale, logged by
# --diagnostics=True) grows from 1.8 sequences at initialisation to ~20 after 250 steps, ~50
# after 1,000 and ~150 after 2,000 (AdamW at its tuned setting, one batch of 12 per evaluation:
# noisy), so batches of 12 to 96 sequences straddle it for most of a run; every run sees the
# tokens of 4,000 steps of batch 12 (so batch 96 still takes 500 steps); the lr of batch 12
# (tuned) times (batch / 12) ** 0, 0.5 or 1
BATCH_SIZES, BATCH_BASE, BATCH_BASE_STEPS = (12, 24, 48, 96), 12, 4000
BATCH_RULES = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}
STUDIES = {
    "lr": dict(grid=" | ".join(
        [f"optimizer={name} lr=1e-3,3e-3,1e-2,3e-2"
         for name in ("adamw", "adam_mini", "apollo", "apollo_mini", "muon")] +
        [f"optimizer={name} lr=3e-3,1e-2,3e-2,1e-1" for name in ("sgd_sai", "adafactor")]),
        seeds="1,2,3", set=BABY + " weight_decay=0.1"),   # as it ran, before wd was tuned
    # weight decay off: decoupled decay multiplies by the lr, which differs ~250x between rules
    # (gsnr_max and none need lr ~1 where gsnr needs ~1e-2), so with it on the rules would also
    # differ in how fast they decay the weights
    "sai_rule": dict(grid=" | ".join([
        "optimizer=sgd_sai sai_rule=gsnr lr=3e-3,1e-2,3e-2",
        "optimizer=sgd_sai sai_rule=sqrt_numel lr=3e-3,1e-2,3e-2",
        "optimizer=sgd_sai sai_rule=gsnr_max lr=0.3,1.0,3.0,10.0",
        "optimizer=sgd_sai sai_rule=none lr=0.3,1.0,3.0,10.0"]), seeds="1,2,3",
        set=BABY + " weight_decay=0.0", baseline="sai_rule=gsnr"),
    # arXiv 2510.00236's two questions at the baby size: where the sign goes (sign_sgd), and
    # what Adam's second moment is built from (adam_pe; "batch" is Adam itself), each over its
    # LR range (grids extended where a first run's best lr was at an edge: the mean of signs
    # takes larger steps, signum smaller). Each step is ~1.5x a plain one (the per-example pass).
    "per_example": dict(grid=" | ".join(
        [f"optimizer=sign_sgd sign_placement={p} lr={lrs}" for p, lrs in (
            ("sign_of_mean", "3e-4,1e-3,3e-3,1e-2"),
            ("mean_of_signs", "3e-4,1e-3,3e-3,1e-2,3e-2,1e-1"),
            ("signum", "3e-5,1e-4,3e-4,1e-3,3e-3,1e-2"))]
        + [f"optimizer=adam_pe preconditioner={p} lr={lrs}" for p, lrs in (
            ("batch", "1e-3,3e-3,1e-2"), ("mean_sq", "1e-3,3e-3,1e-2"),
            ("variance", "3e-4,1e-3,3e-3,1e-2"), ("second_moment", "1e-3,3e-3,1e-2"))]),
        seeds="1,2,3", set=BABY, baseline="preconditioner=batch"),
    # centred where the trainer's defaults were when it ran (pinned: the study's lattice, and so
    # its results in results/gpt-tune.tar.xz, stay the same when the defaults move)
    "tune": dict(tune="all", seeds="1,2,3,4,5", set=TUNE_SET, tune_centre=(
        "adamw=4e-3,0.1 sgd_sai=2e-2,0.1 adam_mini=8e-3,0.1 apollo=3.2e-2,0.1 "
        "apollo_mini=8e-3,0.1 muon=8e-3,0.1 adafactor=2e-2,0.1")),
    # the ViT tuned at 3 epochs of Fashion-MNIST (its default run is 8: tuning all seven there
    # is ~6 CPU hours), 1.3 images per parameter; centred (pinned) on the trainer's defaults
    "vit_tune": dict(trainer="vit", tune="all", seeds="1,2,3,4,5", set="epochs=3", tune_centre=(
        "adamw=4e-3,0.05 sgd_sai=4e-2,0.05 adam_mini=4e-3,0.05 apollo=8e-3,0.05 "
        "apollo_mini=8e-3,0.05 muon=4e-3,0.05 adafactor=4e-2,0.05")),
    # each optimizer at its tuned lr and weight decay, each length with its own full decay
    # (warmup 5% of it, cosine to 10% at its last step), 16x from shortest to longest
    # (shortest first: a study stopped part way has whole lengths)
    "duration": dict(grid=" | ".join(f"{{tuned}} max_iters={n}"
                                     for n in (250, 500, 1000, 2000, 4000)),
                     seeds="1,2,3", set=TUNE_SET),
    # AdamW and SGD-SaI by default: the square-root rule is Adam's, the linear rule SGD's; each
    # batch size and rule compared with the same optimizer at the base batch (same tokens, seeds)
    "batch": dict(grid="{batch}", seeds="1,2,3", set=TUNE_SET, optimizers="adamw,sgd_sai",
                  baseline=f"batch_size={BATCH_BASE}"),
}
# Protocol v2 (docs/studies.md): the research corpus (Shakespeare's complete works, split by
# whole works; selection on the val works, the reported loss on the test works), every GPT run
# under one epoch of its training split (2,000 steps of 768 tokens: 0.34 epochs of 4.5M
# characters), one trial budget for every optimizer, final runs on 5 fresh seeds
V2_GPT = TUNE_SET + " dataset=shakespeare_complete_char"
V2_BUDGET = 15
ISO_MEMORY = "{iso_memory}"   # a grid planned by iso_memory.plan (it builds every model once)
# each optimizer's search centred on its tuned setting of the first studies (pinned, as v1's)
V2_CENTRES = ("adamw=4e-3,0.1 sgd_sai=2e-2,0.0111 adam_mini=4e-3,0.1 apollo=6.4e-2,0.0333 "
              "apollo_mini=8e-3,0.0111 muon=4e-3,0.1 adafactor=4e-2,0.000412")
STUDIES |= {
    "tune_v2": dict(tune="all", budget=V2_BUDGET, seeds="1,2,3,4,5", set=V2_GPT,
                    tune_centre=V2_CENTRES),
    # the ViT: selection on 5,000 training images held out (the same in every run), the test
    # set read once per final run; 3 epochs of the other 55,000
    "vit_tune_v2": dict(trainer="vit", tune="all", budget=V2_BUDGET, seeds="1,2,3,4,5",
                        set="epochs=3", tune_centre=(
                            "adamw=4e-3,0.05 sgd_sai=4e-2,0.05 adam_mini=4e-3,0.05 "
                            "apollo=8e-3,0.05 apollo_mini=8e-3,0.05 muon=4e-3,0.05 "
                            "adafactor=4e-2,0.05")),
}
STUDIES |= {
    # each optimizer at its v2-tuned setting, each length with its own full decay, 5 seeds
    # (4,000 steps: 3.07M tokens, 0.68 epochs)
    "duration_v2": dict(grid=" | ".join(f"{{tuned}} max_iters={n}"
                                        for n in (500, 1000, 2000, 4000)),
                        seeds="1,2,3,4,5", set=V2_GPT, tuned="out/sweep-tune_v2"),
    # batch 12..96 at the tokens of 4,000 steps of 12, every batch size evaluated on the same
    # 50 x 12 sequences; AdamW: fixed lr, lr x sqrt(k), and the full sqrt rule (betas and eps
    # too); SGD-SaI: fixed, sqrt and linear lr
    "batch_v2": dict(grid="{batch_v2}", seeds="1,2,3,4,5",
                     set=V2_GPT + f" eval_batch_size={BATCH_BASE}", optimizers="adamw,sgd_sai",
                     baseline=f"batch_size={BATCH_BASE}", tuned="out/sweep-tune_v2"),
    # arXiv 2510.00236's two questions on the research corpus, 2,000 steps, on the surgery path
    "per_example_v2": dict(grid=STUDIES["per_example"]["grid"], seeds="1,2,3,4,5", set=V2_GPT,
                           baseline="preconditioner=batch", select="lr"),
    # equal memory (iso_memory.py): budgets of AdamW's model state at widths 128, 160, 192;
    # each optimizer's widest model in each, or its largest batch at the first; 3 seeds
    "iso_memory": dict(grid=ISO_MEMORY, seeds="1,2,3", set=V2_GPT, tuned="out/sweep-tune_v2"),
}
# The tuning lattice: lr = centre * 2^i, weight decay = centre * 3^j, from i, j in -1, 0, 1
LR_STEP, WD_STEP = 2.0, 3.0


def read_tuned(cfg):
    """{optimizer: {"lr": .., "weight_decay": ..}} from the tuning sweep's tuned.json, those of
    --optimizers (default all)."""
    path = os.path.join(cfg.tuned, "tuned.json")
    if not os.path.exists(path):
        raise ConfigError(f"--tuned={cfg.tuned}: no tuned.json there; run python sweep.py "
                          f"--study=tune --sweep_dir={cfg.tuned} first (or point --tuned at it)")
    with open(path) as f:
        tuned = json.load(f)
    names = cfg.optimizers.split(",") if cfg.optimizers else list(tuned)
    missing = [n for n in names if n not in tuned]
    if missing:
        raise ConfigError(f"--optimizers: {', '.join(missing)} not tuned in {path} (it has "
                          f"{', '.join(tuned)})")
    return {n: tuned[n] for n in names}


def full_sqrt_rule(lr, batch, eps=1e-8, beta1=0.9, beta2=0.99):
    """Adam's square-root scaling rule (Malladi et al. 2022, arXiv 2205.10287) from batch
    BATCH_BASE to `batch`, k = batch / BATCH_BASE: lr x sqrt(k), 1 - beta1 and 1 - beta2 x k,
    eps / sqrt(k); the trainer options that say it, as grid text."""
    k = batch / BATCH_BASE
    return (f"lr={lr * k ** 0.5:.3g} beta1={1 - (1 - beta1) * k:.4g} "
            f"beta2={1 - (1 - beta2) * k:.4g} eps={eps / k ** 0.5:.3g}")


def expand_grid(grid, cfg):
    """A study's grid with its tuned settings filled in, sub-grid by sub-grid (so the runs go in
    the grid's order): '{tuned}' -> one sub-grid per optimizer at its tuned lr and weight decay;
    '{batch}' -> the batch study's sizes and lr rules for each optimizer; '{batch_v2}' -> the
    same at a fixed lr, the lr-only square-root rule, and (for the Adam family) the full one,
    or (SGD-SaI) the linear one."""
    tokens = ("{tuned}", "{batch}", "{batch_v2}")
    if not any(token in grid for token in tokens):
        return grid
    tuned = read_tuned(cfg)
    parts = []
    for sub in (part.strip() for part in grid.split("|")):
        for name, t in tuned.items():
            here = f"optimizer={name} weight_decay={t['weight_decay']}"
            lr = float(t["lr"])
            if "{tuned}" in sub:
                parts.append(sub.replace("{tuned}", f"{here} lr={t['lr']}"))
            elif "{batch}" in sub:
                for batch in BATCH_SIZES:
                    steps = BATCH_BASE_STEPS * BATCH_BASE // batch   # the same tokens for all
                    lrs = sorted({float(f"{lr * (batch / BATCH_BASE) ** k:.3g}")
                                  for k in BATCH_RULES.values()})
                    parts.append(f"{here} batch_size={batch} max_iters={steps} "
                                 f"lr={','.join(f'{lr:g}' for lr in lrs)}")
            elif "{batch_v2}" in sub:
                for batch in BATCH_SIZES:
                    steps = BATCH_BASE_STEPS * BATCH_BASE // batch
                    k = batch / BATCH_BASE
                    # fixed, sqrt (lr only), and linear (SGD's rule) or the full sqrt rule
                    lrs = sorted({float(f"{lr * k ** e:.3g}")
                                  for e in (0, 0.5) + ((1,) if name == "sgd_sai" else ())})
                    at = f"{here} batch_size={batch} max_iters={steps}"
                    parts.append(f"{at} lr={','.join(f'{x:g}' for x in lrs)}")
                    if name != "sgd_sai" and batch != BATCH_BASE:
                        parts.append(f"{at} {full_sqrt_rule(lr, batch)}")
        if not any(token in sub for token in tokens):
            parts.append(sub)
    return " | ".join(parts)


def parse_grid(text):
    """'a=1,2 b=x | a=3' -> [{'a': '1', 'b': 'x'}, {'a': '2', 'b': 'x'}, {'a': '3'}]."""
    settings = []
    for part in text.split("|"):
        fields = {}
        for item in part.split():
            key, sep, values = item.partition("=")
            if not sep or not values:
                raise ConfigError(f"--grid: {item!r} is not key=value[,value...]")
            fields[key] = values.split(",")
        if fields:
            settings += [dict(zip(fields, combo)) for combo in itertools.product(*fields.values())]
    if not settings:
        raise ConfigError("--grid is empty: give --study or --grid='key=v1,v2 ...'")
    return settings


def run_name(setting, seed):
    """A readable, filesystem-safe directory name for one run."""
    text = "-".join(f"{k}={v}" for k, v in setting.items()) + f"-seed{seed}"
    return re.sub(r"[^A-Za-z0-9_.=,-]", "_", text)


@dataclass
class Run:
    setting: dict
    seed: int
    run_dir: str
    argv: list      # the trainer's command line
    config: dict    # the trainer's full effective config for it (its config.json)


def plan_runs(trainer, settings, seeds, fixed, sweep_dir):
    """Every run of the sweep, its options checked and resolved by the trainer itself (so a grid
    key typo or a bad value stops the sweep before any run starts)."""
    runs = []
    for setting in settings:
        for seed in seeds:
            run_dir = os.path.join(sweep_dir, run_name(setting, seed))
            argv = fixed + [f"--{k}={v}" for k, v in setting.items()
                            if not k.startswith("_")] + [f"--seed={seed}"]   # _key: a label
            try:
                for arg in argv:
                    if arg.startswith(("--out_dir=", "--resume=")):
                        raise ConfigError(f"{arg.split('=')[0]} is the sweep's to set (each run "
                                          "goes to <sweep_dir>/<setting>-seed<k>)")
                cfg = trainer.resolve_config(argv + [f"--out_dir={run_dir}"])
                if len(optimizer_names(cfg.optimizer)) > 1:
                    raise ConfigError(f"--optimizer={cfg.optimizer}: a run trains one optimizer; "
                                      "list them as optimizer=a,b in --grid")
            except ConfigError as err:
                where = " ".join(f"{k}={v}" for k, v in setting.items())
                raise ConfigError(f"--grid setting '{where}' with --set: {err}") from None
            runs.append(Run(setting, seed, run_dir, argv, dataclasses.asdict(cfg)))
    return runs


def last_line(path):
    """The last non-empty line of a run's log.txt (a crash's one-line error), or ''."""
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else ""


ENDED = ("finished", "diverged")   # a run's statuses that a sweep never runs again


def run_one(trainer, run, threads, keep_checkpoint):
    """Run (or resume) one training in its own process; its output goes to run_dir/log.txt.
    Returns (status, how): 'finished', 'diverged', 'stopped' or 'crashed', and a few words."""
    status = last_status(run.run_dir)
    if status in ENDED:
        return status, "skipped"
    ckpt = os.path.join(run.run_dir, "ckpt.pt")
    if os.path.exists(ckpt):
        cmd = [f"--resume={run.run_dir}"]                # crashed or stopped: go on from there
    else:
        shutil.rmtree(run.run_dir, ignore_errors=True)   # died before its first checkpoint
        os.makedirs(run.run_dir)
        cmd = run.argv + [f"--out_dir={run.run_dir}"]
    log_path = os.path.join(run.run_dir, "log.txt")
    code = run_in_process(trainer.__file__, cmd, log_path, threads)
    status = last_status(run.run_dir)
    if code == -signal.SIGINT:   # the Ctrl-C reached it before it could catch one (at its start)
        return "stopped", "Ctrl-C as it started"
    if code not in (0, 3) and status != "stopped":
        return "crashed", f"exit {code}: {last_line(log_path)}"
    if status in ENDED and not keep_checkpoint and os.path.exists(ckpt):
        os.remove(ckpt)
    return status or "crashed", f"exit {code}"


def compared(row):
    """The number a table reports and compares: on the test split when the run has one (the
    GPT's held-out works, the ViT's test set, read once after the last step), else the final
    val loss (tiny shakespeare has no test split); accuracy in points."""
    if row.get("image"):
        return 100 * row["final_test_acc"]
    return row.get("final_test_loss", row["final_val_loss"])


def per_seed(rows):
    """{seed: compared metric} of the finished runs among rows."""
    return {r["seed"]: compared(r) for r in rows if r["status"] == "finished"}


TUNED_KEYS = ("lr", "weight_decay")   # what a baseline is best over, never matched on


def baseline_groups(groups, baseline):
    """{group key: the key of its baseline group}: the best group (by mean objective over its
    finished seeds) whose setting matches every key=value of `baseline`, among those that share
    the group's values of the other keys the matching groups differ in (e.g. max_iters in the
    duration study: each length against AdamW at that length); lr and weight decay excepted (the
    baseline is at its best lr and wd). Returns ({}, []) without a baseline or a match, else
    (that map, the keys matched on)."""
    if not baseline:
        return {}, []
    matching = {key: json.loads(key) for key in groups
                if all(json.loads(key).get(k) == v for k, v in baseline.items())}
    strata = [k for k in dict.fromkeys(k for s in matching.values() for k in s)
              if k not in baseline and k not in TUNED_KEYS
              and len({s.get(k) for s in matching.values()}) > 1]
    best = {}
    for key, setting in matching.items():
        values = [objective(r) for r in groups[key] if r["status"] == "finished"]
        stratum = tuple(setting.get(k) for k in strata)
        if values and (stratum not in best or statistics.mean(values) < best[stratum][0]):
            best[stratum] = (statistics.mean(values), key)
    out = {}
    for key in groups:
        stratum = tuple(json.loads(key).get(k) for k in strata)
        if stratum in best:
            out[key] = best[stratum][1]
    return out, strata


def compute_line(rows):
    """What the runs cost: their count and wall-clock hours (each run's logged wall_s:
    training, evaluation and logging, over every process that ran it), and the threads each
    had."""
    hours = sum(r.get("wall_s", 0.0) for r in rows) / 3600
    threads = sorted({r["threads"] for r in rows if r.get("threads")})
    return (f"Compute: {len(rows)} runs, {hours:.2f} hours of wall-clock time"
            + (f" at {' or '.join(map(str, threads))} thread{'s' if threads != [1] else ''}"
               " each" if threads else "") + ".")


def regime_line(rows):
    """What every run of these trained, and on what, for the top of a summary."""
    context = studies.study_context(rows, same_regime=len({r.get("seen") for r in rows
                                                            if r.get("seen")}) == 1)
    return context.replace("\n", " ") or "(no run has a log yet)"


def reported(rows):
    """What compared() gives for these rows, in words."""
    if any(r.get("image") for r in rows):
        return "test accuracy (points)"
    if any("final_test_loss" in r for r in rows if r["status"] == "finished"):
        return "test loss (held-out works)"
    return "final val loss (no test split)"


def holm_p(diffs):
    """The Holm-adjusted p-value of each paired difference (None: the baseline's own row, or
    no interval) over the table's comparisons: the family is the table."""
    return stats.holm([d["p"] if d else None for d in diffs])


def p_text(p):
    """A p-value for a table cell: two figures, blank where there is none."""
    return "" if p is None else f"{p:.2g}"


def regime_cells(rows):
    """Training tokens (or images) seen, epochs of the training split, and per parameter."""
    ok = [r for r in rows if r["status"] == "finished" and r.get("seen")]
    if not ok:
        return ["", "", ""]
    epochs = ok[0].get("epochs")
    return [f"{ok[0]['seen']:,}", f"{epochs:.2g}" if epochs else "?",
            f"{ok[0]['seen'] / ok[0]['n_params']:.2g}"]


def summarize(rows, sweep_dir, baseline, name="summary", test=True, notes=()):
    """One line per setting: metrics as mean and sd over its seeds (the validation split's,
    which selection reads, and the test split's, which the comparison reports), what it trained
    on (tokens or images, epochs, per parameter), and the difference of the reported metric
    from the baseline setting over paired seeds with its 95% t interval, its p-value and the
    p-value Holm-adjusted over the table's comparisons; diverged and crashed runs counted (a
    setting with no finished run says which). test=False leaves the test split out (a tuning
    search's trials: selection reads val only). notes: lines printed above the table. Written
    to <name>.md and <name>.csv; returns the markdown."""
    groups = {}
    for row in rows:
        groups.setdefault(json.dumps(row["setting"]), []).append(row)
    setting_keys = list(dict.fromkeys(k for row in rows for k in row["setting"]))  # sub-grids
    image_runs = any(r.get("image") for r in rows)
    # the validation split's always; the test split's where the runs have one (and test)
    metric_names = ["final_val_acc"] if image_runs else ["final_val_loss", "best_val_loss"]
    if any("best_test_acc" in r for r in rows):   # ViT logs from before the validation split
        metric_names = ["final_test_acc"]
    metric_names += [m for m in (["final_test_acc", "final_test_loss"] if image_runs else
                                 ["final_test_loss"])
                     if test and m not in metric_names and any(m in r for r in rows)]
    bases, strata = baseline_groups(groups, baseline)
    table, diffs = [], []
    for key, group in groups.items():
        ok = [r for r in group if r["status"] == "finished"]
        line = {k: json.loads(key).get(k, "") for k in setting_keys}
        line["seeds"] = len(group)
        line["diverged"] = sum(r["status"] == "diverged" for r in group)
        line["crashed"] = sum(r["status"] == "crashed" for r in group)
        for metric in metric_names + ["train_s"]:
            values = [r[metric] for r in ok if r.get(metric) is not None]
            line[metric] = statistics.mean(values) if values else math.nan
            line[metric + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        line["seen"], line["epochs"], line["per_param"] = regime_cells(group)
        line["state_bytes"] = ok[0]["state_bytes"] if ok else 0
        diff = None
        if bases:
            line["vs_baseline"], line["diff_mean"] = "no baseline run", math.nan
            line["diff_low"] = line["diff_high"] = line["p"] = None
        if key in bases:
            diff = stats.paired_difference(per_seed(group), per_seed(groups[bases[key]]))
            line["vs_baseline"] = ("baseline" if key == bases[key] else
                                   stats.describe(diff, digits=2 if image_runs else 3))
            line.update(diff_mean=diff["mean"], diff_low=diff["low"], diff_high=diff["high"],
                        p=diff["p"])
            diff = None if key == bases[key] else diff
        diffs.append(diff)
        table.append(line)
    for line, adjusted in zip(table, holm_p(diffs)):
        if bases:
            line["holm_p"] = adjusted
    with open(os.path.join(sweep_dir, f"{name}.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    unit = "images" if image_runs else "tokens"
    head = (setting_keys + metric_names + (["vs baseline", "p", "Holm p"] if bases else [])
            + ["seen", "epochs", f"{unit}/param", "train s", "state MiB", "seeds", "diverged"])
    lines = [f"Regime: {regime_line(rows)}.", ""]
    if bases:
        where = "; ".join(sorted({" ".join(f"{k}={v}" for k, v in json.loads(b).items())
                                  for b in bases.values()}))
        same = f", at the same {', '.join(strata)}" if strata else ""
        lines += [f"Baseline: {where} (the best setting matching --baseline{same}, chosen on "
                  f"validation); differences are this row's {reported(rows)} minus the "
                  "baseline's over the seeds both ran, with a 95% t interval, its p-value, and "
                  "the p-value Holm-adjusted over this table's comparisons.", ""]
    lines += [*notes, ""] if notes else []
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table:
        cells = [str(t[k]) for k in setting_keys]
        no_result = ("diverged" if t["diverged"] == t["seeds"] else
                     "crashed" if t["crashed"] == t["seeds"] else "no finished run")
        for m in metric_names:
            scale = 100 if "acc" in m else 1
            cells.append(f"{scale * t[m]:.4g} ± {scale * t[m + '_sd']:.2g}"
                         if not math.isnan(t[m]) else no_result)
        cells += [t["vs_baseline"], p_text(t["p"]), p_text(t["holm_p"])] if bases else []
        cells += [t["seen"], t["epochs"], t["per_param"], f"{t['train_s']:.1f}",
                  f"{t['state_bytes'] / 2**20:.2f}", str(t["seeds"]),
                  f"{t['diverged']}" + (f" (+{t['crashed']} crashed)" if t["crashed"] else "")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", compute_line(rows)]
    with open(os.path.join(sweep_dir, f"{name}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def select_on_val(rows, keys):
    """The rows of each setting (the grid's keys but `keys`) at its values of `keys` chosen on
    the validation split: the lowest mean objective over its seeds (a value at which a seed
    diverged loses to any that finished on every seed). Returns (those rows, a line per setting
    saying what was chosen from what, and where a chosen value is the smallest or largest
    tried, that the best may lie beyond it)."""
    groups = {}
    for row in rows:
        rest = json.dumps({k: v for k, v in row["setting"].items() if k not in keys})
        value = tuple(row["setting"].get(k) for k in keys)
        groups.setdefault(rest, {}).setdefault(value, []).append(row)
    chosen, lines = [], []
    for rest, by_value in groups.items():
        score = {v: statistics.mean(objective(r) for r in rs) for v, rs in by_value.items()}
        best = min(by_value, key=lambda v: (score[v], v))
        chosen += by_value[best]
        said = []
        for i, key in enumerate(keys):
            tried = sorted({v[i] for v in by_value if v[i] is not None}, key=number_or_text)
            edge = len(tried) > 1 and best[i] in (tried[0], tried[-1])
            said.append(f"{key}={best[i]} of {', '.join(tried)}"
                        + (" (an edge: the best may lie beyond)" if edge else ""))
        label = " ".join(f"{k}={v}" for k, v in json.loads(rest).items())
        lines.append(f"- {label}: {'; '.join(said)}"
                     + (" (every value diverged)" if math.isinf(score[best]) else ""))
    return chosen, lines


def number_or_text(value):
    """A sort key that orders numbers by value (1e-3 before 3e-3 before 1e-2), text after."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


def selected_summary(rows, sweep_dir, baseline, keys, notes=()):
    """selected.md: each setting at its values of `keys` chosen on validation (select_on_val),
    reported on the test split, compared with the baseline (at its chosen value) over paired
    seeds, Holm over these comparisons alone; notes, then the choices, above the table."""
    chosen, lines = select_on_val(rows, keys)
    head = (f"Each setting at its {', '.join(keys)} chosen on the validation split (the lowest "
            "mean over its seeds); the test split is reported only here, at the chosen values:")
    return summarize(chosen, sweep_dir, baseline, "selected", notes=[*notes, head, *lines])


def tune_summary(report, finals, sweep_dir, baseline, all_rows=None):
    """tune.md: per optimizer, the trials spent, the chosen lr and weight decay (by the val
    split), where the search ended (an edge it could not leave is named), the reported metric
    (test, when the runs have a test split) over the fresh seeds (mean ± sd), its difference
    from the baseline optimizer over paired seeds (95% t interval, p, Holm-adjusted p over the
    table), what the runs trained on, and what the study cost (all_rows: trials and finals)."""
    by_name = {}
    for row in finals:
        by_name.setdefault(row["setting"]["optimizer"], []).append(row)
    base = by_name.get((baseline or {}).get("optimizer"))
    image_runs = any(r.get("image") for r in finals)
    metric = reported(finals).replace(" (points)", " %")
    head = ["optimizer", "trials", "lr", "weight decay", "search ended", metric]
    head += [f"vs {baseline['optimizer']}", "p", "Holm p"] if base else []
    head += ["seen", "epochs", "images/param" if image_runs else "tokens/param", "state MiB"]
    budgets = {r["trials"] for r in report.values()}
    rule = ("the untried neighbours of the best tried point that had any, until "
            f"{budgets.pop()} trials each" if report and all(r["ended"] in ("budget", "interior")
                                                             and r.get("budget")
                                                             for r in report.values())
            and len(budgets) == 1 else "extended while the best lacked a tried neighbour")
    lines = [f"Regime: {regime_line(finals)}.", "",
             "Each optimizer's lr x weight decay tuned on one seed (lr x2, wd x3 apart, from a "
             f"3 x 3 start; {rule}), selected on the validation split, then its best "
             f"run on the seeds {', '.join(str(s) for s in sorted({r['seed'] for r in finals}))}"
             " (mean ± sd)" + ("; differences over paired seeds, 95% t interval, p-values "
                               "Holm-adjusted over the table" if base else "") + ".", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    diffs = [stats.paired_difference(per_seed(by_name.get(name, [])), per_seed(base))
             if base and name != baseline["optimizer"] else None for name in report]
    for (name, r), diff, adjusted in zip(report.items(), diffs, holm_p(diffs)):
        rows = by_name.get(name, [])
        values = list(per_seed(rows).values())
        ended = ("interior" if not r["edges"] else
                 f"{'budget spent' if r.get('budget') else 'cap hit'}: "
                 f"{', '.join(r['edges'])} untried")
        cells = [name, str(r["trials"]), r["setting"]["lr"], r["setting"]["weight_decay"], ended,
                 (f"{statistics.mean(values):.4g} ± "
                  f"{statistics.stdev(values) if len(values) > 1 else 0:.2g} "
                  f"({len(values)} of {len(rows)} seeds)") if values else "no finished run"]
        if base:
            cells += (["baseline", "", ""] if diff is None else
                      [stats.describe(diff, digits=2 if image_runs else 3), p_text(diff["p"]),
                       p_text(adjusted)])
        ok = [x for x in rows if x["status"] == "finished" and x.get("seen")]
        cells += regime_cells(rows)
        cells += [f"{ok[0]['state_bytes'] / 2**20:.2f}" if ok else ""]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", compute_line(all_rows or finals)]
    with open(os.path.join(sweep_dir, "tune.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def run_result(run_dir, setting, seed, status):
    """The numbers summarize() needs, read from a run's metrics: the last evaluation's (val;
    test in ViT logs from before the validation split), the test split's once after the last
    step (GPT's held-out works, the ViT's test set), and its regime."""
    row = {"setting": setting, "seed": seed, "status": status, "run_dir": run_dir}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return row
    with open(path) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if r["event"] == "eval"]
    tests = [r for r in records if r["event"] == "test"]
    # wall_s counts from its process's start, again from 0 when a run resumes: the run took
    # the sum of each process's last
    walls = [r["wall_s"] for r in records if "wall_s" in r]
    row["wall_s"] = sum(w for w, after in zip(walls, walls[1:] + [0.0]) if after < w)
    if evals:
        last = evals[-1]
        if "val_acc" in last:
            row.update(final_val_acc=last["val_acc"], best_val_acc=last["best_val_acc"],
                       final_val_loss=last["val_loss"], image=True, seen=last["samples"])
        elif "test_acc" in last:   # evaluated on the test set each epoch (before the val split)
            row.update(final_test_acc=last["test_acc"], best_test_acc=last["best_test_acc"],
                       final_test_loss=last["test_loss"], image=True, seen=last["samples"])
        else:
            row.update(final_val_loss=last["val_loss"], best_val_loss=last["best_val_loss"],
                       seen=last["tokens"])
        row.update(train_s=last["train_s"], state_bytes=last["state_bytes"])
    if tests:
        row["final_test_loss"] = tests[-1]["test_loss"]
        if "test_acc" in tests[-1]:
            row["final_test_acc"] = tests[-1]["test_acc"]
    info_path = os.path.join(run_dir, "run.json")
    if os.path.exists(info_path):
        with open(info_path) as f:
            info = json.load(f)
        row["n_params"], row["threads"] = info["n_params"], info.get("threads")
        examples = info.get("n_train" if row.get("image") else "train_tokens")
        if examples and row.get("seen"):
            row["epochs"] = row["seen"] / examples
    return row


def objective(row):
    """What tuning minimises and a baseline is chosen by, on the validation split only: the
    final val loss (GPT) or minus the final val accuracy (ViT; the test accuracy in logs from
    before the ViT had a validation split); inf for a run that did not finish."""
    if row["status"] != "finished":
        return math.inf
    if row.get("image"):
        return -row.get("final_val_acc", row.get("final_test_acc"))
    return row["final_val_loss"]


def parse_filter(text):
    """--baseline 'optimizer=adamw sai_rule=gsnr' -> {'optimizer': 'adamw', ...}; '' -> None."""
    out = {}
    for item in text.split():
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise ConfigError(f"--baseline: {item!r} is not key=value")
        out[key] = value
    return out or None


def parse_centres(text):
    """--tune_centre 'adamw=4e-3,0.1 muon=8e-3,0.1' -> {'adamw': (0.004, 0.1), ...}."""
    centres = {}
    for item in text.split():
        name, _, values = item.partition("=")
        try:
            lr, wd = (float(v) for v in values.split(","))
        except ValueError:
            raise ConfigError(f"--tune_centre: {item!r} is not name=lr,weight_decay") from None
        optimizer_names(name)
        centres[name] = (lr, wd)
    return centres


def lattice_setting(name, centre, point):
    """The trial at lattice point (i, j): lr = centre lr * 2^i, wd = centre wd * 3^j."""
    (lr, wd), (i, j) = centre, point
    return {"optimizer": name, "lr": f"{lr * LR_STEP ** i:.3g}",
            "weight_decay": f"{wd * WD_STEP ** j:.3g}"}


NEIGHBOURS = ((-1, 0), (1, 0), (0, -1), (0, 1))   # lower / higher lr, lower / higher wd


def next_trials(tried, max_extra, start=9):
    """One tuning decision. tried: {(i, j): final loss, inf when diverged}. Returns (the lattice
    points to run next, and why the search ends when it does: 'interior' when the best point has
    all four neighbours tried, 'cap' when trying them would exceed max_extra extra trials)."""
    best = min(tried, key=lambda p: (tried[p], p))
    missing = [(best[0] + di, best[1] + dj) for di, dj in NEIGHBOURS
               if (best[0] + di, best[1] + dj) not in tried]
    if not missing:
        return [], "interior"
    if len(tried) - start + len(missing) > max_extra:
        return [], "cap"
    return missing, None


def budget_trials(tried, budget):
    """One tuning decision under an equal budget: the untried lattice neighbours of the best
    tried point that has any (points ranked by final loss), as many as the budget has left;
    ([], 'budget') once it is spent. Every optimizer spends the same number of trials by the
    same rule."""
    left = budget - len(tried)
    if left <= 0:
        return [], "budget"
    for point in sorted(tried, key=lambda p: (tried[p], p)):
        missing = [(point[0] + di, point[1] + dj) for di, dj in NEIGHBOURS
                   if (point[0] + di, point[1] + dj) not in tried]
        if missing:
            return missing[:left], None
    return [], "budget"   # not reached: a finite set of points always has an untried neighbour


def edges(tried, best):
    """Which axes the best point still lacks a tried neighbour on: e.g. ['lr above']."""
    words = ("lr below", "lr above", "wd below", "wd above")
    return [w for w, (di, dj) in zip(words, NEIGHBOURS)
            if (best[0] + di, best[1] + dj) not in tried]


def tune(trainer, cfg, fixed, sweep_dir, start, jobs=1):
    """Tune lr x weight decay of each optimizer in cfg.tune (one seed), then run each one's best
    on cfg's seeds. Every optimizer's search goes on by itself: its next trials are decided as
    soon as its last ones have ended, and its final runs start as soon as its search has, so no
    core waits on another optimizer's trials. start(run) begins one run and returns a Future of
    its row; at most `jobs` are under way at once, trials first (they decide what runs next).
    Returns (rows of every run, the per-optimizer report), with no report when a run crashed or
    was stopped (then the runs under way are waited for and no other starts) or, in a redraw,
    had not run (a row with status "not run": that optimizer's search stops there, the others
    go on; the row is left out); writes tuned.json when every search has ended. Deterministic
    given the runs' results: which runs are made, and the rows' order, do not depend on which
    run ended first, so a re-run walks the same searches over finished runs."""
    names = optimizer_names(cfg.tune)
    centres = parse_centres(cfg.tune_centre)
    for name in names:
        if name not in centres:
            resolved = trainer.resolve_config(fixed + [f"--optimizer={name}"])
            centres[name] = (resolved.lr, resolved.weight_decay)
    seeds = [int(s) for s in cfg.seeds.split(",")]
    tried = {name: {} for name in names}
    rows = {name: [] for name in names}     # each run's row, in the order it was decided
    waiting = {name: 0 for name in names}   # this optimizer's runs queued or under way
    report, queue, under_way, decided = {}, [], {}, itertools.count()

    def enqueue(name, settings, run_seeds, points):
        runs = plan_runs(trainer, settings, run_seeds, fixed, sweep_dir)
        check_runs(runs, sweep_dir, trainer)
        for run, point in zip(runs, points):
            rows[name].append({})   # filled where it was decided when the run ends
            queue.append((point is None, next(decided), name, point, run, rows[name][-1]))
        waiting[name] += len(runs)

    def decide(name):
        """The search's next trials, or, once it has ended, the best setting's final runs."""
        points, why = (budget_trials(tried[name], cfg.budget) if cfg.budget else
                       next_trials(tried[name], cfg.max_extra))
        if not why:
            enqueue(name, [lattice_setting(name, centres[name], p) for p in points],
                    [cfg.tune_seed], points)
            return
        best = min(tried[name], key=lambda p: (tried[name][p], p))
        setting = lattice_setting(name, centres[name], best)
        report[name] = dict(setting=setting, trials=len(tried[name]), ended=why,
                            budget=bool(cfg.budget), edges=edges(tried[name], best),
                            tune_loss=tried[name][best])
        if len(report) == len(names):
            with open(os.path.join(sweep_dir, "tuned.json"), "w") as f:
                json.dump({n: {"lr": report[n]["setting"]["lr"],
                               "weight_decay": report[n]["setting"]["weight_decay"]}
                           for n in names}, f, indent=1)
        enqueue(name, [setting], seeds, [None] * len(seeds))

    start_points = [(i, j) for i in (-1, 0, 1) for j in (-1, 0, 1)]
    for name in names:
        enqueue(name, [lattice_setting(name, centres[name], p) for p in start_points],
                [cfg.tune_seed], start_points)
    halted = False   # a run crashed or was stopped: the next decision would need its result
    not_run = set()  # (a redraw) the optimizers whose search reached a run that has not run
    while under_way or (queue and not halted):
        queue.sort(key=lambda item: item[:2])          # trials first, then in decided order
        while queue and not halted and len(under_way) < jobs:
            _, _, name, point, run, row = queue.pop(0)
            under_way[start(run)] = (name, point, row)
        done, _ = wait(under_way, return_when=FIRST_COMPLETED)
        for future in done:
            name, point, row = under_way.pop(future)
            row.update(future.result(), **({"final": True} if point is None else {}))
            waiting[name] -= 1
            halted = halted or row["status"] in ("crashed", "stopped")
            if row["status"] == "not run":
                not_run.add(name)
            if point is not None:
                tried[name][point] = objective(row)
                if not waiting[name] and not halted and name not in not_run:
                    decide(name)
    done_rows = [row for name in names for row in rows[name]
                 if row and row["status"] != "not run"]
    return done_rows, None if halted or not_run else {name: report[name] for name in names}


FALLBACK_SOURCES = ("pydoc_topics", "digits")   # the trainers' offline stand-ins for their data


def check_real_data(trainer, fixed, study):
    """A preset study's data, loaded once (and cached for its runs) before any run starts: the
    real data, or a ConfigError. A study's numbers are read beside the docs' and each other's,
    never on an offline stand-in."""
    data = trainer.load_data(trainer.resolve_config(fixed))
    if data.source in FALLBACK_SOURCES:
        raise ConfigError(f"--study={study}: its data could not be found or downloaded, and its "
                          f"runs would train on the offline stand-in ({data.source}); put the "
                          "data where the line above says, or give --set=data_path=...")


def check_runs(runs, sweep_dir, trainer):
    """Refuse run directories that hold a run made with other options (ConfigError); an option
    the trainer gained since, at its default, is not another option."""
    defaults = dataclasses.asdict(trainer.Config())
    changed = [(run, changes) for run in runs
               if (changes := config_changes(run.run_dir, run.config, defaults))]
    if changed:
        run, changes = changed[0]
        raise ConfigError(
            f"--sweep_dir={sweep_dir} already holds {len(changed)} of these runs made with "
            f"other options (e.g. {os.path.basename(run.run_dir)}: {'; '.join(changes[:3])}"
            "); their results are not this sweep's: give another --sweep_dir, or delete "
            "those run directories to re-run them")


def unpack(pack, sweep_dir):
    """Extract a study's pack into sweep_dir, each file only where sweep_dir has none (a resumed
    or newer run is never overwritten); what it did, in one line. A missing or unreadable pack
    is a ConfigError."""
    try:
        with tarfile.open(pack) as tar:
            members = [m for m in tar.getmembers() if m.isfile()]
            new = [m for m in members if not os.path.exists(os.path.join(sweep_dir, m.name))]
            tar.extractall(sweep_dir, members=new, filter="data")
    except (OSError, tarfile.TarError) as err:
        raise ConfigError(f"--pack={pack}: cannot be read ({type(err).__name__}: {err}); give "
                          "a study's .tar.xz (python tools/pack_study.py DIR makes one)") from None
    return (f"unpacked {len(new)} of {len(members)} files of {pack} into {sweep_dir}"
            + (f" ({len(members) - len(new)} already there, kept)" if len(new) < len(members)
               else ""))


def redraw_notes(partial):
    """The lines above a partial redraw's tables (none for a whole study)."""
    return [f"{partial} (drawn with --redraw); the others have not run, and the same command "
            "without --redraw runs them."] if partial else []


def draw_tables(cfg, rows, runs, the_plan, sweep_dir, baseline, select, partial=""):
    """A grid's (or the iso-memory study's) tables and figures from its rows, printed and
    written to sweep_dir; partial: how many of its runs a redraw found ended, said above each
    table and under each figure's title."""
    notes = redraw_notes(partial)
    if the_plan:
        text = iso_memory.table(rows, the_plan, runs[0].config, compute_line(rows), notes)
        with open(os.path.join(sweep_dir, "iso_memory.md"), "w") as f:
            f.write(text)
        print(text)
    elif select:   # the choice on val; test and the comparisons at the chosen values
        print(summarize(rows, sweep_dir, None, test=False, notes=notes))
        print(selected_summary(rows, sweep_dir, baseline, select, notes))
    else:
        print(summarize(rows, sweep_dir, baseline, notes=notes))
    for path in studies.draw(cfg.study, rows, sweep_dir, note=partial):
        print(f"wrote {path}")


def draw_tuning(cfg, rows, report, sweep_dir, baseline, partial=""):
    """A tuning study's tables and figures: the trials', and the tuned settings' when every
    search has ended (report); partial as in draw_tables."""
    notes = redraw_notes(partial)
    print(summarize([r for r in rows if not r.get("final")], sweep_dir, None, "trials",
                    test=False, notes=notes))
    if report:
        print(tune_summary(report, [r for r in rows if r.get("final")], sweep_dir, baseline,
                           rows))
    for path in studies.draw(cfg.study, rows, sweep_dir, tuning=bool(report), note=partial):
        print(f"wrote {path}")


def redraw_tuning(trainer, cfg, fixed, sweep_dir, baseline):
    """--redraw of a tuning study: its searches walked over the runs that have ended, each
    optimizer's as far as its first run that has not (the trial it would run next), starting
    none. Returns the exit status: 0, or 1 when no run has ended."""
    def start(run):   # the run's row at once, as a sweep would read it had the run just ended
        status, future = last_status(run.run_dir), Future()
        future.set_result(run_result(run.run_dir, run.setting, run.seed, status)
                          if status in ENDED else {"status": "not run"})
        return future
    rows, report = tune(trainer, cfg, fixed, sweep_dir, start)
    if not rows:
        print(f"--redraw: no run of the search in {sweep_dir} has ended; nothing to draw (run "
              "it without --redraw)", file=sys.stderr)
        return 1
    names = optimizer_names(cfg.tune)
    total = (f"of the study's {len(names) * (cfg.budget + len(cfg.seeds.split(',')))} runs "
             if cfg.budget else "")   # a budget fixes every search's length
    draw_tuning(cfg, rows, report, sweep_dir, baseline,
                "" if report else f"Partial: {len(rows)} {total}have ended")
    return 0


def redraw(cfg, runs, the_plan, sweep_dir, baseline, select):
    """--redraw: the tables and figures of the runs that have ended (finished or diverged),
    starting none; runs.jsonl is left as the last sweep wrote it. Returns the exit status: 0,
    or 1 when no run has ended."""
    rows = [run_result(run.run_dir, run.setting, run.seed, status) for run in runs
            if (status := last_status(run.run_dir)) in ENDED]
    if not rows:
        print(f"--redraw: none of the sweep's {len(runs)} runs in {sweep_dir} has ended; "
              "nothing to draw (run it without --redraw)", file=sys.stderr)
        return 1
    partial = ("" if len(rows) == len(runs) else
               f"Partial: {len(rows)} of the sweep's {len(runs)} runs have ended")
    draw_tables(cfg, rows, runs, the_plan, sweep_dir, baseline, select, partial)
    return 0


def main(argv):
    try:
        cfg, given = parse_args(SweepConfig(), argv, __doc__.strip().splitlines()[0])
        if cfg.study:
            if cfg.study not in STUDIES:
                raise ConfigError(f"--study must be one of {', '.join(STUDIES)}, got "
                                     f"{cfg.study!r}")
            preset = {k: v for k, v in STUDIES[cfg.study].items() if k not in given}
            if "set" in given:       # added to the study's fixed options, overriding the same keys
                preset["set"] = f"{STUDIES[cfg.study]['set']} {cfg.set}"
            cfg = dataclasses.replace(cfg, **preset)
        if cfg.trainer not in TRAINERS:
            raise ConfigError(f"--trainer must be one of {', '.join(TRAINERS)}, got "
                                 f"{cfg.trainer!r}")
        if cfg.tune and cfg.grid:
            raise ConfigError("give --tune (tune each optimizer's lr and weight decay) or "
                              "--grid (run these settings), not both")
        try:
            seeds = [int(s) for s in cfg.seeds.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds must be comma-separated ints, got {cfg.seeds!r}")
        if cfg.tune and cfg.tune_seed in seeds:
            raise ConfigError(f"--seeds={cfg.seeds} includes --tune_seed={cfg.tune_seed}: the "
                              "best setting was chosen by that seed's result (biased low); "
                              "give the final runs other seeds")
        check_positive(cfg, "jobs")
        select = [k for k in cfg.select.split(",") if k]
        if select and (cfg.tune or cfg.grid == ISO_MEMORY):
            raise ConfigError(f"--select={cfg.select}: a grid's choice; tuning chooses lr and "
                              "weight decay itself, and the iso-memory study keeps the tuned ones")
        if cfg.max_extra < 0:
            raise ConfigError(f"--max_extra must be >= 0, got {cfg.max_extra}")
        if cfg.budget and cfg.budget < 9:
            raise ConfigError(f"--budget={cfg.budget}: the 3 x 3 start alone is 9 trials; give "
                              ">= 9 (or 0 for the --max_extra rule)")
        baseline = parse_filter(cfg.baseline)
        sweep_dir = cfg.sweep_dir or os.path.join("out", f"sweep-{cfg.study or 'custom'}")
        if cfg.pack:
            print(unpack(cfg.pack, sweep_dir))
        trainer = TRAINERS[cfg.trainer]
        fixed = [f"--{item}" for item in cfg.set.split()]
        runs, the_plan = [], None
        if cfg.tune:
            optimizer_names(cfg.tune)
            parse_centres(cfg.tune_centre)
        elif cfg.grid == ISO_MEMORY:
            if cfg.trainer != "nanogpt":
                raise ConfigError("--study=iso_memory is the GPT's (--trainer=nanogpt)")
            the_plan = iso_memory.plan(fixed, read_tuned(cfg), seeds[0])
            print(iso_memory.describe(the_plan))
            runs = [run for setting, only in the_plan["runs"]
                    for run in plan_runs(trainer, [setting], only or seeds, fixed, sweep_dir)]
            check_runs(runs, sweep_dir, trainer)
        else:
            settings = parse_grid(expand_grid(cfg.grid, cfg))
            unknown = [k for k in select if all(k not in s for s in settings)]
            if unknown:
                raise ConfigError(f"--select={cfg.select}: the grid never sets "
                                  f"{', '.join(unknown)}; give keys of --grid (e.g. lr)")
            runs = plan_runs(trainer, settings, seeds, fixed, sweep_dir)
            check_runs(runs, sweep_dir, trainer)
        if cfg.study and not cfg.redraw:   # nothing trains in a redraw
            check_real_data(trainer, fixed, cfg.study)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.redraw and cfg.tune:
        try:
            return redraw_tuning(trainer, cfg, fixed, sweep_dir, baseline)
        except ConfigError as err:   # a trial's run directory made with other options
            print(f"error: {err}", file=sys.stderr)
            return 2
    if cfg.redraw:
        return redraw(cfg, runs, the_plan, sweep_dir, baseline, select)
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    if the_plan:
        with open(os.path.join(sweep_dir, "plan.json"), "w") as f:
            json.dump(the_plan, f, indent=1)
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs) if cfg.jobs > 1 else None
    t0, done = time.time(), []

    bar = tqdm(total=0, unit="run", disable=None, dynamic_ncols=True, leave=False)
    pool = ThreadPoolExecutor(max_workers=cfg.jobs)   # its threads only wait on processes

    def one(run):
        status, how = run_one(trainer, run, threads, cfg.keep_checkpoints)
        done.append(run)
        bar.update(1)
        bar.write(f"[{len(done)} {time.time() - t0:.0f}s] "
                  f"{os.path.basename(run.run_dir)}: {status} ({how})")
        return run_result(run.run_dir, run.setting, run.seed, status)

    def start(run):
        """Begin one run (on the pool's next free thread); a Future of its row."""
        bar.total += 1
        bar.refresh()
        return pool.submit(one, run)

    report = None
    try:
        if cfg.tune:
            rows, report = tune(trainer, cfg, fixed, sweep_dir, start, cfg.jobs)
        else:
            rows = [future.result() for future in [start(run) for run in runs]]
    except ConfigError as err:   # a tuning trial's run directory made with other options
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:    # the runs got the Ctrl-C too: they stop and save
        rows = None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
    if rows is None:
        print(f"\nstopped after {len(done)} runs; the same command resumes the sweep",
              file=sys.stderr)
        return 130
    with open(os.path.join(sweep_dir, "runs.jsonl"), "w") as f:       # rewritten: no repeats
        f.writelines(json.dumps(row) + "\n" for row in rows)
    if cfg.tune:
        draw_tuning(cfg, rows, report, sweep_dir, baseline)
    else:
        draw_tables(cfg, rows, runs, the_plan, sweep_dir, baseline, select)
    crashed = [row for row in rows if row["status"] == "crashed"]
    if any(row["status"] == "stopped" for row in rows) and not crashed:
        print("a run was stopped (Ctrl-C); the same command resumes the sweep", file=sys.stderr)
        return 130
    if crashed:
        print(f"{len(crashed)} of {len(rows)} runs crashed; the end of each one's log.txt says "
              f"why (first: {crashed[0]['run_dir']})", file=sys.stderr)
    elif not any(row["status"] == "finished" for row in rows):
        print(f"no run finished ({len(rows)} ended otherwise: see the summary)", file=sys.stderr)
    return 1 if crashed or not any(row["status"] == "finished" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
