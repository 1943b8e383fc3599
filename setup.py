"""Builds the one extension, ``sslfast._C``.

A ``CUDAExtension`` when nvcc and a CUDA build of torch are present, else a
``CppExtension``. Environment:

- ``SSLFAST_FORCE_CPU=1``      build the C++ CPU kernels only.
- ``SSLFAST_CUDA_ARCHS``       CUDA targets (over TORCH_CUDA_ARCH_LIST), default ``8.0;9.0``.
- ``CUDA_HOME``                toolkit root; guessed from the usual places if unset.
- ``MAX_JOBS``                 parallel compile jobs (read by torch's build).
"""

import glob
import os
import shutil
import site
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _find_cuda_home():
    """A toolkit root that really has nvcc and the runtime headers.

    torch guesses CUDA_HOME from ``which nvcc``; where nvcc is a wrapper script
    outside the toolkit that guess is wrong, so look for a real toolkit first.
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [env] if env else []
    candidates += ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    nvcc = shutil.which("nvcc")  # last: a toolkit elsewhere, nvcc on PATH its own
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    for root in candidates:
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")) and os.path.isfile(
            os.path.join(root, "include", "cuda_runtime.h")
        ):
            return root
    return None


def _extra_cuda_includes(cuda_home):
    """torch's CUDA headers include cublas_v2.h / cusparse.h; some toolkits lack
    them, the pip packages ``nvidia-*`` ship them."""
    if os.path.isfile(os.path.join(cuda_home, "include", "cublas_v2.h")) and os.path.isfile(
        os.path.join(cuda_home, "include", "cusparse.h")
    ):
        return []
    dirs = []
    roots = list(site.getsitepackages()) + [site.getusersitepackages()] + sys.path
    for root in roots:
        for inc in sorted(glob.glob(os.path.join(root, "nvidia", "*", "include"))):
            if inc not in dirs and (
                os.path.isfile(os.path.join(inc, "cublas_v2.h"))
                or os.path.isfile(os.path.join(inc, "cusparse.h"))
            ):
                dirs.append(inc)
    return dirs


def _extension():
    force_cpu = os.environ.get("SSLFAST_FORCE_CPU", "0") not in ("", "0")
    cuda_home = None
    if not force_cpu:
        cuda_home = _find_cuda_home()
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
            os.environ["PATH"] = os.path.join(cuda_home, "bin") + os.pathsep + os.environ["PATH"]
    # SSLFAST_CUDA_ARCHS wins over an inherited TORCH_CUDA_ARCH_LIST; the default only
    # where neither is set.
    if os.environ.get("SSLFAST_CUDA_ARCHS"):
        os.environ["TORCH_CUDA_ARCH_LIST"] = os.environ["SSLFAST_CUDA_ARCHS"]
    else:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]

    import torch
    from torch.utils import cpp_extension

    use_cuda = bool(cuda_home) and torch.version.cuda is not None and shutil.which("nvcc")
    cpp_sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    cu_sources = sorted(glob.glob("csrc/**/*.cu", recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc")]
    # -fno-trapping-math: no FP-exception traps are relied on, so branch-free
    # selects (max/min, clamps) can be if-converted and vectorized; results are
    # the same IEEE values.
    cxx_flags = ["-O3", "-fno-trapping-math"]
    link_args = []
    if sys.platform.startswith("linux"):
        # at::parallel_for is OpenMP inline code in torch's headers: without
        # -fopenmp it runs on one thread. libgomp.so.1 is torch's own copy.
        cxx_flags.append("-fopenmp")
        link_args.append("-fopenmp")
    define_macros = []
    if use_cuda:
        include_dirs += _extra_cuda_includes(cuda_home)
        define_macros.append(("SSLFAST_WITH_CUDA", "1"))
        print(f"sslfast: building CUDA extension (CUDA_HOME={cuda_home}, archs={archs})")
        return cpp_extension.CUDAExtension(
            "sslfast._C",
            cpp_sources + cu_sources,
            include_dirs=include_dirs,
            define_macros=define_macros,
            extra_link_args=link_args,
            extra_compile_args={
                "cxx": cxx_flags,
                "nvcc": ["-O3", "--expt-relaxed-constexpr", "-lineinfo"],
            },
        )
    print("sslfast: building CPU-only extension")
    return cpp_extension.CppExtension(
        "sslfast._C",
        cpp_sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_link_args=link_args,
        extra_compile_args={"cxx": cxx_flags},
    )


def _cmdclass():
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=[_extension()], cmdclass=_cmdclass())
