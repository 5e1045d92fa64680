"""igpt-fast: fast ImageGPT generation with Triton kernels and CUDA graphs."""

__version__ = "0.1.0"  # the package's version (pyproject.toml reads it from here)

from igpt_fast.checkpoint import load_checkpoint, save_pretrained
from igpt_fast.config import ImageGPTConfig
from igpt_fast.demo import demo_model_path
from igpt_fast.model import ImageGPT, ImageGPTForCausalImageModeling
from igpt_fast.processor import ImageProcessor
from igpt_fast.reference import ReferenceImageGPT

# transformers' names for the image processor, so the model card's import line is the only change
ImageGPTFeatureExtractor = ImageProcessor
ImageGPTImageProcessor = ImageProcessor

__all__ = [
    "ImageGPT",
    "ImageGPTConfig",
    "ImageGPTFeatureExtractor",
    "ImageGPTForCausalImageModeling",
    "ImageGPTImageProcessor",
    "ImageProcessor",
    "ReferenceImageGPT",
    "demo_model_path",
    "load_checkpoint",
    "save_pretrained",
]
