"""Optimizers (SGD, AdamW, LARS) and the warmup + cosine learning-rate schedule."""

import math

import torch
from torch.optim import Optimizer


class LARS(Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017)
    as used by SimCLR and BYOL: for every tensor of 2 or more dimensions the
    update ``g + weight_decay·p`` is scaled by
    ``trust_coefficient·|p| / |g + weight_decay·p|``; biases and norm weights
    (1-D) get neither weight decay nor scaling."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001,
                 eps=1e-8):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS: lr, momentum and weight_decay must be >= 0 and "
                             "trust_coefficient > 0")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if p.dim() > 1:
                    g = g.add(p, alpha=group["weight_decay"])
                    p_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(g)
                    trust = torch.where((p_norm > 0) & (g_norm > 0),
                                        group["trust_coefficient"] * p_norm
                                        / (g_norm + group["eps"]), 1.0)
                    g = g.mul(trust)  # a device tensor: no host sync
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = g.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(g)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def param_groups(model, weight_decay):
    """Weight decay on tensors of 2 or more dimensions only (not on biases and
    norm weights), the parameters that require grad."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() > 1 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


OPTIMIZERS = ("sgd", "adamw", "lars")


def build_optimizer(name, model, lr, weight_decay, momentum=0.9):
    if name == "sgd":
        return torch.optim.SGD(param_groups(model, weight_decay), lr=lr, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr)
    if name == "lars":
        params = [p for p in model.parameters() if p.requires_grad]
        return LARS(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}: choose from {', '.join(OPTIMIZERS)}")


def warmup_cosine(warmup_steps, max_steps, final_fraction=0.0):
    """A LambdaLR factor: linear from 1/warmup_steps to 1 over ``warmup_steps``
    steps, then a cosine down to ``final_fraction`` at ``max_steps``."""

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        t = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
        return final_fraction + (1 - final_fraction) * 0.5 * (1 + math.cos(math.pi * t))

    return factor
