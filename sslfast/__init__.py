"""sslfast: fused kernels for self-supervised pretraining."""

from sslfast import functional
from sslfast._extension import has_cpu_kernels, has_cuda_kernels
from sslfast.losses import (
    BYOLLoss,
    CLIPLoss,
    DINOLoss,
    InfoNCELoss,
    NegativeCosineSimilarity,
    NTXentLoss,
)
from sslfast.modules.ema import ModelEMA, update_momentum
from sslfast.modules.memory_bank import MemoryBank, MemoryBankModule
from sslfast.schedules import cosine_schedule

__version__ = "0.1.0"

__all__ = [
    "NegativeCosineSimilarity",
    "BYOLLoss",
    "CLIPLoss",
    "DINOLoss",
    "InfoNCELoss",
    "MemoryBank",
    "MemoryBankModule",
    "ModelEMA",
    "NTXentLoss",
    "cosine_schedule",
    "functional",
    "has_cpu_kernels",
    "has_cuda_kernels",
    "update_momentum",
]
