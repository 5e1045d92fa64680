"""Each Triton kernel of a decode step, and prefill attention, against its unfused PyTorch equivalent
(imagegpt-small shapes; decode attention at positions 256 and 1023), grouped so pytest-benchmark shows the pair
side by side; and quantizing whole images with the kernel, its unfused equivalent and transformers' processor
(on the host CPU), in pixels/s. Each timed call includes one CUDA synchronize (a few us); `python -m
igpt_fast.benchmark` times the same cases with CUDA events.
"""

import functools

import pytest
import torch

from igpt_fast import bench_measure
from igpt_fast.bench_kernels import QUANTIZE_SIDE, kernel_cases, quantize_cases
from igpt_fast.config import ImageGPTConfig

pytestmark = pytest.mark.gpu

BATCHES = (1, 8, 64)
DTYPES = ("float16", "float32")
KERNELS = ("decode_attention (t=256)", "decode_attention (t=1023)", "prefill_attention (S=512)",
           "prefill_attention (S=1024)", "norm_qkv", "linear_residual (attn c_proj)", "norm_linear (ln_2, c_fc, gelu)",
           "linear_residual (mlp c_proj)", "norm_linear (ln_f, lm_head)", "sample_tokens (top_k=40)",
           "quantize (pixels to clusters)")
DTYPE_FREE = {"sample_tokens (top_k=40)", "quantize (pixels to clusters)"}  # measured once, under float32


@functools.lru_cache(maxsize=1)
def cases(dtype: str, batch: int) -> dict:
    built = kernel_cases(ImageGPTConfig.small(), bench_measure.DTYPES[dtype], batch, torch.device("cuda"), seed=0,
                         with_dtype_free=True)
    return {case.name: case for case in built}


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel(benchmark, synchronized, kernel, impl, dtype, batch):
    if kernel in DTYPE_FREE and dtype != "float32":
        pytest.skip("does not depend on the model dtype: measured under float32")
    by_name = cases(dtype, batch)
    assert set(by_name) == set(KERNELS), sorted(by_name)
    case = by_name[kernel]
    benchmark.group = f"{kernel} {dtype} b{batch}"
    with torch.no_grad():
        benchmark.pedantic(synchronized(case.fused if impl == "triton" else case.unfused), rounds=200,
                           warmup_rounds=20)
    if benchmark.stats is not None:
        benchmark.extra_info["gb_per_s"] = case.bytes_moved / benchmark.stats.stats.median / 1e9
        benchmark.extra_info["torch_equivalent"] = case.baseline


@pytest.mark.parametrize("impl", ["kernel", "torch", "transformers"])
def test_quantize_throughput(benchmark, synchronized, device, impl):
    case = quantize_cases(device, seed=0)[impl]
    if case.skip:
        pytest.skip(case.skip)
    benchmark.group = "quantize throughput"
    with torch.no_grad():
        ids = benchmark.pedantic(synchronized(case.run), rounds=3 if case.on_host else 100, warmup_rounds=1)
    if case.check is not None:
        beyond_near_ties, _ = case.check(ids)
        assert beyond_near_ties == 0, f"{beyond_near_ties} ids differ from the kernel's beyond near ties"
    if benchmark.stats is not None:
        benchmark.extra_info["pixels_per_s"] = case.images * QUANTIZE_SIDE ** 2 / benchmark.stats.stats.median
        benchmark.extra_info["system"] = case.system
