"""The decode step's Triton kernels, each against its unfused PyTorch equivalent, at one model size, dtype and
batch; and the throughput of quantizing whole images (pixels to cluster ids) with the kernel, the unfused
equivalent and transformers' image processor. The cases (shared with benchmarks/test_bench_kernels.py) and their
measurement.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from igpt_fast.bench_measure import TOP_K, graph_kernel_ms, kernel_ms, package_version, wall_ms
from igpt_fast.config import ImageGPTConfig
from igpt_fast.decoder import pack_linear

QUANTIZE_SIDE, QUANTIZE_CLUSTERS = 32, 512  # the checkpoints' images and color table, whatever the model
# Images per timed call on a GPU: a dataset-like few thousand for the kernel; 256 for the unfused equivalent, whose
# [pixels, 512, 3] float32 temporaries are 1.6 GB each there; 512 for transformers' processor, about a second of
# host CPU. The processor's images are the first of the kernel's, so its ids can be checked against the kernel's.
QUANTIZE_IMAGES = {"kernel": 4096, "torch": 256, "transformers": 512}
SMOKE_QUANTIZE_IMAGES = dict.fromkeys(QUANTIZE_IMAGES, 4)  # the Triton interpreter on a CPU: only shows it runs
# transformers computes |x|^2 - 2 x.c + |c|^2 from (x / 255 - 0.5) / 0.5: where the two nearest clusters are this
# close in squared distance, float32 rounding may pick either (as in tests/test_clusters.py).
NEAR_TIE = 1e-5


@dataclass(frozen=True)
class Sweep:
    """A launch heuristic to time under each of `values` (its default among them): the kernel cases whose names
    start with one of `cases`, at the plan's batches that lie in `batches` (where the heuristic is read), and,
    unless it acts outside the decode step (steps=False), the whole decode step."""

    module: str
    constant: str
    values: tuple
    cases: tuple[str, ...]
    batches: range
    steps: bool = True


ALL_BATCHES = range(1, 257)
# Launch heuristics not yet settled on a GPU, for the sweep to measure one at a time (the others at their
# defaults), likeliest wins first, as a sweep cut short by its time limit keeps its first rows. Settled on an H100
# (2026-11-27) or an H200 (2026-12-04, see each constant's comment) and so left out: the weight layout, the program
# targets, every GEMV constant, the dot path's K step, decode attention's key blocks, several steps per graph.
SWEEPS = (
    # split-K of the residual projections (kernels/linear.py's comment says why it may pay at batch 8 and 64); at
    # imagegpt-small only mlp c_proj's K (2048) is long enough to split, so its kernel rows alone
    Sweep("igpt_fast.kernels.linear", "_RESIDUAL_MAX_SPLITS", (1, 4, 2), ("linear_residual (mlp c_proj)",),
          ALL_BATCHES),
    # kv_before_wait paid at batch 1 (-4.7%) and cost at 8 (+12%) on the H200: buckets 2 and 4 are unmeasured (the
    # sweep's batches must include them: gpu_sweep.sh's do)
    Sweep("igpt_fast.decoder", "ATTENTION_KV_BEFORE_WAIT_MAX_BATCH", (1, 4), (), range(2, 5)),  # steps only
    # with 4 splits at batch 8 (256 target programs), whether short caches should take fewer
    Sweep("igpt_fast.kernels.attention", "_DECODE_MIN_SPLIT_KEYS", (64, 128, 256), ("decode_attention",),
          ALL_BATCHES),
    # one split's whole row in 32-key blocks beat 64 (batch 64: -8%, 256: -4%); 16 is untimed
    Sweep("igpt_fast.kernels.attention", "_DECODE_WHOLE_ROW_BLOCK_N", (32, 16), ("decode_attention",), ALL_BATCHES),
)


def current_value(sweep: Sweep):
    """The value the sweep's heuristic holds now (its default, outside a heuristic() block)."""
    return getattr(importlib.import_module(sweep.module), sweep.constant)


@contextlib.contextmanager
def heuristic(module: str, constant: str, value):
    """Inside, <module>.<constant> is `value` (read by the launchers at each call)."""
    owner = importlib.import_module(module)
    before = getattr(owner, constant)
    setattr(owner, constant, value)
    try:
        yield
    finally:
        setattr(owner, constant, before)


