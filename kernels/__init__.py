"""Triton kernels of the HM-LSTM layer-step; installed as `hmlstm.kernels`."""
