"""Adam-mini's blocks: a rule -> a layout of equal blocks that tiles a tensor, and the views and
per-block reductions its update works through.

A layout is a list of chunks [(n_blocks, block_numel), ...] that tile the flattened tensor in
order: each chunk is a contiguous run of n_blocks equal blocks (an Adam-mini block, not a
transformer block).
"""
import math

import torch


def block_layout(rule, shape):
    """Split a tensor of `shape` into Adam-mini blocks by `rule`:
      "full"         one block per element (plain Adam; biases)
      "tensor"       one block for the whole tensor (norm gains, position embeddings)
      "rows"         one block per row = output neuron or token (V, proj, MLP, embeddings, head)
      ("heads", n)   n blocks of equal consecutive rows (a Q or K weight with n heads)
      ("qkv", n)     a fused [Q; K; V] weight stacked on dim 0: Q and K one block per head,
                     V one block per row
    """
    numel = math.prod(shape)
    rows = shape[0] if len(shape) > 0 else 1
    if rule == "full":
        return [(numel, 1)]
    if rule == "tensor":
        return [(1, numel)]
    if rule == "rows":
        return [(rows, numel // rows)]
    kind, n = rule if isinstance(rule, (tuple, list)) and len(rule) == 2 else (rule, None)
    if kind not in ("heads", "qkv") or not isinstance(n, int) or n < 1:
        raise ValueError(f"block rule {rule!r} is not one of 'full', 'tensor', 'rows', "
                         "('heads', n) or ('qkv', n) with n a positive int")
    if kind == "heads":
        if rows % n:
            raise ValueError(f"block rule {rule!r}: {n} heads do not divide the {rows} rows of "
                             f"a tensor of shape {tuple(shape)}")
        return [(n, numel // n)]
    if rows % (3 * n):
        raise ValueError(f"block rule {rule!r}: a fused QKV weight needs rows divisible by "
                         f"3 x {n} heads, got shape {tuple(shape)}")
    d = rows // 3                                   # rows of each of Q, K, V
    cols = numel // rows
    return [(n, d * cols // n), (n, d * cols // n), (d, cols)]


def block_count(layout):
    return sum(n for n, _ in layout)


def chunk_views(t, layout):
    """Views of a contiguous tensor as (n_blocks, block_numel) matrices, one per chunk."""
    if len(layout) == 1:
        return [t.view(layout[0])]
    flat, views, offset = t.view(-1), [], 0
    for n, k in layout:
        views.append(flat[offset:offset + n * k].view(n, k))
        offset += n * k
    return views


def block_mean_sq(grad, layout):
    """mean(g^2) over each block of `layout`, one value per block (grad contiguous)."""
    return torch.cat([torch.linalg.vector_norm(g, dim=1).square_().div_(g.shape[1])
                      for g in chunk_views(grad, layout)])


def broadcast_blocks(block_values, layout, shape):
    """One value per block of `layout` -> one per row of a tensor of `shape` (a block of whole
    rows repeats its value), shaped to broadcast against it; one per element where blocks are
    smaller than a row. What the fused path multiplies by, in the same pass as the update."""
    cols = math.prod(shape[1:])
    if any(k % cols for _, k in layout):                       # element blocks of a matrix
        return block_values.view(shape)
    per_row = torch.cat([values.repeat_interleave(k // cols) for values, (_, k) in
                         zip(block_values.split([n for n, _ in layout]), layout)])
    return per_row.view(-1, *[1] * (len(shape) - 1))


def step_blocks(param, m, step_size, layout):
    """theta[b] -= step_size[b] * m[b] for every block b of `layout`, through views (eager: no
    temporary)."""
    sizes = [n for n, _ in layout]
    for p, m_chunk, s in zip(chunk_views(param, layout), chunk_views(m, layout),
                             step_size.split(sizes)):
        p.addcmul_(m_chunk, s[:, None], value=-1)
