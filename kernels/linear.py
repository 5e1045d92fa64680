"""Fused RMS-norm + linear kernels: every matmul of an iGPT layer, each weight read once per launch.

    y[M, N] = rmsnorm(x[M, K]) @ W[K, N] + b[N]      rmsnorm(x) = x / sqrt(mean(x^2, -1) + eps) * norm_weight

W is [in=K, out=N] (GPT-2 Conv1D's shape), dense in either order: row-major [K, N], or the transposed view of
a row-major [N, K] (nn.Linear's layout, rows contiguous along K: what the engine packs, so that a GEMV program
reads whole rows of W). The kernels take W's two strides; Triton specializes the unit one, so loads are
vectorized along whichever dimension is contiguous. Accumulation is float32; float32 inputs are
computed exactly in IEEE fp32 (no TF32). The norm is optional and never writes the normalized activations out.
The dot path computes each row's statistic in a prologue pass, then normalizes x on the fly in HF's order
(x * rstd * weight, rounded to the weights' dtype like the reference's input to its matmul); the GEMV path, whose
products are float32, reads x once: it sums x^2 alongside x * weight @ W and scales the row by rstd at the end.
Epilogues, chosen at compile time:
    "store"    out = act(y)                     norm_linear: ln_2 -> c_fc -> quick_gelu, ln_f -> lm_head
    "residual" residual += y (in place)         linear_residual: attn.c_proj, mlp.c_proj
    "qkv"      y split q | k | v, k and v       norm_qkv: ln_1 -> c_attn, straight into the KV cache
               scattered to [B, H, T, head_dim] caches at position pos[0] + m % seq_len (pos read on device)

Two code paths, chosen by the number of rows M (or forced with path="gemv" | "dot"):
    gemv (M <= 16, decode at small batch; in float32 up to _FLOAT32_GEMV_MAX_M rows): a program owns a stripe of
        BLOCK_N columns and a block of up to 16 rows, so W streams from memory once per row block (once when M <= 16);
        BLOCK_N is the power of two that gives about _TARGET_PROGRAMS stripes (clamped to _GEMV_MIN_BLOCK_N..128),
        so batch 1 still spreads over all SMs.
    dot (more rows: large decode batches and prefill): tiled tl.dot with grouped tile order for L2 reuse;
        tiles start at min(next_pow2(M), 128) x 128 (x 64 for "qkv", whose 128 x 128 tile spills registers on
        sm_90) and shrink (N to 32, then M to 16, then N to 16) until about _TARGET_PROGRAMS tiles exist, so
        decode batches of 17..256 rows still fill the GPU.
Split-K only in linear_residual, and only when given a workspace (residual_workspace) and _RESIDUAL_MAX_SPLITS > 1:
each K chunk's program stores its partial sum, and the tile's last to finish adds them (in split order) and runs the
epilogue, in the same launch. The norm-fused epilogues keep whole rows in one program (the norm needs all of x).
Launchers allocate nothing when outputs are passed and never sync. On sm_90+ both paths are launched with
programmatic dependent launch (igpt_fast.backend.use_pdl).
"""

import math

import torch
import triton
import triton.language as tl

from igpt_fast import backend

from . import host_math, sync

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ACTIVATIONS = (None, "quick_gelu")
_PATHS = (None, "gemv", "dot")

