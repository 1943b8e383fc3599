"""Functional forms of the sslfast ops (``<op>_loss`` / ``<op>_``)."""

from sslfast.ops.augment import augment
from sslfast.ops.clip import clip_loss
from sslfast.ops.dino import dino_loss
from sslfast.ops.ema import ema_
from sslfast.ops.enqueue import enqueue_
from sslfast.ops.info_nce import info_nce_loss
from sslfast.ops.ntxent import ntxent_loss

__all__ = ["augment", "clip_loss", "dino_loss", "ema_", "enqueue_", "info_nce_loss", "ntxent_loss"]
