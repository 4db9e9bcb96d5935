"""
The iso-memory study (python sweep.py --study=iso_memory): what each optimizer's saved memory
buys when every optimizer gets the same memory, spent two ways.

- On a larger model. A budget is AdamW's model state (params + grads + state, memory.py's (a))
  on a width of the ladder; each optimizer trains the widest GPT of the ladder whose model
  state fits it, for the same training tokens.
- On a larger batch. AdamW's model at the trainers' micro-batch; each optimizer trains the same
  model at the largest batch whose training step's memory (memory.py's (b): params + state +
  the step's own peak, counted) fits what AdamW's step needs, for the same tokens (fewer steps).

Every run keeps its optimizer's tuned lr and weight decay (the tuning study's tuned.json, at the
first budget's width and the base batch). That transfer is checked, not assumed: each optimizer
also runs at half its lr at its widest model, on the first seed (μP's lr ~ 1 / width for Adam
would scale it by 128 / width there: 0.5 to 0.75), and the table says which lr won.

The plan (widths, batches, both memories of each) is worked out here, in the sweep's process,
by building each model and optimizer once (a: exact; b: memory.LiveTensorBytes over one step);
sweep.py runs it and prints `table`.
"""
import contextlib
import inspect
import io
import statistics

import torch

import memory
import nanogpt_sai
import optim
import stats
from cli import ConfigError

# Widths at the cpu preset's depth (4 blocks, 4 heads, block 64): parameters grow ~1.25x a rung
LADDER = tuple(range(128, 401, 16))
BUDGET_WIDTHS = (128, 160, 192)   # AdamW's model state at these widths are the budgets
BATCH_LIMIT = 256                 # the batch search stops here


def trainer_config(fixed, name, width, hparams, batch=None):
    """The trainer's checked Config for optimizer `name` at `width` (and `batch`)."""
    return nanogpt_sai.resolve_config(fixed + [
        f"--optimizer={name}", f"--n_embd={width}", f"--lr={hparams['lr']}",
        f"--weight_decay={hparams['weight_decay']}"]
        + ([f"--batch_size={batch}"] if batch else []))


def build(cfg, vocab_size, eager=False):
    """The GPT and its optimizer as the trainer builds them (same seed, same hyperparameters);
    eager: an optimizer that can compile its step (fused) does not."""
    torch.manual_seed(cfg.seed)
    model = nanogpt_sai.GPT(cfg, vocab_size)
    hparams = optim.trainer_hparams(cfg.optimizer, cfg)
    if eager and "fused" in inspect.signature(optim.OPTIMIZERS[cfg.optimizer]).parameters:
        hparams["fused"] = False
    with contextlib.redirect_stdout(io.StringIO()):
        opt = optim.build_optimizer(cfg.optimizer, model, **hparams)
    return model, opt


def model_state(cfg, vocab_size):
    """(a) in bytes: params + grads + the state a first step creates (from a random gradient:
    how much state there is depends neither on the gradient's values nor on whether the step
    runs compiled, so it runs eagerly)."""
    model, opt = build(cfg, vocab_size, eager=True)
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    opt.step()
    return memory.model_state_bytes(model, opt)["total"]


def step_memory(cfg, vocab_size):
    """(b) in bytes: params + optimizer state + the peak of what one training step allocates
    (forward, backward, the clip, the update), counted by memory.LiveTensorBytes at cfg's batch;
    two steps first, so that the state exists and the step is the steady one."""
    model, opt = build(cfg, vocab_size)
    gen = torch.Generator().manual_seed(0)
    x, y = (torch.randint(0, vocab_size, (cfg.batch_size, cfg.block_size), generator=gen)
            for _ in range(2))

    def step():
        model(x, y)[1].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(2):
        step()
    with memory.LiveTensorBytes() as live:
        step()
    held = memory.model_state_bytes(model, opt)
    return held["params"] + held["state"] + live.peak


