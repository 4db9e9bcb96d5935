"""
What both trainers share: the --key=value CLI, device and precision, the LR schedule,
atomic checkpoints, RNG state, the JSONL metrics log, memory probes, Ctrl-C handling and the
compare-several-optimizers driver. Each trainer still reads top to bottom; this file only keeps
them from writing the same plumbing twice.
"""
import ast
import contextlib
import dataclasses
import difflib
import json
import math
import os
import platform
import resource
import signal
import subprocess
import sys
import time

import torch

import optim
from plots.figures import draw_all

# Downloads and prepared data live beside the code, wherever the trainer is started from.
DATA_CACHE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "cache")


class ConfigError(ValueError):
    """A bad command line: the trainers print its message as one line and exit with status 2."""


def option(default, help):
    """A config field with a one-line meaning, shown by --help."""
    return dataclasses.field(default=default, metadata={"help": help})


# ---------------------------------------------------------------------------------------------
# command line

def help_text(cfg, usage):
    lines = [usage, "", "Options (--key=value; defaults shown):"]
    for f in dataclasses.fields(cfg):
        option_text = f"--{f.name}={getattr(cfg, f.name)!r}"
        lines.append(f"  {option_text:<30} {f.metadata.get('help', '')}")
    return "\n".join(lines)


def parse_value(key, raw, default):
    """Parse one --key=value against the type of its default; ConfigError when it does not fit."""
    kind = type(default)
    if kind is str:
        return raw
    if kind is bool:
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise ConfigError(f"--{key} expects True or False, got {raw!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ConfigError(f"--{key} expects {kind.__name__}, got {raw!r}") from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if type(value) is not kind:
        raise ConfigError(f"--{key} expects {kind.__name__}, got {raw!r}")
    return value


def parse_args(cfg, argv, usage):
    """Apply --key=value overrides to the dataclass `cfg`; return (new cfg, keys given)."""
    names = [f.name for f in dataclasses.fields(cfg)]
    given = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(help_text(cfg, usage))
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"arguments are --key=value, got {arg!r} (--help lists the keys)")
        key, raw = arg[2:].split("=", 1)
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean --{close[0]}?" if close else ""
            raise ConfigError(f"unknown option --{key}{hint} (--help lists the keys)")
        given[key] = parse_value(key, raw, getattr(cfg, key))
    return dataclasses.replace(cfg, **given), set(given)


def check_positive(cfg, *keys):
    for key in keys:
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"--{key} must be > 0, got {getattr(cfg, key)}")


def optimizer_names(spec):
    """'all' or a comma-separated list of names from optim.OPTIMIZERS."""
    names = list(optim.OPTIMIZERS) if spec == "all" else spec.split(",")
    for name in names:
        if name not in optim.OPTIMIZERS:
            raise ConfigError(f"--optimizer: unknown optimizer {name!r}; "
                              f"choose from {', '.join(optim.OPTIMIZERS)}, a comma-separated "
                              "list of them, or all")
    return names


def check_common(cfg):
    """Checks both trainers need: schedule, optimizer hyperparameters, device and dtype."""
    optimizer_names(cfg.optimizer)
    check_positive(cfg, "batch_size", "log_interval")
    for key in ("lr", "weight_decay", "grad_clip", "warmup_iters"):
        if not getattr(cfg, key) >= 0:
            raise ConfigError(f"--{key} must be >= 0, got {getattr(cfg, key)}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ConfigError(f"--min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be in [0, 1), got {getattr(cfg, key)}")
    if cfg.sai_rule not in optim.SCALE_RULES:
        raise ConfigError(f"--sai_rule must be one of {', '.join(optim.SCALE_RULES)}, "
                          f"got {cfg.sai_rule!r}")
    if cfg.device not in ("auto", "cpu", "cuda", "mps") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")


def make_optimizer(cfg, model):
    """The optimizer cfg names, with the config's hyperparameters, and the GradScaler (active
    only under float16 autocast). Adam-mini's partition is printed, so it can be checked."""
    opt = optim.build_optimizer(cfg.optimizer, model,
                                **optimizer_hparams(cfg, cfg.optimizer, cfg.lr))
    if cfg.optimizer == "adam_mini":
        print(optim.partition_table(model, optim.block_rules(model)))
    return opt, torch.amp.GradScaler("cuda", enabled=cfg.dtype == "float16")


def clip_and_step(model, opt, scaler, grad_clip):
    """Unscale the gradients (fp16 only), clip their global norm (0 = off), step, zero them."""
    if grad_clip > 0:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)


def optimizer_hparams(cfg, name, lr):
    """The config's optimizer settings, as the keyword arguments optimizer `name` takes."""
    hp = {"lr": lr, "weight_decay": cfg.weight_decay}
    if name == "sgd_sai":
        hp.update(momentum=cfg.beta1, scale_rule=cfg.sai_rule)
    else:
        hp.update(betas=(cfg.beta1, cfg.beta2))
    return hp


# ---------------------------------------------------------------------------------------------
# device, precision, schedule

