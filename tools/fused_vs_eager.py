"""One optimizer's fused (compiled) step against its eager step, on the device you name:
3 steps of bench.py's setup (a GPT of one bench size, fixed random gradients) from the same
weights, then ||p_fused - p_eager|| / ||p_eager - p_0|| over all parameters and the same for
the state. tests/test_fused.py checks this on a CPU; this is the check for a GPU.

    python tools/fused_vs_eager.py adamw 12x768 cuda
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402  (the repository root, above)


def main(name, size, device):
    models = [bench.gpt(size, device) for _ in range(2)]
    start = [p.detach().clone() for p in models[0].parameters()]
    gen = torch.Generator(device).manual_seed(1)
    grads = [torch.randn(p.shape, device=device, generator=gen) * 1e-3
             for p in models[0].parameters()]
    opts = []
    for model, path in zip(models, ("fused", "eager")):
        for p, g in zip(model.parameters(), grads):
            p.grad = g.clone()
        opts.append(bench.build(f"{name}_{path}", model))
    t0 = time.perf_counter()
    for _ in range(3):
        for opt in opts:
            opt.step()
    bench.sync(device)
    seconds = time.perf_counter() - t0
    fused, eager = (list(m.parameters()) for m in models)
    diff = sum(((a - b).double() ** 2).sum() for a, b in zip(fused, eager)).sqrt()
    moved = sum(((b - s).double() ** 2).sum() for b, s in zip(eager, start)).sqrt()
    state_diff = state_norm = 0.0
    for pf, pe in zip(fused, eager):
        for key, value in opts[1].state[pe].items():
            if torch.is_tensor(value) and value.is_floating_point() and value.numel() > 1:
                state_diff += ((opts[0].state[pf][key].double() - value.double()) ** 2).sum()
                state_norm += (value.double() ** 2).sum()
    print(f"{name} {size} {device}: compiled {opts[0].fused()} | update rel diff "
          f"{(diff / moved).item():.2e} | state rel diff "
          f"{float(state_diff) ** 0.5 / max(float(state_norm) ** 0.5, 1e-300):.2e} | finite "
          f"{all(torch.isfinite(p).all() for p in fused)} | 6 steps, compile included, "
          f"{seconds:.1f} s")
    return 0 if opts[0].fused() and diff / moved < 1e-5 else 1


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    sys.exit(main(*sys.argv[1:]))
