"""
Optimizer step time and state memory on nanoGPT's 6-layer, 384-wide GPT (~10.7M parameters),
and the trainer's own overhead.

    python bench.py                    # CPU, median of 30 timed steps per optimizer
    python bench.py --steps=60 --device=cuda
    python bench.py --what=overhead    # nanogpt_sai.py's ms/iter against a plain loop

Times optimizer.step() alone (gradients are fixed random tensors, set once), for our optimizers
and the references: torch.optim.AdamW (foreach and per-tensor), official SGD_sai 1.0.3 and
official Adam_mini 1.1.1 (if installed: `pip install -r requirements-test.txt`). Rounds are
interleaved so that drift in machine speed hits every optimizer alike. Prints a markdown table,
then each optimizer against its targets (SGD-SaI <= 0.4x torch AdamW (foreach) and no slower
than the official SGD_sai; Adam-mini <= 0.5x the official Adam_mini and <= 1.2x torch AdamW;
APOLLO-Mini's state of the projected matrices < 1% of AdamW's for the same matrices and its
step <= 1.5x torch AdamW). The timed steps reuse a cached random projection: APOLLO draws P
again only every update_proj_gap (200) steps.

On CPU, an optimizer that allocates tensor-sized temporaries every step (the official Adam_mini,
AdamW's sqrt(v)) is timed partly on the allocator (glibc serves a large block from its heap, or
maps fresh pages that fault on first touch), so such rows move between runs and processes: the
official Adam_mini measured 13.7 to 42 ms on one machine, 60 ms with MALLOC_MMAP_THRESHOLD_=65536.
Compare ratios from one run, and look at the middle half of the timed steps.

--what=overhead trains the default baby GPT (SGD-SaI) three ways, interleaved: a plain loop
(batch, forward, backward, clip, step, nothing else), nanogpt_sai.py logging every step (console
line, metrics line, memory probes, progress bar) and nanogpt_sai.py with its default logging.
For the trainer, ms/iter is wall-clock between its first and last metrics lines, logging included.
"""
import contextlib
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

import nanogpt_sai
import optim
from cli import ConfigError, check_positive, option, parse_args, pick_device
from data.text import load_text, sample_batch
from nanogpt_sai import GPT, Config

MIB = 2 ** 20


@dataclass
class BenchConfig:
    steps: int = option(30, "timed steps per optimizer")
    rounds: int = option(3, "interleaved rounds the steps are split into")
    device: str = option("cpu", "cpu, cuda, cuda:N, mps or auto")
    what: str = option("steps", "steps (optimizer.step timings) or overhead (the trainer's)")
    data_path: str = option("", "tiny shakespeare for --what=overhead (as nanogpt_sai.py)")


