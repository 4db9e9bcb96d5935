"""
Sweeps and ablation studies: a grid of trainer settings x seeds, one process per run.

    python sweep.py --study=lr          # LR sensitivity of every optimizer, 3 seeds
    python sweep.py --study=sai_rule    # SGD-SaI's scale rules, each over its own LR range
    python sweep.py --study=batch       # 4x batch with the LR unscaled, sqrt- or linearly scaled
    python sweep.py --study=per_example # sign placement and per-example preconditioners
    python sweep.py --trainer=nanogpt --grid="optimizer=adamw lr=1e-3,3e-3 | optimizer=sgd_sai \
lr=1e-2" --seeds=1,2 --set="max_iters=300"   # any grid

A grid is sub-grids joined by "|"; each is "key=v1,v2 key=v3 ...", their cartesian product.
Runs go sequentially (or --jobs at a time), each in its own process (so each peak-memory figure
is its own), into
<sweep_dir>/<setting>-seed<k>/. Every run's options are checked by its trainer before any run
starts. Re-running skips finished and diverged runs and resumes crashed ones from their
checkpoint; a run directory that holds a run made with other options (a changed --set, a changed
default) is refused, never reported as the new result. runs.jsonl records every run's status;
summary.md and summary.csv aggregate over seeds (mean and standard deviation); the study's
figures are drawn from the logs. Exit status: 0 when every run finished or diverged, 1 when one
crashed or none finished, 2 a bad command line.
"""
import csv
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from tqdm import tqdm

import nanogpt_sai
import optim
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
from nanogpt_sai import DEFAULT_LR
from plots import studies

TRAINERS = {"nanogpt": nanogpt_sai, "vit": vit_sai}


@dataclass
class SweepConfig:
    study: str = option("", "a preset study: lr, sai_rule, batch or per_example (sets "
                            "trainer, grid, seeds, set)")
    trainer: str = option("nanogpt", "nanogpt or vit")
    grid: str = option("", "settings to sweep, e.g. 'optimizer=adamw lr=1e-3,3e-3 | "
                           "optimizer=sgd_sai lr=1e-2'")
    seeds: str = option("1,2,3", "comma-separated seeds; every setting runs with each")
    set: str = option("", "fixed trainer options for every run, e.g. 'max_iters=300' (with "
                          "--study: added to the study's)")
    sweep_dir: str = option("", "where runs and the summary go; default out/sweep-<study>")
    jobs: int = option(1, "runs at a time; above 1 each gets cores/jobs threads, and the "
                          "wall-clock figures are then those of a shared machine")
    keep_checkpoints: bool = option(True, "keep each ended run's ckpt.pt (False deletes it "
                                          "once the run has finished or diverged)")


# The studies, at nanoGPT's CPU baby size (4 layers, 128 wide, block 64, batch 12), 400 steps:
# under a minute per run on 2 CPU cores. LR grids are log-spaced (factors of ~3) around each
# optimizer's usable range.
BABY = ("max_iters=400 eval_interval=100 eval_iters=20 warmup_iters=40 log_interval=50 "
        "sample_tokens=0")
