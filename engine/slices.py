"""Slices of rows for CPU elementwise ops that mix bfloat16 and float32 (Muon's).

On a CPU such an op copies its bfloat16 input to float32 first, and writes a bfloat16 result
through a float32 temporary: a matrix-sized temporary each (docs/performance.md). Run over slices
of rows of about MIXED_DTYPE_SLICE_NUMEL elements, the temporaries are that small. A GPU casts
inside the kernel: there the ops run whole.
"""
import math

MIXED_DTYPE_SLICE_NUMEL = 2 ** 16


def row_slices(*tensors):
    """The tensors (same shape) split alike into slices of rows, MIXED_DTYPE_SLICE_NUMEL
    elements or so each on a CPU, one slice elsewhere: zip of the slices."""
    if tensors[0].device.type != "cpu":
        return [tensors]
    rows = max(1, MIXED_DTYPE_SLICE_NUMEL // math.prod(tensors[0].shape[1:]))
    return zip(*(t.split(rows) for t in tensors))
