"""imagegpt-small decode steps (igpt-fast, the reference with a static cache eager and compiled, transformers'
generate plain and static) and whole-image forwards, under pytest-benchmark.

Each timed call runs STEPS decode steps feeding positions START..START+STEPS-1, around the middle of an image,
so attention reads the whole image's average number of cached tokens; the prefill that fills the cache up to
START runs in the untimed setup. extra_info["ms_per_step"] holds the median call over STEPS.
"""

import pytest
import torch

from igpt_fast import bench_measure as measure
from igpt_fast.anchors import StaticCacheAnchor, TransformersAnchor
from igpt_fast.bench_startup import measure_startup
from igpt_fast.model import ImageGPT
from igpt_fast.reference import ReferenceImageGPT

pytestmark = pytest.mark.gpu

STEPS = 128
START = 448
BATCHES = (1, 8, 64)
DTYPES = ("float16", "float32")


def record_ms_per_step(benchmark, steps: int) -> None:
    if benchmark.stats is not None:  # None under --benchmark-disable
        benchmark.extra_info["ms_per_step"] = benchmark.stats.stats.median * 1e3 / steps


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_igpt_fast_decode_steps(benchmark, synchronized, small, weights, device, dtype, batch):
    model = ImageGPT(small, weights, dtype=measure.DTYPES[dtype], device=device)
    decoder = model.decoder
    state = decoder.state(batch)
    state.top_k.fill_(measure.TOP_K)
    prompt = measure.prompt_of(small, batch, START, seed=0, device=device)
    decoder.start(state, prompt, greedy=False)  # compiles the kernels and captures the bucket's graph
    decoder.step(state, greedy=False)

    def steps():
        decoder.decode(state, STEPS, greedy=False)

    benchmark.group = f"decode {dtype} b{batch}"
    benchmark.pedantic(synchronized(steps), setup=synchronized(lambda: decoder.start(state, prompt, greedy=False)),
                       rounds=5)
    record_ms_per_step(benchmark, STEPS)


def test_igpt_fast_first_call_in_fresh_processes(benchmark, device):
    """The time is two child processes' whole runs; extra_info has what counts: the first generate() call (fp16,
    batch 8) with an empty Triton cache (cold_s) and with the cache that filled (warm_s)."""
    result = {}
    benchmark.group = "first call"
    benchmark.pedantic(lambda: result.update(measure_startup("small", "float16", 8, device, None, 0)), rounds=1)
    benchmark.extra_info.update(cold_s=result["first_call_s"], warm_s=result["warm_first_call_s"])


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_reference_static_cache_decode_steps(benchmark, synchronized, small, weights, device, compiled, dtype,
                                             batch):
    dt = measure.DTYPES[dtype]
    reference = ReferenceImageGPT.from_state_dict(small, {k: v.to(device, dt) for k, v in weights.items()})
    options = StaticCacheAnchor.compiled_options() if compiled else None
    anchor = StaticCacheAnchor(reference, batch, top_k=measure.TOP_K, compile_options=options)
    prompt = measure.prompt_of(small, batch, START, seed=0, device=device)
    anchor.decode(anchor.prefill(prompt), START, 4)  # compile and CUDA-graph recording, untimed

    benchmark.group = f"decode {dtype} b{batch}"
    benchmark.pedantic(synchronized(lambda first: anchor.decode(first, START, STEPS)),
                       setup=synchronized(lambda: ((anchor.prefill(prompt),), {})), rounds=3)
    record_ms_per_step(benchmark, STEPS)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cache", [None, "static"], ids=["dynamic", "static"])
def test_transformers_generate(benchmark, small, weights, device, cache, dtype, batch):
    """The timed call is a whole generate() (its prefill included); ms_per_step comes from the per-step clock."""
    pytest.importorskip("transformers")
    anchor = TransformersAnchor(small, weights, dtype=measure.DTYPES[dtype], device=device, top_k=measure.TOP_K,
                                cache_implementation=cache)
    prompt = measure.prompt_of(small, batch, START, seed=0, device=device)
    anchor.generate(prompt, STEPS + 1)  # warm-up; the static cache compiles here
    runs = []
    benchmark.group = f"transformers generate {dtype} b{batch}"
    benchmark.pedantic(lambda: runs.append(anchor.generate(prompt, STEPS + 1)), rounds=2)
    benchmark.extra_info["ms_per_step"] = min(run.ms_per_step for run in runs)


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("task", ["features", "likelihood"])
@pytest.mark.parametrize("system", [measure.ENGINE, "reference-eager"])
def test_whole_image_forward(benchmark, synchronized, small, weights, device, system, task, dtype, batch):
    dt = measure.DTYPES[dtype]
    ids = measure.prompt_of(small, batch, small.n_positions, seed=0, device=device)
    pixels = measure.random_pixels(small, batch, small.n_positions, seed=0, device=device)
    if system == measure.ENGINE:
        model = ImageGPT(small, weights, dtype=dt, device=device)
        fn = (lambda: model.features(ids)) if task == "features" else (lambda: model.log_likelihood(pixels))
    else:
        reference = ReferenceImageGPT.from_state_dict(small, {k: v.to(device, dt) for k, v in weights.items()})
        fn = ((lambda: measure.reference_features(reference, ids)) if task == "features"
              else (lambda: measure.reference_log_likelihood(reference, pixels)))
    benchmark.group = f"{task} {dtype} b{batch}"
    with torch.no_grad():
        benchmark.pedantic(synchronized(fn), rounds=5, warmup_rounds=1)
    if benchmark.stats is not None:
        benchmark.extra_info["images_per_s"] = batch / benchmark.stats.stats.median
