"""The fused path: an optimizer's update function, as written, compiled by torch.compile into
one graph per param group, in which inductor fuses each tensor's elementwise ops into one pass
over memory (eager, AdamW's ops move ~3x the bytes).

What changes every step (lr, bias corrections) goes in as 0-d tensors, not Python floats: a
float becomes a constant of the graph, and a new value a recompile. A compile costs ~10 s per
param group on a CPU, so by default (fused=None) an optimizer compiles only from FUSED_MIN_NUMEL
parameters on, where the eager step costs a few ms (docs/performance.md).
"""
import torch

FUSED_MIN_NUMEL = 2 ** 20
FUSED_DEVICES = ("cpu", "cuda")
# On a CPU, inductor fuses loops that share as little as 10 bytes: the 0-d step numbers every
# tensor reads then join the loops of same-shaped tensors (a GPT's layers) into one, with up to
# 8 tensors' memory streams at once, more than the prefetchers follow. Fused only where they share
# a KiB or more, each tensor is its own loop (docs/performance.md has the timings). On a GPU a
# joint kernel saves launches: inductor's default. Inductor's size asserts re-check every
# input's shape and strides on each call, which dynamo's guards (dynamic=False) have already
# checked.
FUSED_COMPILE_OPTIONS = {"cpu": {"score_fusion_memory_threshold": 1024, "size_asserts": False},
                         "cuda": {"size_asserts": False}}
_compiled_update_each = {}   # device type: update_each compiled for it


def update_each(update, args, step_numbers, hparams):
    """update(*args, **step_numbers, **hparams) for every tensor's args and step numbers, and what
    each returned: the loop the fused path compiles (torch.compile unrolls it into one graph).
    An update returns a small tensor it scales by (APOLLO, Adafactor, Adam-mini) so that, as an
    output of the graph, it is computed once: an intermediate would be inlined into, and
    recomputed by, every element."""
    return [update(*a, **n, **hparams) for a, n in zip(args, step_numbers)]


def compiled_update_each(device_type):
    if device_type not in _compiled_update_each:
        # one graph per update function and param group shares update_each's code object: let
        # a process hold more than torch's default 8 (several optimizers in a test or notebook)
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        _compiled_update_each[device_type] = torch.compile(
            update_each, fullgraph=True, dynamic=False,
            options=FUSED_COMPILE_OPTIONS.get(device_type, {}))
    return _compiled_update_each[device_type]


def number_tensors(step_numbers, device):
    """Each tensor's step numbers as 0-d float32 tensors on `device`, one tensor per distinct
    name and value (the tensors of a group usually share a step). torch.full launches a fill,
    where torch.tensor(x, device="cuda") would copy from the host and wait for the GPU."""
    made = {}
    out = []
    for tensor_step_numbers in step_numbers:
        out.append({})
        for name, value in tensor_step_numbers.items():
            key = (name, float(value))
            if key not in made:
                made[key] = torch.full((), key[1], dtype=torch.float32, device=device)
            out[-1][name] = made[key]
    return out