STUDIES = {
    "lr": dict(grid=" | ".join(
        [f"optimizer={name} lr=1e-3,3e-3,1e-2,3e-2"
         for name in ("adamw", "adam_mini", "apollo", "apollo_mini", "muon")] +
        [f"optimizer={name} lr=3e-3,1e-2,3e-2,1e-1" for name in ("sgd_sai", "adafactor")]),
        seeds="1,2,3", set=BABY),
    # weight decay off: decoupled decay multiplies by the lr, which differs ~250x between rules
    # (gsnr_max and none need lr ~1 where gsnr needs ~1e-2), so with it on the rules would also
    # differ in how fast they decay the weights
    "sai_rule": dict(grid=" | ".join([
        "optimizer=sgd_sai sai_rule=gsnr lr=3e-3,1e-2,3e-2",
        "optimizer=sgd_sai sai_rule=sqrt_numel lr=3e-3,1e-2,3e-2",
        "optimizer=sgd_sai sai_rule=gsnr_max lr=0.3,1.0,3.0,10.0",
        "optimizer=sgd_sai sai_rule=none lr=0.3,1.0,3.0,10.0"]), seeds="1,2",
        set=BABY + " weight_decay=0.0"),
    # base batch 12 for 400 steps vs batch 48 for 100 steps (the same tokens, warmup the same
    # tenth of them), the LR of the base run (the trainer's default) multiplied by 1 (none),
    # sqrt(4) = 2 or 4 (linear)
    "batch": dict(grid=" | ".join(
        [f"optimizer={o} batch_size=12 max_iters=400 warmup_iters=40 lr={DEFAULT_LR['cpu'][o]:g}"
         for o in optim.OPTIMIZERS]
        + [f"optimizer={o} batch_size=48 max_iters=100 warmup_iters=10 "
           f"lr={lr:g},{2 * lr:g},{4 * lr:g}"
           for o, lr in ((o, DEFAULT_LR["cpu"][o]) for o in optim.OPTIMIZERS)]),
        seeds="1,2", set="eval_interval=25 eval_iters=20 log_interval=25"),
    # arXiv 2510.00236's two questions at the baby size: where the sign goes (sign_sgd), and
    # what Adam's second moment is built from (adam_pe; "batch" is Adam itself), each over its
    # LR range (grids extended where a first run's best lr was at an edge: the mean of signs
    # takes larger steps, signum smaller). Each step is ~1.7x a plain one (the per-example pass).
    "per_example": dict(grid=" | ".join(
        [f"optimizer=sign_sgd sign_placement={p} lr={lrs}" for p, lrs in (
            ("sign_of_mean", "3e-4,1e-3,3e-3,1e-2"),
            ("mean_of_signs", "3e-4,1e-3,3e-3,1e-2,3e-2,1e-1"),
            ("signum", "3e-5,1e-4,3e-4,1e-3,3e-3,1e-2"))]
        + [f"optimizer=adam_pe preconditioner={p} lr={lrs}" for p, lrs in (
            ("batch", "1e-3,3e-3,1e-2"), ("mean_sq", "1e-3,3e-3,1e-2"),
            ("variance", "3e-4,1e-3,3e-3,1e-2"), ("second_moment", "1e-3,3e-3,1e-2"))]),
        seeds="1,2,3", set=BABY),
}


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
            argv = fixed + [f"--{k}={v}" for k, v in setting.items()] + [f"--seed={seed}"]
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


def run_one(trainer, run, threads, keep_checkpoint):
    """Run (or resume) one training in its own process; its output goes to run_dir/log.txt.
    Returns (status, how): 'finished', 'diverged', 'stopped' or 'crashed', and a few words."""
    status = last_status(run.run_dir)
    if status in ("finished", "diverged"):
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
    if code not in (0, 3) and status != "stopped":
        return "crashed", f"exit {code}: {last_line(log_path)}"
    if status in ("finished", "diverged") and not keep_checkpoint and os.path.exists(ckpt):
        os.remove(ckpt)
    return status or "crashed", f"exit {code}"


