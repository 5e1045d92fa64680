"""igpt-fast: fast ImageGPT generation with Triton kernels and CUDA graphs."""

from igpt_fast.config import ImageGPTConfig

__all__ = ["ImageGPTConfig"]
