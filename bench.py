"""
Optimizer step time and state memory on nanoGPT's 6-layer, 384-wide GPT (~10.7M parameters).

    python bench.py                    # CPU, median of 30 timed steps per optimizer
    python bench.py --steps=60 --device=cuda

Times optimizer.step() alone (gradients are fixed random tensors, set once), for our optimizers
and the references: torch.optim.AdamW (foreach and per-tensor), official SGD_sai 1.0.3 and
official Adam_mini 1.1.1 (if installed: `pip install -r requirements-test.txt`). Rounds are
interleaved so that drift in machine speed hits every optimizer alike. Prints a markdown table,
then APOLLO-Mini against its targets: state of the projected matrices < 1% of AdamW's for the
same matrices, step time <= 1.5x torch AdamW (foreach). The timed steps reuse a cached random
projection: APOLLO draws P again only every update_proj_gap (200) steps.
"""
import contextlib
import io
import platform
import statistics
import sys
import time
from dataclasses import dataclass

import torch

import optim
import train_common as tc
from nanogpt_sai import GPT, Config

MIB = 2 ** 20


@dataclass
class BenchConfig:
    steps: int = tc.option(30, "timed steps per optimizer")
    rounds: int = tc.option(3, "interleaved rounds the steps are split into")
    device: str = tc.option("cpu", "cpu, cuda, cuda:N, mps or auto")


def candidates(model):
    """name -> function building that optimizer for `model` (hyperparameters as the trainer's)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    out = {
        "torch AdamW (foreach)": lambda: torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.99),
                                                           foreach=True),
        "torch AdamW (per-tensor)": lambda: torch.optim.AdamW(groups, lr=1e-3,
                                                              betas=(0.9, 0.99), foreach=False),
        "AdamW (ours, foreach)": lambda: optim.build_optimizer(
            "adamw", model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        "AdamW (ours, per-tensor)": lambda: optim.build_optimizer(
            "adamw", model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, foreach=False),
        "SGD-SaI (ours)": lambda: optim.build_optimizer("sgd_sai", model, lr=1e-2,
                                                        weight_decay=0.1),
        "Adam-mini (ours)": lambda: optim.build_optimizer(
            "adam_mini", model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        "APOLLO (ours)": lambda: optim.build_optimizer(
            "apollo", model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
        "APOLLO-Mini (ours)": lambda: optim.build_optimizer(
            "apollo_mini", model, lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1),
    }
    with contextlib.suppress(ImportError):
        from sgd_sai import SGD_sai
        out["SGD_sai (official 1.0.3)"] = lambda: SGD_sai(groups, lr=1e-2, weight_decay=0.1)
    with contextlib.suppress(ImportError):
        from adam_mini import Adam_mini
        out["Adam_mini (official 1.1.1)"] = lambda: Adam_mini(
            model.named_parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1,
            dim=384, n_heads=6, verbose=False)
    return out


def main(argv):
    cfg, _ = tc.parse_args(BenchConfig(), argv, __doc__.strip().splitlines()[0])
    device = tc.pick_device(cfg.device)
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

    base = statistics.median(times["torch AdamW (foreach)"])
    adamw_state = optim.state_bytes(optimizers["AdamW (ours, foreach)"])
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor()) \
        if sys.platform == "linux" else platform.processor()
    print(f"{time.strftime('%Y-%m-%d')} | {cpu} | {torch.get_num_threads()} threads | torch "
          f"{torch.__version__} | {device} | GPT 6x384, {n_params / 1e6:.2f}M params | median of "
          f"{len(times[next(iter(times))])} steps")
    print()
    print("| optimizer | step ms | vs torch AdamW (foreach) | state MiB | state vs AdamW |")
    print("|---|---:|---:|---:|---:|")
    for name, opt in optimizers.items():
        ms = 1000 * statistics.median(times[name])
        state = optim.state_bytes(opt)
        print(f"| {name} | {ms:.2f} | {ms / 1000 / base:.2f}x | {state / MIB:.2f} | "
              f"{state / adamw_state:.3f}x |")

    projected = optim.projected_params(model)
    mini_state = optim.state_bytes(optimizers["APOLLO-Mini (ours)"], projected)
    adamw_projected = optim.state_bytes(optimizers["AdamW (ours, foreach)"], projected)
    mini_time = statistics.median(times["APOLLO-Mini (ours)"]) / base
    print()
    print(f"APOLLO-Mini state of the {len(projected)} projected matrices: {mini_state} bytes = "
          f"{100 * mini_state / adamw_projected:.2f}% of AdamW's for the same matrices "
          "(target < 1%)")
    print(f"APOLLO-Mini step time: {mini_time:.2f}x torch AdamW (foreach) (target <= 1.5x)")


if __name__ == "__main__":
    main(sys.argv[1:])
