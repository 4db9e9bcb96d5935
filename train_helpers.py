"""
Plain helpers for inside one training run, each doing what its name says: the LR schedule,
torch.compile with a fallback, a training clock without per-step GPU syncs, checkpoints with RNG
state, Ctrl-C, the metrics log and memory probe, gradient diagnostics, the run directory and how
the run ended. Nothing here calls a trainer back; the command line is in cli.py.
"""
import dataclasses
import json
import math
import os
import platform
import resource
import signal
import sys
import time

import torch
from tqdm import tqdm

import optim
import parallel
import per_example
from cli import ConfigError, last_status, new_run_dir
from plots.figures import FALLBACK_SOURCES, draw_all, run_summary

# How a trainer's run ended -> its exit status (2 is a bad command line, 1 a failed compare).
EXIT_STATUS = {"finished": 0, "stopped": 130, "diverged": 3}


def lr_at(it, lr, warmup_iters, decay_iters, min_lr_ratio, schedule="cosine", cooldown=0.2):
    """The lr of step `it`: linear warmup for warmup_iters, then down to lr * min_lr_ratio at
    decay_iters (and flat after) by `schedule`:
      cosine     half a cosine over the whole decay
      linear     a straight line over the whole decay (with min_lr_ratio 0: linear to zero)
      wsd        warmup-stable-decay: the peak lr until the last `cooldown` fraction of the
                 decay, then a straight line down
      wsd_sqrt   the same with the 1 - sqrt cool-down (Hagele et al. 2024): faster at first"""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    progress = min(1.0, (it - warmup_iters) / max(1, decay_iters - warmup_iters))
    if schedule in ("wsd", "wsd_sqrt"):   # progress through the cool-down
        progress = max(0.0, progress - (1 - cooldown)) / cooldown
    fraction_left = {"cosine": 0.5 * (1 + math.cos(math.pi * progress)),
                     "linear": 1 - progress, "wsd": 1 - progress,
                     "wsd_sqrt": 1 - math.sqrt(progress)}[schedule]
    min_lr = lr * min_lr_ratio
    return min_lr + fraction_left * (lr - min_lr)


def maybe_compile(model, enabled, trial):
    """torch.compile is opt-in; if compiling or the first compiled step fails, warn and go on
    uncompiled. `trial(compiled)` runs one forward/backward (its RNG use and gradients are
    undone)."""
    if not enabled:
        return model
    rng = rng_state()
    try:
        compiled = torch.compile(model)
        trial(compiled)
        return compiled
    except Exception as err:  # any compiler failure: the eager model trains the same
        print(f"warning: torch.compile failed ({type(err).__name__}: {err}); "
              "continuing without it", file=sys.stderr)
        return model
    finally:
        model.zero_grad(set_to_none=True)
        set_rng_state(rng)


class TrainClock:
    """Seconds spent training, kept without a GPU synchronize every step (CUDA runs
    asynchronously, so a per-step sync would stall the queue the way nanoGPT avoids). The clock
    runs from start() to pause(); pause() first waits for the work queued on the GPU, and the
    trainers call it only where they read a result anyway: a log line, an evaluation, a
    checkpoint. `seconds` is the total so far (exact while paused; starts at a resumed run's)."""

    def __init__(self, device, seconds=0.0):
        self.cuda, self.seconds, self.t0 = device.startswith("cuda"), seconds, None

    def start(self):
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def pause(self):
        if self.t0 is not None:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - self.t0
            self.t0 = None
        return self.seconds


class Progress:
    """A run's console and timing: the progress bar, above which rank 0 alone prints its lines
    (`say`); the training clock, evaluations excluded (`clock`); the ms per step since the last
    log line (`lap`); a warning said once (`warn_once`)."""

    def __init__(self, world, device, total, step, train_s):
        self.bar = tqdm(total=total, initial=step, disable=None if world.main else True,
                        dynamic_ncols=True, leave=False)
        self.main, self.clock = world.main, TrainClock(device, seconds=train_s)
        self.logged_s, self.logged_step, self.warned = train_s, step, False

    def say(self, *args, **kwargs):
        if self.main:
            self.bar.write(*args, **kwargs)

    def lap(self, step):
        """(training seconds so far, ms per step since the last lap); the clock pauses."""
        train_s = self.clock.pause()
        ms = 1000 * (train_s - self.logged_s) / (step - self.logged_step)
        self.logged_s, self.logged_step = train_s, step
        return train_s, ms

    def warn_once(self, warning):
        if warning and not self.warned:
            self.say(warning, file=sys.stderr)
            self.warned = True


