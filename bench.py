"""
Optimizer step time and memory against the strongest torch implementations and against the
memory-traffic bound, at three GPT sizes; and the trainer's own overhead.

    python bench.py                          # CPU, 1 thread, 4x128, 6x384 and 12x768 GPTs
    python bench.py --sizes=6x384 --rows=adamw_fused,torch_adamw_fused
    python bench.py --threads=0 --device=cuda
    python bench.py --what=overhead          # nanogpt_sai.py's ms/iter against a plain loop
    python bench.py --what=per_example       # per-example statistics against a plain backward
    python bench.py --what=memory --sizes=4x128  # a training step's memory: model state, peak

Times optimizer.step() alone (gradients are fixed random tensors, set once) for our optimizers
(fused: compiled by torch.compile, the default from FUSED_MIN_NUMEL parameters; eager) and the
references: torch's AdamW (fused, foreach), SGD with momentum (fused), Muon and Adafactor, and
the official SGD_sai 1.0.3 and Adam_mini 1.1.1 (if installed: `pip install -r
requirements-test.txt`). Each row runs in its own process, with its own peak memory; the rows
take turns over --rounds rounds in a rotating order, so that drift in machine speed hits every
row alike. Per size it prints ns per parameter, the step against torch's fused AdamW and
against the row's memory-traffic bound: the bytes the update must read and write (AdamW: p, g,
m, v read, p, m, v written: 7 floats per parameter; SGD momentum, SGD-SaI and Adam-mini 5;
APOLLO's matrices 4, the gradient read twice as its scaling needs the whole projection first;
Adafactor's matrices 6: the gradient read three times, as its factored statistics need the whole
gradient before U = g / sqrt(v_hat), and the clipping RMS(U) all of U before the update, the
parameter read twice (RMS(theta) with the statistics, then the update) and written once; its
vectors 8, v read twice and written) over the in-place axpy bandwidth measured in the same
round. APOLLO's projection
is matrix products: its bound adds their flops over the matmul rate measured alike. "peak
extra" is the memory a step takes beyond parameters, gradients and its state, as a fraction of
the model, in one more step after the timed ones: on a CPU the resident set's peak, with freed
memory returned to the system first and each freed block of 64 KiB or more returned at once
(live memory, not what the allocator keeps for reuse); on a GPU CUDA's allocated peak. Then
the targets (set for 10M parameters or more; printed at every size, where below that fixed
per-call costs weigh more). Muon's step is bfloat16 matrix products: no bound is measured
for it.

One thread by default (--threads): on a busy 2-core machine two threads spread a row's steps
over 10x and flip verdicts between runs; the load average is printed with the table. The timed
steps reuse a cached random projection: APOLLO draws P again only every 200 steps.

--what=overhead trains the default baby GPT (SGD-SaI) three ways, interleaved: a plain loop
(batch, forward, backward, clip, step, nothing else), nanogpt_sai.py logging every step (console
line, metrics line, memory probes, progress bar) and nanogpt_sai.py with its default logging.
For the trainer, ms/iter is wall-clock between its first and last metrics lines, logging included.
"""
import contextlib
import ctypes
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import memory
import nanogpt_sai
import optim
import per_example
import vit_sai
from cli import ConfigError, check_positive, option, parse_args, pick_device, run_in_process
from data.text import load_text, sample_batch
from engine.base import BaseOptimizer
from nanogpt_sai import GPT, Config

MIB = 2 ** 20
# layers, heads, width; 6x16 has 6x384's 39 tensors and almost no elements: its step time is the
# fixed cost of a step (Python, dispatch, compiled-call guards), what weighs at 10M and not at 85M
SIZES = {"6x16": (6, 2, 16), "4x128": (4, 4, 128), "6x384": (6, 6, 384), "12x768": (12, 12, 768)}
ROWS = {   # row key: its label in the table
    "torch_adamw_fused": "torch AdamW (fused)",
    "torch_adamw_foreach": "torch AdamW (foreach)",
    "torch_sgd_fused": "torch SGD momentum (fused)",
    "adamw_fused": "AdamW (ours, fused)",
    "adamw_eager": "AdamW (ours, eager foreach)",
    "sgd_sai_fused": "SGD-SaI (ours, fused)",
    "sgd_sai_eager": "SGD-SaI (ours, eager)",
    "adam_mini_fused": "Adam-mini (ours, fused)",
    "adam_mini_eager": "Adam-mini (ours, eager foreach)",
    "apollo_fused": "APOLLO (ours, fused)",
    "apollo_mini_fused": "APOLLO-Mini (ours, fused)",
    "apollo_mini_eager": "APOLLO-Mini (ours, eager)",
    "muon": "Muon (ours, + AdamW)",
    "torch_muon": "torch Muon (+ torch AdamW)",
    "adafactor_fused": "Adafactor (ours, fused)",
    "adafactor_eager": "Adafactor (ours, eager)",
    "torch_adafactor": "torch Adafactor (foreach)",
    "official_sgd_sai": "SGD_sai (official 1.0.3)",
    "official_adam_mini": "Adam_mini (official 1.1.1)",
}
OFFICIAL = {"official_sgd_sai": "sgd_sai", "official_adam_mini": "adam_mini"}   # row: module
# floats per parameter an update must read and write (the docstring says why)
TRAFFIC = {"adamw": 7, "sgd": 5, "adam_mini": 5, "projected": 4, "muon": 5,
           "adafactor": 6, "adafactor_vector": 8}
