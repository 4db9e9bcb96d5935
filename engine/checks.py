"""Argument checks shared by the optimizers: each raises one line naming the argument, its value
and what is allowed."""
import math


def check_range(name, value, low, high=math.inf, high_open=False, low_open=False):
    """Raise a ValueError naming the argument, its value and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    ok = (low < value if low_open else low <= value) and \
        (value < high if high_open else value <= high)
    if not ok:  # also catches NaN, which fails every comparison
        left, right = "(" if low_open else "[", ")" if high_open else "]"
        raise ValueError(f"{name}={value!r} is outside the allowed range "
                         f"{left}{low}, {high}{right}")


def check_int(name, value, low):
    """Raise a ValueError naming the argument and its value unless it is an int >= low."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}={value!r} is not allowed: it must be an int >= {low}")


def check_one_of(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {allowed}")


def check_lr_and_decay(group):
    """lr and weight_decay, which every optimizer here takes: >= 0."""
    check_range("lr", group["lr"], 0.0)
    check_range("weight_decay", group["weight_decay"], 0.0)


def check_adam_hparams(group):
    """lr, betas, eps and weight_decay, as AdamW, Adam-mini, APOLLO and Muon take them."""
    check_lr_and_decay(group)
    check_range("eps", group["eps"], 0.0)
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    check_range("betas[0]", betas[0], 0.0, 1.0, high_open=True)
    check_range("betas[1]", betas[1], 0.0, 1.0, high_open=True)


def check_fused(group):
    if group.get("fused") not in (None, True, False):
        raise ValueError(f"fused must be None (compile where it pays), True or False, got "
                         f"{group['fused']!r}")
