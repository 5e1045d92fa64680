"""The decode step's Triton kernels, each against its unfused PyTorch equivalent, at one model size, dtype and
batch: the cases (shared with benchmarks/test_bench_kernels.py) and their measurement.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from igpt_fast.bench_measure import TOP_K, kernel_ms
from igpt_fast.config import ImageGPTConfig


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


def kernel_cases(config: ImageGPTConfig, dtype: torch.dtype, batch: int, device: torch.device, seed: int,
                 with_dtype_free: bool) -> list[KernelCase]:
    """The decode step's kernels at batch rows (decode attention early and late in an image, the linear kernels
    at its middle), causal prefill attention over half and whole images, each with its unfused PyTorch
    equivalent. Sampling and quantization do not depend on the model dtype (with_dtype_free
    includes them)."""
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

    w_qkv, b_qkv, q_out = rand(d, 3 * d, scale=d ** -0.5), rand(3 * d, scale=0.1), torch.empty_like(x)

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

    w_fc, b_fc, hidden = rand(d, inner, scale=d ** -0.5), rand(inner, scale=0.1), rand(batch, inner)
    cases.append(KernelCase(
        "norm_linear (ln_2, c_fc, gelu)", "norm + addmm + gelu",
        (d * inner + inner + d + batch * (d + inner)) * size,
        lambda: linear.norm_linear(x, norm_w, w_fc, b_fc, eps=eps, activation="quick_gelu", out=hidden),
        lambda: _quick_gelu(torch.addmm(b_fc, _rms_norm(x, norm_w, eps), w_fc)), name))

    w_attn_proj, b_attn_proj, attn_rows = rand(d, d, scale=d ** -0.5), rand(d, scale=0.1), rand(batch, d)
    residual = rand(batch, d)
    cases.append(KernelCase(
        "linear_residual (attn c_proj)", "addmm + add_", (d * d + d + batch * 3 * d) * size,
        lambda: linear.linear_residual(attn_rows, w_attn_proj, b_attn_proj, residual),
        lambda: residual.add_(torch.addmm(b_attn_proj, attn_rows, w_attn_proj)), name))

    w_proj, b_proj = rand(inner, d, scale=inner ** -0.5), rand(d, scale=0.1)
    cases.append(KernelCase(
        "linear_residual (mlp c_proj)", "addmm + add_", (inner * d + d + batch * (inner + 2 * d)) * size,
        lambda: linear.linear_residual(hidden, w_proj, b_proj, residual),
        lambda: residual.add_(torch.addmm(b_proj, hidden, w_proj)), name))

    w_head = rand(d, V, scale=d ** -0.5)
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

        def quantize_unfused():
            scaled = pixels.float() / 127.5 - 1.0
            return (scaled[..., None, :] - centers).square().sum(-1).argmin(-1).view(batch, -1)

        cases.append(KernelCase("quantize (pixels to clusters)", "broadcast distances + argmin",
                                batch * side * side * (3 + 8) + V * 12, lambda: clusters.quantize(pixels, centers),
                                quantize_unfused, "uint8"))
    return cases


def measure_kernel(case: KernelCase, device: torch.device, copy_bytes_per_s: float) -> dict:
    with torch.no_grad():
        ms, baseline_ms = kernel_ms(case.fused, device), kernel_ms(case.unfused, device)
    return {"ms": ms, "bytes_per_step": case.bytes_moved, "gb_per_s": case.bytes_moved / ms / 1e6,
            "floor_ms": 1e3 * case.bytes_moved / copy_bytes_per_s, "baseline": case.baseline,
            "baseline_ms": baseline_ms}

