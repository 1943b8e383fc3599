"""EMA (momentum) update: validation, backend dispatch, custom-op registration.

``ema_(targets, sources, decay)`` sets, in place, for every pair
``t <- decay * t + (1 - decay) * s`` (SEMANTICS.md §5), computed in fp32
(fp64 for fp64 tensors) and rounded once into the target's dtype.

Backends: ``cuda`` (multi-tensor-apply kernel, ``csrc/ema/ema_cuda.cu``),
``cpu`` (``csrc/ema/ema_cpu.cpp``), ``reference`` (float64 definition). Without
the compiled extension ``cuda``/``cpu`` run a PyTorch ``lerp_`` fallback.

On the compiled path all argument checks happen in C++, so a call over
hundreds of tensors costs no Python loop; they raise the same errors.
"""

import math
import numbers

import torch

from sslfast import _extension
from sslfast._backend import resolve_backend
from sslfast.reference.ema import ema_reference

_IMPLEMENTED = ("cuda", "cpu", "reference")
_SUPPORTED_PAIRS = {
    (torch.float64, torch.float64),
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
}


def _tensor_list(x, name):
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return x
    try:
        return list(x)
    except TypeError:
        raise TypeError(f"{name} must be a list of tensors, got {type(x).__name__}") from None


def check_decay(decay, name="decay"):
    """(decay_tensor or None, decay_float) for the op; raises on bad values.

    A tensor on the CPU is checked; one on a GPU is not (that would sync).
    """
    if isinstance(decay, torch.Tensor):
        if decay.dim() != 0 or not decay.is_floating_point():
            raise ValueError(
                f"{name} must be a float or a 0-dim floating-point tensor, got a tensor of "
                f"shape {tuple(decay.shape)} and dtype {decay.dtype}"
            )
        # The kernels check a CPU tensor's value too; tracing cannot read it.
        if decay.device.type == "cpu" and not torch.compiler.is_compiling():
            value = float(decay)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        return decay, 0.0
    if isinstance(decay, bool) or not isinstance(decay, numbers.Real):
        raise TypeError(f"{name} must be a float or a 0-dim tensor, got {type(decay).__name__}")
    value = float(decay)
    if not 0.0 <= value <= 1.0 or math.isnan(value):
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return None, value


def check_lists(targets, sources):
    """The checks the C++ op makes, for the Python paths."""
    if len(targets) != len(sources):
        raise ValueError(f"targets has {len(targets)} tensors but sources has {len(sources)}")
    for i, (t, s) in enumerate(zip(targets, sources)):
        for name, x in (("targets", t), ("sources", s)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name}[{i}] must be a tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"{name}[{i}] must be a floating-point tensor, got {x.dtype}")
        if torch._debug_has_internal_overlap(t) == 1:
            raise ValueError(
                f"targets[{i}] has elements that share memory (e.g. from expand()); it cannot "
                "be updated in place"
            )
        if t.shape != s.shape:
            raise ValueError(
                f"targets[{i}] has shape {tuple(t.shape)} but sources[{i}] has shape "
                f"{tuple(s.shape)}"
            )
        if t.device != s.device:
            raise ValueError(f"targets[{i}] is on {t.device} but sources[{i}] is on {s.device}")
        if t.device != targets[0].device:
            raise ValueError(
                f"targets[{i}] is on {t.device} but targets[0] is on {targets[0].device}; "
                "call ema_ once per device"
            )
        if (t.dtype, s.dtype) not in _SUPPORTED_PAIRS:
            raise TypeError(
                f"targets[{i}] is {t.dtype} and sources[{i}] is {s.dtype}; supported: equal "
                "float dtypes, or a float32 target with a bfloat16 or float16 source"
            )


