"""Figures of sweep.py's studies, drawn from the runs' metrics (rows of sweep.py's runs.jsonl)."""
import json
import math
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from plots.figures import read_run, save_figure  # noqa: E402


def _label(setting, skip=("lr",)):
    """'adamw batch_size=48': the optimizer by name, other settings as key=value."""
    return " ".join(v if k == "optimizer" else f"{k}={v}" for k, v in setting.items()
                    if k not in skip)


def _final(row):
    return row.get("final_val_loss", row.get("final_test_loss"))


def _evals(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return [r for r in records if r["event"] == "eval"]


def _by(rows, key):
    """{label of the setting without `key`: {value of key: [rows (one per seed)]}}."""
    out = {}
    for row in rows:
        setting = row["setting"]
        out.setdefault(_label(setting, (key,)), {}).setdefault(setting.get(key), []).append(row)
    return out


def study_context(rows, same_regime=True):
    """A figure's suptitle: what was trained, on what, how long (when every run is as long) and
    over how many seeds, read from the first run that has a log."""
    first = next((read_run(r["run_dir"]) for r in rows
                  if os.path.exists(os.path.join(r["run_dir"], "metrics.jsonl"))), None)
    if first is None:
        return ""
    seeds = len({r["seed"] for r in rows})
    what = first.regime if same_regime else first.regime.split(",")[0]
    return f"{what}\non {first.data_name}; {seeds} seed{'s' if seeds > 1 else ''}"


def lr_sensitivity(rows, path):
    """Final validation loss vs LR (log axis), mean and sd over seeds, a line per setting;
    an x at the top marks an LR at which a seed diverged."""
    fig, ax = plt.subplots(figsize=(9, 6))
    finite = [_final(r) for r in rows if r["status"] == "finished" and _final(r) is not None]
    top = max(finite) if finite else 1.0
    for i, (label, by_lr) in enumerate(_by(rows, "lr").items()):
        lrs = sorted(by_lr, key=float)
        means, sds, bad = [], [], []
        for lr in lrs:
            vals = [_final(r) for r in by_lr[lr] if r["status"] == "finished"]
            means.append(statistics.mean(vals) if vals else math.nan)
            sds.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            if len(vals) < len(by_lr[lr]):
                bad.append(float(lr))
        ax.errorbar([float(x) for x in lrs], means, yerr=sds, marker="o", ms=4, capsize=3,
                    color=f"C{i}", label=label)
        ax.plot(bad, [top * 1.02] * len(bad), "x", color=f"C{i}", ms=8)
    ax.set_xscale("log")
    ax.set(xlabel="peak learning rate", ylabel="final validation loss",
           title="LR sensitivity (mean ± sd over seeds; x = a seed diverged)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.suptitle(study_context(rows))
    return save_figure(fig, path)


def best_lr_curves(rows, path, x="step"):
    """Validation loss vs `x` for each setting at its best LR (lowest mean final loss)."""
    fig, ax = plt.subplots(figsize=(9, 6))
    for i, (label, by_lr) in enumerate(_by(rows, "lr").items()):
        scored = [(statistics.mean(_final(r) for r in rs), lr) for lr, rs in by_lr.items()
                  if all(r["status"] == "finished" for r in rs)]
        if not scored:
            continue
        score, lr = min(scored)
        curves = [_evals(r["run_dir"]) for r in by_lr[lr]]
        steps = [e[x] for e in curves[0]]
        mean = [statistics.mean(c[j]["val_loss"] for c in curves) for j in range(len(steps))]
        ax.plot(steps, mean, "o-", ms=3, color=f"C{i}",
                label=f"{label} lr={lr} ({score:.3f})")
    ax.set(xlabel="tokens seen" if x == "tokens" else x, ylabel="validation loss (mean of seeds)",
           title="each at its best learning rate")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.suptitle(study_context(rows))
    return save_figure(fig, path)


def batch_rule_curves(rows, path):
    """Per optimizer: the base batch and 4x batch with the LR unscaled, x sqrt(4) or x 4,
    validation loss vs tokens seen (the same token budget for all)."""
    optimizers = sorted({r["setting"]["optimizer"] for r in rows})
    fig, axes = plt.subplots(1, len(optimizers), figsize=(5 * len(optimizers), 4), sharey=True,
                             squeeze=False)
    for ax, opt in zip(axes[0], optimizers):
        mine = [r for r in rows if r["setting"]["optimizer"] == opt]
        small = min(int(r["setting"]["batch_size"]) for r in mine)
        base_lr = float(next(r["setting"]["lr"] for r in mine
                             if int(r["setting"]["batch_size"]) == small))
        groups = {}
        for r in mine:
            batch, lr = int(r["setting"]["batch_size"]), float(r["setting"]["lr"])
            ratio = lr / base_lr
            rule = ("base" if batch == small else {1: "none", 2: "sqrt", 4: "linear"}.get(
                round(ratio), f"x{ratio:g}"))
            groups.setdefault((rule, batch, lr), []).append(r)
        for i, ((rule, batch, lr), rs) in enumerate(sorted(groups.items())):
            curves = [_evals(r["run_dir"]) for r in rs if r["status"] == "finished"]
            if not curves:
                continue
            tokens = [e["tokens"] for e in curves[0]]
            mean = [statistics.mean(c[j]["val_loss"] for c in curves) for j in range(len(tokens))]
            ax.plot(tokens, mean, "o-" if rule == "base" else ".-", ms=3, color=f"C{i}",
                    label=f"{rule}: batch {batch}, lr {lr:g} ({mean[-1]:.3f})")
        ax.set(title=opt, xlabel="tokens seen")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("validation loss (mean of seeds)")
    fig.suptitle(study_context(rows, same_regime=False) + "; every run sees the same tokens")
    return save_figure(fig, path)


def draw(study, rows, out_dir):
    """The figures that fit a study's rows; returns the paths written."""
    if study == "batch":
        return [batch_rule_curves(rows, os.path.join(out_dir, "batch_rule.png"))]
    paths = []
    if len({r["setting"].get("lr") for r in rows}) > 1:
        paths.append(lr_sensitivity(rows, os.path.join(out_dir, "lr_sensitivity.png")))
        if all("final_val_loss" in r or r["status"] != "finished" for r in rows):
            paths.append(best_lr_curves(rows, os.path.join(out_dir, "best_lr_curves.png")))
    return paths


def spearman(a, b):
    """Spearman rank correlation (no ties expected in these continuous statistics)."""
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0] * len(v)
        for rank, i in enumerate(order):
            r[i] = rank
        return r
    ra, rb = ranks(a), ranks(b)
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(ra, rb)) / (n * (n * n - 1))


