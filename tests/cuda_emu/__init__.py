"""The CUDA kernels of ``csrc/`` run on the CPU, for tests on machines without a GPU.

``load()`` rewrites every ``csrc/<op>/*_cuda.cu`` for the emulator of
``cuda_emu.h`` (whose comment gives the model and what it refuses), compiles them
with the op schemas as the library ``sslfast_emu`` (CPU tensors in, the CUDA
kernels' code run) and returns ``torch.ops.sslfast_emu``; ``selftest_cuda.cu``
adds kernels with known defects that ``tests/test_cuda_emu.py`` makes it report. With AddressSanitizer
preloaded in the process (``make test`` runs these tests so) the library is built
with it: an out-of-bounds read or write of a kernel, in a tensor or in shared
memory, fails the test.

``emulate(...)`` routes ``torch.ops.sslfast.<op>`` to the emulated ops for the
duration, so the Python wrappers (``sslfast.functional.*`` on CPU tensors) run the
CUDA host and kernel code instead of the CPU kernels.
"""

import contextlib
import functools
import pathlib
import re

import torch

from tests.utils import ROOT as _ROOT

ROOT = pathlib.Path(_ROOT)
HERE = pathlib.Path(__file__).resolve().parent
LIBRARY = "sslfast_emu"
H100_SMEM = 227 * 1024  # opt-in dynamic shared memory per block, sm_90
SM86_SMEM = 99 * 1024   # the smallest of the GPUs the kernels are written for

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(", re.S)


def asan_preloaded():
    """Whether AddressSanitizer's runtime is in this process (LD_PRELOAD)."""
    with open("/proc/self/maps") as f:
        return "libasan" in f.read()


def rewrite(source):
    """A .cu file's text for the emulator; lines keep their numbers."""
    s = re.sub(r"#include <c10/cuda/[^>]+>", "", source)
    # Only __shared__ declarations in a function body (indented, not static): the
    # storage is looked up at each execution, so it is refreshed for each block.
    s = re.sub(r"(?m)^([ \t]+)extern __shared__ (\w+) (\w+)\[\];",
               r"\1\2* \3 = ::cuda_emu::dynamic_shared<\2>();", s)
    s = re.sub(r"(?m)^([ \t]+)__shared__ ([\w:]+) (\w+)((?:\[[^\]]+\])*);",
               r"\1auto& \3 = ::cuda_emu::block_shared<\2\4, __COUNTER__>();", s)
    s = _LAUNCH.sub(lambda m: f'::cuda_emu::Launch("{m.group(1)}", {m.group(2)})({m.group(1)}, ', s)
    s = re.sub(r"([\w.\[\]]+)\.device\(\)\.is_cpu\(\)", r"::cuda_emu::is_host(\1)", s)
    s = s.replace(".is_cuda()", ".is_cpu()")
    s = s.replace(".pinned_memory(true)", ".pinned_memory(false)")
    s = re.sub(r"TORCH_LIBRARY_IMPL\(sslfast, CUDA, (\w+)\)",
               rf"TORCH_LIBRARY_IMPL({LIBRARY}, CPU, \1)", s)
    left = [t for t in ("<<<", "__shared__", "is_cuda", "c10/cuda", "(sslfast, CUDA")
            if t in s]
    if left:
        raise RuntimeError(f"cuda_emu: no rewrite for {left}: extend tests/cuda_emu")
    return s


def _schemas():
    """csrc/sslfast.cpp's TORCH_LIBRARY block, for the emulator's library."""
    text = (ROOT / "csrc" / "sslfast.cpp").read_text()
    block = re.search(r"TORCH_LIBRARY\(sslfast, m\) \{.*?\n\}\n", text, re.S)
    if block is None:
        raise RuntimeError("cuda_emu: no TORCH_LIBRARY(sslfast, m) block in csrc/sslfast.cpp")
    return block.group(0).replace("TORCH_LIBRARY(sslfast,", f"TORCH_LIBRARY({LIBRARY},")


def op_names():
    return re.findall(r'm\.def\("(\w+)\(', _schemas())


def _write(path, text):
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


@functools.cache
def load():
    """torch.ops.sslfast_emu, built on first use (a minute or two; then cached in build/)."""
    from torch.utils import cpp_extension

    asan = asan_preloaded()
    name = LIBRARY + ("_asan" if asan else "")
    build = ROOT / "build" / name
    build.mkdir(parents=True, exist_ok=True)
    sources = [str(HERE / "emu_ops.cpp")]
    schema = build / "schemas.cpp"
    _write(schema, "#include <torch/library.h>\n" + _schemas())
    sources.append(str(schema))
    kernels = sorted((ROOT / "csrc").glob("*/*_cuda.cu")) + [HERE / "selftest_cuda.cu"]
    for cu in kernels:
        out = build / f"{cu.stem}_emu.cpp"
        _write(out, f'#include "cuda_emu.h"\n#line 1 "{cu}"\n' + rewrite(cu.read_text()))
        sources.append(str(out))
    # Headers the rewrite changes (a check on host memory, e.g.) are found first in
    # include/; the others in csrc/.
    include = build / "include"
    for h in sorted((ROOT / "csrc").glob("*/*.h")):
        text = h.read_text()
        out = include / h.relative_to(ROOT / "csrc")
        if rewrite(text) != text:
            out.parent.mkdir(parents=True, exist_ok=True)
            _write(out, f'#include "cuda_emu.h"\n#line 1 "{h}"\n' + rewrite(text))
        elif out.exists():
            out.unlink()
    # Hidden: the library's inline functions (from the rewritten headers too) must
    # not be bound to sslfast._C's of the same name.
    flags = ["-O1", "-g", "-fno-omit-frame-pointer", "-fvisibility=hidden",
             "-fvisibility-inlines-hidden"]
    ldflags = []
    if asan:
        flags.append("-fsanitize=address")
        ldflags.append("-fsanitize=address")
    cpp_extension.load(name=name, sources=sources, extra_cflags=flags, extra_ldflags=ldflags,
                       extra_include_paths=[str(include), str(ROOT / "csrc"), str(HERE)],
                       build_directory=str(build), is_python_module=False, verbose=False)
    return getattr(torch.ops, LIBRARY)


_settings = [(0, True, H100_SMEM)]  # the emulator's, innermost last


@contextlib.contextmanager
def emulate(seed=None, cpu_tensors_are_host=True, optin_smem_bytes=H100_SMEM):
    """torch.ops.sslfast.<op> runs the emulated CUDA code for CPU tensors.

    seed: 0 runs blocks and threads in index order, else in an order shuffled
    with it; None keeps the enclosing ``emulate``'s (tests/conftest.py opens one
    with the test's seed for a test marked cuda_emu), 0 outside any.
    cpu_tensors_are_host=False makes a CPU tensor count as device memory
    where the host code asks (e.g. an EMA decay tensor read by the kernel).
    optin_smem_bytes: the most dynamic shared memory a kernel may opt into.
    The enclosing settings return on exit. Yields torch.ops.sslfast_emu (its
    ``_launches()`` lists the launches made).
    """
    from sslfast import _extension

    _extension.extension()  # registers torch.ops.sslfast.*
    ops = load()
    settings = (_settings[-1][0] if seed is None else seed, cpu_tensors_are_host,
                optin_smem_bytes)
    _settings.append(settings)
    ops._configure(*settings)
    names = op_names()
    saved = {n: getattr(torch.ops.sslfast, n) for n in names}
    try:
        for n in names:
            setattr(torch.ops.sslfast, n, getattr(ops, n))
        yield ops
    finally:
        for n, packet in saved.items():
            setattr(torch.ops.sslfast, n, packet)
        _settings.pop()
        ops._configure(*_settings[-1])


@contextlib.contextmanager
def native():
    """Inside ``emulate()``: the ops' own kernels (the CPU ones for CPU tensors) for
    the duration, e.g. to compare the emulated CUDA code with them."""
    names = op_names()
    current = {n: getattr(torch.ops.sslfast, n) for n in names}
    try:
        for n in names:
            delattr(torch.ops.sslfast, n)  # looked up again: the registered op
        yield
    finally:
        for n, packet in current.items():
            setattr(torch.ops.sslfast, n, packet)
