"""User-facing nn.Modules."""

from sslfast.modules.ema import ModelEMA, update_momentum

__all__ = ["ModelEMA", "update_momentum"]
