"""hmlstm: the Hierarchical Multiscale LSTM (Chung, Ahn & Bengio, ICLR 2017) for PyTorch."""

from ._version import __version__
from .backends import available_backends
from .boundary import hard_sigmoid
from .lm import CharLM, GatedOutput, LMOutput
from .model import HMLSTM, HMLSTMLayer
from .reference import naive_cell_step
from .state import HMLSTMOutput, HMLSTMState
from .types import CellConfig, LayerParams

__all__ = [
    "__version__", "HMLSTM", "HMLSTMLayer", "HMLSTMOutput", "HMLSTMState", "CharLM", "GatedOutput",
    "LMOutput", "CellConfig", "LayerParams", "naive_cell_step", "hard_sigmoid", "available_backends",
]
