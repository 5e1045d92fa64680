"""igpt-fast: fast ImageGPT generation with Triton kernels and CUDA graphs."""

from igpt_fast.checkpoint import load_checkpoint, save_pretrained
from igpt_fast.config import ImageGPTConfig
from igpt_fast.model import ImageGPT, ImageGPTForCausalImageModeling
from igpt_fast.reference import ReferenceImageGPT

__all__ = [
    "ImageGPT",
    "ImageGPTConfig",
    "ImageGPTForCausalImageModeling",
    "ReferenceImageGPT",
    "load_checkpoint",
    "save_pretrained",
]
