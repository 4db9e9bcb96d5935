import os
import random
import sys

import numpy as np
import pytest
import torch
from torch._inductor.runtime.cache_dir_utils import default_cache_dir

# Tests import the project's top-level modules (optim, nanogpt_sai, ...) and tests/ helpers.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tolerance  # noqa: E402  (a tests/ helper: importable once the path above is set)

# torch 2.13's compile cache does not key its CPU code on the kernel path: code compiled under
# one ATEN_CPU_CAPABILITY and loaded under another stepped wrong (AVX-512 code under avx2: the
# fused AdamW 0.6% off the eager one) or crashed (AVX2 code under avx512). The tests compile
# into a cache of their own per kernel path and thread count (the subprocesses they start
# inherit it), so what ran before on the machine cannot change their results.
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
    os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default_cache_dir(),
    f"{torch.backends.cpu.get_cpu_capability()}-{torch.get_num_threads()}-threads")


def pytest_addoption(parser):
    parser.addoption("--error-margins", action="store_true",
                     help="print, per family of float comparisons, the largest error this run "
                          "measured against its tolerance (tests/tolerance.py)")
    parser.addoption("--order", default="as-written", metavar="as-written|reversed|SEED",
                     help="run the collected tests reversed, or shuffled by an integer seed, to "
                          "show that no test depends on the ones before it")


def pytest_collection_modifyitems(config, items):
    order = config.getoption("--order")
    if order == "reversed":
        items.reverse()
    elif order != "as-written":
        if not order.isdigit():
            raise pytest.UsageError(f"--order must be as-written, reversed or an integer seed, "
                                    f"got {order!r}")
        random.Random(int(order)).shuffle(items)


def pytest_terminal_summary(terminalreporter, config):
    if config.getoption("--error-margins") and tolerance.MEASURED:
        terminalreporter.write_sep("=", f"float errors against their tolerances (torch "
                                        f"{torch.backends.cpu.get_cpu_capability()}, "
                                        f"{torch.get_num_threads()} threads)")
        terminalreporter.write_line(tolerance.margins_table())


def process_state():
    """What a test could change for every test after it in this process."""
    return {"threads": torch.get_num_threads(), "dtype": torch.get_default_dtype(),
            "deterministic": (torch.are_deterministic_algorithms_enabled(),
                              torch.is_deterministic_algorithms_warn_only_enabled()),
            "matmul precision": torch.get_float32_matmul_precision(),
            "grad enabled": torch.is_grad_enabled(),
            "environment": dict(os.environ), "directory": os.getcwd()}


def restore(state):
    torch.set_num_threads(state["threads"])
    torch.set_default_dtype(state["dtype"])
    enabled, warn_only = state["deterministic"]
    torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
    torch.set_float32_matmul_precision(state["matmul precision"])
    torch.set_grad_enabled(state["grad enabled"])
    os.environ.clear()
    os.environ.update(state["environment"])
    os.chdir(state["directory"])


@pytest.fixture(autouse=True)
def each_test_starts_alike():
    """A test's result must not depend on which tests ran before it: each starts from the same
    global seeds, and what it changed process-wide (a trainer's thread count, a default dtype,
    the environment, the directory) is put back after it."""
    before = process_state()
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    yield
    if process_state() != before:
        restore(before)


def repository_outputs():
    """Every file (with its size and mtime) where a run or the data cache would write by
    default: the repository's data/cache/ and out/."""
    files = {}
    for top in ("data/cache", "out"):
        for folder, _, names in os.walk(os.path.join(ROOT, top)):
            for name in names:
                stat = os.stat(os.path.join(folder, name))
                files[os.path.join(folder, name)] = (stat.st_size, stat.st_mtime_ns)
    return files


@pytest.fixture(autouse=True, scope="session")
def tests_leave_the_repository_alone():
    """Tests write into temporary directories only (a user's cache and runs stay as they were)."""
    before = repository_outputs()
    yield
    after = repository_outputs()
    changed = sorted(p for p in set(before) | set(after) if before.get(p) != after.get(p))
    assert not changed, f"tests wrote into the repository: {changed[:5]}"