def _dense(t):
    """ATen's is_non_overlapping_and_dense: the elements fill one span, in some order
    of the dims (contiguous, channels-last, transposed, ...)."""
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def check_disjoint_targets(targets):
    """The kernels' check (csrc/ema/ema_plan.h) that no two targets share memory, for
    the Python paths: spans sorted by start, a pair whose spans meet compared (shared
    when it is one tensor twice, or two dense tensors: too hard to tell otherwise)."""
    spans = []
    for i, t in enumerate(targets):
        if t.numel():
            last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
            spans.append((t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size(), i))
    spans.sort()
    reach = None
    for begin, end, i in spans:
        if reach is not None and begin < reach[1]:
            a, b = targets[reach[2]], targets[i]
            if a is b or (_dense(a) and _dense(b)):
                lo, hi = sorted((reach[2], i))
                raise ValueError(
                    f"targets[{lo}] and targets[{hi}] share memory (the same tensor twice, e.g. "
                    "a tied parameter?); each target may appear once")
        if reach is None or end > reach[1]:
            reach = (begin, end, i)


def _check_decay_device(decay_tensor, device):
    if decay_tensor is not None and decay_tensor.device.type != "cpu":
        if decay_tensor.device != device:
            raise ValueError(f"decay is on {decay_tensor.device} but targets are on {device}")


@torch.no_grad()
def ema_torch_(targets, sources, decay_tensor, decay):
    """The PyTorch fallback: lerp_ in the target's precision, as the kernels do.
    Also takes what the kernels do not: any dtype pair, sources on another device."""
    weight = (1.0 - decay_tensor.to(torch.float64)) if decay_tensor is not None else 1.0 - decay
    for t, s in zip(targets, sources):
        w = weight.to(device=t.device, dtype=t.dtype) if torch.is_tensor(weight) else weight
        t.lerp_(s.to(device=t.device, dtype=t.dtype), w)


@torch.no_grad()
def _ema_reference_(targets, sources, decay_tensor, decay):
    new = ema_reference(targets, sources, decay_tensor if decay_tensor is not None else decay)
    for t, v in zip(targets, new):
        t.copy_(v)


def ema_(targets, sources, decay, *, backend="auto"):
    """In place, for each pair: ``t <- decay * t + (1 - decay) * s``.

    Args:
        targets: list of floating-point tensors (the EMA / teacher weights),
            all on one device, updated in place.
        sources: list of tensors of the same shapes and device (the model).
            Pairs: equal float dtypes, or fp32 targets with bf16/fp16 sources.
        decay: a float in [0, 1], or a 0-dim tensor (on the CPU, or on the
            targets' device: read by the kernel, no host sync, not checked).
        backend: "auto", "cuda", "cpu" or "reference".
    """
    targets = _tensor_list(targets, "targets")
    sources = _tensor_list(sources, "sources")
    decay_tensor, decay_value = check_decay(decay)
    if len(targets) != len(sources):
        raise ValueError(f"targets has {len(targets)} tensors but sources has {len(sources)}")
    if len(targets) == 0:
        return
    first = targets[0]
    if not isinstance(first, torch.Tensor):
        raise TypeError(f"targets[0] must be a tensor, got {type(first).__name__}")
    device = first.device
    name = resolve_backend(backend, device, "ema_", _IMPLEMENTED)
    _check_decay_device(decay_tensor, device)
    compiled = (
        _extension.has_cuda_kernels() if name == "cuda" else _extension.has_cpu_kernels()
    )
    if name != "reference" and compiled:
        torch.ops.sslfast.ema_(targets, sources, decay_tensor, decay_value)
        return
    check_lists(targets, sources)
    if not torch.compiler.is_compiling():  # traced tensors have no memory to compare
        check_disjoint_targets(targets)
    if name == "reference":
        _ema_reference_(targets, sources, decay_tensor, decay_value)
    else:
        _extension.warn_fallback("ema_", device.type)
        ema_torch_(targets, sources, decay_tensor, decay_value)


def _register_fake():
    if _extension.extension() is None:
        return

    @torch.library.register_fake("sslfast::ema_")
    def _ema_fake(targets, sources, decay_tensor, decay):
        # Same checks as the kernels, so tracing rejects what they would.
        check_lists(targets, sources)
        return None


_register_fake()
