"""The foreach twins: AdamW's and Adam-mini's update functions (optim.py) over lists of tensors
with torch._foreach_* ops, a few calls per param group instead of a dozen per tensor. The eager
step of those two runs these by default (foreach=True); tests/test_optim.py holds each equal to
the function it mirrors, line for line. The step's numbers are lists too, one per tensor."""
import torch

from engine.blocks import block_mean_sq, step_blocks

# The eager foreach path steps its tensors in runs of about this many elements: its temporaries
# (AdamW's sqrt(v)) are then that small, not model-sized, and the allocator reuses them, where a
# model-sized one would be mapped afresh and page-faulted every step.
FOREACH_CHUNK_NUMEL = 2 ** 20


def numel_chunks(args, limit):
    """Runs of consecutive indices into `args` (one tuple per tensor, the parameter first) whose
    parameters hold about `limit` elements (a bigger one is a run of its own)."""
    chunk, numel = [], 0
    for i, tensor_args in enumerate(args):
        if chunk and numel + tensor_args[0].numel() > limit:
            yield chunk
            chunk, numel = [], 0
        chunk.append(i)
        numel += tensor_args[0].numel()
    if chunk:
        yield chunk


def adamw_update_foreach(params, grads, ms, vs, *, lr, bias_correction1, bias_correction2_sqrt,
                         beta1, beta2, eps, weight_decay):
    """optim.adamw_update, in torch.optim.AdamW's order of operations."""
    if weight_decay != 0:
        torch._foreach_mul_(params, [1 - x * weight_decay for x in lr])
    torch._foreach_lerp_(ms, grads, 1 - beta1)
    torch._foreach_mul_(vs, beta2)
    torch._foreach_addcmul_(vs, grads, grads, value=1 - beta2)
    denoms = torch._foreach_sqrt(vs)
    torch._foreach_div_(denoms, bias_correction2_sqrt)
    torch._foreach_add_(denoms, eps)
    torch._foreach_addcdiv_(params, ms, denoms, [-x / b for x, b in zip(lr, bias_correction1)])


def adam_mini_update_foreach(params, grads, ms, vs, layouts, *, lr, bias_correction1,
                             bias_correction2_sqrt, beta1, beta2, eps, weight_decay):
    """optim.adam_mini_update: the arithmetic on the small per-block vectors v with foreach ops,
    then the per-element work tensor by tensor, so that each tensor's theta, m and g stay in
    cache between ops."""
    grads = [g.contiguous() for g in grads]
    torch._foreach_mul_(vs, beta2)
    torch._foreach_add_(vs, [block_mean_sq(g, layout) for g, layout in zip(grads, layouts)],
                        alpha=1 - beta2)
    step_sizes = torch._foreach_sqrt(vs)                           # sqrt(v_hat) + eps, per block
    torch._foreach_div_(step_sizes, bias_correction2_sqrt)
    torch._foreach_add_(step_sizes, eps)
    # lr / (1 - b1^t) / that, as reciprocal then multiply: bit-identical to adam_mini_update's
    # (lr / bc1) / denom, because torch evaluates float / tensor as reciprocal(tensor) * float
    torch._foreach_reciprocal_(step_sizes)
    torch._foreach_mul_(step_sizes, [x / b for x, b in zip(lr, bias_correction1)])
    for param, grad, m, step_size, layout, x in zip(params, grads, ms, step_sizes, layouts, lr):
        if weight_decay != 0:
            param.mul_(1 - x * weight_decay)
        m.lerp_(grad, 1 - beta1)
        step_blocks(param, m, step_size, layout)
