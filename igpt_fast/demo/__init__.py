"""The demo model shipped in the package: a small ImageGPT trained on scikit-learn's 8x8 digits, tinted and
upsampled to 16x16, with a 16-color palette (scripts/train_demo_model.py made it; rerun that to rebuild).
It is a Hugging Face folder (config.json, model.safetensors, preprocessor_config.json): what `igpt-fast
generate` uses when no model is named, and the peaked-distribution parity fixture for engine tests.
"""

from pathlib import Path

DEMO_MODEL_PATH = Path(__file__).resolve().parent


def demo_model_path() -> Path:
    """The folder holding the shipped demo checkpoint."""
    return DEMO_MODEL_PATH