def summarize(rows, sweep_dir):
    """One line per setting: metrics as mean and sd over its seeds; diverged and crashed runs
    counted (a setting with no finished run says which)."""
    groups = {}
    for row in rows:
        groups.setdefault(json.dumps(row["setting"]), []).append(row)
    setting_keys = list(dict.fromkeys(k for row in rows for k in row["setting"]))  # sub-grids
    image_runs = any("test_acc" in r for r in rows)
    metric_names = (["final_test_acc", "best_test_acc", "final_test_loss"] if image_runs
                    else ["final_val_loss", "best_val_loss"])
    table = []
    for key, group in groups.items():
        ok = [r for r in group if r["status"] == "finished"]
        line = {k: json.loads(key).get(k, "") for k in setting_keys}
        line["seeds"] = len(group)
        line["diverged"] = sum(r["status"] == "diverged" for r in group)
        line["crashed"] = sum(r["status"] == "crashed" for r in group)
        for name in metric_names + ["train_s"]:
            values = [r[name] for r in ok if r.get(name) is not None]
            line[name] = statistics.mean(values) if values else math.nan
            line[name + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
        seen = [r for r in ok if r.get("seen")]
        line["seen"] = seen[0]["seen"] if seen else 0
        line["state_bytes"] = ok[0]["state_bytes"] if ok else 0
        table.append(line)
    with open(os.path.join(sweep_dir, "summary.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(table[0]))
        writer.writeheader()
        writer.writerows(table)
    head = setting_keys + metric_names + ["seen", "train s", "state MiB", "seeds", "diverged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table:
        cells = [str(t[k]) for k in setting_keys]
        no_result = ("diverged" if t["diverged"] == t["seeds"] else
                     "crashed" if t["crashed"] == t["seeds"] else "no finished run")
        for m in metric_names:
            scale = 100 if "acc" in m else 1
            cells.append(f"{scale * t[m]:.4g} ± {scale * t[m + '_sd']:.2g}"
                         if not math.isnan(t[m]) else no_result)
        cells += [f"{t['seen']:,}", f"{t['train_s']:.1f}", f"{t['state_bytes'] / 2**20:.2f}",
                  str(t["seeds"]), f"{t['diverged']}" + (f" (+{t['crashed']} crashed)"
                                                         if t["crashed"] else "")]
        lines.append("| " + " | ".join(cells) + " |")
    with open(os.path.join(sweep_dir, "summary.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def run_result(run_dir, setting, seed, status):
    """The numbers summarize() needs, read from a run's metrics."""
    row = {"setting": setting, "seed": seed, "status": status, "run_dir": run_dir}
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return row
    with open(path) as f:
        records = [json.loads(line) for line in f]
    evals = [r for r in records if r["event"] == "eval"]
    if evals:
        last = evals[-1]
        if "test_acc" in last:
            row.update(final_test_acc=last["test_acc"], best_test_acc=last["best_test_acc"],
                       final_test_loss=last["test_loss"], test_acc=True, seen=last["samples"])
        else:
            row.update(final_val_loss=last["val_loss"], best_val_loss=last["best_val_loss"],
                       seen=last["tokens"])
        row.update(train_s=last["train_s"], state_bytes=last["state_bytes"])
    return row


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
        settings = parse_grid(cfg.grid)
        try:
            seeds = [int(s) for s in cfg.seeds.split(",")]
        except ValueError:
            raise ConfigError(f"--seeds must be comma-separated ints, got {cfg.seeds!r}")
        check_positive(cfg, "jobs")
        sweep_dir = cfg.sweep_dir or os.path.join("out", f"sweep-{cfg.study or 'custom'}")
        trainer = TRAINERS[cfg.trainer]
        runs = plan_runs(trainer, settings, seeds, [f"--{item}" for item in cfg.set.split()],
                         sweep_dir)
        changed = [(run, changes) for run in runs
                   if (changes := config_changes(run.run_dir, run.config))]
        if changed:
            run, changes = changed[0]
            raise ConfigError(
                f"--sweep_dir={sweep_dir} already holds {len(changed)} of these runs made with "
                f"other options (e.g. {os.path.basename(run.run_dir)}: {'; '.join(changes[:3])}"
                f"); their results are not this sweep's: give another --sweep_dir, or delete "
                "those run directories to re-run them")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs) if cfg.jobs > 1 else None
    bar = tqdm(total=len(runs), unit="run", disable=None, dynamic_ncols=True, leave=False)
    t0, done = time.time(), []

    def one(run):
        status, how = run_one(trainer, run, threads, cfg.keep_checkpoints)
        done.append(run)
        bar.update(1)
        bar.write(f"[{len(done)}/{len(runs)} {time.time() - t0:.0f}s] "
                  f"{os.path.basename(run.run_dir)}: {status} ({how})")
        return run_result(run.run_dir, run.setting, run.seed, status)

    pool = ThreadPoolExecutor(max_workers=cfg.jobs)   # its threads only wait on processes
    try:
        rows = list(pool.map(one, runs))
    except KeyboardInterrupt:   # the runs got the Ctrl-C too: they stop and save a checkpoint
        pool.shutdown(wait=True, cancel_futures=True)
        bar.close()
        print(f"\nstopped after {len(done)} of {len(runs)} runs; the same command resumes the "
              "sweep", file=sys.stderr)
        return 130
    pool.shutdown()
    bar.close()
    with open(os.path.join(sweep_dir, "runs.jsonl"), "w") as f:       # rewritten: no repeats
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(summarize(rows, sweep_dir))
    for path in studies.draw(cfg.study, rows, sweep_dir):
        print(f"wrote {path}")
    crashed = [row for row in rows if row["status"] == "crashed"]
    if crashed:
        print(f"{len(crashed)} of {len(rows)} runs crashed; the end of each one's log.txt says "
              f"why (first: {crashed[0]['run_dir']})", file=sys.stderr)
    elif not any(row["status"] == "finished" for row in rows):
        print(f"no run finished ({len(rows)} ended otherwise: see the summary)", file=sys.stderr)
    return 1 if crashed or not any(row["status"] == "finished" for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