# ---------------------------------------------------------------------------------------------
# checkpoints, RNG, Ctrl-C

def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir, model, optimizer, scaler, cfg, world, **entries):
    """run_dir/ckpt.pt: everything a resume needs (the trainer adds its data position and loop
    counters in `entries`), written by rank 0 to a temp file and renamed, so a crash or Ctrl-C
    never leaves half a checkpoint. Model and optimizer state are whole tensors (gathered from
    the ranks under FSDP2), so the checkpoint loads at any world size; every rank's RNG state is
    kept. Every rank must call it."""
    model_state, optimizer_state = parallel.full_state(model, optimizer)
    rngs = parallel.gather_to_main(rng_state(), world)
    if not world.main:
        return
    path = os.path.join(run_dir, "ckpt.pt")
    torch.save(dict(model=model_state, optimizer=optimizer_state, scaler=scaler.state_dict(),
                    rng=rngs, world_size=world.size, config=dataclasses.asdict(cfg), **entries),
               path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(run_dir, model, optimizer, scaler, world, **data_facts):
    """Restore what save_checkpoint saved (SGD-SaI's frozen scales travel in the optimizer's
    state) into `model`, the module trained through (plain, DDP or FSDP2), on every rank; returns
    the checkpoint, for the trainer's own entries. Anything that makes the run unresumable (no or
    a damaged checkpoint, other data than it trained on, a model of another shape) is a
    ConfigError naming it, raised before anything in run_dir is written. `data_facts`
    (data_source=..., vocab_size=...) are checked against the run's run.json."""
    check_same_data(run_dir, data_facts)
    path = os.path.join(run_dir, "ckpt.pt")
    if not os.path.exists(path):
        raise ConfigError(f"--resume={run_dir}: no ckpt.pt there (the run stopped before its "
                          f"first evaluation); start it again with --out_dir={run_dir}")
    # loaded on the CPU: RNG and generator states must be CPU tensors; the model's and the
    # optimizer's load_state_dict copy theirs to the parameters' device
    try:
        ckpt = torch.load(path, map_location="cpu")
    except Exception as err:   # empty, truncated or overwritten: torch's reader says which
        raise ConfigError(f"--resume={run_dir}: ckpt.pt cannot be read ({type(err).__name__}: "
                          f"{str(err).splitlines()[0] if str(err) else 'empty'}); it is damaged, "
                          "and the run cannot go on from it: start a new run") from None
    try:
        parallel.load_model_state(model, ckpt["model"])
    except RuntimeError as err:   # size mismatches: the model code changed since the save
        first = next((ln.strip() for ln in str(err).splitlines() if "size mismatch" in ln
                      or "Missing" in ln or "Unexpected" in ln), str(err).splitlines()[0])
        raise ConfigError(f"--resume={run_dir}: the checkpoint's model is not this model "
                          f"({first}); it was saved by other code: start a new run") from None
    # a hyperparameter this optim.py takes and the checkpoint lacks (e.g. sai_rule, which older
    # versions called scale_rule)
    missing = sorted(set(optimizer.param_groups[0]) - set().union(
        *ckpt["optimizer"]["param_groups"]))
    if missing:
        raise ConfigError(f"--resume={run_dir}: its optimizer state has no hyperparameter "
                          f"{missing[0]!r}: it was written by an older optim.py; start a new run")
    parallel.load_optimizer_state(model, optimizer, ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][world.rank % len(ckpt["rng"])])   # another world size: dropout's
    if world.main:                                                # masks then differ
        print(f"resuming {run_dir} at step {ckpt['step']}"
              + (f" (saved by {ckpt['world_size']} processes, now {world.size})"
                 if ckpt["world_size"] != world.size else ""))
    return ckpt