def widest(state_of, budget, ladder):
    """(width, its model state): the widest rung whose model state (state_of(width)) fits
    `budget`, or None when none does."""
    best = None
    for width in ladder:   # model state grows with width: stop at the first that does not fit
        need = state_of(width)
        if need > budget:
            break
        best = (width, need)
    return best


def largest_batch(fixed, name, hparams, width, budget, base_batch, vocab_size):
    """(batch, its step memory): the largest batch (up to BATCH_LIMIT) whose training step fits
    `budget`, searched up from the base batch (or down from it, when even that does not fit);
    None when not even one sequence fits."""
    def need(batch):
        return step_memory(trainer_config(fixed, name, width, hparams, batch), vocab_size)
    batch, fits = base_batch, need(base_batch)
    if fits > budget:
        while batch > 1:
            batch -= 1
            if (fits := need(batch)) <= budget:
                return batch, fits
        return None
    while batch < BATCH_LIMIT and (more := need(batch + 1)) <= budget:
        batch, fits = batch + 1, more
    return batch, fits


def plan(fixed, tuned, check_seed):
    """The study: {"runs": [(setting, seeds), ...], "budgets": [...], ...}. A setting's keys
    starting with "_" are labels (the sweep passes the rest to the trainer); seeds None means
    the sweep's. tuned: {optimizer: {"lr", "weight_decay"}}, AdamW among them (its memory
    makes the budgets). Every run trains the base run's tokens, under one epoch of the training
    split (a ConfigError otherwise). In the order they run: the first budget's models, its
    batches, the other budgets' models, the lr checks."""
    if "adamw" not in tuned:
        raise ConfigError("--study=iso_memory: the budgets are AdamW's memory; include adamw in "
                          "--optimizers")
    base = nanogpt_sai.resolve_config(fixed)
    data = nanogpt_sai.load_data(base)
    tokens = base.max_iters * base.batch_size * base.block_size
    if tokens > len(data.train):
        raise ConfigError(f"--study=iso_memory: {tokens:,} training tokens are more than one "
                          f"epoch of {base.dataset}'s {len(data.train):,}; lower max_iters")
    ladder = [w for w in LADDER if w % base.n_head == 0]
    states = {}   # (optimizer, width): its model state, each built once

    def state_of(name, width):
        if (name, width) not in states:
            states[name, width] = model_state(trainer_config(fixed, name, width, tuned[name]),
                                              data.vocab_size)
        return states[name, width]

    def setting(budget, spend, name, width, batch, lr=None, steps=None):
        return ({"_budget": str(budget), "_spend": spend, "optimizer": name,
                 "n_embd": str(width), "batch_size": str(batch)}
                | ({"max_iters": str(steps)} if steps else {})
                | {"lr": lr or tuned[name]["lr"], "weight_decay": tuned[name]["weight_decay"]})
    budgets, by_budget = [], []
    for k, budget_width in enumerate(BUDGET_WIDTHS, 1):
        budget, spent, runs = state_of("adamw", budget_width), {}, []
        for name in tuned:
            found = widest(lambda width: state_of(name, width), budget, ladder)
            if found is None:
                raise ConfigError(f"--study=iso_memory: {name}'s model state does not fit "
                                  f"AdamW's at width {budget_width} on any width of the ladder")
            spent[name] = dict(width=found[0], model_state=found[1])
            runs.append((setting(k, "model", name, found[0], base.batch_size), None))
        budgets.append(dict(budget=k, spend="model", width=budget_width, bytes=budget,
                            optimizers=spent))
        by_budget.append(runs)
    # the other way: AdamW's first model, each optimizer at the largest batch whose training
    # step fits AdamW's at the base batch, the same tokens in fewer steps
    width = BUDGET_WIDTHS[0]
    budget = step_memory(trainer_config(fixed, "adamw", width, tuned["adamw"],
                                        base.batch_size), data.vocab_size)
    spent, batch_runs = {}, []
    for name, hparams in tuned.items():
        found = largest_batch(fixed, name, hparams, width, budget, base.batch_size,
                              data.vocab_size)
        spent[name] = dict(batch=found and found[0], step_memory=found and found[1])
        if found and name != "adamw":   # AdamW's own run is the first budget's model run
            batch_runs.append((setting(1, "batch", name, width, found[0], steps=round(
                base.max_iters * base.batch_size / found[0])), None))
    budgets.append(dict(budget=1, spend="batch", width=width, bytes=budget, optimizers=spent))
    # the lr transfer: half the tuned lr at each optimizer's widest model, on one seed
    last = budgets[len(BUDGET_WIDTHS) - 1]
    checks = [(setting(last["budget"], "lr_check", name, last["optimizers"][name]["width"],
                       base.batch_size, lr=f"{float(tuned[name]['lr']) / 2:.3g}"), [check_seed])
              for name in tuned]
    return dict(runs=by_budget[0] + batch_runs + sum(by_budget[1:], []) + checks,
                budgets=budgets, tokens=tokens, train_tokens=len(data.train),
                vocab_size=data.vocab_size)


