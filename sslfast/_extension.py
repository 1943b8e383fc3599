"""Loads the compiled extension ``sslfast._C`` once.

The package works without it: every op has a PyTorch fallback, and the first
fallback says so once with a warning. ``SSLFAST_NO_EXTENSION=1`` skips loading
(used by the tests of the fallback path).
"""

import os
import warnings

_state = {"loaded": False, "module": None, "error": None, "warned": set()}


def extension():
    """The ``sslfast._C`` module, or None when it is missing or disabled."""
    if not _state["loaded"]:
        _state["loaded"] = True
        if os.environ.get("SSLFAST_NO_EXTENSION", "0") not in ("", "0"):
            _state["error"] = "disabled by SSLFAST_NO_EXTENSION"
        else:
            try:
                from sslfast import _C  # registers torch.ops.sslfast.*

                _state["module"] = _C
            except ImportError as exc:  # not built, or built against another torch
                _state["error"] = f"{type(exc).__name__}: {exc}"
    return _state["module"]


def has_cpu_kernels():
    return extension() is not None


def has_cuda_kernels():
    ext = extension()
    return ext is not None and bool(getattr(ext, "with_cuda", False))


def warn_fallback(op, device_type):
    """Warn once per (op, device type) that the PyTorch fallback is used."""
    key = (op, device_type)
    if key in _state["warned"]:
        return
    _state["warned"].add(key)
    why = _state["error"] or "the extension was built without CUDA kernels"
    warnings.warn(
        f"sslfast: compiled {device_type} kernels unavailable ({why}); "
        f"{op} uses the PyTorch fallback.",
        RuntimeWarning,
        stacklevel=3,
    )
