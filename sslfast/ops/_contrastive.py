"""What the contrastive losses share: argument checks, the temperature / scale
tensor, normalization, positive logits, and the call of the core op."""

import math
import numbers

import torch
import torch.nn.functional as F

from sslfast._backend import resolve_backend
from sslfast.ops.dot_lse import IMPLEMENTED, dot_lse


def check_features(x, name, other=None, other_name=None, finite=True):
    """x: a (N, D) floating tensor with N, D >= 1 (and, with ``finite``, finite
    where checking costs no host sync). With other: same dtype and device."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must be 2-D (batch, dim), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)})")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has feature dimension 0")
    if other is not None:
        if x.device != other.device:
            raise ValueError(f"{name} is on {x.device} but {other_name} is on {other.device}")
        if x.dtype != other.dtype:
            raise TypeError(f"{name} is {x.dtype} but {other_name} is {other.dtype}")
    if finite and x.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or Inf")


def check_same_shape(a, a_name, b, b_name):
    if a.shape != b.shape:
        raise ValueError(f"{a_name} has shape {tuple(a.shape)} but {b_name} has {tuple(b.shape)}")


def scale_tensor(value, name, like, invert, positive=False):
    """A 0-dim tensor on ``like``'s device, float32 (float64 for float64
    features): 1/value (a temperature) or value (a logit scale); ``positive``:
    value must be > 0. A tensor keeps its autograd graph (a CPU one is checked);
    a float makes no host sync."""
    device = like.device
    dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
    if isinstance(value, torch.Tensor):
        if value.dim() != 0 or not value.is_floating_point():
            raise ValueError(f"{name} must be a float or a 0-dim floating tensor, got shape "
                             f"{tuple(value.shape)} and dtype {value.dtype}")
        if value.device.type == "cpu" and not torch.compiler.is_compiling():
            check_scalar(float(value.detach()), name, invert, positive)
        t = value.to(device=device, dtype=dtype)
        return 1.0 / t if invert else t
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(value).__name__}")
    check_scalar(float(value), name, invert, positive)
    v = 1.0 / float(value) if invert else float(value)
    return torch.full((), v, dtype=dtype, device=device)


def check_scalar(v, name, invert=False, positive=False):
    """v finite (and > 0 if positive; |v| >= 1e-8 if it is inverted)."""
    if positive and not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a positive finite number, got {v}")
    if not math.isfinite(v):
        raise ValueError(f"{name} must be finite, got {v}")
    if invert and abs(v) < 1e-8:
        raise ValueError(f"Illegal {name}: abs({v}) < 1e-8")


def backend_for(backend, device, op):
    return resolve_backend(backend, device, op, IMPLEMENTED, gpu_default="triton")


def normalized(x):
    """Unit rows (x / max(|x|, 1e-12)), computed in fp32 at least, in x's dtype."""
    if x.dtype == torch.float64:
        return F.normalize(x, dim=1, eps=1e-12)
    return F.normalize(x.float(), dim=1, eps=1e-12).to(x.dtype)


def row_dot(a, b, scale):
    """scale * (a_i . b_i) per row, in float32 (float64 for float64 inputs)."""
    ct = torch.float64 if a.dtype == torch.float64 else torch.float32
    return (a.to(ct) * b.to(ct)).sum(dim=1) * scale.to(ct)


def mean_ce(q, k, scale, pos_logit, backend, exclude_offset=None, extra=None):
    """mean_i [ lse_i - pos_logit_i ] with mean_i lse_i from the core op."""
    mean_lse = dot_lse(q, k, scale, exclude_offset=exclude_offset, extra=extra, backend=backend)
    return mean_lse - pos_logit.mean()
