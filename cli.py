"""
The command line of every script here: --key=value options checked against a config dataclass
(a bad one is a ConfigError: one line on stderr, exit status 2), the options both trainers
share, device and dtype, and a trainer run in its own process (compare.py and sweep.py).
"""
import ast
import dataclasses
import difflib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch

import optim
from data.files import CACHE_DIR

SCHEDULES = ("cosine", "linear", "wsd", "wsd_sqrt")   # train_helpers.lr_at draws each


class ConfigError(ValueError):
    """A bad command line: the trainers print its message as one line and exit with status 2."""


def option(default, help):
    """A config field with a one-line meaning, shown by --help."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_value(key, raw, default):
    """Parse one --key=value against the type of its default; ConfigError when it does not fit."""
    kind = type(default)
    if kind is str:
        return raw
    if kind is bool:   # what --help shows, in any case; yes / 1 / on are not guessed at
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
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
    """Apply --key=value overrides to the dataclass `cfg`; return (new cfg, keys given).
    --help prints `usage` and every option with its default and meaning, then exits."""
    fields = dataclasses.fields(cfg)
    names = [f.name for f in fields]
    # --help lists a trainer's own options before the shared RunOptions (sorted is stable)
    fields = sorted(fields, key=lambda f: isinstance(cfg, RunOptions)
                    and f.name in RunOptions.__dataclass_fields__)
    given = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(usage, "", "Options (--key=value; defaults shown):", sep="\n")
            for f in fields:
                print(f"  {f'--{f.name}={getattr(cfg, f.name)!r}':<30} {f.metadata['help']}")
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
    """'all' (optim.OPTIMIZERS) or a comma-separated list of names from optim.OPTIMIZERS and
    optim.PER_EXAMPLE_OPTIMIZERS."""
    names = list(optim.OPTIMIZERS) if spec == "all" else spec.split(",")
    known = list(optim.OPTIMIZERS) + list(optim.PER_EXAMPLE_OPTIMIZERS)
    for name in names:
        if name not in known:
            raise ConfigError(f"--optimizer: unknown optimizer {name!r}; "
                              f"choose from {', '.join(known)}, a comma-separated "
                              "list of them, or all (the first seven)")
    return names


@dataclass
class RunOptions:
    """The options both trainers take, checked by `read_config`; each trainer's Config adds its
    data, model and training options (and may change a default here by declaring it again)."""
    # optimizer
    optimizer: str = option("sgd_sai", f"{', '.join(optim.OPTIMIZERS)}, a comma-separated list "
                                       "of them, or all (compare)")
    lr: float = option(0.0, "peak learning rate; 0 = the optimizer's default (DEFAULT_LR)")
    schedule: str = option("cosine", "lr decay after the warmup: cosine, linear, wsd "
                                     "(warmup-stable-decay, linear cool-down) or wsd_sqrt "
                                     "(1 - sqrt cool-down)")
    cooldown: float = option(0.2, "wsd / wsd_sqrt: the fraction of the decay steps that cools "
                                  "down (the rest stays at the peak lr)")
    min_lr_ratio: float = option(0.1, "the decay ends at lr * min_lr_ratio (0 with "
                                      "--schedule=linear: linear decay to zero)")
    weight_decay: float = option(0.1, "decoupled weight decay of matrices and embeddings")
    beta1: float = option(0.9, "AdamW/Adam-mini/APOLLO beta1; SGD-SaI momentum")
    beta2: float = option(0.99, "AdamW/Adam-mini/APOLLO beta2")
    eps: float = option(0.0, "AdamW/Adam-mini/APOLLO/Muon's AdamW part/adam_pe eps; 0 = the "
                             "optimizer's own (1e-8; adam_pe 1e-6)")
    sai_rule: str = option("gsnr", f"SGD-SaI scale rule: {', '.join(optim.SAI_RULES)}")
    sign_placement: str = option("mean_of_signs", "sign_sgd's sign: "
                                                  f"{', '.join(optim.SIGN_PLACEMENTS)}")
    preconditioner: str = option("second_moment", "adam_pe's second moment from: "
                                            f"{', '.join(optim.PRECONDITIONERS)}")
    grad_clip: float = option(1.0, "clip the global gradient norm to this; 0 = off")
    warmup_iters: int = option(-1, "linear warmup steps; -1 = 5% of the run's steps")
    # system
    device: str = option("auto", "auto, cpu, cuda, cuda:N or mps")
    dtype: str = option("auto", "autocast dtype: auto (bf16, else fp16 on CUDA; fp32 "
                                "elsewhere), float32, bfloat16, float16")
    compile: bool = option(False, "torch.compile the model (falls back if it fails)")
    parallel: str = option("auto", "under torchrun: ddp or fsdp (FSDP2: parameters and optimizer "
                                   "state sliced across ranks); auto = ddp there, none elsewhere")
    out_dir: str = option("", "run directory; default out/<time>-<dataset>-<optimizer>")
    resume: str = option("", "run directory to resume from its checkpoint")
    data_dir: str = option(CACHE_DIR, "where downloads and prepared data are cached")


def read_config(config_cls, argv, usage):
    """Command line -> (config, keys given). With --resume=<run dir>, that run's saved config
    (no other option may change it); otherwise the options both trainers share are checked."""
    cfg, given = parse_args(config_cls(), argv, usage)
    if cfg.resume:
        if given - {"resume", "parallel"}:   # a run may go on at another world size
            raise ConfigError("--resume continues a run with its saved config; drop "
                              + ", ".join(f"--{k}" for k in sorted(given - {"resume",
                                                                            "parallel"})))
        path = os.path.join(cfg.resume, "config.json")
        if not os.path.exists(path):
            raise ConfigError(f"--resume={cfg.resume}: no config.json there; pass a run "
                              "directory this trainer wrote")
        try:
            with open(path) as f:
                saved = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ConfigError(f"--resume={cfg.resume}: its config.json is damaged ({err}); "
                              "the run cannot be resumed") from None
        unknown = sorted(set(saved) - set(config_cls.__dataclass_fields__))
        if unknown:   # e.g. a vit_sai.py run given to nanogpt_sai.py
            raise ConfigError(f"--resume={cfg.resume}: its config has options this trainer "
                              f"does not know ({', '.join(unknown[:3])}): it is another "
                              "trainer's run (resume it with that script) or an older version's")
        return dataclasses.replace(config_cls(**saved), resume=cfg.resume,
                                   parallel=cfg.parallel), given
    optimizer_names(cfg.optimizer)
    check_positive(cfg, "batch_size", "log_interval")
    for key in ("lr", "grad_clip"):
        if not getattr(cfg, key) >= 0:
            raise ConfigError(f"--{key} must be >= 0, got {getattr(cfg, key)}")
    # -1 where it is the trainer's default: its tuned value for the optimizer (nanogpt_sai.py)
    if not (cfg.weight_decay >= 0 or cfg.weight_decay == -1 == config_cls().weight_decay):
        raise ConfigError(f"--weight_decay must be >= 0, got {cfg.weight_decay}")
    if cfg.warmup_iters < -1:
        raise ConfigError(f"--warmup_iters must be >= 0 (or -1: 5% of the run), got "
                          f"{cfg.warmup_iters}")
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"--schedule must be one of {', '.join(SCHEDULES)}, got "
                          f"{cfg.schedule!r}")
    if not 0 < cfg.cooldown <= 1:
        raise ConfigError(f"--cooldown must be in (0, 1] (a fraction of the decay steps), got "
                          f"{cfg.cooldown}")
    if not 0 <= cfg.min_lr_ratio <= 1:
        raise ConfigError(f"--min_lr_ratio must be in [0, 1], got {cfg.min_lr_ratio}")
    for key in ("beta1", "beta2"):
        if not 0 <= getattr(cfg, key) < 1:
            raise ConfigError(f"--{key} must be in [0, 1), got {getattr(cfg, key)}")
    if cfg.eps < 0:
        raise ConfigError(f"--eps must be >= 0 (0: the optimizer's own), got {cfg.eps}")
    for key, allowed in (("sai_rule", optim.SAI_RULES),
                         ("sign_placement", optim.SIGN_PLACEMENTS),
                         ("preconditioner", optim.PRECONDITIONERS)):
        if getattr(cfg, key) not in allowed:
            raise ConfigError(f"--{key} must be one of {', '.join(allowed)}, "
                              f"got {getattr(cfg, key)!r}")
    if cfg.device not in ("auto", "cpu", "cuda", "mps") and not cfg.device.startswith("cuda:"):
        raise ConfigError(f"--device must be auto, cpu, cuda, cuda:N or mps, got {cfg.device!r}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    return cfg, given


def warmup_steps(warmup_iters, total_steps):
    """--warmup_iters, where -1 is 5% of the run (nanoGPT's CPU run: 100 of 2000 steps), so a
    short run reaches its peak lr; a warning when an explicit warmup is the whole run."""
    if warmup_iters == -1:
        return round(0.05 * total_steps)
    if warmup_iters >= total_steps:
        print(f"warning: --warmup_iters={warmup_iters} >= the run's {total_steps} steps: the lr "
              "never reaches its peak --lr (leave --warmup_iters out: 5% of the run)",
              file=sys.stderr)
    return warmup_iters


def data_error(err, data_dir):
    """The ConfigError for data that cannot be loaded or prepared: a file the cache could not
    write is --data_dir's fault, anything else (missing, not UTF-8, malformed) --data_path's."""
    filename = os.path.abspath(getattr(err, "filename", None) or os.sep)
    cache = os.path.abspath(data_dir)
    if isinstance(err, OSError) and (filename + os.sep).startswith(cache + os.sep):
        return ConfigError(f"--data_dir={data_dir}: the prepared data cannot be written there "
                           f"({err.strerror}: {err.filename}); give a writable --data_dir")
    if isinstance(err, UnicodeDecodeError):
        return ConfigError(f"--data_path: the text is not UTF-8 ({err.reason} at byte "
                           f"{err.start}); convert it, e.g. iconv -t utf-8")
    return ConfigError(f"--data_path: {err}")


def pick_device(name):
    """--device: 'auto' is CUDA, else MPS, else the CPU; a named one must be available."""
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"--device={name} but CUDA is not available; use --device=cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("--device=mps but MPS is not available; use --device=cpu")
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else (
        "mps" if torch.backends.mps.is_available() else "cpu")


def pick_dtype(name, device):
    """--dtype: 'auto' is bf16 autocast on GPUs that support it, else fp16 (with a GradScaler);
    float32 off CUDA, where autocast is not used."""
    if name == "auto":
        if not device.startswith("cuda"):
            return "float32"
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    if name != "float32" and not device.startswith("cuda"):
        raise ConfigError(f"--dtype={name} is for CUDA autocast; use --dtype=float32 on {device}")
    return name


def run_in_process(script, argv, log_path=None, threads=None):
    """Run `python script *argv` in its own process (its own peak memory, its own Ctrl-C
    handling); its output goes to log_path (appended) or to this console. `threads` sets
    OMP_NUM_THREADS, so runs side by side do not oversubscribe the cores. Returns the exit
    status."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads)) if threads else None
    cmd = [sys.executable, script, *argv]
    if log_path is None:
        return subprocess.run(cmd, env=env).returncode
    with open(log_path, "a") as log:
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode


def new_run_dir(out_root, name):
    """out_root/<time>-<name>, never an existing directory (earlier runs are not touched)."""
    stem = os.path.join(out_root, time.strftime("%Y%m%d-%H%M%S") + "-" + name)
    path, n = stem, 1
    while os.path.exists(path):
        n += 1
        path = f"{stem}-{n}"
    os.makedirs(path)
    return path


def last_status(run_dir):
    """How a run directory's run ended: 'finished', 'diverged', 'stopped', or None (never
    ended, or never started)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    with open(path, errors="replace") as f:
        ends = [json.loads(line) for line in f if '"event": "end"' in line]
    return ends[-1]["status"] if ends else None


WHERE_KEYS = {"parallel", "out_dir", "data_dir", "resume"}


def config_changes(run_dir, config, defaults=None):
    """How the config a run directory already holds differs from `config` (a trainer's resolved
    config as a dict): ['max_iters: 400 -> 300', ...]; empty when the same or never started.
    With `defaults` (the trainer's Config() as a dict), an option the saved config lacks is no
    change where `config` has it at its default: an option added after the run was made, which
    computes what the run computed."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        before = json.load(f)
    # how a run is launched and where its files are, not what it computes: --parallel (it may
    # go on at another world size), its own directory and the data cache's (a sweep's results
    # moved to another clone or given as a relative path are the same runs; a resume checks
    # that the data is the same)
    added_at_default = {k for k in set(config) - set(before)
                        if defaults is not None and k in defaults and config[k] == defaults[k]}
    return [f"{k}: {before.get(k, '(none)')} -> {config.get(k, '(none)')}"
            for k in sorted((set(before) | set(config)) - WHERE_KEYS - added_at_default)
            if before.get(k) != config.get(k)]