def pick_device(name):
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device={name} but CUDA is not available; use --device=cpu")
        if name == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("--device=mps but MPS is not available; use --device=cpu")
        return name
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(name, device):
    """Autocast dtype: bf16 on GPUs that support it, else fp16 (with a GradScaler); fp32 off
    CUDA."""
    if name == "auto":
        if not device.startswith("cuda"):
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if name != "float32" and not device.startswith("cuda"):
        raise ConfigError(f"--dtype={name} is for CUDA autocast; use --dtype=float32 on {device}")
    return name


def autocast(device, dtype):
    """Mixed precision on CUDA (parameters and optimizer state stay float32); nothing elsewhere."""
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=getattr(torch, dtype))


def lr_at(it, lr, warmup_iters, decay_iters, min_lr_ratio):
    """Linear warmup for warmup_iters, then cosine from lr down to lr * min_lr_ratio at
    decay_iters (and flat after)."""
    if it < warmup_iters:
        return lr * (it + 1) / (warmup_iters + 1)
    progress = min(1.0, (it - warmup_iters) / max(1, decay_iters - warmup_iters))
    min_lr = lr * min_lr_ratio
    return min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (lr - min_lr)


def maybe_compile(model, enabled, trial):
    """torch.compile is opt-in; if compiling or the first compiled step fails, warn and go on
    uncompiled. `trial` runs one forward/backward (its RNG use and gradients are undone)."""
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


# ---------------------------------------------------------------------------------------------
# checkpoints, RNG, Ctrl-C

def save_checkpoint(path, obj):
    """torch.save to a temp file, then rename: a crash or Ctrl-C never leaves half a file."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def rng_state():
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopOnCtrlC:
    """The first Ctrl-C asks the loop to stop after the current iteration (so the checkpoint it
    writes is consistent); a second one interrupts at once."""

    def __init__(self):
        self.requested = False

    def __enter__(self):
        self.previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nCtrl-C: stopping after this iteration and saving a checkpoint "
              "(press again to abort without saving)", file=sys.stderr)

    def __exit__(self, *exc):
        signal.signal(signal.SIGINT, self.previous)


# ---------------------------------------------------------------------------------------------
# metrics and memory

class MetricsLog:
    """Append-only JSONL, one object per line, flushed each write so `plots/` can read it live.
    On resume, lines past the checkpoint's step and the old end line are dropped: the run goes on
    from the checkpoint and recomputes them."""

    def __init__(self, path, resume_step=None):
        self.path = path
        if resume_step is not None and os.path.exists(path):
            with open(path) as f:
                # a line without its newline was torn by a crash; it is past the checkpoint anyway
                records = [(line, json.loads(line)) for line in f if line.endswith("\n")]
            kept = [line for line, r in records
                    if r["step"] <= resume_step and r["event"] != "end"]
            with open(path + ".tmp", "w") as f:
                f.writelines(kept)
            os.replace(path + ".tmp", path)
        self.file = open(path, "a")

    def write(self, **record):
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self):
        self.file.close()


def peak_memory(device):
    """(bytes, what): CUDA max allocated on a GPU, the process's peak RSS elsewhere."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "cpu_peak_rss"


def memory_fields(model, optimizer, device):
    params = list(model.parameters())
    peak, peak_kind = peak_memory(device)
    return {"param_bytes": sum(p.numel() * p.element_size() for p in params),
            "grad_bytes": sum(p.numel() * p.element_size() for p in params if p.requires_grad),
            "state_bytes": optim.state_bytes(optimizer),
            "peak_bytes": peak, "peak_kind": peak_kind}


def log_train(log, bar, model, opt, device, *, step, loss, lr, ms, items_per_step, unit,
              **fields):
    """The periodic training line, to the metrics log and the console:
    iter 100 | loss 1.2345 | lr 1.0e-03 | 12.3 ms | 52,000 tok/s | state 0.50x AdamW.
    Memory is probed here only, so steps between lines pay nothing for it."""
    mem = memory_fields(model, opt, device)
    log.write(event="train", step=step, loss=loss, lr=lr, ms=ms, **fields, **mem)
    state_vs_adamw = mem["state_bytes"] / (2 * mem["param_bytes"])   # AdamW keeps m and v
    bar.write(f"iter {step} | loss {loss:.4f} | lr {lr:.1e} | {ms:.1f} ms | "
              f"{items_per_step * 1000 / ms:,.0f} {unit}/s | state {state_vs_adamw:.2f}x AdamW")


class Timer:
    """Seconds spent training, excluding evaluation and checkpoints (so optimizers compare on
    the work they do); CUDA is synchronised so the clock sees finished kernels."""

    def __init__(self, device, seconds=0.0):
        self.device, self.seconds = device, seconds

    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        self.last = time.perf_counter() - self.t0
        self.seconds += self.last


# ---------------------------------------------------------------------------------------------
# runs

