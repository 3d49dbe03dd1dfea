"""Kernels: attention computations over stored KV (reference PyTorch routines and Triton kernels)."""
