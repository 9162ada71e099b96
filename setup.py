"""Build and install hmlstm.

The C++ extension `hmlstm._C` (csrc/) is optional. It is built when torch can be imported at build time:

    pip install torch==2.13.0 && pip install --no-build-isolation -e .

A plain `pip install .` (an isolated build, which cannot see torch) installs without it; the package then
compiles the CPU part on first use (torch.utils.cpp_extension.load, cached; HMLSTM_NO_JIT=1 turns that off).

Environment flags:
    HMLSTM_SKIP_BUILD=1        build no extension at all (pure Python: reference + Triton backends)
    HMLSTM_SKIP_CUDA_BUILD=1   build the CPU part only, even where CUDA is available
    HMLSTM_FORCE_CUDA_BUILD=1  build the CUDA part even if no GPU is visible (needs nvcc and a CUDA torch),
                               and let a failed CUDA compile stop the install (otherwise: CPU kernels only)
    DEBUG=1                    -O0 -g
    MAX_JOBS=N                 parallel compile jobs (ninja)

The CPU row kernels are compiled twice, for any x86-64 CPU and for AVX2 + FMA (csrc/cell_rows_avx2.cpp, with
GCC); the extension picks one when it loads. HMLSTM_CPU_ISA=base at run time forces the first.
"""

import glob
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def read_version() -> str:
    with open(os.path.join(HERE, "hmlstm", "_version.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


def flag(name: str) -> bool:
    return os.environ.get(name, "0") not in ("", "0", "false", "False")


def extensions():
    """The C++/CUDA extension, or nothing where it cannot be built (the package still works)."""
    if flag("HMLSTM_SKIP_BUILD"):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("hmlstm: torch is not importable at build time; installing without the C++ extension "
              "(to build it: pip install torch first, then pip install --no-build-isolation -e .)")
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp:
        return [], {}
    debug = flag("DEBUG")
    # -fno-trapping-math lets GCC vectorize the branch-free float exp of csrc/cell_cpu.cpp (torch itself
    # builds with it and -fno-math-errno); NaN and inf still propagate as IEEE says.
    cxx = ["-O0", "-g"] if debug else ["-O3", "-fno-trapping-math", "-fno-math-errno"]
    cxx += ["-fopenmp"] if os.name != "nt" else []
    with_cuda = bool(cu) and not flag("HMLSTM_SKIP_CUDA_BUILD") and torch.version.cuda is not None \
        and CUDA_HOME is not None and (torch.cuda.is_available() or flag("HMLSTM_FORCE_CUDA_BUILD"))
    if with_cuda:
        nvcc = ["-O0", "-g", "-G"] if debug else ["-O3", "--use_fast_math"]
        ext = CUDAExtension("hmlstm._C", cpp + cu, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                            extra_link_args=["-fopenmp"])
    else:
        ext = CppExtension("hmlstm._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": with_cpu_fallback(BuildExtension).with_options(use_ninja=True)}


def with_cpu_fallback(base):
    """`base` (torch's BuildExtension), except that a failed compile of the CUDA sources rebuilds the
    extension without them: the CPU kernels still install, and backend='cuda' then says what happened.
    HMLSTM_FORCE_CUDA_BUILD=1 makes the failure stop the install instead."""

    class BuildExtWithFallback(base):
        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as e:  # the compiler's own output is above in the log
                if not any(s.endswith(".cu") for s in ext.sources) or flag("HMLSTM_FORCE_CUDA_BUILD"):
                    raise
                print(f"hmlstm: WARNING: the CUDA kernels (csrc/*.cu) failed to build ({e}); installing the "
                      "CPU kernels only. Fix the error above and reinstall, or set HMLSTM_FORCE_CUDA_BUILD=1 "
                      "to make this failure stop the install.")
                ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
                super().build_extension(ext)

    return BuildExtWithFallback


ext_modules, cmdclass = extensions()

setup(
    name="hmlstm",
    version=read_version(),
    description="Hierarchical Multiscale LSTM for PyTorch: reference, fused Triton/C++/CUDA ops, Lightning training",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ ships inside the package too (hmlstm.configs), so `hmlstm fit` finds its defaults anywhere, and
    # so do the C++ sources (hmlstm/csrc in a wheel): an install without the extension compiles them on first
    # use (hmlstm/ops/extension.py).
    packages=["hmlstm", "hmlstm.data", "hmlstm.ops", "hmlstm.ops.triton", "hmlstm.configs", "hmlstm.csrc"],
    package_dir={"hmlstm": "hmlstm", "hmlstm.configs": "configs", "hmlstm.csrc": "csrc"},
    package_data={"hmlstm.configs": ["*.yaml"], "hmlstm.csrc": ["*.cpp", "*.h", "*.cu"]},
    install_requires=[
        "torch>=2.4",
        "pytorch-lightning>=2.2",
        "jsonargparse[signatures]>=4.27",
        "matplotlib>=3.5",
        "tensorboard",
        "ninja",
        "triton>=3.0; platform_system == 'Linux' and platform_machine == 'x86_64'",
    ],
    extras_require={"test": ["pytest>=7"]},
    entry_points={"console_scripts": ["hmlstm = hmlstm.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
