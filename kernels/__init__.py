"""Fused Triton kernels, imported as soflow_fast.kernels (setup.py maps this folder there)."""