TARGETS = [   # (row, against, at most): step time over another row's; ours on its default path
    ("adamw_fused", "torch_adamw_fused", 1.15),
    ("sgd_sai_fused", "torch_sgd_fused", 1.15),
    ("adam_mini_fused", "torch_adamw_fused", 0.85),
    ("apollo_mini_fused", "torch_adamw_fused", 1.2),
    ("apollo_fused", "torch_adamw_fused", 3.0),
    ("sgd_sai_fused", "official_sgd_sai", 1.0),
    ("adam_mini_fused", "official_adam_mini", 0.5),
]
# ours on its default path: the rows the bound and memory targets check
DEFAULT_PATHS = ("adamw_fused", "sgd_sai_fused", "adam_mini_fused", "apollo_fused",
                 "apollo_mini_fused", "muon", "adafactor_fused")
BOUND_TARGET = 1.5      # every row of ours within this of its bound, APOLLO's compute included
PEAK_TARGET = 0.1       # peak memory beyond params, grads and state, in model sizes


@dataclass
class BenchConfig:
    what: str = option("steps", "steps (optimizer.step timings), overhead (the trainer's), "
                                "per_example (per-example statistics against a plain backward) "
                                "or memory (a training step's memory, two ways)")
    sizes: str = option("4x128,6x384,12x768", f"GPT sizes (layers x width): {', '.join(SIZES)}")
    rows: str = option("all", "comma-separated rows (all: every one installed): "
                       + ", ".join(ROWS))
    steps: int = option(30, "timed steps per row and size, split over the rounds")
    rounds: int = option(3, "rounds the rows take turns in (a rotating order)")
    threads: int = option(1, "torch threads per process (0: torch's default)")
    device: str = option("cpu", "cpu, cuda, cuda:N, mps or auto")
    results: str = option("", "JSON-lines file keeping each finished row and round: a run "
                               "stopped part-way, started again with it, measures only the rest")
    data_path: str = option("", "tiny shakespeare for --what=overhead (as nanogpt_sai.py)")
    row: str = option("", "(internal) the one row a child process times")
    result_path: str = option("", "(internal) where a child process writes its timings")


def gpt(size, device):
    torch.manual_seed(0)
    layers, heads, width = SIZES[size]
    with torch.device(device):      # built there ("meta": shapes only), weight tying kept
        return GPT(Config(n_layer=layers, n_head=heads, n_embd=width, block_size=256),
                   vocab_size=65)


def build(row, model):
    """Row `row`'s optimizer for `model`, hyperparameters as the trainer's."""
    groups = optim.decay_groups(model.parameters(), 0.1)
    adam = dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1)
    if row == "torch_adamw_fused":
        return torch.optim.AdamW(groups, **adam, fused=True)
    if row == "torch_adamw_foreach":
        return torch.optim.AdamW(groups, **adam, foreach=True)
    if row == "torch_sgd_fused":
        return torch.optim.SGD(groups, lr=1e-2, momentum=0.9, fused=True)
    if row == "torch_muon":
        return TorchMuonWithAdamW(model)
    if row == "torch_adafactor":
        return torch.optim.Adafactor(groups, lr=1e-2, foreach=True)
    if row == "official_sgd_sai":
        from sgd_sai import SGD_sai
        return SGD_sai(groups, lr=1e-2, weight_decay=0.1)
    if row == "official_adam_mini":
        from adam_mini import Adam_mini
        return Adam_mini(model.named_parameters(), **adam, dim=model.lm_head.in_features,
                         n_heads=model.n_head, verbose=False)
    name = row.removesuffix("_eager").removesuffix("_fused")
    hparams = dict(adam) if name not in ("sgd_sai", "adafactor") else dict(lr=1e-2,
                                                                            weight_decay=0.1)
    if name != "muon":
        hparams["fused"] = row.endswith("_fused")
    return optim.build_optimizer(name, model, **hparams)


