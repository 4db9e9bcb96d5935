"""ms/iter between consecutive log lines from step 100 on, as a table row per run: nanoGPT's
stdout with each line's arrival time in front (tools/gpu_check.sh), or a nanogpt_sai.py run's
metrics.jsonl. Wall clock in both: each log line reads the loss, so the GPU has caught up.

    python tools/ms_per_iter.py LABEL FILE [LABEL FILE ...]
"""
import json
import re
import statistics
import sys


def log_points(path):
    """(step, seconds) of each log line from step 100 on."""
    if path.endswith(".jsonl"):
        with open(path) as f:
            points = [(r["step"], r["wall_s"]) for r in map(json.loads, f)
                      if r["event"] == "train"]
    else:
        with open(path) as f:
            points = [(int(m[2]), float(m[1])) for m in
                      (re.match(r"(\d+\.\d+) iter (\d+):", line) for line in f) if m]
    return [p for p in points if p[0] >= 100]


def main(args):
    if len(args) < 2 or len(args) % 2:
        return __doc__.strip().splitlines()[-1].strip()
    print("| run | ms/iter, median | range | intervals x steps |")
    print("|---|---:|---:|---:|")
    for label, path in zip(args[::2], args[1::2]):
        points = log_points(path)
        if len(points) < 2:
            print(f"| {label} | no two log lines from step 100 on in {path} | | |")
            continue
        ms = [1000 * (t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(points, points[1:])]
        print(f"| {label} | {statistics.median(ms):.2f} | {min(ms):.2f}-{max(ms):.2f} | "
              f"{len(ms)} x {points[1][0] - points[0][0]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
