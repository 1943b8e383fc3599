"""The definitions, in plain PyTorch. Tests and benchmarks compare against them."""

from sslfast.reference.augment import augment_reference
from sslfast.reference.clip import clip_reference
from sslfast.reference.dino import dino_reference
from sslfast.reference.dot_lse import dot_lse_reference
from sslfast.reference.ema import ema_reference
from sslfast.reference.enqueue import enqueue_reference
from sslfast.reference.info_nce import info_nce_reference
from sslfast.reference.ntxent import ntxent_reference

__all__ = [
    "augment_reference",
    "clip_reference",
    "dino_reference",
    "dot_lse_reference",
    "ema_reference",
    "enqueue_reference",
    "info_nce_reference",
    "ntxent_reference",
]
