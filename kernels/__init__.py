"""Triton kernels of patfast (installed as patfast.kernels) and their eager PyTorch reference."""
