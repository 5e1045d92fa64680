"""PyTorch stand-ins for the Triton kernels (the decoder's and the cluster lookup's), with the kernels'
signatures and math (float32 accumulation, one rounding to the storage dtype), so the decoder and the image
processor run unchanged on a machine without CUDA or Triton.

Unlike the kernels these read `pos` on the host: they never run inside a CUDA graph.
"""

from __future__ import annotations

import torch

from igpt_fast.philox import philox_uniforms
from igpt_fast.sampling import sample_reference


def rms_norm(x: torch.Tensor, norm_weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """iGPT's norm in float32 (identity when norm_weight is None)."""
    x = x.float()
    if norm_weight is None:
        return x
    return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps) * norm_weight.float()


def embed(ids, wte, wpe, pos, *, seq_len: int, out) -> torch.Tensor:
    positions = int(pos[0]) + torch.arange(ids.shape[0], device=ids.device) % seq_len
    out.copy_(wte[ids].float() + wpe[positions].float())
    return out


def norm_linear(x, norm_weight, weight, bias, *, eps: float, activation=None, out=None, out_dtype=None):
    y = rms_norm(x, norm_weight, eps) @ weight.float()
    if bias is not None:
        y = y + bias.float()
    if activation == "quick_gelu":
        y = y * torch.sigmoid(1.702 * y)
    elif activation is not None:
        raise ValueError(f"activation must be None or 'quick_gelu', got {activation!r}")
    if out is None:
        return y.to(out_dtype or x.dtype)
    return out.copy_(y)


def residual_workspace(max_rows: int, N: int, Ks: tuple[int, ...], dtype, device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=device)  # the stand-in never splits K


def linear_residual(x, weight, bias, residual, *, workspace=None) -> torch.Tensor:
    return residual.copy_(residual.float() + x.float() @ weight.float() + bias.float())


def norm_qkv(x, norm_weight, weight, bias, *, eps: float, q_out, k_cache, v_cache, pos, seq_len: int) -> None:
    d = x.shape[1]
    qkv = norm_linear(x, norm_weight, weight, bias, eps=eps, out_dtype=torch.float32)
    q_out.copy_(qkv[:, :d])
    B, H, _, D = k_cache.shape
    batch, start = x.shape[0] // seq_len, int(pos[0])
    for cache, part in ((k_cache, qkv[:, d:2 * d]), (v_cache, qkv[:, 2 * d:])):
        # rows (b, s) -> cache[b, h, start + s, :]
        cache[:batch, :, start:start + seq_len].copy_(part.view(batch, seq_len, H, D).transpose(1, 2))


def prefill_attention(q, k, v, *, scale: float, out=None) -> torch.Tensor:
    S = q.shape[2]
    scores = (q.float() @ k[:, :, :S].float().transpose(-1, -2)) * scale
    causal = torch.ones(S, S, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
    result = probs @ v[:, :, :S].float()
    if out is None:
        return result.to(q.dtype)
    return out.copy_(result)


def decode_workspace(batch: int, n_head: int, head_dim: int, max_len: int, device) -> torch.Tensor:
    return torch.empty(0, dtype=torch.float32, device=device)  # the stand-in needs no split-K partials


def decode_attention(q, k_cache, v_cache, pos, *, scale: float, out, workspace, kv_before_wait=False) -> torch.Tensor:
    t = int(pos[0])
    scores = (k_cache[:, :, :t + 1].float() @ q.float()[..., None])[..., 0] * scale  # (B, H, t+1)
    probs = torch.softmax(scores, dim=-1)
    return out.copy_((probs[:, :, None, :] @ v_cache[:, :, :t + 1].float())[:, :, 0])


def sample_tokens(logits, *, temperature, top_k, top_p, seed, pos, out_ids, sequences=None, greedy=False,
                  arrivals=None):
    t = int(pos[0])
    uniforms = None
    if not greedy:
        uniforms = philox_uniforms(int(seed[0]), t, logits.shape[0], logits.shape[1]).to(logits.device)
    ids = sample_reference(logits, uniforms=uniforms, temperature=temperature, top_k=top_k, top_p=top_p,
                           greedy=greedy)
    out_ids.copy_(ids)
    if sequences is not None:
        sequences[:, t + 1] = ids
    if arrivals is not None:
        pos.add_(1)


# Elements of the [pixels, clusters] distance matrix the quantize stand-in holds at once (32 MB of float32).
_QUANTIZE_CHUNK_ELEMENTS = 1 << 23


def quantize(pixels, clusters) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> int64 [N, H * W], the same float32 arithmetic as the kernel (no FMA)."""
    # Divided by a tensor, not a Python number: CUDA divides by a host scalar as a multiply by its reciprocal,
    # which is 1 ulp off the true quotient for some values and flips near-tie ids (seen on an H100).
    x = pixels.reshape(-1, 3).float() / torch.tensor(127.5, device=pixels.device) - 1.0  # [P, 3] in [-1, 1]
    clusters = clusters.float()
    ids = torch.empty(x.shape[0], dtype=torch.int64, device=pixels.device)
    chunk = max(1, _QUANTIZE_CHUNK_ELEMENTS // clusters.shape[0])
    for start in range(0, x.shape[0], chunk):
        xs = x[start : start + chunk]
        # (r - cr)^2 + (g - cg)^2 + (b - cb)^2, summed in that order: [chunk, n_clusters]
        distances = (xs[:, 0:1] - clusters[:, 0]).square()
        distances += (xs[:, 1:2] - clusters[:, 1]).square()
        distances += (xs[:, 2:3] - clusters[:, 2]).square()
        ids[start : start + chunk] = distances.argmin(-1)  # first index on ties
    return ids.view(pixels.shape[0], -1)


def dequantize(ids, clusters) -> torch.Tensor:
    """int64 [N, L] -> uint8 [N, L, 3] = rint(127.5 * (clusters[id] + 1)); bad ids raise ValueError."""
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= clusters.shape[0]:
            raise ValueError(
                f"ids hold cluster id {lo if lo < 0 else hi}; ids must lie in [0, {clusters.shape[0]})"
            )
    return torch.round(127.5 * (clusters[ids] + 1.0)).clamp(0, 255).to(torch.uint8)