_GEMV_MAX_M = 16  # rows up to which the weight-streaming GEMV path is used (and its row block's most rows)
# The same for float32 inputs, whose dot tiles run IEEE-float32 tl.dot on CUDA cores (no tensor cores). On an H200
# (2026-12-04, imagegpt-small) float32's decode step took 9.4 ms at batch 64 against 0.95 at batch 8, and mlp c_proj's
# 128 dot tiles of 16 x 16 took 43.5 us a launch in its kernel row (3 TFLOP/s); the GEMV would stream W in 4 row
# blocks of 16. 16 (as other dtypes) until a GPU has timed 64: benchmarks/gpu_check.sh's fp32-gemv stage does.
_FLOAT32_GEMV_MAX_M = 16
_MAX_GRID_Y = 65535
# Narrowest column stripe: the fewest [out, in] rows of W one GEMV program streams. 4 rather than 8: on an H100
# (fp16, 2026-11-27) the N = 512 projections then get twice the programs, and mlp c_proj took 8.6 us instead of
# 13.7 at batch 8 (4.0 instead of 4.8 at batch 1); the other linears were unchanged. 2 rather than 4: on an H200
# (fp16, 2026-12-04 sweep) the decode step took 0.275 ms instead of 0.287 at batch 1, 0.628 instead of 0.648 at 8.
_GEMV_MIN_BLOCK_N = 2
_TARGET_PROGRAMS = 264  # about two per SM on an H100 (132 SMs); measured there: 132 is slower at batch 8, 528 the same
_GEMV_TILE = 8192  # BLOCK_M * BLOCK_K * BLOCK_N elements per GEMV step (64 per thread at 4 warps); 4096: slower (H100)
_GEMV_NUM_WARPS = 4
_GROUP_M = 8  # row tiles walked together in the dot path, so W tiles are reused from L2
# K step of the dot path's small 16-bit tiles (at most 32 x 32: decode batches of 17..64, where the serial K loop,
# not the tile's arithmetic, is the time); other tiles step 64. At 64, on an H100 at batch 64, mlp c_proj (K = 4d)
# took 13.5 us against 5.3 for attn c_proj (K = d). 256 quarters its K steps: on an H200 (fp16, 2026-12-04 sweep)
# batch 64's decode step took 1.257 ms instead of 1.449 (128: 1.414).
_DOT_SMALL_TILE_BLOCK_K = 256
# The "qkv" epilogue stores through per-element int64 cache pointers (head_dim is a runtime value, so no contiguity
# is provable): compiled for sm_90, its 128 x 128 dot tile spills 0.9-3 KB of registers per thread (every dtype);
# 128 x 64 spills none in 16-bit and 24 B in float32. Large prefills (M >= 1024 at imagegpt-large) would get 128 x 128.
_QKV_MAX_BLOCK_N = 64
# Split-K of the residual projections (linear_residual given a workspace, as in the engine's decode step): up to this
# many programs share an output tile, each summing a chunk of K of at least _SPLIT_MIN_K, and the last to finish adds
# their partials in the same launch. 1 (off) until the sweep has timed 2 and 4 on a GPU. Why they may pay, from an
# H200's decode-step profile (fp16, imagegpt-small, 2026-12-04): at batch 8, mlp c_proj (K = 2048) took 6.8 us of the
# critical path against 4.4 for ln_2/c_fc, which streams the same 2 MB of weights; c_proj's 256 stripes of 2 columns
# each read all of x (32 KB: 8 MB through L2, c_fc's 2 MB), where 4 splits with 8-column stripes read 4 MB. At batch 64
# (the dot path) its 128 tiles of 16 x 16 walk K in 8 serial steps: 15.8 us, against 5.5 for attn c_proj (K = 512).
_RESIDUAL_MAX_SPLITS = 1
_SPLIT_MIN_K = 512