@dataclass
class KernelCase:
    name: str
    baseline: str
    bytes_moved: int
    fused: Callable
    unfused: Callable
    dtype: str


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """iGPT's norm as the reference computes it: separate ops in the storage dtype."""
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _quantize_unfused(pixels: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """The quantize kernel's math in PyTorch: every [pixel, cluster] distance materialized, then argmin."""
    scaled = pixels.float() / 127.5 - 1.0
    return (scaled[..., None, :] - centers).square().sum(-1).argmin(-1).flatten(1)


def kernel_cases(config: ImageGPTConfig, dtype: torch.dtype, batch: int, device: torch.device, seed: int,
                 with_dtype_free: bool) -> list[KernelCase]:
    """The decode step's kernels at batch rows (decode attention early and late in an image, the linear kernels
    at its middle, weights laid out as the engine packs them), causal prefill attention over half and whole
    images, each with its unfused PyTorch equivalent. Sampling and quantization do not depend on the model
    dtype (with_dtype_free includes them)."""
    from igpt_fast.kernels import attention, clusters, linear, sampling

    c = config
    d, inner, H, D, T, V = c.n_embd, c.inner_dim, c.n_head, c.head_dim, c.n_positions, c.n_clusters
    size, eps, name = dtype.itemsize, c.layer_norm_epsilon, str(dtype).removeprefix("torch.")
    g = torch.Generator(device).manual_seed(seed)

    def rand(*shape, scale=1.0, dt=dtype):
        return (scale * torch.randn(*shape, generator=g, device=device)).to(dt)

    t = T // 2  # the linear kernels' cache position: the middle of an image
    pos = torch.tensor([t], dtype=torch.int32, device=device)
    x, norm_w = rand(batch, d), 1.0 + rand(d, scale=0.1)
    cases = []

    q, k_cache, v_cache = rand(batch, H, D), rand(batch, H, T, D), rand(batch, H, T, D)
    attn_out, scale = torch.empty_like(q), 1.0 / math.sqrt(D)
    workspace = attention.decode_workspace(batch, H, D, T, device)
    for newest in sorted({T // 4, T - 1}):  # early in an image and its last step (256 and 1023 for 1024 pixels)
        at = torch.tensor([newest], dtype=torch.int32, device=device)
        cases.append(KernelCase(
            f"decode_attention (t={newest})", "SDPA", (2 * batch * H * (newest + 1) * D + 2 * batch * d) * size,
            functools.partial(attention.decode_attention, q, k_cache, v_cache, at, scale=scale, out=attn_out,
                              workspace=workspace),
            functools.partial(F.scaled_dot_product_attention, q[:, :, None], k_cache[:, :, :newest + 1],
                              v_cache[:, :, :newest + 1], scale=scale), name))
    for length in sorted({T // 2, T}):  # a completion prompt (half an image) and a whole image
        qs, prefill_out = rand(batch, H, length, D), torch.empty(batch, H, length, D, dtype=dtype, device=device)
        ks, vs = k_cache[:, :, :length], v_cache[:, :, :length]
        cases.append(KernelCase(
            f"prefill_attention (S={length})", "SDPA causal", 4 * batch * H * length * D * size,
            functools.partial(attention.prefill_attention, qs, ks, vs, scale=scale, out=prefill_out),
            functools.partial(F.scaled_dot_product_attention, qs, ks, vs, is_causal=True, scale=scale), name))

    w_qkv, b_qkv, q_out = pack_linear(rand(d, 3 * d, scale=d ** -0.5)), rand(3 * d, scale=0.1), torch.empty_like(x)

    def qkv_unfused():
        qkv = torch.addmm(b_qkv, _rms_norm(x, norm_w, eps), w_qkv)
        q_out.copy_(qkv[:, :d])
        k_cache[:, :, t] = qkv[:, d:2 * d].view(batch, H, D)
        v_cache[:, :, t] = qkv[:, 2 * d:].view(batch, H, D)

    cases.append(KernelCase(
        "norm_qkv", "norm + addmm + cache writes", (d * 3 * d + 4 * d + batch * 4 * d) * size,
        lambda: linear.norm_qkv(x, norm_w, w_qkv, b_qkv, eps=eps, q_out=q_out, k_cache=k_cache,
                                v_cache=v_cache, pos=pos, seq_len=1),
        qkv_unfused, name))

    w_fc, b_fc, hidden = pack_linear(rand(d, inner, scale=d ** -0.5)), rand(inner, scale=0.1), rand(batch, inner)
    cases.append(KernelCase(
        "norm_linear (ln_2, c_fc, gelu)", "norm + addmm + gelu",
        (d * inner + inner + d + batch * (d + inner)) * size,
        lambda: linear.norm_linear(x, norm_w, w_fc, b_fc, eps=eps, activation="quick_gelu", out=hidden),
        lambda: _quick_gelu(torch.addmm(b_fc, _rms_norm(x, norm_w, eps), w_fc)), name))

    w_attn_proj, b_attn_proj, attn_rows = pack_linear(rand(d, d, scale=d ** -0.5)), rand(d, scale=0.1), rand(batch, d)
    residual = rand(batch, d)
    # with the engine's split-K workspace (empty while the projections do not split K)
    residual_workspace = linear.residual_workspace(batch, d, (d, inner), dtype, device)
    cases.append(KernelCase(
        "linear_residual (attn c_proj)", "addmm + add_", (d * d + d + batch * 3 * d) * size,
        lambda: linear.linear_residual(attn_rows, w_attn_proj, b_attn_proj, residual, workspace=residual_workspace),
        lambda: residual.add_(torch.addmm(b_attn_proj, attn_rows, w_attn_proj)), name))

    w_proj, b_proj = pack_linear(rand(inner, d, scale=inner ** -0.5)), rand(d, scale=0.1)
    cases.append(KernelCase(
        "linear_residual (mlp c_proj)", "addmm + add_", (inner * d + d + batch * (inner + 2 * d)) * size,
        lambda: linear.linear_residual(hidden, w_proj, b_proj, residual, workspace=residual_workspace),
        lambda: residual.add_(torch.addmm(b_proj, hidden, w_proj)), name))

    w_head = pack_linear(rand(d, V, scale=d ** -0.5))
    logits_out = torch.empty(batch, V, dtype=torch.float32, device=device)
    cases.append(KernelCase(
        "norm_linear (ln_f, lm_head)", "norm + mm + float", (d * V + d + batch * d) * size + batch * V * 4,
        lambda: linear.norm_linear(x, norm_w, w_head, None, eps=eps, out=logits_out),
        lambda: (_rms_norm(x, norm_w, eps) @ w_head).float(), name))

    if with_dtype_free:
        top_k = min(TOP_K, V)
        logits = 3.0 * torch.randn(batch, V, generator=g, device=device)
        params = {"temperature": torch.ones(batch, device=device),
                  "top_k": torch.full((batch,), top_k, dtype=torch.int32, device=device),
                  "top_p": torch.ones(batch, device=device), "seed": torch.zeros(1, dtype=torch.int64, device=device),
                  "pos": pos, "out_ids": torch.empty(batch, dtype=torch.int64, device=device)}

        def sample_unfused():
            top = torch.topk(logits, top_k, dim=-1)
            probs = torch.softmax(top.values, dim=-1)
            return top.indices.gather(1, torch.multinomial(probs, 1))

        cases.append(KernelCase("sample_tokens (top_k=40)", "topk + softmax + multinomial",
                                batch * V * 4 + batch * 20, lambda: sampling.sample_tokens(logits, **params),
                                sample_unfused, "float32"))

        side = math.isqrt(T)  # an image of T pixels, cut square
        pixels = torch.randint(0, 256, (batch, side, side, 3), generator=g, device=device, dtype=torch.uint8)
        centers = torch.rand(V, 3, generator=g, device=device) * 2 - 1
        cases.append(KernelCase("quantize (pixels to clusters)", "broadcast distances + argmin",
                                batch * side * side * (3 + 8) + V * 12, lambda: clusters.quantize(pixels, centers),
                                lambda: _quantize_unfused(pixels, centers), "uint8"))
    return cases


def measure_kernel(case: KernelCase, device: torch.device, copy_bytes_per_s: float, with_baseline: bool = True
                   ) -> dict:
    """The kernel's time, GB/s and % of the copy floor, and its unfused equivalent's time unless not asked for
    (the sweep varies only the kernel)."""
    with torch.no_grad():
        ms = graph_kernel_ms(case.fused, device)
        baseline_ms = graph_kernel_ms(case.unfused, device) if with_baseline else None
    return {"ms": ms, "bytes_per_step": case.bytes_moved, "gb_per_s": case.bytes_moved / ms / 1e6,
            "floor_ms": 1e3 * case.bytes_moved / copy_bytes_per_s, "baseline": case.baseline if with_baseline else None,
            "baseline_ms": baseline_ms}


@dataclass
class QuantizeCase:
    system: str
    images: int
    run: Callable[[], torch.Tensor] | None  # quantizes the images: ids [images, QUANTIZE_SIDE ** 2]
    on_host: bool  # transformers' processor runs on the host CPU, whatever the benchmark's device
    check: Callable[[torch.Tensor], tuple[int, int]] | None = None  # see ids_unlike_the_kernel
    skip: str = ""  # why it cannot run here


def quantize_cases(device: torch.device, seed: int) -> dict[str, QuantizeCase]:
    """Random uint8 32x32 images to ids over a random 512-color table (ties essentially impossible): the kernel
    and its unfused equivalent on `device`, transformers' processor as users call it (uint8 numpy images and the
    checkpoints' settings: resize to 32x32, normalize, color-quantize) with its ids checked against the kernel's;
    QUANTIZE_IMAGES images each on a GPU, SMOKE_QUANTIZE_IMAGES on a CPU."""
    from igpt_fast.kernels import clusters

    images = QUANTIZE_IMAGES if device.type == "cuda" else SMOKE_QUANTIZE_IMAGES
    g = torch.Generator(device).manual_seed(seed)
    pixels = torch.randint(0, 256, (max(images.values()), QUANTIZE_SIDE, QUANTIZE_SIDE, 3), generator=g,
                           device=device, dtype=torch.uint8)
    centers = torch.rand(QUANTIZE_CLUSTERS, 3, generator=g, device=device) * 2 - 1
    kernel, unfused, hf = (pixels[:images[system]] for system in ("kernel", "torch", "transformers"))
    cases = {
        "kernel": QuantizeCase("igpt-fast quantize (Triton)", len(kernel),
                               functools.partial(clusters.quantize, kernel, centers), on_host=False),
        "torch": QuantizeCase("torch broadcast distances + argmin", len(unfused),
                              functools.partial(_quantize_unfused, unfused, centers), on_host=False),
    }
    if package_version("transformers") is None:
        cases["transformers"] = QuantizeCase("transformers ImageGPTImageProcessor (host CPU)", len(hf), None,
                                             on_host=True, skip="transformers is not installed")
        return cases
    from transformers import ImageGPTImageProcessor  # the Pil variant when torchvision is missing

    processor = ImageGPTImageProcessor(clusters=centers.cpu().numpy(),
                                       size={"height": QUANTIZE_SIDE, "width": QUANTIZE_SIDE})
    host_images = list(hf.cpu().numpy())  # [32, 32, 3] uint8 arrays
    cases["transformers"] = QuantizeCase(
        f"transformers {type(processor).__name__} (host CPU)", len(hf),
        lambda: processor(host_images, return_tensors="pt")["input_ids"], on_host=True,
        check=functools.partial(ids_unlike_the_kernel, pixels=hf, centers=centers))
    return cases


def ids_unlike_the_kernel(ids: torch.Tensor, pixels: torch.Tensor, centers: torch.Tensor) -> tuple[int, int]:
    """(pixels whose id differs from the quantize kernel's beyond a near tie, pixels differing at a near tie):
    the float64 squared distances of a pixel to its two clusters are more than NEAR_TIE apart, or not."""
    from igpt_fast.kernels import clusters

    expected = clusters.quantize(pixels, centers).cpu().flatten()
    ids = ids.cpu().flatten()
    differ = (ids != expected).nonzero()[:, 0]
    x, c = pixels.cpu().reshape(-1, 3)[differ].double() / 127.5 - 1.0, centers.cpu().double()
    gaps = ((x - c[ids[differ]]).square().sum(-1) - (x - c[expected[differ]]).square().sum(-1)).abs()
    beyond = int((gaps > NEAR_TIE).sum())
    return beyond, len(differ) - beyond


def measure_quantize(case: QuantizeCase, device: torch.device) -> dict:
    """ms per call and images/s (the report turns them into pixels/s). A warm-up call first, whose ids are
    checked: ids unlike the kernel's make the row a failure, not a number."""
    if case.skip:
        return {"status": "skipped", "note": case.skip}
    with torch.no_grad():
        ids, note = case.run(), ""
        if case.check is not None:
            beyond, near_ties = case.check(ids)
            if beyond:
                return {"status": "failed", "note": f"ids differ from the kernel's at {beyond} of {ids.numel()} "
                                                    f"pixels, beyond near ties"}
            note = f"ids equal to the kernel's on {ids.numel()} pixels ({near_ties} near ties differ)"
        ms = wall_ms(case.run, torch.device("cpu"), reps=3) if case.on_host else kernel_ms(case.run, device)
    return {"ms": ms, "images_per_s": 1e3 * case.images / ms, "note": note}
