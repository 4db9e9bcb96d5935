"""Helpers for tests that drive the trainers: read a run's metrics, check a PNG, press Ctrl-C."""
import json
import os
import signal
import struct

import matplotlib.pyplot as plt

import train_helpers


def records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def is_png(path):
    """A real PNG image of a real size that matplotlib can read back."""
    with open(path, "rb") as f:
        head = f.read(24)
    width, height = struct.unpack(">II", head[16:24])
    return head[:8] == b"\x89PNG\r\n\x1a\n" and width > 100 and height > 100 and \
        plt.imread(path).ndim == 3


def ctrl_c_after_step(monkeypatch, step):
    """Send SIGINT right after the trainer logs training step `step` (as a user's Ctrl-C); the
    trainer stops after that iteration and checkpoints. Undo with monkeypatch.undo()."""
    write = train_helpers.MetricsLog.write

    def write_then_interrupt(self, **record):
        write(self, **record)
        if record["event"] == "train" and record["step"] == step:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(train_helpers.MetricsLog, "write", write_then_interrupt)