@triton.jit
def _row_rstd(
    x_ptr,  # [M, K] input rows, last dim contiguous
    rows,  # [BLOCK_M] int64 row indices of this program
    row_mask,  # [BLOCK_M] rows < M
    stride_xm,
    K,
    eps,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Prologue: 1 / sqrt(mean(x^2) + eps) for each row, in float32 (correctly rounded sqrt and divide)."""
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = row_mask[:, None] & (offs_k < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :], mask=mask, other=0.0).to(tl.float32)
        sumsq += tl.sum(x * x, axis=1)
    return tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(sumsq, K * 1.0) + eps))


@triton.jit
def _load_bias(b_ptr, offs_n, N, HAS_BIAS: tl.constexpr):
    """The bias of columns offs_n in float32 (zeros without HAS_BIAS): a weight, so readable before gdc_wait."""
    if HAS_BIAS:
        return tl.load(b_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    else:
        return tl.zeros(offs_n.shape, tl.float32)


@triton.jit
def _load_activations(out_ptr, pos_ptr, rows, offs_n, M, N, stride_om, EPILOGUE: tl.constexpr):
    """What the epilogue reads that an earlier kernel wrote: the residual tile ("residual") or the position ("qkv";
    0 and 0.0 stand in for what an epilogue does not read). Only after gdc_wait."""
    if EPILOGUE == "residual":
        ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
        residual = tl.load(ptrs, mask=(rows < M)[:, None] & (offs_n < N)[None, :], other=0.0).to(tl.float32)
    else:
        residual = 0.0
    if EPILOGUE == "qkv":
        pos = tl.load(pos_ptr)
    else:
        pos = 0
    return residual, pos


@triton.jit
def _epilogue(
    acc,  # [BLOCK_M, BLOCK_N] float32 x @ W
    rows,  # [BLOCK_M] int64 row indices
    offs_n,  # [BLOCK_N] column indices
    n_start,  # offs_n[0]
    M,
    N,
    bias,  # [BLOCK_N] float32 bias of these columns (_load_bias; unused without HAS_BIAS)
    residual,  # "residual": [BLOCK_M, BLOCK_N] float32, the residual tile as it was before this kernel
    pos,  # "qkv": int32 position of each sequence's first row
    out_ptr,  # "store": [M, N] output; "residual": [M, N] residual, updated in place; "qkv": [M, N // 3] q
    stride_om,
    k_ptr,  # "qkv": key cache [B, H, T, head_dim], last dim contiguous
    v_ptr,  # "qkv": value cache [B, H, T, head_dim], last dim contiguous
    seq_len,
    head_dim,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ONE_PART: tl.constexpr,  # "qkv": BLOCK_N divides d, so each tile's columns are all q, all k or all v
):
    if HAS_BIAS:
        acc += bias[None, :]
    if ACTIVATION == "quick_gelu":
        acc = acc / (1.0 + tl.exp(-1.702 * acc))  # x * sigmoid(1.702 x)
    mask = (rows < M)[:, None] & (offs_n < N)[None, :]
    if EPILOGUE == "store":
        ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    elif EPILOGUE == "residual":
        ptrs = out_ptr + rows[:, None] * stride_om + offs_n[None, :]
        tl.store(ptrs, (residual + acc).to(out_ptr.dtype.element_ty), mask=mask)
    else:  # "qkv": column n belongs to part n // d (q, k, v), head (n % d) // head_dim
        d = N // 3
        part = n_start // d if ONE_PART else offs_n // d  # one part for the whole tile, or one per column
        col = offs_n - part * d
        head = col // head_dim
        dim = col - head * head_dim
        batch = rows // seq_len
        t = pos.to(tl.int64) + rows % seq_len
        q_ptrs = out_ptr + rows[:, None] * stride_om + col[None, :]
        k_ptrs = k_ptr + batch[:, None] * stride_kb + head[None, :] * stride_kh + t[:, None] * stride_kt + dim[None, :]
        v_ptrs = v_ptr + batch[:, None] * stride_vb + head[None, :] * stride_vh + t[:, None] * stride_vt + dim[None, :]
        if ONE_PART:  # one store of one pointer tile: three live int64 pointer tiles spill in a 128 x 64 tile
            if part == 0:
                tl.store(q_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
            elif part == 1:
                tl.store(k_ptrs, acc.to(k_ptr.dtype.element_ty), mask=mask)
            else:
                tl.store(v_ptrs, acc.to(v_ptr.dtype.element_ty), mask=mask)
        else:
            tl.store(q_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask & (part == 0)[None, :])
            tl.store(k_ptrs, acc.to(k_ptr.dtype.element_ty), mask=mask & (part == 1)[None, :])
            tl.store(v_ptrs, acc.to(v_ptr.dtype.element_ty), mask=mask & (part == 2)[None, :])


@triton.jit
def _w_block(w_ptr, offs_k, offs_n, n_mask, K, stride_wk, stride_wn):
    """W's [1, BLOCK_K, BLOCK_N] slab at rows offs_k (zeros past K), in W's dtype."""
    return tl.load(w_ptr + offs_k[None, :, None] * stride_wk + offs_n[None, None, :] * stride_wn,
                   mask=(offs_k < K)[None, :, None] & n_mask[None, None, :], other=0.0)


@triton.jit
def _x_block(x_ptr, rows, row_mask, stride_xm, offs_k, K):
    """x's [BLOCK_M, BLOCK_K] block at columns offs_k (zeros past K or M), in x's dtype. Only after the wait."""
    return tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :], mask=row_mask[:, None] & (offs_k < K)[None, :],
                   other=0.0)


@triton.jit
def _norm_weight_block(nw_ptr, offs_k, K, HAS_NORM: tl.constexpr):
    """The RMS-norm weight at offs_k in float32 (zeros past K; a scalar zero, never read, without HAS_NORM)."""
    if HAS_NORM:
        return tl.load(nw_ptr + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
    else:
        return 0.0


@triton.jit
def _k_range(K, SPLITS: tl.constexpr, K_CHUNK: tl.constexpr, AXIS: tl.constexpr):
    """(start, end) of this program's part of K: all of it, or chunk program_id(AXIS) of K_CHUNK (the last one
    ragged)."""
    if SPLITS > 1:
        k_start = tl.program_id(AXIS) * K_CHUNK
        return k_start, tl.minimum(k_start + K_CHUNK, K)
    else:
        return 0, K


@triton.jit
def _merge_k_splits(acc, part_ptr, arrived_ptr, tile, rows, offs_n, M, N, SPLITS: tl.constexpr, AXIS: tl.constexpr):
    """Split-K in one launch (decode attention's semaphore pattern): store this split's partial sum of the tile,
    count it in on the tile's arrival counter; the split that arrives last sums every split's partial in split
    order (the same float32 sum whichever split finishes last) and sets the counter back to zero for the next
    launch. Returns (the tile's sum, M in the last split and 0 in the others)."""
    mask = (rows < M)[:, None] & (offs_n < N)[None, :]
    split = tl.program_id(AXIS)
    tl.store(part_ptr + (split * M + rows[:, None]) * N + offs_n[None, :], acc, mask=mask)
    # The barrier puts every thread's stores before the counter's release; the acq_rel increment makes the earlier
    # splits' stores visible to the last one.
    tl.debug_barrier()
    arrived = tl.atomic_add(arrived_ptr + tile, 1, sem="acq_rel", scope="gpu")
    last = arrived == SPLITS - 1
    rows_kept = tl.where(last, M, 0)
    mask = (rows < rows_kept)[:, None] & (offs_n < N)[None, :]  # all false but in the last split: nothing loaded
    total = tl.zeros_like(acc)
    for s in tl.static_range(SPLITS):
        # .cg: read from L2, where the other programs' stores are, never from this SM's L1
        total += tl.load(part_ptr + (s * M + rows[:, None]) * N + offs_n[None, :], mask=mask, other=0.0,
                         cache_modifier=".cg")
    if last:
        tl.atomic_xchg(arrived_ptr + tile, 0, sem="relaxed", scope="gpu")  # ready for the next launch
    return total, rows_kept


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K] input rows, last dim contiguous
    nw_ptr,  # [K] RMS-norm weight (not read without HAS_NORM)
    w_ptr,  # [K, N] weight, contiguous along K or N (stride_wk, stride_wn)
    b_ptr,  # [N] bias (not read without HAS_BIAS)
    out_ptr,  # see _epilogue
    k_ptr,  # see _epilogue
    v_ptr,  # see _epilogue
    pos_ptr,  # see _epilogue
    M, N, K,
    stride_xm, stride_om,
    stride_wk, stride_wn,
    eps,
    seq_len, head_dim,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    part_ptr,  # SPLITS > 1: float32 [SPLITS, M, N] partial sums (scratch); else None
    arrived_ptr,  # SPLITS > 1: int32 [stripes * row blocks] arrival counters, 0 before and after; else None
    HAS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ONE_PART: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLITS: tl.constexpr,  # programs along K (grid axis 2), each summing K_CHUNK of it; the last to finish merges
    K_CHUNK: tl.constexpr,  # a multiple of BLOCK_K (unused with SPLITS == 1)
):
    """Grid (column stripes, row blocks[, splits]): column stripe pid_n of row block pid_m (over K chunk pid_s).
    Products on CUDA cores in float32 (exact for float32 inputs).

    W is read one block ahead of its use: the first block before waiting on the previous kernel (weights are never
    written during a step, so under programmatic dependent launch that read overlaps the previous kernel), then
    each iteration loads the next block before computing with the current one. Each is loaded as the
    [1, BLOCK_K, BLOCK_N] slab of the product, so the product takes the load's vectorized layout: compiled for sm_90
    with K-contiguous W, the loop has 1-2 layout conversions (shared-memory round trips) instead of 3-4, and from
    batch 8 the sum over K stays inside a warp. x's blocks and the norm weight's ride with W's (x's first one right
    after the wait): loaded in the iteration that used it, x made every K step (several from batch 2) wait out an L2
    round trip. Two blocks ahead instead of one timed the same on an H200 (fp16, batch 8, 2026-12-04).

    The epilogue's additions are read early, not after the sum over K: the bias before the wait (a weight no kernel
    writes), the residual or the cache position right after it, alongside the first x loads. Read after the sum,
    each was a memory round trip of its own before the store, in every linear of a decode step: the H200's step
    took 9-10% longer at batch 1 and 8.
    """
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    rows = tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    k_start, k_end = _k_range(K, SPLITS, K_CHUNK, 2)
    offs_k = k_start + tl.arange(0, BLOCK_K)
    w_next = _w_block(w_ptr, offs_k, offs_n, n_mask, k_end, stride_wk, stride_wn)
    nw_next = _norm_weight_block(nw_ptr, offs_k, K, HAS_NORM)
    bias = _load_bias(b_ptr, offs_n, N, HAS_BIAS)
    # the previous kernel's writes (x, the residual, the cache) are visible after this
    sync.wait_for_inputs(USE_PDL)
    x_next = _x_block(x_ptr, rows, row_mask, stride_xm, offs_k, k_end)
    residual, pos = _load_activations(out_ptr, pos_ptr, rows, offs_n, M, N, stride_om, EPILOGUE)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sumsq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        w = w_next.to(tl.float32)
        ahead = offs_k + BLOCK_K  # past the K range on the last iteration: fully masked, no memory traffic
        w_next = _w_block(w_ptr, ahead, offs_n, n_mask, k_end, stride_wk, stride_wn)
        x = x_next.to(tl.float32)
        nw = nw_next
        x_next = _x_block(x_ptr, rows, row_mask, stride_xm, ahead, k_end)
        nw_next = _norm_weight_block(nw_ptr, ahead, K, HAS_NORM)
        if HAS_NORM:
            sumsq += tl.sum(x * x, axis=1)
            x = x * nw[None, :]
        # [BLOCK_M, BLOCK_K, BLOCK_N] products, summed over K
        acc += tl.sum(x[:, :, None] * w, axis=1)
    if HAS_NORM:  # rmsnorm's per-row factor, applied after the sum: x is read once, in the same pass
        acc = acc * tl.div_rn(1.0, tl.sqrt_rn(tl.div_rn(sumsq, K * 1.0) + eps))[:, None]
    if SPLITS > 1:  # M becomes 0 in every split but the tile's last to finish: their epilogues store nothing
        acc, M = _merge_k_splits(acc, part_ptr, arrived_ptr, pid_m * tl.num_programs(0) + pid_n, rows, offs_n, M, N,
                                 SPLITS, 2)
    _epilogue(acc, rows, offs_n, pid_n * BLOCK_N, M, N, bias, residual, pos, out_ptr, stride_om, k_ptr,
              v_ptr, seq_len, head_dim, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
              HAS_BIAS, ACTIVATION, EPILOGUE, ONE_PART)


