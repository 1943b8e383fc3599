"""The definitions, in plain PyTorch. Tests and benchmarks compare against them."""

from sslfast.reference.ema import ema_reference

__all__ = ["ema_reference"]