def check_same_data(run_dir, data_facts):
    """A resumed run must see the data it trained on: the same sizes (vocabulary, images), and
    no swap between the real data and an offline fallback (offline, a run started on tiny
    shakespeare would otherwise go on with the Python manual)."""
    path = os.path.join(run_dir, "run.json")
    if not os.path.exists(path):
        return
    with open(path) as f:
        before = json.load(f)
    for key, now in data_facts.items():
        if key not in before or before[key] == now:
            continue
        if key == "data_source" and not {before[key], now} & set(FALLBACK_SOURCES):
            continue   # the same data named two ways (a path, or the file's known name)
        raise ConfigError(f"--resume={run_dir}: the run trained on {key} {before[key]!r}, "
                          f"and here it is {now!r}; resume where that data is found (e.g. "
                          "online, or with the same file in the data cache)")


class StopOnCtrlC:
    """The first Ctrl-C asks the loop to stop after the current iteration (so the checkpoint it
    writes is consistent); a second one interrupts at once, in one process. Under torchrun
    (`world`: more than one rank), whose launcher passes the terminal's Ctrl-C on to the ranks a
    second time, a second one changes nothing, and rank 0 alone says so."""

    def __init__(self, world):
        self.requested, self.second_aborts, self.announce = False, world.size == 1, world.main

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            if self.second_aborts:
                raise KeyboardInterrupt
            return
        self.requested = True
        if not self.announce:
            return
        print("\nCtrl-C: stopping after this iteration and saving a checkpoint"
              + (" (press again to abort without saving)" if self.second_aborts else ""),
              file=sys.stderr)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


# ---------------------------------------------------------------------------------------------
# metrics and memory

class MetricsLog:
    """Append-only JSONL, one object per line, flushed each write so `plots/` can read it live.
    On resume, lines past the checkpoint's step and the old end line are dropped: the run goes on
    from the checkpoint and recomputes them. A damaged log is a ConfigError, the file untouched.
    path None (ranks other than 0 under torchrun): writes nothing."""

    def __init__(self, path, resume_step=None):
        self.file = None
        if path is None:
            return
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                # a line without its newline was torn by a crash; it is past the checkpoint anyway
                lines = [line for line in f if line.endswith("\n")]
            records = []
            for number, line in enumerate(lines, 1):
                try:
                    records.append((line, json.loads(line)))
                except json.JSONDecodeError:
                    raise ConfigError(f"{path}: line {number} is not JSON; the log is damaged, "
                                      "so the resumed run's figures would be wrong: repair or "
                                      "remove that line, or start a new run") from None
            with open(path + ".tmp", "w") as f:
                f.writelines(line for line, r in records
                             if r["step"] <= resume_step and r["event"] != "end")
            os.replace(path + ".tmp", path)
        self.file = open(path, "a")

    def write(self, **record):
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self):
        if self.file:
            self.file.close()


def memory_fields(model, optimizer, device, world):
    """Bytes of parameters, gradients and optimizer state this rank holds (a slice of each under
    FSDP2), and the peak so far: CUDA max allocated on a GPU, the process's peak RSS elsewhere
    (which includes PyTorch itself). With more than one rank, the totals over ranks too (every
    rank must call it)."""
    def held(t):
        return (t.to_local() if hasattr(t, "to_local") else t).numel() * t.element_size()
    if hasattr(model, "reshard"):   # FSDP2 keeps the root's parameters gathered after a forward
        model.reshard()             # without backward (an evaluation): slice them again first
    params = list(model.parameters())
    if device.startswith("cuda"):
        peak, peak_kind = torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    else:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak, peak_kind = rss * (1 if sys.platform == "darwin" else 1024), "cpu_peak_rss"
    fields = {"param_bytes": sum(held(p) for p in params),
              "grad_bytes": sum(held(p) for p in params if p.requires_grad),
              "state_bytes": optim.state_bytes(optimizer), "peak_bytes": peak}
    if world.size > 1:
        totals = parallel.sum_over_ranks(torch.tensor(list(fields.values())), world).tolist()
        fields |= {f"{key}_all_ranks": total for key, total in zip(list(fields), totals)}
    return fields | {"peak_kind": peak_kind}


