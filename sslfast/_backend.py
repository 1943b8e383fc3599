"""Backend choice per call: ``backend=`` wins, then ``SSLFAST_BACKEND``, then
the device (CUDA tensors -> fused GPU kernel, CPU tensors -> CPU kernel)."""

import functools
import os

import torch

BACKENDS = ("auto", "triton", "cuda", "cpu", "reference")


def resolve_backend(backend, device, op, implemented, gpu_default="cuda"):
    """The backend that runs ``op`` on tensors of ``device``.

    implemented: the backends ``op`` has (a subset of BACKENDS minus "auto").
    """
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        env = os.environ.get("SSLFAST_BACKEND", "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"SSLFAST_BACKEND must be one of {BACKENDS}, got {env!r}")
            backend = env
            # The variable is global: "cuda" / "triton" mean an op's fused GPU kernel,
            # whichever of the two it is written in.
            if backend in ("cuda", "triton") and backend not in implemented:
                backend = gpu_default
    if backend == "auto":
        backend = gpu_default if device.type == "cuda" else "cpu"
    if backend not in implemented:
        raise ValueError(f"{op}: backend {backend!r} is not implemented; available: {implemented}")
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    if backend in ("cuda", "triton") and device.type != "cuda" and not interpreted:
        raise ValueError(f"{op}: backend {backend!r} needs CUDA tensors, got tensors on {device}")
    if backend == "cpu" and device.type != "cpu":
        raise ValueError(f"{op}: backend 'cpu' needs CPU tensors, got tensors on {device}")
    return backend


def without_autocast(fn):
    """For custom-op bodies: they compute in their inputs' dtypes with float32
    accumulation by design, so an enclosing ``torch.autocast`` must not recast the
    matmuls inside them (on the CPU it would also break their ``out=`` buffers)."""

    @functools.wraps(fn)
    def body(*args, **kwargs):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args, **kwargs)

    return body