class TorchMuonWithAdamW:
    """torch.optim.Muon on the matrices optim's Muon orthogonalises, torch's foreach AdamW on the
    rest, as one optimizer with one state: the reference for "Muon (ours, + AdamW)"."""

    def __init__(self, model):
        hidden = set(optim.projected_params(model))
        self.parts = [torch.optim.Muon([p for p in model.parameters() if p in hidden], lr=1e-3,
                                       weight_decay=0.1, adjust_lr_fn="match_rms_adamw"),
                      torch.optim.AdamW(optim.decay_groups(
                          [p for p in model.parameters() if p not in hidden], 0.1), lr=1e-3,
                          betas=(0.9, 0.99), foreach=True)]
        self.state = {p: s for part in self.parts for p, s in part.state.items()}

    def step(self):
        for part in self.parts:
            part.step()
        self.state = {p: s for part in self.parts for p, s in part.state.items()}


def traffic_floats(row, model):
    """Floats the update of `row` must read and write per step (the docstring's counts)."""
    name = row.removeprefix("torch_").removeprefix("official_").removesuffix("_eager")
    name = name.removesuffix("_fused").removesuffix("_foreach")
    if name in ("apollo", "apollo_mini", "muon"):
        matrices = set(optim.projected_params(model))
        words = TRAFFIC["projected" if name != "muon" else "muon"]
        return sum(p.numel() * (words if p in matrices else TRAFFIC["adamw"])
                   for p in model.parameters())
    if name == "adafactor":                       # factored: every tensor of 2 dims or more
        return sum(p.numel() * TRAFFIC["adafactor" if p.dim() >= 2 else "adafactor_vector"]
                   for p in model.parameters())
    words = TRAFFIC["sgd" if name in ("sgd", "sgd_sai") else name]
    return words * sum(p.numel() for p in model.parameters())


def projection_flops(row, model):
    """APOLLO's matrix products per step: R = P G (2 r k N flops per matrix); 0 for others."""
    if not row.startswith("apollo"):
        return 0
    rank = 1 if row.startswith("apollo_mini") else None
    return sum(2 * optim.projection_rank(rank, p.shape) * p.numel()
               for p in optim.projected_params(model))


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def free_memory_at_once():
    """From here on, glibc's malloc gives each block of 64 KiB or more back to the system when it
    is freed. By default it keeps freed blocks up to an adaptive threshold (up to 32 MiB) for
    reuse, so that the resident set's peak follows the order of allocations, not only what a step
    holds at once: the same Muon step measured 0.085x to 0.155x the 10.75M model in three runs.
    With it, the CPU's peak counts live memory, as CUDA's allocated peak does. Only for the
    memory step: it would make every step with temporaries map them afresh."""
    m_trim_threshold, m_mmap_threshold = -1, -3                  # glibc's mallopt parameters
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(m_mmap_threshold, 64 * 1024)
        libc.mallopt(m_trim_threshold, 64 * 1024)


def release_freed_memory(device):
    """Give freed memory back (glibc's malloc_trim; CUDA's cache), so that the peak of the
    next steps counts every temporary they allocate, not what an earlier step left mapped."""
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")                                     # reset the peak resident set


