"""Float comparisons with tolerances that hold on any x86 kernel path, and a record of the
errors each one measured.

CPUs differ: ATen picks AVX-512, AVX2 or plain kernels (ATEN_CPU_CAPABILITY), and the thread
count changes how reductions are split, so float32 sums land on different last bits. A
tolerance must leave room for that, with a margin of ~10x over the largest error measured on
the three kernel paths, and still sit far below what a real bug gives. Each tolerance below
says what it covers, what was measured, and how large a real bug's error is.

`check(family, actual, expected, tolerance)` measures one error, records it under its family
and asserts it. `python -m pytest tests --error-margins` prints, per family, the largest error
of the run against its tolerance; `tools/test_kernel_paths.sh` runs the suite on each path.

Float32's unit roundoff is u = 2^-24 ~ 6e-8; float64's 2^-53 ~ 1.1e-16.
"""
import math

import pytest
import torch
from torch import nn

# Float32 training over tens of steps of a tiny transformer, two implementations of the same
# update (ours against torch's, the official package's, or our own other path): each step
# rounds differently by a few u, and training carries it forward. Measured (relative, losses
# and weights): see the table of `--error-margins` (up to 1.1e-6 here on avx512 / avx2 /
# default, 1 and 2 threads); Intel AVX-512 with one thread has given 1.02e-6 (Adafactor). A real
# bug is far above: AdamW against torch's over the 50 steps of tests/test_optim.py, weight decay
# left out moves the weights by 4.9e-2 relative (the losses by 7.3e-4), a bias correction left
# out by 0.47 (m's) or 0.93 (v's).
F32_TRAINING = 2e-5
# The same in float64 where the reference computes in float64 too: rounding is 2^29 times
# finer, so what is left is ~1e-15 (measured up to 1.7e-15). A real bug is as above.
F64_TRAINING = 1e-10
# One float32 computation of a few reductions (a norm, a std, a g-SNR, a handful of steps of
# one tensor): a few u, measured up to 2.6e-7 (a g-SNR from two different float32 sums). A wrong
# rule or a missing eps is off by far more (sqrt_numel for gsnr: 2x or more).
F32_COMPUTATION = 5e-6
# One float64 computation: a few u64; measured up to ~1.2e-15.
F64_COMPUTATION = 1e-12

# A reference comparison runs in float64 (a tight pin: any difference is the code, not rounding)
# and in float32 (the dtype the trainers run), each at its training tolerance.
BOTH_DTYPES = pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
TRAINING = {torch.float64: F64_TRAINING, torch.float32: F32_TRAINING}
DTYPE_NAMES = {torch.float64: "float64", torch.float32: "float32"}

MEASURED = {}        # (family, tolerance) -> [largest error, number of checks]


def _tensors(x):
    if isinstance(x, nn.Module):
        return [p.detach() for p in x.parameters()]
    if isinstance(x, (list, tuple)):
        return [t.detach() if torch.is_tensor(t) else torch.tensor(float(t), dtype=torch.float64)
                for t in x]
    if torch.is_tensor(x):
        return [x.detach()]
    return [torch.tensor(float(x), dtype=torch.float64)]


def relative_error(actual, expected):
    """The largest ||a - b|| / ||b|| over matched tensors (a model's parameters, a list of
    losses or tensors, one tensor or number), in float64; ||a - b|| alone where b is 0."""
    worst = 0.0
    for a, b in zip(_tensors(actual), _tensors(expected), strict=True):
        a, b = a.double(), b.double()
        if a.shape != b.shape:
            raise AssertionError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        norm = b.norm().item()
        err = (a - b).norm().item() / (norm if norm > 0 else 1.0)
        worst = max(worst, math.inf if math.isnan(err) else err)
    return worst


def check(family, actual, expected, tolerance):
    """Assert relative_error(actual, expected) <= tolerance, and record it under `family`."""
    err = relative_error(actual, expected)
    record = MEASURED.setdefault((family, tolerance), [0.0, 0])
    record[0], record[1] = max(record[0], err), record[1] + 1
    assert err <= tolerance, (f"{family}: relative error {err:.3g} exceeds the tolerance "
                              f"{tolerance:.3g}")


def margins_table():
    """One line per family: the largest error this run measured, the tolerance, their ratio."""
    lines = [f"{'family':<66} {'checks':>6} {'largest':>9} {'tolerance':>9} {'margin':>8}"]
    for (family, tolerance), (worst, count) in sorted(MEASURED.items()):
        margin = f"{tolerance / worst:.0f}x" if worst > 0 else "exact"
        lines.append(f"{family:<66} {count:>6} {worst:>9.2e} {tolerance:>9.1e} {margin:>8}")
    return "\n".join(lines)
