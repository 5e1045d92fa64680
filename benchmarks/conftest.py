"""pytest-benchmark harness: `pytest benchmarks/` on a CUDA machine (every test here is GPU-only and skips with a
reason elsewhere; CI runs only tests/). Compile, capture and warm-up happen in fixtures or pedantic setup, outside
the timed region; each timed call ends with a CUDA synchronize.

The summary table, ratios to the anchors and the plot come from `python -m igpt_fast.benchmark`; these files give
the same measurements pytest-benchmark's statistics, grouping and --benchmark-compare.
"""

import sys
from pathlib import Path

# As in tests/conftest.py: the checkout's top-level kernels/ must not shadow Hugging Face's `kernels` package, which
# transformers >= 5.25 imports when it loads a model (the transformers anchors here).
_CHECKOUT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]

import pytest  # noqa: E402
import torch  # noqa: E402

from igpt_fast.bench_measure import random_weights  # noqa: E402
from igpt_fast.config import ImageGPTConfig  # noqa: E402

HAS_CUDA = torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="benchmarks need a CUDA GPU")
    for item in items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda")


@pytest.fixture(scope="session")
def small() -> ImageGPTConfig:
    return ImageGPTConfig.small()


@pytest.fixture(scope="session")
def weights(small, device) -> dict[str, torch.Tensor]:
    """imagegpt-small's shapes, random, float32 on the CPU (each system copies what it needs)."""
    return random_weights(small, seed=0, device=device)


@pytest.fixture(scope="session")
def synchronized(device):
    """fn -> fn followed by a CUDA synchronize, so the timer sees the device's work."""
    def wrap(fn):
        def run(*args, **kwargs):
            result = fn(*args, **kwargs)
            torch.cuda.synchronize(device)
            return result
        return run
    return wrap