@triton.jit
def _dot_kernel(
    x_ptr,  # [M, K] input rows, last dim contiguous
    nw_ptr,  # [K] RMS-norm weight (not read without HAS_NORM)
    w_ptr,  # [K, N] weight, contiguous along K or N (stride_wk, stride_wn)
    b_ptr,  # [N] bias (not read without HAS_BIAS)
    out_ptr,  # see _epilogue
    k_ptr,  # see _epilogue
    v_ptr,  # see _epilogue
    pos_ptr,  # see _epilogue
    M, N, K,
    stride_xm, stride_om,
    stride_wk, stride_wn,
    eps,
    seq_len, head_dim,
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    part_ptr,  # see _gemv_kernel
    arrived_ptr,  # see _gemv_kernel
    HAS_NORM: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACTIVATION: tl.constexpr,
    EPILOGUE: tl.constexpr,
    ONE_PART: tl.constexpr,
    USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SPLITS: tl.constexpr,  # as in the GEMV kernel, on grid axis 1
    K_CHUNK: tl.constexpr,
):
    """Grid (tiles, splits): [BLOCK_M, BLOCK_N] tiles in grouped order, each over K chunk pid_s; tl.dot in the
    inputs' dtype into float32."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # GROUP_M row tiles sweep the column tiles together, so each W tile is fetched from HBM about once.
    group_size = GROUP_M * tiles_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    rows = tl.cast(pid_m, tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < M
    bias = _load_bias(b_ptr, offs_n, N, HAS_BIAS)  # read early, as in the GEMV kernel
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    # A larger residual tile would sit in registers through the K loop (spilling in 128 x 128 prefill tiles).
    if BLOCK_M * BLOCK_N <= 64 * 64:
        residual, pos = _load_activations(out_ptr, pos_ptr, rows, offs_n, M, N, stride_om, EPILOGUE)
    if HAS_NORM:
        # In the main loop's K steps. Reading a 16-row decode tile's whole x in one step instead (8192 elements) was
        # slower on the card: at batch 64 on an H200 (2026-12-04) norm_qkv took 12.2 us and ln_2/c_fc 13.9, against
        # 8.5 and 8.7 this way on an H100, while the kernels without the norm did not move (5.3 and 13.5 us).
        rstd = _row_rstd(x_ptr, rows, row_mask, stride_xm, K, eps, BLOCK_M, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    k_start, k_end = _k_range(K, SPLITS, K_CHUNK, 1)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + offs_k[None, :],
            mask=row_mask[:, None] & k_mask[None, :], other=0.0,
        )
        if HAS_NORM:
            nw = tl.load(nw_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * rstd[:, None] * nw[None, :]).to(w_ptr.dtype.element_ty)
        w = tl.load(
            w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
            mask=k_mask[:, None] & (offs_n < N)[None, :], other=0.0,
        )
        # "ieee": float32 stays exact fp32 (no TF32); ignored for 16-bit inputs, which use tensor cores.
        acc = tl.dot(x, w, acc, input_precision="ieee")
    if BLOCK_M * BLOCK_N > 64 * 64:
        residual, pos = _load_activations(out_ptr, pos_ptr, rows, offs_n, M, N, stride_om, EPILOGUE)
    if SPLITS > 1:  # as in the GEMV kernel
        acc, M = _merge_k_splits(acc, part_ptr, arrived_ptr, pid, rows, offs_n, M, N, SPLITS, 1)
    _epilogue(acc, rows, offs_n, pid_n * BLOCK_N, M, N, bias, residual, pos, out_ptr, stride_om, k_ptr, v_ptr,
              seq_len, head_dim, stride_kb, stride_kh, stride_kt, stride_vb, stride_vh, stride_vt,
              HAS_BIAS, ACTIVATION, EPILOGUE, ONE_PART)


# ----------------------------------------------------------------------------------------------------------
# Launch heuristics (deterministic, no autotuning).


def _choose_path(M: int, path: str | None, dtype: torch.dtype) -> str:
    if path is not None:
        return path
    return "gemv" if M <= (_FLOAT32_GEMV_MAX_M if dtype == torch.float32 else _GEMV_MAX_M) else "dot"


def _split_k(K: int, splits: int, block_k: int) -> tuple[int, int, int]:
    """(SPLITS, K_CHUNK, BLOCK_K) for up to `splits` chunks of K: a chunk is whole BLOCK_K steps (BLOCK_K no wider
    than a chunk), and none is empty."""
    if splits <= 1:
        return 1, 0, block_k
    block_k = min(block_k, max(host_math.next_power_of_2(host_math.cdiv(K, splits)), 16))
    chunk = host_math.cdiv(host_math.cdiv(K, splits), block_k) * block_k
    used = host_math.cdiv(K, chunk)
    return (used, chunk, block_k) if used > 1 else (1, 0, block_k)


def _gemv_config(M: int, N: int, K: int, splits: int = 1) -> dict:
    block_m = min(host_math.next_power_of_2(M), _GEMV_MAX_M)
    row_blocks = host_math.cdiv(M, block_m)
    # Column stripes: enough of them that about _TARGET_PROGRAMS programs (times each stripe's K splits) each stream
    # a disjoint part of W.
    columns_per_program = host_math.cdiv(N * row_blocks * splits, _TARGET_PROGRAMS)
    block_n = min(max(host_math.next_power_of_2(columns_per_program), _GEMV_MIN_BLOCK_N), 128)
    block_k = min(max(_GEMV_TILE // (block_m * block_n), 16), max(host_math.next_power_of_2(K), 16))
    used, k_chunk, block_k = _split_k(K, splits, block_k)
    if used < splits and splits > 1:  # stripes as wide as the splits asked for would be too few programs
        return _gemv_config(M, N, K, used)
    stripes = host_math.cdiv(N, block_n)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SPLITS=used, K_CHUNK=k_chunk,
                num_warps=_GEMV_NUM_WARPS, grid=(stripes, row_blocks) if used == 1 else (stripes, row_blocks, used))


def _dot_config(M: int, N: int, K: int, dtype: torch.dtype, max_block_n: int = 128, splits: int = 1) -> dict:
    block_m = min(max(host_math.next_power_of_2(M), 16), 128)
    block_n = max_block_n
    # Shrink tiles until about _TARGET_PROGRAMS exist: N first (down to 32), then M, then N to 16.
    while host_math.cdiv(M, block_m) * host_math.cdiv(N, block_n) < _TARGET_PROGRAMS:
        if block_n > 32:
            block_n //= 2
        elif block_m > 16:
            block_m //= 2
        elif block_n > 16:
            block_n //= 2
        else:
            break
    if dtype == torch.float32:
        block_k = 32
    else:
        block_k = _DOT_SMALL_TILE_BLOCK_K if block_m * block_n <= 32 * 32 else 64
    block_k = min(block_k, max(host_math.next_power_of_2(K), 16))
    tiles = host_math.cdiv(M, block_m) * host_math.cdiv(N, block_n)
    # K splits only where the tiles fill under half the target (decode batches of 17..64 at imagegpt-small's width)
    splits, k_chunk, block_k = _split_k(K, splits if 2 * tiles <= _TARGET_PROGRAMS else 1, block_k)
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=_GROUP_M, SPLITS=splits, K_CHUNK=k_chunk,
                num_warps=8 if block_m * block_n >= 128 * 64 else 4, num_stages=3,
                grid=(tiles,) if splits == 1 else (tiles, splits))


# ----------------------------------------------------------------------------------------------------------
# Validation: every check raises ValueError naming what it got, before anything is allocated or written.


def _fail(msg: str):
    raise ValueError(msg)


def _check_tensor(name: str, t, *, ndim: int, dtype=None, dtypes=_FLOAT_DTYPES, device=None,
                  contiguous: bool | None = False):
    """contiguous: True (all of it), False (its last dim), None (the caller checks strides)."""
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        _fail(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        _fail(f"{name} must have dtype {dtype}, got {t.dtype}")
    if dtypes is not None and t.dtype not in dtypes:
        _fail(f"{name} must have dtype in {dtypes}, got {t.dtype}")
    if device is not None and t.device != device:
        _fail(f"{name} must be on {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        _fail(f"{name} must be contiguous, got strides {t.stride()} for shape {tuple(t.shape)}")
    if contiguous is False and t.shape[-1] > 1 and t.stride(-1) != 1:
        _fail(f"{name} must have a contiguous last dim, got strides {t.stride()} for shape {tuple(t.shape)}")


def _check_shape(name: str, t: torch.Tensor, shape: tuple):
    if tuple(t.shape) != tuple(shape):
        _fail(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _check_linear(x, norm_weight, weight, bias) -> tuple[int, int, int]:
    """Shared checks of x [M, K], norm_weight [K] | None, weight [K, N], bias [N] | None. Returns M, N, K."""
    _check_tensor("x", x, ndim=2)
    dtype, device = x.dtype, x.device
    _check_tensor("weight", weight, ndim=2, dtype=dtype, device=device, contiguous=None)  # either order: below
    M, K = x.shape
    if weight.shape[0] != K:
        _fail(f"weight must be [K={K}, N] (Conv1D layout [in, out]), got shape {tuple(weight.shape)}")
    N = weight.shape[1]
    if not (weight.is_contiguous() or weight.t().is_contiguous()):
        _fail(f"weight [K, N] must be row-major or the transposed view of a row-major [N, K], got strides "
              f"{weight.stride()} for shape {tuple(weight.shape)}")
    if norm_weight is not None:
        _check_tensor("norm_weight", norm_weight, ndim=1, dtype=dtype, device=device, contiguous=True)
        _check_shape("norm_weight", norm_weight, (K,))
    if bias is not None:
        _check_tensor("bias", bias, ndim=1, dtype=dtype, device=device, contiguous=True)
        _check_shape("bias", bias, (N,))
    return M, N, K


def _check_eps(eps):
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        _fail(f"eps must be a non-negative float, got {eps!r}")


def _check_path(path, M: int):
    if path not in _PATHS:
        _fail(f"path must be one of {_PATHS}, got {path!r}")
    if path == "gemv" and host_math.cdiv(M, _GEMV_MAX_M) > _MAX_GRID_Y:  # the GEMV grid's rows are its y axis
        _fail(f"path='gemv' takes at most {_GEMV_MAX_M * _MAX_GRID_Y} rows (CUDA's grid y limit), got M={M}; "
              f"use path='dot' or None")


def _check_pos(pos, device):
    _check_tensor("pos", pos, ndim=1, dtype=torch.int32, dtypes=None, device=device, contiguous=True)
    _check_shape("pos", pos, (1,))


def _check_seq_len(seq_len, M: int):
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 1:
        _fail(f"seq_len must be a positive int, got {seq_len!r}")
    if M % seq_len != 0:
        _fail(f"the number of rows M={M} must be a multiple of seq_len={seq_len}")


# ----------------------------------------------------------------------------------------------------------
# Launchers.


def _launch_config(path: str, M: int, N: int, K: int, dtype: torch.dtype, epilogue: str, splits: int) -> dict:
    if path == "gemv":
        return _gemv_config(M, N, K, splits)
    return _dot_config(M, N, K, dtype, max_block_n=_QKV_MAX_BLOCK_N if epilogue == "qkv" else 128, splits=splits)


def _residual_splits(K: int) -> int:
    """How many ways linear_residual with a workspace asks to split K (its config may use fewer)."""
    return max(1, min(_RESIDUAL_MAX_SPLITS, K // _SPLIT_MIN_K))


def _split_sizes(config: dict, M: int, N: int) -> tuple[int, int]:
    """(partials, counters): the float32 values of its workspace a launch of this config takes ((0, 0) unsplit):
    [SPLITS, M, N] partial sums, and a counter per output tile (the grid but its split axis)."""
    if config["SPLITS"] == 1:
        return 0, 0
    return config["SPLITS"] * M * N, math.prod(config["grid"][:-1])


def _split_need(M: int, N: int, K: int, dtype: torch.dtype, path: str | None) -> tuple[int, int]:
    """_split_sizes of a linear_residual launch of M rows."""
    config = _launch_config(_choose_path(M, path, dtype), M, N, K, dtype, "residual", _residual_splits(K))
    return _split_sizes(config, M, N)


def residual_workspace(max_rows: int, N: int, Ks: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """Allocate once (outside any CUDA graph) linear_residual's split-K workspace for weights [K, N], every K in Ks,
    x of `dtype` and any number of rows 1..max_rows (path by rows), under the split heuristics as they are now.

    float32 [P + C]: P values of partial sums (scratch), then C arrival counters, int32 bit patterns that must be
    zero between launches: zeroed here, and every launch leaves them zero (a launch with fewer tiles uses the last
    of them, never a partials value). Empty when no such launch splits K.
    """
    if not isinstance(Ks, tuple | list):
        _fail(f"residual_workspace: Ks must be a tuple of the weights' K, got {Ks!r}")
    for name, value in (("max_rows", max_rows), ("N", N), *(("K", K) for K in Ks)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(f"residual_workspace: {name} must be a positive int, got {value!r}")
    if dtype not in _FLOAT_DTYPES:
        _fail(f"residual_workspace: dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
    needs = [_split_need(M, N, K, dtype, None) for M in range(1, max_rows + 1) for K in Ks]
    partials, counters = max((p for p, _ in needs), default=0), max((c for _, c in needs), default=0)
    return torch.zeros(partials + counters, dtype=torch.float32, device=device)


def _launch(path, x, norm_weight, weight, bias, out, *, eps=0.0, activation=None, epilogue="store",
            k_cache=None, v_cache=None, pos=None, seq_len=1, head_dim=1, splits=1, workspace=None):
    M, K = x.shape
    N = weight.shape[1]
    if M == 0:
        return
    config = _launch_config(path, M, N, K, x.dtype, epilogue, splits)
    kernel = _gemv_kernel if path == "gemv" else _dot_kernel
    partials, counters = _split_sizes(config, M, N)
    grid = config.pop("grid")
    part = arrived = None  # constexpr None: a launch that does not split compiles without them
    if counters:  # views of the workspace (sized by the caller's check): partials first, counters last
        part = workspace[:partials]
        arrived = workspace[workspace.numel() - counters:].view(torch.int32)
    pdl = backend.use_pdl(x.device)
    k_strides = k_cache.stride()[:3] if k_cache is not None else (0, 0, 0)
    v_strides = v_cache.stride()[:3] if v_cache is not None else (0, 0, 0)
    kernel[grid](
        x, norm_weight if norm_weight is not None else weight, weight,
        bias if bias is not None else weight, out,
        k_cache if k_cache is not None else out, v_cache if v_cache is not None else out,
        pos if pos is not None else out,
        M, N, K, x.stride(0), out.stride(0), *weight.stride(), float(eps), seq_len, head_dim, *k_strides, *v_strides,
        part, arrived,
        HAS_NORM=norm_weight is not None, HAS_BIAS=bias is not None, ACTIVATION=activation, EPILOGUE=epilogue,
        ONE_PART=epilogue == "qkv" and (N // 3) % config["BLOCK_N"] == 0, USE_PDL=pdl, launch_pdl=pdl,
        enable_fp_fusion=backend.FP_FUSION, **config,
    )


def norm_linear(x, norm_weight, weight, bias, *, eps: float, activation: str | None = None, out=None,
                out_dtype=None, path: str | None = None) -> torch.Tensor:
    """out[M, N] = act(rmsnorm(x) * norm_weight @ weight + bias).

    x [M, K] (last dim contiguous), norm_weight [K] or None (plain linear), weight [K, N] (row-major, or the
    .t() of a row-major [N, K]),
    bias [N] or None, all one dtype (float32, float16, bfloat16). activation None or "quick_gelu".
    out_dtype defaults to out.dtype when out is given, else x.dtype; out [M, N] (last dim contiguous) is
    written and returned, allocated only when None. path: None (by M), "gemv" or "dot".
    """
    M, N, K = _check_linear(x, norm_weight, weight, bias)
    _check_eps(eps)
    _check_path(path, M)
    if activation not in _ACTIVATIONS:
        _fail(f"activation must be one of {_ACTIVATIONS}, got {activation!r}")
    if out_dtype is not None and out_dtype not in _FLOAT_DTYPES:
        _fail(f"out_dtype must be one of {_FLOAT_DTYPES}, got {out_dtype}")
    if out is not None:
        _check_tensor("out", out, ndim=2, dtype=out_dtype, device=x.device)
        _check_shape("out", out, (M, N))
    else:
        out = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    _launch(_choose_path(M, path, x.dtype), x, norm_weight, weight, bias, out, eps=eps, activation=activation)
    return out


def linear_residual(x, weight, bias, residual, *, path: str | None = None, workspace=None) -> torch.Tensor:
    """residual[M, N] += x[M, K] @ weight[K, N] + bias[N], in place; returns residual.

    x, weight, bias (or None) share one float dtype; residual [M, N] (last dim contiguous) may be any float
    dtype (the sum is formed in float32 and rounded once). path: None (by M), "gemv" or "dot". workspace: None, or
    from residual_workspace (rows >= M, this N and K, x's dtype; its counters zero), with which the launch may split
    K over several programs per output tile (_RESIDUAL_MAX_SPLITS); same sum but for float32 rounding order.
    """
    M, N, K = _check_linear(x, None, weight, bias)
    _check_path(path, M)
    _check_tensor("residual", residual, ndim=2, device=x.device)
    _check_shape("residual", residual, (M, N))
    splits = 1
    if workspace is not None:
        _check_tensor("workspace", workspace, ndim=1, dtype=torch.float32, device=x.device, contiguous=True)
        splits = _residual_splits(K)
    if splits > 1:  # (the size check computes the launch's config: only where it may split)
        partials, counters = _split_need(M, N, K, x.dtype, path)
        if workspace.numel() < partials + counters:
            _fail(f"workspace holds {workspace.numel()} float32 values but M={M} rows of N={N} columns split "
                  f"{partials // (M * N)} ways over K={K} need {partials + counters}: allocate it with "
                  f"residual_workspace(max_rows >= {M}, {N}, ({K},), {x.dtype}, device)")
    _launch(_choose_path(M, path, x.dtype), x, None, weight, bias, residual, epilogue="residual", splits=splits,
            workspace=workspace)
    return residual


def norm_qkv(x, norm_weight, weight, bias, *, eps: float, q_out, k_cache, v_cache, pos, seq_len: int,
             path: str | None = None) -> None:
    """ln_1 -> c_attn -> bias, split into q and the KV cache.

    x [M, d], norm_weight [d], weight [d, 3d], bias [3d] or None. Row m is batch m // seq_len at position
    pos[0] + m % seq_len (pos: int32 [1] on the device, read in-kernel). Columns 0:d go to q_out[m, :]
    ([M, d]); columns d:2d to k_cache[b, h, p, :] with h = (col - d) // head_dim; 2d:3d to v_cache.
    k_cache, v_cache: [B, H, T, head_dim] with H * head_dim == d, any strides but a contiguous last dim,
    B >= M // seq_len. q_out and the caches have x's dtype. The caller keeps pos[0] + seq_len <= T (a device
    value, not checked here). path: None (by M), "gemv" or "dot".
    """
    M, N, K = _check_linear(x, norm_weight, weight, bias)
    _check_eps(eps)
    _check_path(path, M)
    if norm_weight is None:
        _fail("norm_weight must be a tensor [d] (ln_1 weight), got None")
    d = K
    if N != 3 * d:
        _fail(f"weight must be [d={d}, 3d={3 * d}] for q | k | v, got shape {tuple(weight.shape)}")
    _check_tensor("q_out", q_out, ndim=2, dtype=x.dtype, device=x.device)
    _check_shape("q_out", q_out, (M, d))
    _check_tensor("k_cache", k_cache, ndim=4, dtype=x.dtype, device=x.device)
    _check_tensor("v_cache", v_cache, ndim=4, dtype=x.dtype, device=x.device)
    _check_shape("v_cache", v_cache, tuple(k_cache.shape))
    B, H, T, head_dim = k_cache.shape
    if H * head_dim != d:
        _fail(f"k_cache must be [B, H, T, head_dim] with H * head_dim == d={d}, "
              f"got shape {tuple(k_cache.shape)}")
    _check_pos(pos, x.device)
    _check_seq_len(seq_len, M)
    if M // seq_len > B:
        _fail(f"M={M} rows of seq_len={seq_len} are {M // seq_len} sequences, "
              f"more than the cache batch B={B}")
    if seq_len > T:
        _fail(f"seq_len={seq_len} is longer than the cache length T={T}")
    _launch(_choose_path(M, path, x.dtype), x, norm_weight, weight, bias, q_out, eps=eps, epilogue="qkv",
            k_cache=k_cache, v_cache=v_cache, pos=pos, seq_len=seq_len, head_dim=head_dim)
