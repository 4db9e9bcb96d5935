"""Redraw figures for any set of runs: python -m plots RUN_DIR [RUN_DIR ...] [--out=DIR]."""
import sys

from plots.figures import draw_all

args = [a for a in sys.argv[1:] if not a.startswith("--out=")]
out = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("--out=")), ".")
if not args:
    sys.exit("usage: python -m plots RUN_DIR [RUN_DIR ...] [--out=DIR]")
for path in draw_all(args, out):
    print(path)
