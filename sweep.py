"""
Sweeps and ablation studies: a grid of trainer settings x seeds, one process per run.

    python sweep.py --study=lr          # LR sensitivity of every optimizer, 3 seeds
    python sweep.py --study=sai_rule    # SGD-SaI's scale rules, each over its own LR range
    python sweep.py --study=batch       # 4x batch with the LR unscaled, sqrt- or linearly scaled
    python sweep.py --trainer=nanogpt --grid="optimizer=adamw lr=1e-3,3e-3 | optimizer=sgd_sai \
lr=1e-2" --seeds=1,2 --set="max_iters=300"   # any grid

A grid is sub-grids joined by "|"; each is "key=v1,v2 key=v3 ...", their cartesian product.
Runs go sequentially (or --jobs at a time), each in its own process (so each peak-memory figure
is its own), into
<sweep_dir>/<setting>-seed<k>/. Re-running skips finished and diverged runs and resumes crashed
ones from their checkpoint. runs.jsonl records every run's status; summary.md and summary.csv
aggregate over seeds (mean and standard deviation); the study's figures are drawn from the logs.
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

from cli import ConfigError, check_positive, option, parse_args, run_in_process
from nanogpt_sai import DEFAULT_LR
from plots import studies

TRAINERS = {"nanogpt": "nanogpt_sai.py", "vit": "vit_sai.py"}
ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class SweepConfig:
    study: str = option("", "a preset study: lr, sai_rule or batch (sets trainer, grid, "
                            "seeds, set)")
    trainer: str = option("nanogpt", "nanogpt or vit")
    grid: str = option("", "settings to sweep, e.g. 'optimizer=adamw lr=1e-3,3e-3 | "
                           "optimizer=sgd_sai lr=1e-2'")
    seeds: str = option("1,2,3", "comma-separated seeds; every setting runs with each")
    set: str = option("", "fixed trainer options for every run, e.g. 'max_iters=300' (with "
                          "--study: added to the study's)")
    sweep_dir: str = option("", "where runs and the summary go; default out/sweep-<study>")
    jobs: int = option(1, "runs at a time; above 1 each gets cores/jobs threads, and the "
                          "wall-clock figures are then those of a shared machine")


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
        [f"optimizer={o} batch_size=12 max_iters=400 warmup_iters=40 lr={lr:g}"
         for o, lr in DEFAULT_LR["cpu"].items()]
        + [f"optimizer={o} batch_size=48 max_iters=100 warmup_iters=10 "
           f"lr={lr:g},{2 * lr:g},{4 * lr:g}" for o, lr in DEFAULT_LR["cpu"].items()]),
        seeds="1,2", set="eval_interval=25 eval_iters=20 log_interval=25"),
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


def last_status(run_dir):
    """'finished', 'diverged', 'stopped', or None if the run never ended."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        ends = [json.loads(line) for line in f if '"event": "end"' in line]
    return ends[-1]["status"] if ends else None


def run_one(trainer, run_dir, argv, threads):
    """Run (or resume) one training in its own process; its output goes to run_dir/log.txt."""
    status = last_status(run_dir)
    if status in ("finished", "diverged"):
        return status, "skipped"
    if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
        cmd = [f"--resume={run_dir}"]                    # crashed or stopped: go on from there
    else:
        shutil.rmtree(run_dir, ignore_errors=True)       # died before its first checkpoint
        os.makedirs(run_dir)
        cmd = argv + [f"--out_dir={run_dir}"]
    code = run_in_process(os.path.join(ROOT, trainer), cmd, os.path.join(run_dir, "log.txt"),
                          threads)
    status = last_status(run_dir) or "crashed"
    if code not in (0, 3):
        status = "crashed" if status != "stopped" else status
    return status, f"exit {code}"


def summarize(rows, sweep_dir):
    """One line per setting: metrics as mean and sd over its seeds; diverged runs counted."""
    groups = {}
    for row in rows:
        groups.setdefault(json.dumps(row["setting"]), []).append(row)
    image_runs = any("test_acc" in r for r in rows)
    metric_names = (["final_test_acc", "best_test_acc", "final_test_loss"] if image_runs
                    else ["final_val_loss", "best_val_loss"])
    table = []
    for key, group in groups.items():
        ok = [r for r in group if r["status"] == "finished"]
        line = dict(json.loads(key))
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
    setting_keys = [k for k in table[0] if k not in ("seeds", "diverged", "crashed", "seen",
                                                      "state_bytes", "train_s", "train_s_sd")
                    and not k.endswith("_sd") and k not in metric_names]
    head = setting_keys + metric_names + ["seen", "train s", "state MiB", "seeds", "diverged"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in table:
        cells = [str(t[k]) for k in setting_keys]
        for m in metric_names:
            scale = 100 if "acc" in m else 1
            cells.append(f"{scale * t[m]:.4g} ± {scale * t[m + '_sd']:.2g}"
                         if not math.isnan(t[m]) else "diverged")
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
        fixed = [f"--{item}" for item in cfg.set.split()]
        check_positive(cfg, "jobs")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    sweep_dir = cfg.sweep_dir or os.path.join("out", f"sweep-{cfg.study or 'custom'}")
    os.makedirs(sweep_dir, exist_ok=True)
    with open(os.path.join(sweep_dir, "sweep.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    runs = [(s, seed) for s in settings for seed in seeds]
    threads = max(1, (os.cpu_count() or 1) // cfg.jobs) if cfg.jobs > 1 else None
    t0, done = time.time(), []

    def one(run):
        setting, seed = run
        run_dir = os.path.join(sweep_dir, run_name(setting, seed))
        argv_run = fixed + [f"--{k}={v}" for k, v in setting.items()] + [f"--seed={seed}"]
        status, how = run_one(TRAINERS[cfg.trainer], run_dir, argv_run, threads)
        done.append(run)
        print(f"[{len(done)}/{len(runs)} {time.time() - t0:.0f}s] {os.path.basename(run_dir)}: "
              f"{status} ({how})", flush=True)
        return run_result(run_dir, setting, seed, status)

    with ThreadPoolExecutor(max_workers=cfg.jobs) as pool:   # threads only wait on processes
        rows = list(pool.map(one, runs))
    with open(os.path.join(sweep_dir, "runs.jsonl"), "w") as f:       # rewritten: no repeats
        f.writelines(json.dumps(row) + "\n" for row in rows)
    print(summarize(rows, sweep_dir))
    for path in studies.draw(cfg.study, rows, sweep_dir):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
