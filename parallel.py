"""
More than one process (torchrun): plain helpers the trainers call, each doing what its name says.

    torchrun --standalone --nproc_per_node=2 nanogpt_sai.py --parallel=ddp --grad_accum=2  # or fsdp

ddp: every rank holds the whole model and optimizer state; gradients are averaged in backward
(PyTorch's DistributedDataParallel). fsdp: parameters, gradients and optimizer state are sliced
across the ranks (FSDP2, torch.distributed.fsdp.fully_shard); optim.py's optimizers sum their
statistics over the slices, so a step is the same as in one process. In both, every rank draws
the same batches and trains on its share of the micro-batches of each step, so a run at any world
size sees the same tokens per step and the same losses. Rank 0 alone writes files and prints.
"""
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import Shard
from torch.nn.parallel import DistributedDataParallel

import optim
from cli import ConfigError

MODES = ("auto", "none", "ddp", "fsdp")
# whole (unsharded) tensors on the CPU, on rank 0 (the others get empty dicts): a checkpoint that
# loads at any world size, in one process too
FULL_ON_RANK0 = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class World:
    """The processes of this run, as this one sees them: mode "none" (one process), "ddp" or
    "fsdp"; this process's rank among size; main: rank 0, which writes files and prints."""
    mode: str = "none"
    rank: int = 0
    size: int = 1
    backend: str = ""
    flags: object = None     # a gloo group for the loop's stop flags (no GPU sync to agree)

    @property
    def main(self):
        return self.rank == 0


def launched_by_torchrun():
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def check_mode(cfg, script):
    """The mode --parallel gives this launch, checked: auto is ddp under torchrun with more than
    one process, else none; ddp and fsdp need torchrun. Refused, as not verified: compare mode
    under torchrun, MPS, and with fsdp float16 and --compile (until a GPU run checks them)."""
    mode, n_procs = cfg.parallel, int(os.environ.get("WORLD_SIZE", "1"))
    if mode not in MODES:
        raise ConfigError(f"--parallel must be one of {', '.join(MODES)}, got {mode!r}")
    if launched_by_torchrun() and ("," in cfg.optimizer or cfg.optimizer == "all"):
        raise ConfigError("compare mode (several --optimizer) does not run under torchrun; "
                          "launch one optimizer at a time")
    if mode == "fsdp" and (cfg.optimizer in optim.PER_EXAMPLE_OPTIMIZERS
                           or getattr(cfg, "diagnostics", False)):
        raise ConfigError("per-example statistics (--optimizer=sign_sgd / adam_pe, "
                          "--diagnostics) run the whole model in each process: use "
                          "--parallel=ddp, not fsdp")
    if mode == "auto":
        return "ddp" if launched_by_torchrun() and n_procs > 1 else "none"
    if mode == "none":
        if n_procs > 1:
            raise ConfigError(f"--parallel=none under torchrun with {n_procs} processes would "
                              f"train {n_procs} separate copies; use --parallel=ddp or fsdp")
        return mode
    if not launched_by_torchrun():
        raise ConfigError(f"--parallel={mode} needs several processes: launch with torchrun "
                          f"--standalone --nproc_per_node=2 {script} --parallel={mode} ...")
    if cfg.device == "mps":
        raise ConfigError(f"--parallel={mode} is not supported on MPS; use --device=cpu")
    if mode == "fsdp" and cfg.dtype == "float16":
        raise ConfigError("--parallel=fsdp with --dtype=float16 is not verified here (the "
                          "GradScaler on sharded gradients); use --dtype=bfloat16")
    if mode == "fsdp" and cfg.compile:
        raise ConfigError("--parallel=fsdp with --compile is not verified here; drop --compile "
                          "or use --parallel=ddp")
    return mode


def start(mode, device):
    """Join the other ranks (gloo on the CPU, nccl on cuda:LOCAL_RANK); returns (World,
    this rank's device). Mode "none" starts nothing."""
    if mode == "none":
        return World(), device
    if device.startswith("cuda"):
        device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(device)
    backend = "nccl" if device.startswith("cuda") else "gloo"
    dist.init_process_group(backend, device_id=torch.device(device) if backend == "nccl"
                            else None)
    return World(mode, dist.get_rank(), dist.get_world_size(), backend,
                    dist.new_group(backend="gloo")), device


