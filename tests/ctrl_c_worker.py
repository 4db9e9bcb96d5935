"""nanogpt_sai.py under torchrun with Ctrl-C pressed on rank 0 alone, right after it logs step
N (the other rank learns of it only through the trainer's agreed stop).

    torchrun --standalone --nproc_per_node=2 tests/ctrl_c_worker.py N <nanogpt_sai.py options>
"""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import nanogpt_sai  # noqa: E402
from run_helpers import ctrl_c_after_step  # noqa: E402

if __name__ == "__main__":
    ctrl_c_after_step(pytest.MonkeyPatch(), int(sys.argv[1]))   # only rank 0 keeps a log
    sys.exit(nanogpt_sai.main(sys.argv[2:]))
