"""Checkpoints with everything an exact resume needs: model (EMA teacher, queue
and DINO center are in the method's state_dict), optimizer, scheduler, step,
and the RNG states of every rank (global torch/CUDA/Python/NumPy generators and
the augmentation generator)."""

import os
import random

import numpy as np
import torch

from sslfast import distributed

FORMAT = "sslfast-pretrain/1"
# Settings that must match for a resumed run to continue the same run.
RESUME_KEYS = ("method", "backbone", "data", "image_size", "batch_size", "epochs", "world_size",
               "seed", "optimizer", "lr", "weight_decay", "warmup_epochs", "method_kwargs")


def rng_state(generator):
    """This rank's generators. CUDA: only the default generator of the rank's own
    device (the augmentation generator's), so a resume with another number of
    visible GPUs per process restores the one that matters."""
    device = generator.device
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "python": random.getstate(), "numpy": np.random.get_state(),
            "augment": generator.get_state()}


def set_rng_state(state, generator):
    torch.set_rng_state(state["torch"])
    device, cuda = generator.device, state["cuda"]
    if isinstance(cuda, (list, tuple)):  # before 2026-11-23: every visible device's
        cuda = cuda[device.index] if device.index is not None and device.index < len(cuda) \
            else None
    if cuda is not None and device.type == "cuda":
        torch.cuda.set_rng_state(cuda, device)
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    generator.set_state(state["augment"])


def all_rng_states(generator):
    """Every rank's RNG states, in rank order (collective under torch.distributed)."""
    state = rng_state(generator)
    if distributed.world_size() == 1:
        return [state]
    out = [None] * distributed.world_size()
    torch.distributed.all_gather_object(out, state)
    return out


def save(path, payload):
    """Written to a temporary file and renamed: a kill mid-write leaves the last
    checkpoint intact."""
    tmp = f"{path}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load(path, settings):
    """The checkpoint at ``path`` (a file, or a run directory holding
    ``checkpoint.pt``), after checking it continues the run described by
    ``settings``."""
    if os.path.isdir(path):
        path = os.path.join(path, "checkpoint.pt")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({exc})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise ValueError(f"--resume: {path} is not an sslfast-pretrain checkpoint")
    saved = ckpt["settings"]
    if saved["method"] != settings["method"]:
        raise ValueError(f"--resume: {path} is a checkpoint of --method {saved['method']}, "
                         f"not {settings['method']}")
    differ = [k for k in RESUME_KEYS if saved.get(k) != settings.get(k)]
    if differ:
        pairs = ", ".join(f"{k}: {saved.get(k)!r} (checkpoint) vs {settings.get(k)!r}"
                          for k in differ)
        raise ValueError(f"--resume: the checkpoint was written with other settings: {pairs}")
    return path, ckpt