def wrap(model, world, shard_units, shard_dims):
    """The module to train through: the model itself (none), wrapped in DDP, or, for fsdp, the
    model sharded in place: each of the modules `shard_units` (its transformer blocks, gathered
    one at a time in forward and backward), then the rest, every parameter sliced along
    shard_dims[p] (optim.shard_dims)."""
    if world.mode == "ddp":
        return DistributedDataParallel(model)
    if world.mode == "fsdp":
        def placement(p):
            return Shard(shard_dims[p])
        for unit in shard_units:
            fully_shard(unit, shard_placement_fn=placement)
        fully_shard(model, shard_placement_fn=placement)
    return model


@contextmanager
def main_first(world):
    """Rank 0 runs the `with` body first (e.g. a download into the cache), the others after it."""
    if not world.main:
        dist.barrier()
    yield
    if world.main and world.size > 1:
        dist.barrier()


def grad_sync(model, world, last):
    """The context of one backward: gradients are reduced over the ranks only on the last
    micro-batch of a step (`last`), accumulated locally before it."""
    if world.mode == "ddp" and not last:
        return model.no_sync()
    if world.mode == "fsdp":
        model.set_requires_gradient_sync(last)
    return nullcontext()


def my_micro_batches(grad_accum, world):
    """Which of a step's grad_accum micro-batches this rank trains on (every rank draws all)."""
    if grad_accum % world.size:
        raise ConfigError(f"--grad_accum={grad_accum} (micro-batches per step, over all ranks) "
                          f"must be divisible by the {world.size} processes: pass e.g. "
                          f"--grad_accum={-(-grad_accum // world.size) * world.size} (a smaller "
                          "--batch_size keeps the tokens per step), or resume a run on a "
                          "number of processes that divides its --grad_accum")
    return [i % world.size == world.rank for i in range(grad_accum)]


def mean_over_ranks(x, world):
    """The mean of tensor x over the ranks (x itself in one process)."""
    if world.size > 1:
        x = x.clone()
        dist.all_reduce(x, group=None if x.is_cuda else world.flags)
        x /= world.size
    return x


def sum_over_ranks(x, world):
    """The sum of tensor x over the ranks (x itself in one process)."""
    if world.size > 1:
        x = x.clone()
        dist.all_reduce(x, group=None if x.is_cuda else world.flags)
    return x


def any_rank(flag, world):
    """Whether `flag` (a bool) is true on any rank: all ranks decide the same, on the CPU."""
    if world.size == 1:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=world.flags)
    return bool(t.item())


def gather_to_main(obj, world):
    """[obj of rank 0, obj of rank 1, ...] on rank 0 (None elsewhere); [obj] in one process."""
    if world.size == 1:
        return [obj]
    out = [None] * world.size if world.main else None
    dist.gather_object(obj, out, dst=0, group=world.flags)
    return out


def full_state(model, optimizer):
    """(model, optimizer) state dicts of whole tensors on the CPU (rank 0; {} elsewhere); every
    rank must call it."""
    return (get_model_state_dict(model, options=FULL_ON_RANK0),
            get_optimizer_state_dict(model, optimizer, options=FULL_ON_RANK0))


def load_model_state(model, state):
    """Load a full_state model dict on any number of ranks (each keeps the slices it holds)."""
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))


def load_optimizer_state(model, optimizer, state):
    """Load a full_state optimizer dict on any number of ranks."""
    set_optimizer_state_dict(model, optimizer, state,
                             options=StateDictOptions(full_state_dict=True))


def finish(code, world):
    """End the process with exit status `code`: flushed, the process group destroyed, and
    os._exit (interpreter teardown after a distributed run sometimes aborts: 'terminate called
    without an active exception')."""
    if world.mode == "none":
        return code
    sys.stdout.flush()
    sys.stderr.flush()
    dist.destroy_process_group()
    os._exit(code)
