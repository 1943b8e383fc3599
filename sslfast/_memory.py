"""Peak memory of a call: the GPU allocator's peak on CUDA, the process's
resident-set high-water mark on the CPU (Linux: reset through clear_refs)."""

import gc

import torch


def _read_status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_rss_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn, device):
    """(fn's result, bytes allocated at the peak of fn beyond what was live before).

    On the CPU the figure is None where the OS cannot reset the peak.
    """
    device = torch.device(device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        out = fn()
        torch.cuda.synchronize(device)
        return out, torch.cuda.max_memory_allocated(device) - base
    if not _reset_rss_peak():
        return fn(), None
    base = _read_status_kib("VmRSS")
    out = fn()
    return out, max(0, _read_status_kib("VmHWM") - base) * 1024
