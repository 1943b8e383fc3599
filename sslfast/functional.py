"""Functional forms of the sslfast ops (``<op>_loss`` / ``<op>_``)."""

from sslfast.ops.ema import ema_

__all__ = ["ema_"]
