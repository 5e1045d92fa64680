"""Test harness: a `gpu` marker, the Triton interpreter on machines without CUDA, and the engine tests' shared TINY
model (fixtures `weights`, `reference`).

TRITON_INTERPRET must be set before anything imports triton, so this runs first. Checking for CUDA
imports torch, which does not import triton.
"""

import os
import sys
from pathlib import Path

# This checkout's top-level kernels/ (shipped as igpt_fast.kernels) must not be importable as `kernels`: transformers
# >= 5.25 depends on Hugging Face's `kernels` package and imports it when it loads a model, and `python -m pytest` puts
# the checkout first on sys.path, where our directory would shadow it. igpt_fast itself comes from the installed
# (editable) package, not from the checkout's path. Child Pythons (3.11+) get the same through PYTHONSAFEPATH.
_CHECKOUT = Path(__file__).resolve().parent.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _CHECKOUT]
os.environ.setdefault("PYTHONSAFEPATH", "1")

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import TINY, random_state_dict  # noqa: E402

from igpt_fast import ReferenceImageGPT  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (full sizes, bfloat16 and CUDA graphs run only there)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> torch.device:
    """Where kernel tests run: the GPU when there is one, else the CPU under the Triton interpreter."""
    return torch.device("cuda" if HAS_CUDA else "cpu")


@pytest.fixture
def few_linear_programs(monkeypatch):
    """Under the Triton interpreter, the linears' launch heuristic aims at 8 programs instead of a GPU's 264
    (kernels/linear.py's _TARGET_PROGRAMS); with CUDA it stays as it is. The interpreter runs each program as a pass of
    Python over the kernel, and at TINY's widths 264 cuts W into stripes of 2 columns: over a thousand GEMV programs in
    one 4-token generate() (71 s on a 2-core machine; 20 s with 8). The engine tests that use this test the kernels
    inside the engine's control flow, where wider stripes and tiles run the same code (the last one masked);
    tests/test_linear.py tests the heuristic itself and the 2-column stripes."""
    if not HAS_CUDA:
        from igpt_fast.kernels import linear

        monkeypatch.setattr(linear, "_TARGET_PROGRAMS", 8)


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    """Random TINY weights, the same in every engine test module."""
    return random_state_dict(TINY, seed=11)


@pytest.fixture(scope="module")
def reference(weights) -> ReferenceImageGPT:
    return ReferenceImageGPT.from_state_dict(TINY, weights)
