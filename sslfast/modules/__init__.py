"""User-facing nn.Modules."""

from sslfast.modules.ema import ModelEMA, update_momentum
from sslfast.modules.memory_bank import MemoryBank, MemoryBankModule

__all__ = ["MemoryBank", "MemoryBankModule", "ModelEMA", "update_momentum"]