def describe(the_plan):
    """The plan in a few lines, printed before the runs start: each budget and what each
    optimizer gets in it."""
    lines = []
    for b in the_plan["budgets"]:
        if b["spend"] == "model":
            what = ", ".join(f"{n} {o['width']}" for n, o in b["optimizers"].items())
            lines.append(f"budget {b['budget']}: {b['bytes'] / 2**20:.2f} MiB of model state "
                         f"(AdamW at width {b['width']}); widths: {what}")
        else:
            what = ", ".join(f"{n} {o['batch'] or 'none fits'}" for n, o in b["optimizers"].items())
            lines.append(f"budget {b['budget']}, spent on the batch: {b['bytes'] / 2**20:.2f} MiB "
                         f"of step memory (AdamW at width {b['width']}); batches: {what}")
    return "\n".join(lines)


def flops(row, cfg):
    """Training FLOPs of a run: 6 N per token (forward and backward through N parameters, the
    position table left out, as nanoGPT's estimate_mfu) plus attention's 12 L d T per token."""
    width = int(row["setting"]["n_embd"])
    n = row["n_params"] - cfg["block_size"] * width
    return row["seen"] * (6 * n + 12 * cfg["n_layer"] * width * cfg["block_size"])


def test_losses(rows):
    """{seed: test loss} of the finished runs among rows."""
    return {r["seed"]: r["final_test_loss"] for r in rows
            if r["status"] == "finished" and "final_test_loss" in r}


def seeds_of(rows):
    """The seeds of the runs that are not lr checks, in order."""
    return sorted({r["seed"] for r in rows if r["setting"]["_spend"] != "lr_check"})


