"""The install: one version string, the extension built wherever it can be, clear errors where it is not."""

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import hmlstm
from hmlstm.backends import resolve, unavailable_reason

ROOT = Path(__file__).resolve().parents[1]


def test_version_has_one_source():
    text = (ROOT / "hmlstm" / "_version.py").read_text()
    assert re.search(r'__version__ = "(.+)"', text).group(1) == hmlstm.__version__
    assert "version=read_version()" in (ROOT / "setup.py").read_text()


@pytest.mark.skipif(os.environ.get("HMLSTM_SKIP_BUILD", "0") not in ("", "0"),
                    reason="HMLSTM_SKIP_BUILD is set: this install is pure Python on purpose")
def test_cpp_extension_is_built_where_a_compiler_exists():
    """The C++ tests skip where the extension is absent; this makes a failed build fail instead."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler on this machine: the pure-Python install is the expected outcome")
    assert unavailable_reason("cpp", torch.device("cpu")) is None


def test_auto_picks_an_available_backend_and_unknown_names_fail():
    assert resolve("auto", torch.device("cpu")) in hmlstm.available_backends("cpu")
    with pytest.raises(ValueError, match="backend must be one of"):
        unavailable_reason("fast", torch.device("cpu"))


def test_unavailable_backend_error_says_how_to_get_it():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: the cpp backend's CPU-only message is tested on CPU machines")
    with pytest.raises(RuntimeError, match="backend='cpp' is not available on device cuda"):
        resolve("cpp", torch.device("cuda"))


def _wheel_venv(tmp_path) -> Path:
    """A fresh venv (seeing this environment's torch) holding hmlstm from a wheel built without the extension,
    as a plain `pip install .` makes it (its isolated build cannot import torch). Returns its python."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # it would put a checkout ahead of the wheel
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "whl"), str(ROOT)], check=True, env=dict(env, HMLSTM_SKIP_BUILD="1"), cwd=tmp_path)
    wheel = next((tmp_path / "whl").glob("hmlstm-*.whl"))
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(tmp_path / "venv")], check=True)
    python = tmp_path / "venv" / "bin" / "python"
    # --ignore-installed: the venv sees this environment's (editable) hmlstm, which pip would call satisfied
    subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--ignore-installed", "-q", str(wheel)],
                   check=True, env=env, cwd=tmp_path)
    return python


# The venv sees this environment's packages (torch) and so the editable install of the checkout, whose finder
# would hand out the checkout's own hmlstm._C: dropped, as on a machine that has only the wheel.
USE = ("import sys\n"
       "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in getattr(f, '__module__', '')]\n"
       "import warnings, torch, hmlstm\n"
       "from hmlstm import HMLSTM, backends\n"
       "assert hmlstm.__file__.startswith({venv!r}), hmlstm.__file__\n"
       "with warnings.catch_warnings(record=True) as w:\n"
       "    warnings.simplefilter('always')\n"
       "    out = HMLSTM(4, (5, 3))(torch.randn(2, 3, 4))\n"
       "print('backend', backends.resolve('auto', torch.device('cpu')))\n"
       "print('warnings', [str(x.message) for x in w])\n")


@pytest.mark.slow
def test_a_wheel_without_the_extension_builds_it_on_first_use_or_warns(tmp_path):
    """`pip install .` without --no-build-isolation: the first use compiles the CPU extension (once, cached) and
    says so; with the build turned off (HMLSTM_NO_JIT=1, or no compiler) backend='auto' warns once that it runs
    on the reference and names the command that fixes it."""
    import subprocess

    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler: the build on first use cannot be tested here")
    python = _wheel_venv(tmp_path)
    venv = str(tmp_path / "venv")
    code = USE.format(venv=venv)
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(tmp_path / "ext"))
    for var in ("HMLSTM_NO_JIT", "PYTHONPATH"):  # PYTHONPATH would put a checkout ahead of the wheel
        env.pop(var, None)
    built = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    assert "hmlstm: building the C++ extension" in built.stderr and "built the C++ extension in" in built.stderr
    assert "backend cpp" in built.stdout and "warnings []" in built.stdout
    again = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert "backend cpp" in again.stdout  # cached: loads without a rebuild message of its own build step

    off = subprocess.run([str(python), "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(env, HMLSTM_NO_JIT="1"))
    assert off.returncode == 0, off.stderr[-3000:]
    assert "backend reference" in off.stdout
    assert "runs on the 'reference' backend" in off.stdout and "pip install --no-build-isolation" in off.stdout
    assert off.stdout.count("runs on the 'reference' backend") == 1  # warned once


def test_the_retired_cuda_backend_names_its_replacement():
    from hmlstm import HMLSTM
    from hmlstm.backends import unavailable_reason

    with pytest.raises(ValueError, match="backend='cuda' no longer exists.*triton"):
        HMLSTM(4, (8, 8), backend="cuda")
    with pytest.raises(ValueError, match="no longer exists"):
        unavailable_reason("cuda", torch.device("cpu"))
