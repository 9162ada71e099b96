"""Build and install hmlstm.

The C++ extension `hmlstm._C` (csrc/) is optional. It is built when torch can be imported at build time:

    pip install torch==2.13.0 && pip install --no-build-isolation -e .

A plain `pip install .` (an isolated build, which cannot see torch) installs without it; the package then
compiles the CPU part on first use (torch.utils.cpp_extension.load, cached; HMLSTM_NO_JIT=1 turns that off).

Environment flags:
    HMLSTM_SKIP_BUILD=1        build no extension at all (pure Python: reference + Triton backends)
    DEBUG=1                    -O0 -g
    MAX_JOBS=N                 parallel compile jobs (ninja)

The CPU row kernels are compiled twice, for any x86-64 CPU and for AVX2 + FMA (csrc/cell_rows_avx2.cpp, with
GCC); the extension picks one when it loads. HMLSTM_CPU_ISA=base at run time forces the first.

The GPU path is the Triton backend (hmlstm/ops/triton), compiled by Triton at run time: nothing of it is built
here. (A per-step CUDA op, csrc/cell_cuda.cu, was retired for it: docs/history.md.)
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
    """The C++ extension (CPU kernels), or nothing where it cannot be built (the package still works)."""
    if flag("HMLSTM_SKIP_BUILD"):
        return [], {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        print("hmlstm: torch is not importable at build time; installing without the C++ extension "
              "(to build it: pip install torch first, then pip install --no-build-isolation -e .)")
        return [], {}
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    if not cpp:
        return [], {}
    debug = flag("DEBUG")
    # -fno-trapping-math lets GCC vectorize the branch-free float exp of csrc/cell_cpu.cpp (torch itself
    # builds with it and -fno-math-errno); NaN and inf still propagate as IEEE says.
    cxx = ["-O0", "-g"] if debug else ["-O3", "-fno-trapping-math", "-fno-math-errno"]
    cxx += ["-fopenmp"] if os.name != "nt" else []
    ext = CppExtension("hmlstm._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extensions()

setup(
    name="hmlstm",
    version=read_version(),
    description="Hierarchical Multiscale LSTM for PyTorch: reference, fused Triton (GPU) and C++ (CPU) ops, Lightning training",
    long_description=open(os.path.join(HERE, "README.md")).read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ ships inside the package too (hmlstm.configs), so `hmlstm fit` finds its defaults anywhere, and
    # so do the C++ sources (hmlstm/csrc in a wheel): an install without the extension compiles them on first
    # use (hmlstm/ops/extension.py).
    packages=["hmlstm", "hmlstm.data", "hmlstm.ops", "hmlstm.ops.triton", "hmlstm.configs", "hmlstm.csrc"],
    package_dir={"hmlstm": "hmlstm", "hmlstm.configs": "configs", "hmlstm.csrc": "csrc"},
    package_data={"hmlstm.configs": ["*.yaml"], "hmlstm.csrc": ["*.cpp", "*.h"]},
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
