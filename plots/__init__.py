"""Figures drawn from run directories (config.json + metrics.jsonl), so any set of runs can be
redrawn later: `python -m plots RUN_DIR [RUN_DIR ...] --out=DIR`."""
