"""Triton kernels and their launchers only: tensors in, tensors out (imported lazily)."""
