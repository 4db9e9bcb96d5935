"""Redraw the figures of runs from their logs:

    python -m plots DIR [DIR ...] [--out=DIR]

Each DIR is a run directory (it holds metrics.jsonl), or a compare or sweep directory, whose run
subdirectories are drawn together. The figures go to --out (default: the one DIR given, else
the current directory). Runs of both trainers cannot share a figure.
"""
import json
import os
import sys

from plots.figures import draw_all, is_vit_config


def run_dirs(path):
    """The run directories `path` stands for: itself, or its subdirectories that hold runs."""
    if not os.path.isdir(path):
        raise ValueError(f"{path} is not a directory (give a run, compare or sweep directory)")
    if os.path.exists(os.path.join(path, "metrics.jsonl")):
        return [path]
    runs = sorted(os.path.join(path, d) for d in os.listdir(path)
                  if os.path.exists(os.path.join(path, d, "metrics.jsonl")))
    if not runs:
        raise ValueError(f"{path} holds no run (no metrics.jsonl in it or its subdirectories)")
    return runs


def trainer_of(run_dir):
    with open(os.path.join(run_dir, "config.json")) as f:
        return "vit_sai.py" if is_vit_config(json.load(f)) else "nanogpt_sai.py"


def main(argv):
    usage = __doc__.strip()
    if any(a in ("-h", "--help") for a in argv):
        print(usage)
        return 0
    options = [a for a in argv if a.startswith("-")]
    paths = [a for a in argv if not a.startswith("-")]
    try:
        bad = [a for a in options if not a.startswith("--out=")]
        if bad:
            raise ValueError(f"unknown option {bad[0]} (the one option is --out=DIR)")
        if not paths:
            raise ValueError("give at least one run, compare or sweep directory")
        out = next((a.split("=", 1)[1] for a in options), paths[0] if len(paths) == 1 else ".")
        runs = [run for path in paths for run in run_dirs(path)]
        trainers = {run: trainer_of(run) for run in runs}
        if len(set(trainers.values())) > 1:
            gpt = next(r for r, t in trainers.items() if t == "nanogpt_sai.py")
            vit = next(r for r, t in trainers.items() if t == "vit_sai.py")
            raise ValueError(f"these are runs of both trainers (e.g. {gpt} is a GPT, {vit} a "
                             "ViT); draw each trainer's runs separately")
        paths_written = draw_all(runs, out)
    except (OSError, ValueError) as err:
        print(f"error: {err} (python -m plots --help for usage)", file=sys.stderr)
        return 2
    for path in paths_written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
