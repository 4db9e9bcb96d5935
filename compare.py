"""
Compare mode: several optimizers trained one after another, each in its own process with the
same seed and batches, then drawn in one figure with a summary table. The trainers call it for
a comma-separated --optimizer (or all).
"""
import dataclasses
import os
import signal
import sys

from cli import ConfigError, config_changes, last_status, new_run_dir, run_in_process
from plots.figures import compare_table, draw_all


def compare(script, resolve_config, names, argv, out_dir, name):
    """Train each optimizer in its own process (same seed and batches) into out_dir/<optimizer>
    (out_dir "": out/<time>-<name>), then draw them in one figure (a diverged run too, up to
    where it stopped). Given an existing --out_dir, finished and diverged runs are kept, stopped
    ones resumed, and runs made with other options refused. A Ctrl-C stops the running
    optimizer (it saves a checkpoint) and the ones after it. Returns 0 when every run finished,
    130 when stopped, else 1."""
    out_dir = out_dir or new_run_dir("out", name)
    plan = []
    for optimizer in names:
        run_dir = os.path.join(out_dir, optimizer)
        rest = [a for a in argv if not a.startswith(("--optimizer=", "--out_dir="))]
        run_argv = [f"--optimizer={optimizer}", f"--out_dir={run_dir}", *rest]
        changes = config_changes(run_dir, dataclasses.asdict(resolve_config(run_argv)))
        if changes:
            raise ConfigError(f"--out_dir={out_dir} holds a {optimizer} run made with other "
                              f"options ({'; '.join(changes[:3])}); choose another --out_dir")
        plan.append((optimizer, run_dir, run_argv))

    stop = []
    previous = signal.signal(signal.SIGINT, lambda *_: stop.append(True))   # the child stops
    try:
        for optimizer, run_dir, run_argv in plan:
            if stop:
                break
            status = last_status(run_dir)
            if status in ("finished", "diverged"):
                print(f"=== {optimizer}: {status} before, kept ({run_dir})", flush=True)
                continue
            if os.path.exists(os.path.join(run_dir, "ckpt.pt")):
                run_argv = [f"--resume={run_dir}"]
            print(f"=== {optimizer}: {os.path.basename(script)} {' '.join(run_argv)}", flush=True)
            if run_in_process(script, run_argv) not in (0, 3, 130):
                print(f"=== {optimizer} did not finish; see {run_dir}", flush=True)
    finally:
        signal.signal(signal.SIGINT, previous)
    if stop:
        print(f"stopped; the same command with --out_dir={out_dir} resumes the comparison",
              file=sys.stderr)
        return 130
    runs = [run_dir for _, run_dir, _ in plan
            if os.path.exists(os.path.join(run_dir, "metrics.jsonl"))]
    for path in draw_all(runs, out_dir):
        print(f"wrote {path}")
    if runs:
        table = compare_table(runs)
        with open(os.path.join(out_dir, "summary.md"), "w") as f:
            f.write(table + "\n")
        print(table)
    return 0 if all(last_status(run_dir) == "finished" for _, run_dir, _ in plan) else 1
