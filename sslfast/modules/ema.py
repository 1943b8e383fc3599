"""EMA teachers: ``ModelEMA`` (timm ``ModelEmaV3`` numerics) and
``update_momentum`` (lightly's), both over the fused ``ema_`` op."""

import copy
import weakref

import torch
from torch import nn

from sslfast.ops.ema import _SUPPORTED_PAIRS, check_decay, ema_, ema_torch_

_BUFFER_MODES = ("average", "copy", "skip")


def _unwrap(model):
    """The module itself inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


@torch.no_grad()
def update_momentum(model, model_ema, m):
    """``model_ema.p <- m * model_ema.p + (1 - m) * model.p`` for every parameter
    (lightly.models.utils.update_momentum; buffers are left alone)."""
    check_decay(m, "m")
    ema_params = list(model_ema.parameters())
    params = list(model.parameters())
    if len(ema_params) != len(params):
        raise ValueError(
            f"model has {len(params)} parameters but model_ema has {len(ema_params)}"
        )
    ema_(ema_params, params, m)


class _Slot:
    """Where a tensor lives in a module: read fresh on every update, so that
    ``.to()`` or ``load_state_dict`` replacing a buffer is seen."""

    __slots__ = ("module", "name", "is_param")

    def __init__(self, module, name, is_param):
        self.module, self.name, self.is_param = module, name, is_param

    def get(self):
        return (self.module._parameters if self.is_param else self.module._buffers)[self.name]


def _slots(model):
    """name -> _Slot for every parameter and persistent buffer (state_dict order), each
    tensor once: a tied one under its first name only (as ``parameters()`` lists it),
    so that it is averaged once per update."""
    out, seen = {}, set()
    for prefix, mod in model.named_modules():
        pre = prefix + "." if prefix else ""
        for name, p in mod._parameters.items():
            if p is not None and id(p) not in seen:
                seen.add(id(p))
                out[pre + name] = _Slot(mod, name, True)
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set and id(b) not in seen:
                seen.add(id(b))
                out[pre + name] = _Slot(mod, name, False)
    return out


class ModelEMA(nn.Module):
    """An exponential moving average of a model's parameters and buffers.

    Numerically equal to ``timm.utils.ModelEmaV3(model, decay)`` for the same
    settings (round-to-nearest for bf16 shadows; timm rounds those
    stochastically by default, use ``shadow_dtype=torch.float32`` instead).

    Args:
        model: the model to follow (DDP / compiled wrappers are unwrapped).
        decay: the default decay in [0, 1] (``update`` may pass another).
        buffers: "average" (float buffers averaged, integer buffers copied),
            "copy" (all buffers copied), or "skip" (buffers left alone).
        shadow_dtype: keep the floating-point shadow tensors in this dtype,
            e.g. ``torch.float32`` for a bf16 model.
        device: keep the shadow on this device (the update then moves each
            source tensor; the fused path needs the same device).

    ``update(model, decay=None)`` advances the average, ``.module`` is the
    averaged model for evaluation, and ``state_dict()`` holds it.
    """

    def __init__(self, model, decay=0.9999, buffers="average", shadow_dtype=None, device=None):
        super().__init__()
        check_decay(decay, "decay")
        if buffers not in _BUFFER_MODES:
            raise ValueError(f"buffers must be one of {_BUFFER_MODES}, got {buffers!r}")
        if shadow_dtype is not None and (
            not isinstance(shadow_dtype, torch.dtype) or not shadow_dtype.is_floating_point
        ):
            raise TypeError(
                f"shadow_dtype must be a floating-point torch.dtype, got {shadow_dtype!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        model = _unwrap(model)
        self.decay = decay
        self.buffers_mode = buffers
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.module.requires_grad_(False)
        if device is not None:
            self.module.to(device=device)
        if shadow_dtype is not None:
            self.module.to(dtype=shadow_dtype)  # casts floating-point tensors only
        self._source = lambda: None  # weak reference to the bound model
        self._bind(model)

    def _bind(self, model):
        """Pair the shadow's tensors with ``model``'s, once per source model."""
        ema_slots, src_slots = _slots(self.module), _slots(model)
        if ema_slots.keys() != src_slots.keys():
            missing = sorted(set(ema_slots) ^ set(src_slots))[:5]
            raise ValueError(f"model does not match the EMA model; differing tensors: {missing}")
        self._averaged, self._copied = [], []
        for name, es in ema_slots.items():
            ss = src_slots[name]
            e = es.get()
            if es.is_param or (self.buffers_mode == "average" and e.is_floating_point()):
                self._averaged.append((es, ss))
            elif self.buffers_mode != "skip":
                self._copied.append((es, ss))
        # Sorted once into per-device lists the fused op takes, and the rest
        # (dtype pairs it does not take, or shadow and model on two devices).
        # Parameters keep their identity under .to(); buffers are read fresh.
        self._groups, self._rest = {}, []
        for es, ss in self._averaged:
            e, s = es.get(), ss.get()
            if e.device == s.device and (e.dtype, s.dtype) in _SUPPORTED_PAIRS:
                g = self._groups.setdefault(e.device, ([], [], []))
                if es.is_param:
                    g[0].append(e)
                    g[1].append(s)
                else:
                    g[2].append((es, ss))
            else:
                self._rest.append((es, ss))
        self._source = weakref.ref(model)
        self._layout = self._layout_of(model)

    @staticmethod
    def _layout_of(model):
        p = next(model.parameters(), None)
        return None if p is None else (p.device, p.dtype)

    @torch.no_grad()
    def update(self, model, decay=None):
        """One EMA step towards ``model`` with ``decay`` (default: self.decay)."""
        decay = self.decay if decay is None else decay
        check_decay(decay, "decay")
        model = _unwrap(model)
        if model is not self._source() or self._layout_of(model) != self._layout:
            self._bind(model)
        for ts, ss, buffer_slots in self._groups.values():
            if buffer_slots:
                ts = ts + [es.get() for es, _ in buffer_slots]
                ss = ss + [s.get() for _, s in buffer_slots]
            ema_(ts, ss, decay)
        if self._rest:
            decay_tensor = decay if torch.is_tensor(decay) else None
            ema_torch_([es.get() for es, _ in self._rest], [ss.get() for _, ss in self._rest],
                       decay_tensor, 0.0 if decay_tensor is not None else float(decay))
        for es, ss in self._copied:
            e = es.get()
            e.copy_(ss.get().to(device=e.device))

    @torch.no_grad()
    def set(self, model):
        """Copy ``model`` into the shadow (a fresh start)."""
        model = _unwrap(model)
        if model is not self._source():
            self._bind(model)
        for es, ss in self._averaged + self._copied:
            es.get().copy_(ss.get())

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)
