import os
import sys

import pytest

# Tests import the project's top-level modules (optim, nanogpt_sai, ...) and tests/ helpers.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


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