def snr_figure(rows, path, batch_size):
    """Per block, coloured by kind: SaI's g-SNR with sqrt(numel) marked (left), the per-example
    gradient SNR (middle), and one against the other (right)."""
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    colors = {k: f"C{i}" for i, k in enumerate(kinds)}
    xs = range(len(rows))
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(16, 4.5))
    a.bar(xs, [r["sai_gsnr"] for r in rows], color=[colors[r["kind"]] for r in rows])
    a.plot(xs, [r["sai_sqrt_numel"] for r in rows], "k_", ms=8, label="sqrt(numel)")
    a.legend(fontsize=7)
    a.set(yscale="log", xlabel="parameter block (model order)",
          title="SaI scale (gsnr rule; gsnr_max = this / max, none = 1)")
    b.bar(xs, [r["example_snr"] for r in rows], color=[colors[r["kind"]] for r in rows])
    b.set(yscale="log", xlabel="parameter block (model order)",
          title=f"per-example gradient SNR (batch {batch_size})")
    for kind in kinds:
        mine = [r for r in rows if r["kind"] == kind]
        c.scatter([r["sai_gsnr"] / r["sai_sqrt_numel"] for r in mine],
                  [r["example_snr"] for r in mine], color=colors[kind], label=kind, s=18)
    rho = spearman([r["sai_gsnr"] / r["sai_sqrt_numel"] for r in rows],
                   [r["example_snr"] for r in rows])
    c.set(yscale="log", xlabel="g-SNR / sqrt(numel)",
          ylabel="per-example SNR", title=f"Spearman rank correlation {rho:.2f}")
    c.legend(fontsize=7, ncol=2)
    for ax in (a, b, c):
        ax.grid(alpha=0.3, which="both")
    return save_figure(fig, path)