def gradient_diagnostics(raw_model, optimizer, loss_of, x, y):
    """--diagnostics' fields of an evaluation, from the per-example gradients of one batch:
    per parameter, per_example.block_diagnostics (and SGD-SaI's frozen scale beside, once
    taken), and the whole model's noise scale. Under DDP every rank computes the same."""
    statistics, _ = per_example.batch_statistics(raw_model, loss_of, x, y, write_grad=False)
    diagnostics = per_example.block_diagnostics(raw_model, statistics)
    for p, name in zip(raw_model.parameters(), diagnostics):
        if "scale" in optimizer.state.get(p, {}):
            diagnostics[name]["sai_scale"] = optimizer.state[p]["scale"].item()
    return dict(diagnostics=diagnostics, noise_scale=per_example.noise_scale(statistics))


def loss_far_above_chance(loss, n_classes):
    """The warning for a finite loss 1.5x above a uniform guess's ln(n_classes) (where training
    starts): the run is diverging though not (yet) NaN. None when the loss is below that."""
    chance = math.log(n_classes)
    if not loss > 1.5 * chance:
        return None
    return (f"warning: the training loss {loss:.2f} is far above a uniform guess's "
            f"ln({n_classes:,}) = {chance:.2f}, where training starts: the lr is probably too "
            "high for this setup (try a lower --lr)")


# ---------------------------------------------------------------------------------------------
# the run directory and how the run ended

def data_name(dataset, source):
    """A run directory's data part: the dataset, or the offline fallback it fell back to
    ('pydoc_topics-fallback', 'digits-fallback')."""
    return f"{source}-fallback" if source in FALLBACK_SOURCES and dataset != source else dataset


def check_out_dir(cfg):
    """Called before the data is loaded, so a bad --out_dir is found at once: it must be a
    directory that can be written and holds no run (one aborted before its first checkpoint has
    nothing to resume, and starts over). An existing run is never overwritten."""
    run_dir = cfg.out_dir
    if cfg.resume or not run_dir:
        return
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"--out_dir={run_dir} is a file; give a directory")
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        if last_status(run_dir) or os.path.exists(os.path.join(run_dir, "ckpt.pt")):
            raise ConfigError(f"--out_dir={run_dir} already holds a run; resume it with "
                              f"--resume={run_dir} or choose another --out_dir")
        print(f"{run_dir} holds a run aborted before its first checkpoint; starting it over")
        os.remove(metrics)
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as err:
        raise unwritable(run_dir, err) from None


def open_run_dir(cfg, name):
    """The resumed run's directory, or the new one (--out_dir, checked by check_out_dir, else
    out/<time>-<name>) with the run's config.json written in it."""
    if cfg.resume:
        return cfg.resume
    run_dir = cfg.out_dir or new_run_dir("out", name)
    try:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=1)
    except OSError as err:
        raise unwritable(run_dir, err) from None
    return run_dir


def unwritable(run_dir, err):
    return ConfigError(f"--out_dir={run_dir} cannot be written ({err.strerror}); choose a "
                       "directory you can write to")


def write_run_info(run_dir, cfg, model, world, **facts):
    """run.json: what the figures were measured on (the processes too: world size, backend and
    mode under torchrun), and the model's size: all parameters and those outside the token and
    position embeddings (Kaplan et al.'s non-embedding count). Returns the parameter count."""
    n_params = sum(p.numel() for p in model.parameters())   # of the whole model, also sharded
    kinds = model.param_kinds()
    non_embedding = sum(p.numel() for p in model.parameters()
                        if kinds.get(p) not in ("embedding", "position"))
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump(dict(device=cfg.device, dtype=cfg.dtype, torch=torch.__version__,
                       python=platform.python_version(), cpus=os.cpu_count(),
                       threads=torch.get_num_threads(), n_params=n_params,
                       n_params_non_embedding=non_embedding, argv=sys.argv,
                       world_size=world.size, backend=world.backend, parallel=world.mode,
                       **facts), f, indent=1)
    return n_params


def report_end(status, step, run_dir, script):
    """Draw the figures of what the run has (a stopped or diverged one too, up to where it
    ended) and say how it ended; returns the exit status."""
    for path in draw_all([run_dir], run_dir):
        print(f"wrote {path}")
    if status == "diverged":
        print(f"a loss was not finite by step {step}: training diverged (try a lower --lr). The "
              f"last good checkpoint, if any, is intact in {run_dir}.", file=sys.stderr)
    elif status == "stopped":
        print(f"stopped at step {step}; resume with: python {script} --resume={run_dir}")
    else:
        print(run_summary(run_dir))
    return EXIT_STATUS[status]