def table(rows, the_plan, cfg, compute, notes=()):
    """iso_memory.md: per budget, each optimizer's model (or batch), its memory, test loss
    (mean ± sd over seeds), its difference from AdamW at that budget over paired seeds (95% t
    interval, p, Holm-adjusted over the table's comparisons), FLOPs and wall time per run; then
    the lr transfer check. cfg: the trainer's config of the runs (dict); compute: the sweep's
    line saying what the runs cost; notes: lines above the table (a partial study's)."""
    groups = {}
    for row in rows:
        s = row["setting"]
        groups.setdefault((s["_spend"], s["_budget"], s["optimizer"]), []).append(row)

    def runs_of(spend, budget, name):
        if spend == "batch" and name == "adamw":   # AdamW's model at its own batch
            spend, budget = "model", "1"
        return groups.get((spend, budget, name), [])
    cells = []
    for b in the_plan["budgets"]:
        spend, k = b["spend"], str(b["budget"])
        base = test_losses(runs_of(spend, k, "adamw"))
        for name, got in b["optimizers"].items():
            group = runs_of(spend, k, name)
            ok = [r for r in group if r["status"] == "finished" and "final_test_loss" in r]
            losses = test_losses(group)
            size, need = ((got["width"], got["model_state"]) if spend == "model" else
                          (got["batch"], got["step_memory"]))
            cells.append(dict(
                budget=f"{k}: {b['bytes'] / 2**20:.2f} MiB "
                       + ("model state (a)" if spend == "model" else "step (b)"),
                spend="a larger model" if spend == "model" else "a larger batch", name=name,
                size=str(size) if size else "does not fit",
                need=f"{need / 2**20:.2f}" if need else "", runs=len(group),
                losses=list(losses.values()),
                diff=stats.paired_difference(losses, base) if name != "adamw" and losses
                else None,
                params=f"{ok[0]['n_params'] / 1e6:.2f}M" if ok else "",
                pflops=f"{flops(ok[0], cfg) / 1e15:.3g}" if ok else "",
                wall=f"{statistics.mean(r['wall_s'] for r in ok) / 60:.1f}" if ok else ""))
    adjusted = stats.holm([c["diff"]["p"] if c["diff"] else None for c in cells])
    per_param = [r["seen"] / r["n_params"] for r in rows
                 if r["status"] == "finished" and r.get("seen")]
    lines = [f"Regime: every run trains {the_plan['tokens']:,} tokens of {cfg['dataset']}, "
             f"{the_plan['tokens'] / the_plan['train_tokens']:.2g} epochs of its training split "
             f"({the_plan['train_tokens']:,} tokens)"
             + (f", {min(per_param):.2g} to {max(per_param):.2g} tokens per parameter"
                if per_param else "") + f"; seeds {', '.join(map(str, seeds_of(rows)))}.", "",
             f"Each budget is AdamW's memory at one width of the ladder (widths {LADDER[0]}.."
             f"{LADDER[-1]} by {LADDER[1] - LADDER[0]}, depth {cfg['n_layer']}, "
             f"{cfg['n_head']} heads). Every "
             "optimizer spends it on the widest model whose model state (params + grads + "
             "state) fits, or on the largest batch whose training step (params + state + the "
             "step's counted peak) fits beside AdamW's model at the first budget; all train the "
             "same tokens at their tuned lr and weight decay. Test loss on the held-out works, "
             "mean ± sd over seeds; differences from AdamW at the same budget over paired seeds, "
             "95% t interval, p, and p Holm-adjusted over the table.", ""]
    lines += [*notes, ""] if notes else []
    head = ["budget", "spent on", "optimizer", "width or batch", "params", "memory MiB",
            "test loss", "vs AdamW", "p", "Holm p", "PFLOPs per run", "wall min per run"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c, holm_p in zip(cells, adjusted):
        loss = (f"{statistics.mean(c['losses']):.4f} ± "
                f"{statistics.stdev(c['losses']) if len(c['losses']) > 1 else 0:.3f} "
                f"({len(c['losses'])} of {c['runs']})" if c["losses"] else "no finished run")
        lines.append("| " + " | ".join([
            c["budget"], c["spend"], c["name"], c["size"], c["params"], c["need"], loss,
            "baseline" if c["name"] == "adamw" else stats.describe(c["diff"]) if c["diff"]
            else "", f"{c['diff']['p']:.2g}" if c["diff"] and c["diff"]["p"] is not None else "",
            f"{holm_p:.2g}" if holm_p is not None else "", c["pflops"], c["wall"]]) + " |")
    last = str(len(BUDGET_WIDTHS))
    lines += ["", f"lr transfer: each optimizer at its widest model (budget {last}), its tuned "
              "lr against half of it, on one seed (test loss; a negative difference: half the "
              "lr was better there).", "",
              "| optimizer | width | seed | at the tuned lr | at lr / 2 | difference |",
              "|---|---|---|---|---|---|"]
    for name, got in the_plan["budgets"][len(BUDGET_WIDTHS) - 1]["optimizers"].items():
        half = test_losses(groups.get(("lr_check", last, name), []))
        tuned = test_losses(groups.get(("model", last, name), []))
        seed = next((s for s in half if s in tuned), None)
        lines.append(f"| {name} | {got['width']} | "
                     + (f"{seed} | {tuned[seed]:.4f} | {half[seed]:.4f} | "
                        f"{half[seed] - tuned[seed]:+.4f} |" if seed is not None else
                        "| not run yet | | |"))
    return "\n".join(lines + ["", compute]) + "\n"