def memory_now_and_peak(device):
    """(bytes in use, peak bytes since release_freed_memory): CUDA allocated, or resident set."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated(device), torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f)
        return (int(fields["VmRSS"].split()[0]) * 1024, int(fields["VmHWM"].split()[0]) * 1024)
    except (OSError, KeyError):                   # not Linux: no peak to report
        return 0, 0


def time_row(cfg):
    """The child process: cfg.steps timed steps of cfg.row on one GPT, as JSON."""
    device = pick_device(cfg.device)
    model = gpt(cfg.sizes, device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    with contextlib.redirect_stdout(io.StringIO()):          # the official packages print
        opt = build(cfg.row, model)
        for _ in range(3):                                   # lazy state, g-SNR, compiling
            opt.step()
    times = []
    for _ in range(cfg.steps):
        sync(device)
        t0 = time.perf_counter()
        opt.step()
        sync(device)
        times.append(time.perf_counter() - t0)
    free_memory_at_once()
    release_freed_memory(device)
    before, _ = memory_now_and_peak(device)
    opt.step()                                               # the memory step, untimed
    sync(device)
    _, peak = memory_now_and_peak(device)
    result = dict(times=times, extra_bytes=max(0, peak - before),
                  state_bytes=optim.state_bytes(opt),
                  projected_state_bytes=optim.state_bytes(opt, optim.projected_params(model)),
                  fused=opt.fused() if isinstance(opt, BaseOptimizer) else None)
    with open(cfg.result_path, "w") as f:
        json.dump(result, f)


def machine_rates(size, device):
    """(in-place axpy bandwidth in bytes/s, float32 matmul rate in flops/s), best of 5: the
    denominators of the bounds, measured in the round they bound."""
    x = torch.rand(2 ** 24, device=device)              # 64 MiB each: far beyond the caches
    y = torch.rand(2 ** 24, device=device)
    width = SIZES[size][2]
    g = torch.rand(4 * width, width, device=device)
    p = torch.rand(width // 4, width, device=device)
    axpy, matmul = [], []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        y.add_(x, alpha=0.5)
        sync(device)
        axpy.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        g @ p.T
        sync(device)
        matmul.append(time.perf_counter() - t0)
    return 3 * 4 * x.numel() / min(axpy), 2 * g.numel() * p.shape[0] / min(matmul)


def bench_steps(cfg):
    device = pick_device(cfg.device)
    sizes = cfg.sizes.split(",")
    rows = list(ROWS) if cfg.rows == "all" else cfg.rows.split(",")
    for size in sizes:
        if size not in SIZES:
            raise ConfigError(f"--sizes: unknown size {size!r}; choose from {', '.join(SIZES)}")
    for row in rows:
        if row not in ROWS:
            raise ConfigError(f"--rows: unknown row {row!r}; choose from {', '.join(ROWS)}")
    if cfg.rows == "all":                              # the official packages, if installed
        rows = [r for r in rows if r not in OFFICIAL or _importable(OFFICIAL[r])]
    per_round = max(1, cfg.steps // cfg.rounds)
    saved = open_results(cfg.results, dict(machine=machine(device).split(" | ", 1)[1],
                                           steps_per_round=per_round))
    print(machine(device) + f" | load average {os.getloadavg()[0]:.2f} | median of "
          f"{per_round * cfg.rounds} steps in {cfg.rounds} rotating rounds, one process per "
          "row and round" + (f" | {len(saved)} results from {cfg.results}" if saved else ""))

    def measured(size, round_, row, measure):
        """The saved result of (size, round, row), else measure() appended to --results."""
        if (size, round_, row) not in saved:
            saved[size, round_, row] = measure()
            if cfg.results:
                with open(cfg.results, "a") as f:
                    f.write(json.dumps(dict(size=size, round=round_, row=row,
                                            result=saved[size, round_, row])) + "\n")
        return saved[size, round_, row]

    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            results, rates = {row: [] for row in rows}, []
            for round_ in range(cfg.rounds):
                rates.append(measured(size, round_, "machine rates",
                                      lambda: machine_rates(size, device)))
                for row in rows[round_ % len(rows):] + rows[:round_ % len(rows)]:
                    print(f"  {size} round {round_ + 1}/{cfg.rounds}: {ROWS[row]}"
                          + (" (saved)" if (size, round_, row) in saved else ""),
                          file=sys.stderr, flush=True)
                    results[row].append(measured(size, round_, row,
                                                 lambda: time_in_process(cfg, tmp, size, row,
                                                                         per_round, device)))
            report(size, device, rows, results, rates)


def time_in_process(cfg, tmp, size, row, steps, device):
    """Row `row`'s timings at `size` from a child process of its own (time_row)."""
    result_path = os.path.join(tmp, "result.json")
    argv = [f"--row={row}", f"--sizes={size}", f"--steps={steps}", f"--device={device}",
            f"--threads={cfg.threads}", f"--result_path={result_path}"]
    status = run_in_process(__file__, argv, os.path.join(tmp, "child.log"),
                            threads=cfg.threads or None)
    if status != 0:
        with open(os.path.join(tmp, "child.log")) as f:
            raise RuntimeError(f"{ROWS[row]} at {size} failed:\n{f.read()}")
    with open(result_path) as f:
        return json.load(f)