def candidates(model):
    """name -> function building that optimizer for `model` (hyperparameters as the trainer's)."""
    def groups():   # fresh dicts for each: torch's optimizers write their defaults into them
        return optim.decay_groups(model.parameters(), 0.1)

    out = {
        "torch AdamW (foreach)": lambda: torch.optim.AdamW(groups(), lr=1e-3, betas=(0.9, 0.99),
                                                           foreach=True),
        "torch AdamW (per-tensor)": lambda: torch.optim.AdamW(groups(), lr=1e-3,
                                                              betas=(0.9, 0.99), foreach=False),
        "AdamW (ours, foreach)": lambda: optim.build_optimizer(
            "adamw", model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        "AdamW (ours, per-tensor)": lambda: optim.build_optimizer(
            "adamw", model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, foreach=False),
        "SGD-SaI (ours)": lambda: optim.build_optimizer("sgd_sai", model, lr=1e-2,
                                                        weight_decay=0.1),
        "Adam-mini (ours)": lambda: optim.build_optimizer(
            "adam_mini", model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        "Adam-mini (ours, per-tensor)": lambda: optim.build_optimizer(
            "adam_mini", model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, foreach=False),
        "APOLLO (ours)": lambda: optim.build_optimizer(
            "apollo", model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        "APOLLO-Mini (ours)": lambda: optim.build_optimizer(
            "apollo_mini", model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        "Muon (ours, + AdamW)": lambda: optim.build_optimizer(
            "muon", model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        "torch Muon (+ torch AdamW)": lambda: TorchMuonWithAdamW(model),
        "Adafactor (ours)": lambda: optim.build_optimizer("adafactor", model, lr=1e-2,
                                                          weight_decay=0.1),
        "torch Adafactor (foreach)": lambda: torch.optim.Adafactor(groups(), lr=1e-2,
                                                                   foreach=True),
    }
    with contextlib.suppress(ImportError):
        from sgd_sai import SGD_sai
        out["SGD_sai (official 1.0.3)"] = lambda: SGD_sai(groups(), lr=1e-2, weight_decay=0.1)
    with contextlib.suppress(ImportError):
        from adam_mini import Adam_mini
        out["Adam_mini (official 1.1.1)"] = lambda: Adam_mini(
            model.named_parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1,
            dim=384, n_heads=6, verbose=False)
    return out


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


def bench_steps(cfg):
    device = pick_device(cfg.device)
    torch.manual_seed(0)
    model = GPT(Config(n_layer=6, n_head=6, n_embd=384, block_size=256), vocab_size=65)
    model.to(device)
    n_params = sum(p.numel() for p in model.parameters())
    grads = [torch.randn_like(p) * 1e-3 for p in model.parameters()]
    initial = [p.detach().clone() for p in model.parameters()]

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    optimizers, times = {}, {}
    with contextlib.redirect_stdout(io.StringIO()):      # the official packages print
        for name, build in candidates(model).items():
            optimizers[name] = build()
            times[name] = []
    for round_ in range(cfg.rounds + 1):                  # round 0 warms up (lazy state, g-SNR)
        for name, opt in optimizers.items():
            with torch.no_grad():
                for p, g, p0 in zip(model.parameters(), grads, initial):
                    p.copy_(p0)
                    p.grad = g
            for _ in range(cfg.steps // cfg.rounds if round_ else 3):
                sync()
                t0 = time.perf_counter()
                with contextlib.redirect_stdout(io.StringIO()):
                    opt.step()
                sync()
                if round_:
                    times[name].append(time.perf_counter() - t0)

    median = {name: statistics.median(t) for name, t in times.items()}
    base = median["torch AdamW (foreach)"]
    adamw_state = optim.state_bytes(optimizers["AdamW (ours, foreach)"])
    print(f"{machine(device)} | GPT 6x384, {n_params / 1e6:.2f}M params | median of "
          f"{len(times[next(iter(times))])} steps")
    print()
    print("| optimizer | step ms | middle half ms | vs torch AdamW (foreach) | state MiB | "
          "state vs AdamW |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, opt in optimizers.items():
        ms = 1000 * median[name]
        steps_ms = [1000 * t for t in times[name]]
        q1, _, q3 = statistics.quantiles(steps_ms, n=4) if len(steps_ms) > 1 else steps_ms * 3
        state = optim.state_bytes(opt)
        print(f"| {name} | {ms:.2f} | {q1:.1f}-{q3:.1f} | {ms / 1000 / base:.2f}x | "
              f"{state / MIB:.2f} | {state / adamw_state:.3f}x |")

    projected = optim.projected_params(model)
    mini_state = optim.state_bytes(optimizers["APOLLO-Mini (ours)"], projected)
    adamw_projected = optim.state_bytes(optimizers["AdamW (ours, foreach)"], projected)
    print()
    targets = [("SGD-SaI step", median["SGD-SaI (ours)"] / base, "torch AdamW (foreach)", 0.4)]
    if "SGD_sai (official 1.0.3)" in median:
        targets.append(("SGD-SaI step", median["SGD-SaI (ours)"] / median[
            "SGD_sai (official 1.0.3)"], "official SGD_sai", 1.0))
    if "Adam_mini (official 1.1.1)" in median:
        targets.append(("Adam-mini step", median["Adam-mini (ours)"] / median[
            "Adam_mini (official 1.1.1)"], "official Adam_mini", 0.5))
    targets += [("Adam-mini step", median["Adam-mini (ours)"] / base, "torch AdamW (foreach)",
                 1.2),
                ("APOLLO-Mini step", median["APOLLO-Mini (ours)"] / base,
                 "torch AdamW (foreach)", 1.5),
                (f"APOLLO-Mini state of the {len(projected)} projected matrices",
                 mini_state / adamw_projected, "AdamW's for the same matrices", 0.01)]
    for what, ratio, against, target in targets:
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
            loss.item()     # the trainer reads the loss every step too (divergence check)
        return (time.perf_counter() - t0) / cfg.steps

    def trainer(log_interval, out_dir):
        args = ["--preset=cpu", f"--device={device}", "--sample_tokens=0",
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


def main(argv):
    try:
        cfg, _ = parse_args(BenchConfig(), argv, __doc__.strip().splitlines()[0])
        if cfg.what not in ("steps", "overhead"):
            raise ConfigError(f"--what must be steps or overhead, got {cfg.what!r}")
        check_positive(cfg, "steps", "rounds")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if cfg.what == "steps":
        bench_steps(cfg)
    else:
        bench_overhead(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
