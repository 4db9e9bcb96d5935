"""FSDP2: parameters sliced across ranks, and the one mechanism through which the update
functions see a whole tensor.

Under FSDP2 (torch.distributed.fsdp.fully_shard) a parameter, its gradient and the state made
with zeros_like are DTensors, of which each rank holds a slice along one dimension. The update
functions run on those slices (`local`), which is exact for elementwise math. A function that
needs a statistic of the whole tensor (SGD-SaI's g-SNR, APOLLO's and Adafactor's norms, Muon's
orthogonalisation) takes a keyword `whole`: `WHOLE` (the default: the tensor is whole, each
method the plain operation) or the tensor's `Shard`, whose same methods sum over the ranks. The
optimizer's step loop passes the Shard (engine/base.py); the math never tests which it has.
"""
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from engine.blocks import chunk_views


class Whole:
    """Statistics of a tensor that every update function sees whole: here each is the plain
    operation (a Shard sums them over the ranks)."""

    def sum(self, partial):
        """`partial` holds sums over this tensor's elements: their totals."""
        return partial

    def sum_along(self, partial, dim):
        """`partial` holds sums along dimension `dim` of this tensor: their totals."""
        return partial

    def mean_along(self, t, dim):
        """The mean of t along dimension `dim` of this tensor (kept as a dimension of 1)."""
        return t.mean(dim=dim, keepdim=True)

    def norm(self, t):
        """||t||_2, of all its elements."""
        return torch.linalg.vector_norm(t)

    def norm_by_rows(self, t):
        """||t||_2, a matrix's as the norm of its rows' norms: compiled, a flat sum over
        Adafactor's U = g x row factor x column factor would find each element's factors by a
        division and a modulo of its flat index, where a sum along rows walks both dimensions
        (docs/performance.md: Adafactor's compiled matrix step 1.3x faster)."""
        if t.dim() < 2:
            return t.norm()
        return torch.linalg.vector_norm(torch.linalg.vector_norm(t, dim=-1))

    def shape(self, t):
        return t.shape

    def numel(self, t):
        return t.numel()

    def gather(self, t):
        """This tensor, whole on every rank."""
        return t

    def own_part(self, t):
        """This rank's part of a whole tensor shaped like this one."""
        return t


WHOLE = Whole()


