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
