"""Peak memory of a call: the GPU allocator's peak on CUDA, the process's
resident-set high-water mark on the CPU (Linux: reset through clear_refs).

On the CPU, glibc's malloc keeps freed memory for reuse, so a call could run in
memory that is already resident and show no growth. For the measured call only,
allocations of 64 KiB and more are served by mmap (and returned on free), so the
high-water mark counts what the call really holds at its peak; afterwards the
threshold is set to glibc's largest dynamic value (32 MiB), where a warmed-up
process sits anyway.
"""

import ctypes
import gc

import torch

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_MMAP_MAX = -1, -3, -4  # glibc mallopt parameters


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - glibc only
        libc.malloc_trim  # noqa: B018
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


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


_keeping_freed_memory = False  # set by keep_freed_memory; peak_memory restores it


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
    if _LIBC is not None:
        _LIBC.mallopt(_M_MMAP_MAX, 65536)  # glibc's default, whatever keep_freed_memory set
        _LIBC.mallopt(_M_MMAP_THRESHOLD, 64 << 10)
        _LIBC.malloc_trim(0)
    try:
        if not _reset_rss_peak():
            return fn(), None
        base = _read_status_kib("VmRSS")
        out = fn()
        return out, max(0, _read_status_kib("VmHWM") - base) * 1024
    finally:
        if _LIBC is not None:
            _LIBC.mallopt(_M_MMAP_THRESHOLD, 32 << 20)
            if _keeping_freed_memory:
                keep_freed_memory()


def keep_freed_memory():
    """For CPU training loops: glibc serves large blocks (activations) with mmap and
    unmaps them on free, so every step faults the same pages in again (on a 2-core
    VM the kernel's time then rivals the model's). Keep them in the heap instead, and
    do not trim it: a loop's steady working set stays resident. Returns whether it
    took effect (glibc only)."""
    global _keeping_freed_memory
    if _LIBC is None:
        return False
    _keeping_freed_memory = bool(_LIBC.mallopt(_M_MMAP_MAX, 0)) and \
        bool(_LIBC.mallopt(_M_TRIM_THRESHOLD, 2**30))
    return _keeping_freed_memory