def open_results(path, settings):
    """The results saved in `path` by earlier runs with the same `settings` (machine, torch,
    threads, steps per round), keyed (size, round, row); a new file starts with the settings.
    A line cut short by a kill is dropped (its row is measured again)."""
    if not path:
        return {}
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        with open(path, "w") as f:
            f.write(json.dumps(dict(settings=settings)) + "\n")
        return {}
    lines, text = [], []
    with open(path) as f:
        for line in f:
            with contextlib.suppress(json.JSONDecodeError):
                lines.append(json.loads(line))
                text.append(line.rstrip("\n") + "\n")
    if not lines or lines[0] != dict(settings=settings):
        raise ConfigError(f"--results={path} holds results measured with other settings "
                          f"({lines[0] if lines else 'none readable'}; this run: {settings}): "
                          "give a new file, or delete that one")
    if os.path.getsize(path) != sum(map(len, text)):      # a cut line: the next would join it
        with open(path, "w") as f:
            f.writelines(text)
    return {(r["size"], r["round"], r["row"]): r["result"] for r in lines[1:]}


def _importable(module):
    try:
        __import__(module)
    except ImportError:
        return False
    return True


def report(size, device, rows, results, rates):
    model = gpt(size, "meta")
    n_params = sum(p.numel() for p in model.parameters())
    bandwidth = statistics.median(r[0] for r in rates)
    flop_rate = statistics.median(r[1] for r in rates)
    step = {row: statistics.median(t for r in results[row] for t in r["times"]) for row in rows}
    base_row = "torch_adamw_fused" if "torch_adamw_fused" in rows else rows[0]
    adamw_state = 2 * 4 * n_params
    bound = {row: 4 * traffic_floats(row, model) / bandwidth
             + projection_flops(row, model) / flop_rate for row in rows}
    print()
    print(f"GPT {size} ({n_params / 1e6:.2f}M params) | axpy bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s | matmul {flop_rate / 1e9:.0f} GFLOP/s")
    print()
    print(f"| optimizer | ns/param | step ms | middle half ms | vs {ROWS[base_row]} | x bound | "
          "peak extra (x model) | state MiB | state vs AdamW |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        ms = [1000 * t for r in results[row] for t in r["times"]]
        q1, _, q3 = statistics.quantiles(ms, n=4) if len(ms) > 1 else ms * 3
        extra = max(r["extra_bytes"] for r in results[row]) / (4 * n_params)
        state = results[row][0]["state_bytes"]
        print(f"| {ROWS[row]} | {1e9 * step[row] / n_params:.2f} | {1000 * step[row]:.2f} | "
              f"{q1:.2f}-{q3:.2f} | {step[row] / step[base_row]:.2f}x | "
              f"{step[row] / bound[row]:.2f}x | {extra:.3f} | {state / MIB:.2f} | "
              f"{state / adamw_state:.3f}x |")
    print()
    for row, against, target in TARGETS:
        if row in rows and against in rows:
            check(f"{ROWS[row]} step", step[row] / step[against], ROWS[against], target)
    for row in (r for r in rows if r in DEFAULT_PATHS):
        if row != "muon":           # Newton-Schulz's bfloat16 matmuls: no bound measured for them
            what = "its memory-traffic + matmul bound" if projection_flops(row, model) else \
                "its memory-traffic bound"
            check(f"{ROWS[row]} step", step[row] / bound[row], what, BOUND_TARGET)
        extra = max(r["extra_bytes"] for r in results[row]) / (4 * n_params)
        check(f"{ROWS[row]} peak extra memory", extra, "the model's size", PEAK_TARGET)
    mini_rows = [r for r in rows if r.startswith("apollo_mini")]
    if mini_rows:
        projected = optim.projected_params(model)
        mini = results[mini_rows[0]][0]["projected_state_bytes"]
        check(f"APOLLO-Mini state of the {len(projected)} projected matrices",
              mini / (2 * 4 * sum(p.numel() for p in projected)),
              "AdamW's for the same matrices", 0.01)


def check(what, ratio, against, target):
    verdict = "met" if ratio <= target else "MISSED"
    print(f"- {what}: {ratio:.3f}x {against} (target <= {target}x): {verdict}")


def machine(device):
    """One line naming what the figures were measured on."""
    cpu = platform.processor()
    if sys.platform == "linux":
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    if device.startswith("cuda"):
        cpu = torch.cuda.get_device_name(device)
    return (f"{time.strftime('%Y-%m-%d')} | {cpu} | {torch.get_num_threads()} threads | torch "
            f"{torch.__version__} | {device}")


def bench_overhead(cfg):
    """ms/iter of a plain training loop against nanogpt_sai.py's, on the default baby GPT."""
    device = pick_device(cfg.device)
    gpt_cfg = nanogpt_sai.resolve_config(["--preset=cpu", f"--device={device}",
                                          "--dtype=float32", "--sample_tokens=0"])
    data = load_text(gpt_cfg.dataset, data_dir=gpt_cfg.data_dir, text_path=cfg.data_path,
                     log=lambda line: None)
    tokens = torch.from_numpy(data.train.astype("int64"))

    def plain_loop():
        torch.manual_seed(0)
        model = GPT(gpt_cfg, data.vocab_size).to(device)
        opt = optim.build_optimizer("sgd_sai", model, lr=gpt_cfg.lr, weight_decay=0.1)
        gen = torch.Generator().manual_seed(0)
        t0 = time.perf_counter()
        for _ in range(cfg.steps):
            x, y = sample_batch(tokens, gpt_cfg.block_size, gpt_cfg.batch_size, gen)
            _, loss = model(x.to(device), y.to(device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        loss.item()     # waits for the last step (on a GPU); nothing is read between steps
        return (time.perf_counter() - t0) / cfg.steps

    def trainer(log_interval, out_dir):
        args = ["--preset=cpu", f"--device={device}", "--sample_tokens=0",
                "--eval_sample_tokens=0",
                f"--max_iters={cfg.steps + 1}", f"--eval_interval={cfg.steps + 1}",
                "--eval_iters=1", f"--log_interval={log_interval}", f"--out_dir={out_dir}",
                f"--data_path={cfg.data_path}"]
        with contextlib.redirect_stdout(io.StringIO()):
            nanogpt_sai.main(args)
        with open(os.path.join(out_dir, "metrics.jsonl")) as f:
            train = [r for r in map(json.loads, f) if r["event"] == "train"]
        return (train[-1]["wall_s"] - train[0]["wall_s"]) / (train[-1]["step"] - train[0]["step"])

    sparse = min(gpt_cfg.log_interval, max(1, cfg.steps // 4))   # the default, if it fits
    results = {"plain loop": [], "trainer, log every step": [],
               f"trainer, log every {sparse}": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(cfg.rounds):
            results["plain loop"].append(plain_loop())
            results["trainer, log every step"].append(
                trainer(1, os.path.join(tmp, f"every-{round_}")))
            results[f"trainer, log every {sparse}"].append(
                trainer(sparse, os.path.join(tmp, f"sparse-{round_}")))
    print(f"{machine(device)} | baby GPT (nanoGPT CPU config), SGD-SaI | {cfg.steps} steps, "
          f"median of {cfg.rounds} interleaved rounds")
    print()
    print("| loop | ms/iter | vs plain loop |")
    print("|---|---:|---:|")
    base = statistics.median(results["plain loop"])
    for name, values in results.items():
        ms = statistics.median(values)
        print(f"| {name} | {1000 * ms:.1f} | {ms / base:.3f}x |")


# --what=per_example: the batch (examples x positions) of each model; the GPTs' 4x128 is the
# cpu preset, 6x384 the gpu preset's shapes, "vit" vit_sai.py's default (Fashion-MNIST's 28x28
# in 4x4 patches: 50 positions)
PER_EXAMPLE_BATCHES = {"6x16": (4, 16), "4x128": (12, 64), "6x384": (64, 256),
                       "12x768": (12, 1024), "vit": (128, 50)}
PER_EXAMPLE_TARGET = 1.3   # surgery against a plain forward + backward (arXiv 2510.00236)


def per_example_case(size, device):
    """(model, loss_of, inputs, targets) of one --what=per_example size, seeded."""
    g = torch.Generator().manual_seed(0)
    n, positions = PER_EXAMPLE_BATCHES[size]
    if size == "vit":
        torch.manual_seed(0)
        model = vit_sai.ViT(vit_sai.Config(), image_size=28, channels=1, num_classes=10)
        x, y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
        return model.to(device), F.cross_entropy, x.to(device), y.to(device)
    x, y = (torch.randint(0, 65, (n, positions), generator=g).to(device) for _ in range(2))
    return gpt(size, device), nanogpt_sai.sequence_loss, x, y


def per_example_paths(model, loss_of, x, y):
    """The three passes --what=per_example compares, by name."""
    return {"plain": lambda: loss_of(model(x), y).backward(),
            "vmap": lambda: per_example.batch_statistics(model, loss_of, x, y, method="vmap"),
            "surgery": lambda: per_example.batch_statistics(model, loss_of, x, y)}


def sums_alone(model, n):
    """Seconds of the three sums by themselves: per_example.add_example n times on every
    weight's shape, in place on a gradient kept in the cache (sign_ of +-1 costs what sign_ of
    anything does): the elementwise work any implementation of the statistics adds to a plain
    backward, done with eager torch operations."""
    total = 0.0
    for p in model.parameters():
        g, sums = torch.randn_like(p), [torch.zeros_like(p) for _ in per_example.KEYS]
        per_example.add_example(sums, g)
        sync(str(p.device))
        t0 = time.perf_counter()
        for _ in range(n):
            per_example.add_example(sums, g)
        sync(str(p.device))
        total += time.perf_counter() - t0
    return total


def bench_per_example(cfg):
    """Seconds and peak memory of per_example.batch_statistics by its two paths, vmap and
    surgery, against a plain forward and backward of the same batch (rounds interleaved,
    median of --steps per round), with the bound the surgery is compared with: the plain
    forward + backward plus the three sums alone (`sums_alone`). Peak extra: the memory a
    pass takes beyond what a plain one takes, in model sizes (bench's memory step, once per
    path after the timed ones)."""
    device = pick_device(cfg.device)
    sizes = cfg.sizes.split(",")
    for size in sizes:
        if size not in PER_EXAMPLE_BATCHES:
            raise ConfigError(f"--sizes: unknown size {size!r} for --what=per_example; choose "
                              f"from {', '.join(PER_EXAMPLE_BATCHES)}")
    print(f"{machine(device)} | load average {os.getloadavg()[0]:.2f} | median of {cfg.steps} "
          f"passes in each of {cfg.rounds} interleaved rounds")
    print()
    print("| model | examples x positions | plain forward + backward s | vmap s | surgery s | "
          "plain + sums alone s | peak extra, model sizes: vmap / surgery |")
    print("|---|---|---:|---:|---:|---:|---:|")
    timed = {}
    for size in sizes:
        model, loss_of, x, y = per_example_case(size, device)
        paths = per_example_paths(model, loss_of, x, y)
        times = {name: [] for name in paths}
        for _ in range(cfg.rounds):
            for name, fn in paths.items():
                for _ in range(cfg.steps):
                    model.zero_grad(set_to_none=True)
                    sync(device)
                    t0 = time.perf_counter()
                    fn()
                    sync(device)
                    times[name].append(time.perf_counter() - t0)
        timed[size] = [statistics.median(times[k]) for k in paths]
        timed[size].append(timed[size][0] + sums_alone(model, len(x)))
    free_memory_at_once()   # from here on the peaks count live memory (time_row's memory step)
    verdicts = []
    for size in sizes:
        model, loss_of, x, y = per_example_case(size, device)
        extra = {}
        for name, fn in per_example_paths(model, loss_of, x, y).items():
            model.zero_grad(set_to_none=True)
            release_freed_memory(device)
            before, _ = memory_now_and_peak(device)
            fn()
            sync(device)
            extra[name] = max(0, memory_now_and_peak(device)[1] - before)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        vm, sg = ((extra[k] - extra["plain"]) / model_bytes for k in ("vmap", "surgery"))
        plain, vmap, surgery, bound = timed[size]
        n, positions = PER_EXAMPLE_BATCHES[size]
        print(f"| {size} | {n} x {positions} | {plain:.4g} | {vmap:.4g} ({vmap / plain:.2f}x) | "
              f"{surgery:.4g} ({surgery / plain:.2f}x) | {bound:.4g} ({bound / plain:.2f}x) | "
              f"{vm:.1f} / {sg:.1f} |")
        verdicts.append((size, surgery / plain, bound / plain))
    print()
    for size, ratio, bound in verdicts:
        print(f"- {size} surgery: {ratio:.2f}x a plain forward + backward (target <= "
              f"{PER_EXAMPLE_TARGET}x): {'met' if ratio <= PER_EXAMPLE_TARGET else 'MISSED'}; "
              f"its bound (the three sums alone added) {bound:.2f}x")


# --what=memory: a step's memory at the trainers' micro-batch (the GPT's cpu preset, 12 x 64)
MEMORY_TARGET = 0.10   # the resident set's step peak within 10% of the tensors counted


def memory_row(cfg):
    """The child process of --what=memory: optimizer cfg.row on GPT cfg.sizes at batch 12 x 64,
    two warm steps (kernels, the optimizer's state), then one step measured from outside (the
    resident set's peak, live memory only: free_memory_at_once) and one counted from inside
    (memory.LiveTensorBytes), as JSON."""
    device = pick_device(cfg.device)
    free_memory_at_once()
    layers, heads, width = SIZES[cfg.sizes]
    torch.manual_seed(0)
    model = GPT(Config(n_layer=layers, n_head=heads, n_embd=width, block_size=64),
                vocab_size=65).to(device)
    x, y = (torch.randint(0, 65, (12, 64), generator=torch.Generator().manual_seed(i))
            .to(device) for i in (0, 1))
    with contextlib.redirect_stdout(io.StringIO()):
        opt = optim.build_optimizer(cfg.row, model, lr=1e-3)

    def step():
        model(x, y)[1].backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    for _ in range(2):
        step()
    release_freed_memory(device)
    before, _ = memory_now_and_peak(device)
    step()
    sync(device)
    _, peak = memory_now_and_peak(device)
    with memory.LiveTensorBytes(device.split(":")[0]) as live:
        step()
    state = memory.model_state_bytes(model, opt)
    with open(cfg.result_path, "w") as f:
        json.dump(dict(state, measured=max(0, peak - before), counted=live.peak), f)


def bench_memory(cfg):
    """(a) model state and (b) a training step's memory, per optimizer, each in a process of
    its own: what the step holds before it starts (parameters and state) plus the peak of what
    it allocates, counted by memory.LiveTensorBytes and measured by the resident set (CUDA's
    allocated peak on a GPU)."""
    device = pick_device(cfg.device)
    names = list(optim.OPTIMIZERS) if cfg.rows == "all" else cfg.rows.split(",")
    for name in names:
        if name not in optim.OPTIMIZERS:
            raise ConfigError(f"--rows: unknown optimizer {name!r} for --what=memory; choose "
                              f"from {', '.join(optim.OPTIMIZERS)}")
    print(f"{machine(device)} | a training step of the GPT at batch 12 x 64, MiB")
    worst = 0.0
    for size in cfg.sizes.split(","):
        if size not in SIZES:
            raise ConfigError(f"--sizes: unknown size {size!r}; choose from {', '.join(SIZES)}")
        print(f"\n{size}\n")
        print("| optimizer | (a) params + grads + state | step's own peak: counted | measured "
              "| measured / counted | (b) params + state + step's peak | (b) / (a) |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        with tempfile.TemporaryDirectory() as tmp:
            for name in names:
                path = os.path.join(tmp, "result.json")
                status = run_in_process(__file__, [
                    "--what=memory", f"--row={name}", f"--sizes={size}", f"--device={device}",
                    f"--result_path={path}"], os.path.join(tmp, "child.log"),
                    threads=cfg.threads or None)
                if status != 0:
                    with open(os.path.join(tmp, "child.log")) as f:
                        raise RuntimeError(f"{name} at {size} failed:\n{f.read()}")
                with open(path) as f:
                    r = json.load(f)
                need = r["params"] + r["state"] + r["counted"]
                ratio = r["measured"] / r["counted"]
                worst = max(worst, abs(ratio - 1))
                print(f"| {name} | {r['total'] / 2**20:.2f} | {r['counted'] / 2**20:.2f} | "
                      f"{r['measured'] / 2**20:.2f} | {ratio:.3f} | {need / 2**20:.2f} | "
                      f"{need / r['total']:.2f}x |")
    print(f"\n- the measured step peak against the counted one: within {100 * worst:.1f}% "
          f"(target <= {100 * MEMORY_TARGET:.0f}%): "
          f"{'met' if worst <= MEMORY_TARGET else 'MISSED'}")


def main(argv):
    try:
        cfg, _ = parse_args(BenchConfig(), argv, __doc__.strip().splitlines()[0])
        if cfg.what not in ("steps", "overhead", "per_example", "memory"):
            raise ConfigError(f"--what must be steps, overhead, per_example or memory, got "
                              f"{cfg.what!r}")
        check_positive(cfg, "steps", "rounds")
        if cfg.threads < 0:
            raise ConfigError(f"--threads must be >= 0 (0: torch's default), got {cfg.threads}")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        if cfg.row and cfg.what == "memory":
            memory_row(cfg)
        elif cfg.row:
            time_row(cfg)
        elif cfg.what == "steps":
            bench_steps(cfg)
        elif cfg.what == "per_example":
            bench_per_example(cfg)
        elif cfg.what == "memory":
            bench_memory(cfg)
        else:
            bench_overhead(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
