"""Triton kernels of igpt-fast, one kernel family per module (shipped as igpt_fast.kernels)."""
