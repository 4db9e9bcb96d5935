"""
The memory a training run needs, two ways (the iso-memory study's axis):

(a) model state = parameters + gradients + optimizer state: what the papers and ZeRO / FSDP
    count, exact (`model_state_bytes`, from `optim.state_bytes`);
(b) the peak of one training step, activations included: what the step holds before it starts
    (parameters and optimizer state) plus the peak of what it allocates (activations, the
    gradients, backward's transients, the update's temporaries). On a GPU the second term is
    CUDA's allocated peak; on a CPU it is measured twice, and each checks the other:
    `LiveTensorBytes` counts the bytes of every tensor the step's operations create, alive at
    once (the CPU's analog of CUDA's allocated peak), and the process's resident set measures
    them from outside (bench.py --what=memory).
"""
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import optim


def model_state_bytes(model, optimizer):
    """{params, grads, state, total}: bytes of the parameters, of their gradients (one per
    trainable parameter, its dtype) and of the optimizer's state (created by a first step)."""
    params = list(model.parameters())
    out = dict(params=sum(p.numel() * p.element_size() for p in params),
               grads=sum(p.numel() * p.element_size() for p in params if p.requires_grad),
               state=optim.state_bytes(optimizer))
    return out | dict(total=sum(out.values()))


class LiveTensorBytes(TorchDispatchMode):
    """Within `with LiveTensorBytes() as live:`, the bytes of the tensors its operations
    create that are alive at once: `live.now`, and its maximum `live.peak`. A storage counts
    from the first operation that returns it until the last tensor viewing it is freed; an
    operation that writes into a tensor made before (in place, or a view of one) adds nothing.
    Every thread's operations on `device` whose dispatch passes through this one (autograd's
    backward on a CPU runs on the calling thread)."""

    def __init__(self, device="cpu"):
        super().__init__()
        self.device, self.views, self.size, self.now, self.peak = device, {}, {}, 0, 0

    def _freed(self, key):
        self.views[key] -= 1
        if not self.views[key]:
            del self.views[key]
            self.now -= self.size.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        made_before = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                       if isinstance(t, torch.Tensor)} - set(self.views)
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type != self.device:
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in made_before:
                continue
            if key not in self.views:
                self.views[key], self.size[key] = 0, storage.nbytes()
                self.now += storage.nbytes()
                self.peak = max(self.peak, self.now)
            self.views[key] += 1
            weakref.finalize(t, self._freed, key)
        return out