class Shard(Whole):
    """A DTensor sliced along one dimension: this rank holds indices start ... stop of dimension
    `dim` of the whole tensor (of shape `whole_shape`, placed like `like`); `ranks` is the
    process group that holds the other slices. Each statistic is summed over the ranks
    (all_reduce)."""

    def __init__(self, like):
        (placement,) = like.placements
        self.like, self.dim, self.whole_shape = like, placement.dim, like.shape
        self.ranks = like.device_mesh.get_group()
        size = -(-self.whole_shape[self.dim] // like.device_mesh.size())   # torch.chunk's split
        self.start = min(like.device_mesh.get_local_rank() * size, self.whole_shape[self.dim])
        self.stop = self.start + like.to_local().shape[self.dim]

    def sum(self, partial):
        dist.all_reduce(partial, group=self.ranks)
        return partial

    def _sliced(self, dim):
        return self.dim == dim % len(self.whole_shape)

    def sum_along(self, partial, dim):
        return self.sum(partial) if self._sliced(dim) else partial

    def mean_along(self, t, dim):
        if not self._sliced(dim):
            return t.mean(dim=dim, keepdim=True)
        return self.sum(t.sum(dim=dim, keepdim=True)) / self.whole_shape[dim]

    def norm(self, t):
        return self.sum(t.square().sum()).sqrt()

    norm_by_rows = norm

    def shape(self, t):
        return self.whole_shape

    def numel(self, t):
        return math.prod(self.whole_shape)

    def gather(self, part):
        return DTensor.from_local(part, self.like.device_mesh, self.like.placements,
                                  shape=self.whole_shape, stride=self.like.stride()).full_tensor()

    def own_part(self, t):
        return t.narrow(self.dim, self.start, self.stop - self.start)


def shard_of(p):
    """p's Shard if p is a DTensor sliced along one dimension (FSDP2), else None (a plain
    tensor, or a DTensor every rank holds whole)."""
    if not isinstance(p, DTensor) or all(isinstance(q, Replicate) for q in p.placements):
        return None
    if len(p.placements) != 1 or not p.placements[0].is_shard():
        raise ValueError(f"a DTensor placed {p.placements} is not supported: the optimizers "
                         "here take FSDP2's one-dimensional sharding (Shard(dim) on a 1-D mesh)")
    return Shard(p)


def whole_of(p):
    """What an update function's `whole` is for tensor p: its Shard, or WHOLE."""
    return shard_of(p) or WHOLE


def local(t):
    """A DTensor's slice on this rank (a view: writing it writes the DTensor); others as they
    are."""
    return t.to_local() if isinstance(t, DTensor) else t


def require_sliced_along(p, dim, name, why):
    """A ValueError unless p is whole or sliced along `dim` (what its optimizer steps exactly)."""
    shard = shard_of(p)
    if shard is not None and shard.dim != dim:
        raise ValueError(f"{name} (shape {tuple(p.shape)}) is sharded along dim {shard.dim}; "
                         f"{why}, so shard it along dim {dim} (optim.shard_dims gives FSDP2 "
                         "each parameter's dim)")


def sliced_state(p, part):
    """A state tensor of p, given as this rank's `part`, sliced along p's sharded dimension as p
    is: a DTensor placed like p, so that torch.distributed.checkpoint's helpers gather and place
    it whole; `part` itself for a p that is not sharded."""
    shard = shard_of(p)
    if shard is None:
        return part
    shape = list(part.shape)
    shape[shard.dim] = p.shape[shard.dim]
    return DTensor.from_local(part, p.device_mesh, p.placements, shape=torch.Size(shape),
                              stride=torch.empty(shape, device="meta").stride())


def replicated_state(p, t):
    """A state tensor every rank keeps whole and equal (a replicated DTensor for a DTensor p)."""
    if not isinstance(p, DTensor):
        return t
    return DTensor.from_local(t, p.device_mesh, [Replicate()] * p.device_mesh.ndim,
                              run_check=False)


def reduced_zeros(p, dim):
    """Zeros shaped like p with dimension `dim` reduced to 1 (Adafactor's row or column
    statistics): sliced like p, unless p is sliced along `dim` (then every rank keeps it whole)."""
    shard = shard_of(p)
    if shard is not None and shard.dim == p.dim() + dim:
        shape = list(p.shape)
        shape[dim] = 1
        return replicated_state(p, torch.zeros(shape, dtype=p.dtype, device=p.device))
    shape = list(local(p).shape)
    shape[dim] = 1
    return sliced_state(p, torch.zeros(shape, dtype=p.dtype, device=p.device))


def all_finite(t):
    """Whether every element of t is finite (of every rank's slice, for a sharded t)."""
    shard = shard_of(t)
    if shard is None:
        return bool(torch.isfinite(t).all())
    # a float64 sum of float32 (or narrower) values is finite exactly when they all are
    return bool(torch.isfinite(shard.sum(local(t).detach().sum(dtype=torch.float64))))


# Adam-mini under FSDP2: a block may be cut by a slice's edge, so each rank sums g^2 over its
# part of every block, and one all-reduce per param group adds the parts.

def shard_blocks(layout, shape, start, stop):
    """The blocks of `layout` (of a tensor of `shape`) that rows start ... stop meet, for a rank
    that holds only those rows: (local layout, ids). The local layout tiles the rank's slice in
    order, a block cut by the slice's edge counted with the elements it has here; ids are the
    blocks' indices among the whole tensor's (a LongTensor, one per local block)."""
    cols = math.prod(shape[1:])
    lo, hi = start * cols, stop * cols          # the slice's elements in the flattened tensor
    parts, ids, offset, first_id = [], [], 0, 0
    for n, k in layout:
        pos, end = max(lo, offset), min(hi, offset + n * k)
        while pos < end:
            block, into = divmod(pos - offset, k)
            count = 1 if into or end - pos < k else (end - pos) // k   # cut block, or whole ones
            size = min(k - into, end - pos) if count == 1 else k
            parts.append((count, size))
            ids.append(torch.arange(first_id + block, first_id + block + count))
            pos += count * size
        offset, first_id = offset + n * k, first_id + n
    return parts, torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)


def block_means_over_ranks(named_args):
    """For Adam-mini's sharded tensors, given as (name, (param, grad, m, v, layout)): yield
    (local param, grad, m, v, local layout, ids, block_mean), block_mean the mean g^2 of every
    block of the whole tensor, summed over the ranks in one all-reduce."""
    if not named_args:
        return
    parts, sums, shards = [], [], []
    for name, (p, grad, m, v, layout) in named_args:
        shard = shard_of(p)
        if shard.dim != 0:
            raise ValueError(f"AdamMini: {name} is sharded along dim {shard.dim}; Adam-mini's "
                             "blocks are rows, so shard it along dim 0 (FSDP2's default)")
        local_layout, ids = shard_blocks(layout, p.shape, shard.start, shard.stop)
        grad = local(grad).contiguous()
        local_sums = torch.cat([grad.new_zeros(0)] + [
            torch.linalg.vector_norm(g, dim=1).square_() for g in
            chunk_views(grad, local_layout)])   # sum g^2 of each local (part of a) block
        sums.append(torch.zeros(v.shape, dtype=v.dtype, device=grad.device)
                    .index_add_(0, ids.to(grad.device), local_sums))
        parts.append((p, grad, m, v, local_layout, ids.to(grad.device), layout))
        shards.append(shard)
    total = shards[0].sum(torch.cat(sums)).split([s.numel() for s in sums])
    for (p, grad, m, v, local_layout, ids, layout), block_sum in zip(parts, total):
        block_numel = torch.cat([torch.full((n,), k, dtype=v.dtype, device=grad.device)
                                 for n, k in layout])
        yield local(p), grad, local(m), local(v), local_layout, ids, block_sum / block_numel
