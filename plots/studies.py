"""Figures of sweep.py's studies, drawn from the runs' metrics (rows of sweep.py's runs.jsonl)."""
import json
import math
import os
import statistics

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import stats  # noqa: E402
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


def lr_sensitivity(rows, path, note=""):
    """Final validation (GPT) or test (ViT) loss vs LR (log axis), mean and sd over seeds, a
    line per setting; an x at the top marks an LR at which a seed diverged."""
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
    split = "validation" if any("final_val_loss" in r for r in rows) else "test"
    ax.set(xlabel="peak learning rate", ylabel=f"final {split} loss",
           title="LR sensitivity (mean ± sd over seeds; x = a seed diverged)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.suptitle(study_context(rows))
    return save_figure(fig, path, note)


def best_lr_curves(rows, path, x="step", note=""):
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
    return save_figure(fig, path, note)


def _metric(row):
    """Final val loss (GPT) or test accuracy in % (ViT) of a finished run."""
    loss = row.get("final_val_loss")
    return loss if loss is not None else 100 * row["final_test_acc"]


def _metric_name(rows):
    return ("final validation loss" if any("final_val_loss" in r for r in rows)
            else "final test accuracy %")


def tune_trials(rows, path, note=""):
    """One panel per optimizer: the tuning trials' final metric against lr (log axis), a line
    per weight decay; the chosen setting's fresh seeds as a star with its sd."""
    names = list(dict.fromkeys(r["setting"]["optimizer"] for r in rows))
    cols = min(4, len(names))
    fig, axes = plt.subplots(-(-len(names) // cols), cols, figsize=(4.2 * cols, 3.6 * -(
        -len(names) // cols)), squeeze=False)
    color = {wd: f"C{i}" for i, wd in enumerate(sorted(   # one colour per wd in every panel
        {r["setting"]["weight_decay"] for r in rows}, key=float))}
    for ax, name in zip(axes.flat, names):
        trials = [r for r in rows if r["setting"]["optimizer"] == name and not r.get("final")]
        for wd in sorted({r["setting"]["weight_decay"] for r in trials}, key=float):
            mine = sorted((r for r in trials if r["setting"]["weight_decay"] == wd),
                          key=lambda r: float(r["setting"]["lr"]))
            ok = [r for r in mine if r["status"] == "finished"]
            ax.plot([float(r["setting"]["lr"]) for r in ok], [_metric(r) for r in ok], "o-",
                    ms=4, color=color[wd], label=f"wd {wd}")
            bad = [float(r["setting"]["lr"]) for r in mine if r["status"] != "finished"]
            if ok and bad:
                ax.plot(bad, [max(_metric(r) for r in ok)] * len(bad), "x", color=color[wd])
        final = [_metric(r) for r in rows if r.get("final") and r["status"] == "finished"
                 and r["setting"]["optimizer"] == name]
        if final:
            chosen = next(r["setting"] for r in rows if r.get("final")
                          and r["setting"]["optimizer"] == name)
            ax.errorbar([float(chosen["lr"])], [statistics.mean(final)],
                        yerr=[statistics.stdev(final) if len(final) > 1 else 0], fmt="*",
                        color="k", ms=12, capsize=3, label=f"chosen, {len(final)} seeds")
        ax.set_xscale("log")
        lrs = sorted({float(r["setting"]["lr"]) for r in trials})
        ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs], rotation=45, fontsize=8)
        ax.minorticks_off()
        ax.set(title=name, xlabel="peak lr")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for row_axes in axes:
        row_axes[0].set_ylabel(_metric_name(rows))
    finals = [r for r in rows if r.get("final")] or rows
    fig.suptitle("Tuning lr x weight decay on one seed (x: diverged); the chosen setting on "
                 "fresh seeds:\n" + study_context(finals), fontsize=10)
    return save_figure(fig, path, note)


def duration_curves(rows, path, baseline="adamw", note=""):
    """Left: final metric against tokens (or images) per parameter, one line per optimizer with
    a band of one sd over seeds. Right: each optimizer minus the baseline over paired seeds,
    mean and 95% t interval (stats.paired_difference)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    names = list(dict.fromkeys(r["setting"]["optimizer"] for r in rows))
    ok = [r for r in rows if r["status"] == "finished" and r.get("n_params")]

    def at(name):   # {tokens per parameter: {seed: metric}}
        out = {}
        for r in ok:
            if r["setting"]["optimizer"] == name:
                out.setdefault(r["seen"] / r["n_params"], {})[r["seed"]] = _metric(r)
        return dict(sorted(out.items()))

    base = at(baseline)
    for i, name in enumerate(names):
        points = at(name)
        xs = list(points)
        means = [statistics.mean(v.values()) for v in points.values()]
        sds = [statistics.stdev(v.values()) if len(v) > 1 else 0.0 for v in points.values()]
        left.plot(xs, means, "o-", color=f"C{i}", label=name)
        left.fill_between(xs, [m - s for m, s in zip(means, sds)],
                          [m + s for m, s in zip(means, sds)], color=f"C{i}", alpha=0.2)
        if name == baseline or not base:
            continue
        diffs = [(x, stats.paired_difference(points[x], base[x])) for x in xs if x in base]
        shown = [(x * (1 + 0.03 * (i - len(names) / 2)), d) for x, d in diffs]   # side by side
        right.errorbar([x for x, _ in shown], [d["mean"] for _, d in shown],
                       yerr=[[d["mean"] - (d["low"] if d["low"] is not None else d["mean"])
                              for _, d in shown],
                             [(d["high"] if d["high"] is not None else d["mean"]) - d["mean"]
                              for _, d in shown]],
                       fmt="o-", color=f"C{i}", capsize=3, label=name)
    unit = "tokens" if any("final_val_loss" in r for r in ok) else "images"
    left.set(xscale="log", xlabel=f"{unit} per parameter", ylabel=_metric_name(rows),
             title="each optimizer at its tuned lr and wd; band: ± sd over seeds")
    right.axhline(0, color="k", lw=0.8)
    right.set(xscale="log", xlabel=f"{unit} per parameter",
              ylabel=f"difference from {baseline}", title=f"minus {baseline}, paired seeds, 95% "
                                                          "t interval")
    lengths = sorted({r["seen"] / r["n_params"] for r in ok})
    for ax in (left, right):
        ax.set_xticks(lengths, [f"{x:.2g}" for x in lengths])
        ax.minorticks_off()
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Duration: each length with its own full decay; "
                 + study_context(rows, same_regime=False))
    return save_figure(fig, path, note)


BATCH_RULES = ("none", "sqrt", "full sqrt", "linear")


def batch_rule(setting, base_batch, base_lr):
    """Which lr rule made a batch study's setting: the exponent k of lr = base_lr * (batch /
    base_batch) ** k, as 'none' (0), 'sqrt' (0.5) or 'linear' (1); 'full sqrt' where the
    setting scales the betas too (Malladi et al.'s rule, sweep.full_sqrt_rule)."""
    ratio = float(setting["batch_size"]) / base_batch
    if ratio == 1:
        return "base"
    if "beta1" in setting:
        return "full sqrt"
    k = math.log(float(setting["lr"]) / base_lr) / math.log(ratio)
    return min(((abs(k - e), n) for n, e in (("none", 0), ("sqrt", 0.5), ("linear", 1))))[1]


def batch_rule_curves(rows, path, base_batch=12, note=""):
    """A row of panels per optimizer, one panel per lr rule the study ran (of none, sqrt, full
    sqrt, linear): validation loss against tokens seen (mean over seeds), a line per batch size,
    the base batch in each panel; the same tokens for every run."""
    names = list(dict.fromkeys(r["setting"]["optimizer"] for r in rows))
    base_lrs = {r["setting"]["optimizer"]: float(r["setting"]["lr"]) for r in rows
                if int(r["setting"]["batch_size"]) == base_batch}
    ran = {batch_rule(r["setting"], base_batch, base_lrs[r["setting"]["optimizer"]])
           for r in rows if r["setting"]["optimizer"] in base_lrs}
    rules = [rule for rule in BATCH_RULES if rule in ran]
    fig, axes = plt.subplots(len(names), len(rules), figsize=(5 * len(rules), 4 * len(names)),
                             sharey="row", squeeze=False)
    for row_axes, name in zip(axes, names):
        mine = [r for r in rows if r["setting"]["optimizer"] == name]
        base_lr = base_lrs.get(name)
        if base_lr is None:
            continue
        groups = {}
        for r in mine:
            rule = batch_rule(r["setting"], base_batch, base_lr)
            groups.setdefault((rule, int(r["setting"]["batch_size"])), []).append(r)
        batches = sorted({b for _, b in groups})
        for ax, rule in zip(row_axes, rules):
            for i, batch in enumerate(batches):
                rs = groups.get(("base" if batch == base_batch else rule, batch), [])
                curves = [_evals(r["run_dir"]) for r in rs if r["status"] == "finished"]
                if not curves:
                    continue
                tokens = [e["tokens"] for e in curves[0]]
                mean = [statistics.mean(c[j]["val_loss"] for c in curves)
                        for j in range(len(tokens))]
                ax.plot(tokens, mean, "o-" if batch == base_batch else ".-", ms=3,
                        color=f"C{i}", label=f"batch {batch}, lr {rs[0]['setting']['lr']} "
                                             f"({mean[-1]:.3f}, {len(curves)} seeds)")
            ax.set(title=f"{name}: lr rule {rule}", xlabel="tokens seen")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        row_axes[0].set_ylabel("validation loss (mean of seeds)")
    fig.suptitle(study_context(rows, same_regime=False) + "; every run sees the same tokens")
    return save_figure(fig, path, note)


def pareto(points):
    """The (memory, loss) points that no other point beats on both (less memory, lower loss),
    by memory."""
    front, best = [], math.inf
    for m, loss in sorted(points):
        if loss < best:
            front.append((m, loss))
            best = loss
    return front


def iso_memory_front(rows, path, baseline="adamw", note=""):
    """Left: test loss against model-state memory (params + grads + state), one line per
    optimizer through the budgets (the widest model that fits each), the baseline's points
    marked, and the Pareto front of all points. Right: at the first budget's model, test loss
    against the batch each optimizer's step memory affords. Mean ± sd over seeds."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5))
    ok = [r for r in rows if r["status"] == "finished" and "final_test_loss" in r]
    names = list(dict.fromkeys(r["setting"]["optimizer"] for r in rows))
    points, batches = [], set()

    def mean_sd(group):
        losses = [r["final_test_loss"] for r in group]
        return statistics.mean(losses), statistics.stdev(losses) if len(losses) > 1 else 0.0
    for i, name in enumerate(names):
        by_budget = {}
        for r in ok:
            if r["setting"]["optimizer"] == name and r["setting"]["_spend"] == "model":
                by_budget.setdefault(r["setting"]["_budget"], []).append(r)
        # (a) of a run: float32 params and grads (8 bytes a parameter) and its logged state
        xs = [(8 * g[0]["n_params"] + g[0]["state_bytes"]) / 2**20
              for _, g in sorted(by_budget.items())]
        ys = [mean_sd(g) for _, g in sorted(by_budget.items())]
        points += [(x, m) for x, (m, _) in zip(xs, ys)]
        base = name == baseline
        for x in xs if base else []:   # each budget: the baseline's memory
            left.axvline(x, color="0.7", lw=0.8, ls=":")
        left.errorbar(xs, [m for m, _ in ys], yerr=[s for _, s in ys], fmt="s-" if base else
                      "o-", color="k" if base else f"C{i}", ms=8 if base else 5, capsize=3,
                      lw=2 if base else 1, label=name, zorder=3 if base else 2)
        batch = [r for r in ok if r["setting"]["optimizer"] == name and (
            r["setting"]["_spend"] == "batch" or
            (base and r["setting"]["_spend"] == "model" and r["setting"]["_budget"] == "1"))]
        if batch:
            m, s = mean_sd(batch)
            batches.add(int(batch[0]["setting"]["batch_size"]))
            right.errorbar([int(batch[0]["setting"]["batch_size"])], [m], yerr=[s],
                           fmt="s" if base else "o", color="k" if base else f"C{i}",
                           capsize=3, label=name)
    if points:
        front = pareto(points)
        left.step([m for m, _ in front], [loss for _, loss in front], where="post",
                  color="0.5", ls="--", lw=1, label="Pareto front")
    left.set(xlabel="model state (params + grads + state), MiB", ylabel="test loss",
             title="the widest model each optimizer fits in each budget")
    right.set(xlabel="batch (sequences) that fits AdamW's step memory", ylabel="test loss",
              title="AdamW's model (first budget): the saving spent on the batch",
              xticks=sorted(batches))
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    first = next((read_run(r["run_dir"]) for r in ok), None)
    seeds = len({r["seed"] for r in ok if r["setting"]["_spend"] != "lr_check"})
    fig.suptitle("Iso-memory: every optimizer in the same memory, on the same training tokens"
                 + (f" ({ok[0]['seen']:,})\non {first.data_name}; {seeds} seeds; dotted: the "
                    "budgets" if first else ""))
    return save_figure(fig, path, note)


def draw(study, rows, out_dir, tuning=False, note=""):
    """The figures that fit a study's rows; returns the paths written. note: a line under each
    figure's title (a partial study's)."""
    if tuning:
        return [tune_trials(rows, os.path.join(out_dir, "tune.png"), note=note)]
    if study in ("batch", "batch_v2"):
        return [batch_rule_curves(rows, os.path.join(out_dir, "batch_rule.png"), note=note)]
    if study in ("duration", "duration_v2"):
        return [duration_curves(rows, os.path.join(out_dir, "duration.png"), note=note)]
    if study == "iso_memory":
        return [iso_memory_front(rows, os.path.join(out_dir, "iso_memory.png"), note=note)]
    paths = []
    if len({r["setting"].get("lr") for r in rows}) > 1:
        paths.append(lr_sensitivity(rows, os.path.join(out_dir, "lr_sensitivity.png"), note=note))
        if all("final_val_loss" in r or r["status"] != "finished" for r in rows):
            paths.append(best_lr_curves(rows, os.path.join(out_dir, "best_lr_curves.png"),
                                        note=note))
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
