"""Fused HM-LSTM ops registered with torch.library, one module per backend (cpp, cuda, triton)."""