def new_run_dir(out_root, name):
    """out_root/<time>-<name>, never an existing directory (earlier runs are not touched)."""
    stem = os.path.join(out_root, time.strftime("%Y%m%d-%H%M%S") + "-" + name)
    path, n = stem, 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}"
    os.makedirs(path)
    return path


def compare(script, names, argv, out_dir):
    """Train each optimizer in its own process (so peak memory is its own), same seed and
    batches, into out_dir/<name>. Returns (how many finished, the run directories with metrics:
    a diverged run is drawn too, up to where it stopped)."""
    finished, runs = 0, []
    for name in names:
        run_dir = os.path.join(out_dir, name)
        rest = [a for a in argv if not a.startswith(("--optimizer=", "--out_dir="))]
        cmd = [sys.executable, script, f"--optimizer={name}", f"--out_dir={run_dir}", *rest]
        print(f"=== {name}: {' '.join(cmd[1:])}", flush=True)
        if subprocess.run(cmd).returncode == 0:
            finished += 1
        else:
            print(f"=== {name} did not finish; see {run_dir}", flush=True)
        if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
            runs.append(run_dir)
    return finished, runs


# ---------------------------------------------------------------------------------------------
# a run's beginning and end, the same in both trainers

def resumed_config(config_cls, cfg, given):
    """--resume=<run dir>: that run's saved config; no other option may change it."""
    if given != {"resume"}:
        raise ConfigError("--resume continues a run with its saved config; drop "
                          + ", ".join(f"--{k}" for k in sorted(given - {"resume"})))
    path = os.path.join(cfg.resume, "config.json")
    if not os.path.exists(path):
        raise ConfigError(f"--resume={cfg.resume}: no config.json there; pass a run directory "
                          "this trainer wrote")
    with open(path) as f:
        return dataclasses.replace(config_cls(**json.load(f)), resume=cfg.resume)


def open_run_dir(cfg, name):
    """The resumed run's directory, or a new one holding config.json. An existing run is never
    overwritten: it is resumed, or left alone."""
    if cfg.resume:
        return cfg.resume
    run_dir = cfg.out_dir or new_run_dir("out", name)
    if os.path.exists(os.path.join(run_dir, "metrics.jsonl")):
        raise ConfigError(f"--out_dir={run_dir} already holds a run; resume it with "
                          f"--resume={run_dir} or choose another --out_dir")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(dataclasses.asdict(cfg), f, indent=1)
    return run_dir


def write_run_info(run_dir, cfg, model, **facts):
    """run.json: what the figures were measured on. Returns the parameter count."""
    n_params = sum(p.numel() for p in model.parameters())
    with open(os.path.join(run_dir, "run.json"), "w") as f:
        json.dump(dict(device=cfg.device, dtype=cfg.dtype, torch=torch.__version__,
                       python=platform.python_version(), cpus=os.cpu_count(),
                       threads=torch.get_num_threads(), n_params=n_params, argv=sys.argv,
                       **facts), f, indent=1)
    return n_params


def save_run(run_dir, model, optimizer, scaler, cfg, **entries):
    """Checkpoint everything a resume needs; the trainer adds its data position in `entries`."""
    save_checkpoint(os.path.join(run_dir, "ckpt.pt"), dict(
        model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
        rng=rng_state(), config=dataclasses.asdict(cfg), **entries))


def load_run(run_dir, model, optimizer, scaler):
    """Restore what save_run saved (SGD-SaI's frozen scales travel in the optimizer's state);
    returns the checkpoint, for the trainer's own entries."""
    # loaded on the CPU: RNG and generator states must be CPU tensors; the model's and the
    # optimizer's load_state_dict copy theirs to the parameters' device
    ckpt = torch.load(os.path.join(run_dir, "ckpt.pt"), map_location="cpu")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"])
    print(f"resuming {run_dir} at step {ckpt['step']}")
    return ckpt


def finish_run(status, step, run_dir, script):
    """Say how the run ended; a finished run gets its figures."""
    if status == "diverged":
        print(f"loss is not finite at step {step}: training diverged (try a lower --lr). The "
              f"last good checkpoint, if any, is intact in {run_dir}.", file=sys.stderr)
    elif status == "stopped":
        print(f"stopped at step {step}; resume with: python {script} --resume={run_dir}")
    else:
        for path in draw_all([run_dir], run_dir):
            print(f"wrote {path}")
    return status


def main(argv, resolve_config, train, script):
    """Both trainers' entry point: one run, or several optimizers compared (each in its own
    process). Exit status 0 finished, 130 stopped by Ctrl-C, 3 diverged, 2 bad command line
    (one line on stderr), 1 a compared run did not finish."""
    try:
        cfg = resolve_config(argv)
        names = optimizer_names(cfg.optimizer)
        if len(names) > 1:
            out_dir = cfg.out_dir or new_run_dir("out", f"compare-{cfg.dataset}")
            finished, runs = compare(script, names, argv, out_dir)
            for path in draw_all(runs, out_dir):
                print(f"wrote {path}")
            return 0 if finished == len(names) else 1
        status = train(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return {"finished": 0, "stopped": 130, "diverged": 3}[status]
