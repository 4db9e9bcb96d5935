"""Loss, accuracy and memory figures from the JSONL metrics the trainers write."""
import inspect
import json
import os
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only; works without a display
import matplotlib.pyplot as plt  # noqa: E402

import optim  # noqa: E402

MIB = 2 ** 20


@dataclass
class Run:
    path: str
    config: dict
    records: list

    @property
    def label(self):
        c = self.config
        # SGD-SaI's rule, when not the default: the one ablation a figure must tell apart
        takes_rule = "sai_rule" in inspect.signature(optim.OPTIMIZERS[c["optimizer"]]).parameters
        rule = f" ({c['sai_rule']})" if takes_rule and c.get("sai_rule", "gsnr") != "gsnr" else ""
        return f"{c['optimizer']}{rule} lr={c['lr']:g}"

    def events(self, kind):
        return [r for r in self.records if r["event"] == kind]


def read_run(path):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    records = []
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for number, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):   # else a line being written by a live run: skipped
                    raise ValueError(f"{path}/metrics.jsonl: line {number} is not JSON (the "
                                     "log is damaged)") from None
    return Run(path, config, records)


def save_figure(fig, path):
    """Lay out, write a PNG at the resolution every figure here uses, close; returns path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def loss_curves(runs, path, val_key="val_loss", title=""):
    """Train loss (thin) and evaluation loss (markers) vs step and vs training seconds."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, run in enumerate(runs):
        color = f"C{i}"
        train, evals = run.events("train"), run.events("eval")
        for ax, x in zip(axes, ("step", "train_s")):
            ax.plot([r[x] for r in train], [r["loss"] for r in train], color=color, alpha=0.3,
                    lw=0.8)
            ax.plot([r[x] for r in evals], [r[val_key] for r in evals], "o-", color=color,
                    ms=3, label=f"{run.label} ({val_key} {evals[-1][val_key]:.3f})"
                    if evals else run.label)
    axes[0].set(xlabel="step", ylabel="loss", title=title or "loss vs step")
    axes[1].set(xlabel="training seconds (eval excluded)", title="loss vs wall-clock")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def accuracy_curves(runs, path):
    """Test accuracy vs epoch and vs training seconds."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for i, run in enumerate(runs):
        evals = run.events("eval")
        for ax, x in zip(axes, ("epoch", "train_s")):
            ax.plot([r[x] for r in evals], [100 * r["test_acc"] for r in evals], "o-",
                    color=f"C{i}", ms=3,
                    label=f"{run.label} ({100 * evals[-1]['test_acc']:.2f}%)" if evals else "")
    axes[0].set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy vs epoch")
    axes[1].set(xlabel="training seconds (eval excluded)", title="test accuracy vs wall-clock")
    axes[0].legend(fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    return save_figure(fig, path)


def memory_bars(runs, path):
    """Parameters, gradients and optimizer state per optimizer (left); the measured peak (right:
    CUDA max allocated, or the process's peak RSS on CPU, which includes PyTorch itself)."""
    last = [next(r for r in reversed(run.records) if "state_bytes" in r) for run in runs]
    labels = [run.label for run in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4),
                                      gridspec_kw={"width_ratios": [3, 1.4]})
    parts = [("param_bytes", "parameters"), ("grad_bytes", "gradients"),
             ("state_bytes", "optimizer state")]
    width = 0.8 / len(parts)
    for j, (key, name) in enumerate(parts):
        xs = [i + (j - 1) * width for i in range(len(runs))]
        bars = left.bar(xs, [r[key] / MIB for r in last], width, label=name)
        left.bar_label(bars, fmt="%.2f", fontsize=7)
    left.set_xticks(range(len(runs)), labels, rotation=15, fontsize=8)
    left.set(ylabel="MiB", title="model and optimizer memory")
    left.legend(fontsize=8)
    kind = last[0]["peak_kind"].replace("_", " ")
    bars = right.bar(range(len(runs)), [r["peak_bytes"] / MIB for r in last], color="C3")
    right.bar_label(bars, fmt="%.0f", fontsize=7)
    right.set_xticks(range(len(runs)), labels, rotation=15, fontsize=8)
    right.set(ylabel="MiB", title=f"peak ({kind})")
    return save_figure(fig, path)


def draw_all(run_dirs, out_dir):
    """Every figure that fits these runs; returns the paths written."""
    runs = [read_run(d) for d in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    runs = [r for r in runs if r.records]
    if not runs:
        return []
    image_runs = "test_acc" in str(runs[0].events("eval")[:1])
    paths = [loss_curves(runs, os.path.join(out_dir, "loss.png"),
                         val_key="test_loss" if image_runs else "val_loss"),
             memory_bars(runs, os.path.join(out_dir, "memory.png"))]
    if image_runs:
        paths.append(accuracy_curves(runs, os.path.join(out_dir, "accuracy.png")))
    return paths
