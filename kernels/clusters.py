"""Color-cluster lookups: pixels -> nearest cluster ids (quantize) and ids -> pixels (dequantize).

quantize:   pixels [N, H, W, 3] (uint8, scaled in-kernel as x / 127.5 - 1, or float32 already in [-1, 1]),
            clusters float32 [C, 3] -> int64 ids [N, H * W] in raster order:
            id = argmin_c (r - c_r)^2 + (g - c_g)^2 + (b - c_b)^2, in float32 and summed in that order, first
            index on ties. One program takes BLOCK_P pixels and sweeps all C centers in BLOCK_C chunks in
            registers. FMA contraction is off, so distances are bitwise those of the same PyTorch expression.
dequantize: ids [N, L] (any integer dtype) -> uint8 [N, L, 3] = rint(127.5 * (clusters[id] + 1)) clamped to
            0..255, rounding half to even like numpy.rint. Out-of-range ids raise ValueError in the launcher
            (a host sync: this is an image I/O op, never on the decode path).
"""

import torch
import triton
import triton.language as tl

from igpt_fast.backend import use_triton

from . import host_math


@triton.jit
def _quantize_kernel(
    pixels_ptr,  # uint8 or float32 [N, H, W, 3], strides stride_n, stride_h, stride_w, stride_ch
    clusters_ptr,  # float32 [C, 3], strides stride_cluster, stride_cluster_ch
    ids_ptr,  # int64 [N, H * W], contiguous: the nearest cluster of each pixel
    n_pixels,  # N * H * W
    H,
    W,
    C,
    stride_n,
    stride_h,
    stride_w,
    stride_ch,
    stride_cluster,
    stride_cluster_ch,
    FROM_UINT8: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    pixel = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    in_range = pixel < n_pixels
    image = pixel // (H * W)
    h = (pixel // W) % H
    w = pixel % W
    base = pixels_ptr + image * stride_n + h * stride_h + w * stride_w
    r = tl.load(base, mask=in_range, other=0).to(tl.float32)
    g = tl.load(base + stride_ch, mask=in_range, other=0).to(tl.float32)
    b = tl.load(base + 2 * stride_ch, mask=in_range, other=0).to(tl.float32)
    if FROM_UINT8:
        r = tl.math.div_rn(r, 127.5) - 1.0
        g = tl.math.div_rn(g, 127.5) - 1.0
        b = tl.math.div_rn(b, 127.5) - 1.0

    best_distance = tl.full((BLOCK_P,), float("inf"), tl.float32)
    best_id = tl.zeros((BLOCK_P,), tl.int32)
    for start in range(0, C, BLOCK_C):
        cluster = start + tl.arange(0, BLOCK_C)
        is_cluster = cluster < C
        center = clusters_ptr + cluster * stride_cluster
        cr = tl.load(center, mask=is_cluster, other=0.0)
        cg = tl.load(center + stride_cluster_ch, mask=is_cluster, other=0.0)
        cb = tl.load(center + 2 * stride_cluster_ch, mask=is_cluster, other=0.0)
        dr = r[:, None] - cr[None, :]
        dg = g[:, None] - cg[None, :]
        db = b[:, None] - cb[None, :]
        distance = dr * dr + dg * dg + db * db  # [BLOCK_P, BLOCK_C]
        distance = tl.where(is_cluster[None, :], distance, float("inf"))
        chunk_distance, chunk_id = tl.min(distance, axis=1, return_indices=True, return_indices_tie_break_left=True)
        closer = chunk_distance < best_distance  # strict: an earlier chunk keeps a tie
        best_distance = tl.where(closer, chunk_distance, best_distance)
        best_id = tl.where(closer, start + chunk_id, best_id)
    tl.store(ids_ptr + pixel, best_id.to(tl.int64), mask=in_range)


@triton.jit
def _dequantize_kernel(
    ids_ptr,  # any integer dtype [N, L], strides stride_n, stride_l; every id in [0, C)
    clusters_ptr,  # float32 [C, 3], strides stride_cluster, stride_cluster_ch
    pixels_ptr,  # uint8 [N, L, 3], contiguous
    n_ids,  # N * L
    L,
    stride_n,
    stride_l,
    stride_cluster,
    stride_cluster_ch,
    BLOCK: tl.constexpr,
):
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    in_range = index < n_ids
    ids = tl.load(ids_ptr + (index // L) * stride_n + (index % L) * stride_l, mask=in_range, other=0)
    center = clusters_ptr + ids.to(tl.int64) * stride_cluster
    for channel in range(3):
        value = tl.load(center + channel * stride_cluster_ch, mask=in_range, other=0.0)
        scaled = (value + 1.0) * 127.5
        scaled = tl.minimum(tl.maximum(scaled, 0.0), 255.0)  # clamping before rounding gives the same result
        # rint, half to even: the fraction of a float >= 0 is exact, so the comparisons are too.
        whole = tl.floor(scaled)
        fraction = scaled - whole
        odd = (whole.to(tl.int32) % 2) == 1
        rounded = tl.where((fraction > 0.5) | ((fraction == 0.5) & odd), whole + 1.0, whole)
        tl.store(pixels_ptr + index * 3 + channel, rounded.to(tl.uint8), mask=in_range)


def _check_clusters(clusters, device, op):
    if not isinstance(clusters, torch.Tensor) or clusters.dtype != torch.float32 or clusters.dim() != 2 \
            or clusters.shape[1] != 3 or clusters.shape[0] < 1:
        got = (f"{clusters.dtype} {list(clusters.shape)}" if isinstance(clusters, torch.Tensor)
               else type(clusters).__name__)
        raise ValueError(f"{op}: clusters must be a float32 [C, 3] tensor with C >= 1, got {got}")
    if clusters.device != device:
        raise ValueError(f"{op}: clusters are on {clusters.device}, the input on {device}")
    if not use_triton(device):
        raise ValueError(f"{op}: tensors on {device} need CUDA or TRITON_INTERPRET=1 to run the Triton kernel")


def quantize(pixels: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """uint8 [N, H, W, 3] (scaled x / 127.5 - 1) or float32 [N, H, W, 3] in [-1, 1] -> int64 ids [N, H * W].

    Nearest cluster by squared Euclidean distance in float32, first index on ties, raster order. Any strides.
    """
    if not isinstance(pixels, torch.Tensor) or pixels.dim() != 4 or pixels.shape[3] != 3 \
            or pixels.dtype not in (torch.uint8, torch.float32):
        got = f"{pixels.dtype} {list(pixels.shape)}" if isinstance(pixels, torch.Tensor) else type(pixels).__name__
        raise ValueError(f"quantize: pixels must be uint8 or float32 [N, H, W, 3], got {got}")
    _check_clusters(clusters, pixels.device, "quantize")
    n, h, w, _ = pixels.shape
    ids = torch.empty((n, h * w), dtype=torch.int64, device=pixels.device)
    if ids.numel() == 0:
        return ids
    block_p, block_c = 128, 64
    _quantize_kernel[(host_math.cdiv(ids.numel(), block_p),)](
        pixels,
        clusters,
        ids,
        ids.numel(),
        h,
        w,
        clusters.shape[0],
        *pixels.stride(),
        *clusters.stride(),
        FROM_UINT8=pixels.dtype == torch.uint8,
        BLOCK_P=block_p,
        BLOCK_C=block_c,
        num_warps=8,  # a [128, 64] distance tile and its argmin: 4 warps spill (ptxas, sm_90)
        enable_fp_fusion=False,  # no FMA: the distances round exactly like PyTorch's
    )
    return ids


def dequantize(ids: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """ids [N, L] of any integer dtype -> uint8 [N, L, 3] = rint(127.5 * (clusters[id] + 1)) in 0..255.

    Ids outside [0, C) raise ValueError (checked on the host before the launch).
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point \
            or ids.dtype.is_complex or ids.dtype == torch.bool:
        got = f"{ids.dtype} {list(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"dequantize: ids must be an integer [N, L] tensor, got {got}")
    _check_clusters(clusters, ids.device, "dequantize")
    n_clusters = clusters.shape[0]
    if ids.numel():
        # torch has no min/max for uint16..uint64: the range check reads them as int64 (uint64 past 2^63 wraps
        # negative, out of range either way)
        checked = ids.to(torch.int64) if ids.dtype in (torch.uint16, torch.uint32, torch.uint64) else ids
        low, high = int(checked.min()), int(checked.max())
        if low < 0 or high >= n_clusters:
            bad = low if low < 0 else high
            raise ValueError(f"dequantize: ids hold {bad}; cluster ids must lie in [0, {n_clusters})")
    n, length = ids.shape
    pixels = torch.empty((n, length, 3), dtype=torch.uint8, device=ids.device)
    if ids.numel() == 0:
        return pixels
    block = 256
    _dequantize_kernel[(host_math.cdiv(ids.numel(), block),)](
        ids,
        clusters,
        pixels,
        ids.numel(),
        length,
        *ids.stride(),
        *clusters.stride(),
        BLOCK=block,
        num_warps=4,
        enable_fp_fusion=False,  # rint(127.5 * (c + 1)) rounds exactly as numpy's
    )
    return pixels
