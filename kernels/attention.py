"""Causal attention for ImageGPT: flash-attention prefill and split-K (flash-decoding) decode.

Math (per batch b, head h; scale is the caller's, e.g. 1/sqrt(D), times 1/(layer_idx+1) if configured):
    prefill: out[i] = sum_{j <= i} softmax_j(scale * q[i] . k[j]) v[j]    q, k, v: [B, H, S, D]
    decode:  out    = sum_{j <= t} softmax_j(scale * q . k[j]) v[j]       q: [B, H, D], cache: [B, H, T, D]
Softmax is computed online in float32 and in base 2 (exp2 of scores pre-multiplied by log2(e)).
float32 inputs use IEEE fp32 dot products (input_precision="ieee", never TF32).

Decode reads t from device memory (an int32 [1] tensor) so one captured CUDA graph serves every step.
The key range 0..t is cut into NUM_SPLITS equal chunks (rounded up to whole BLOCK_N key blocks, and at least
_DECODE_MIN_SPLIT_KEYS) at run time, so every step balances its work over all programs; the first
n_active = cdiv(t+1, chunk) splits hold keys, the others do nothing. Each active split stores its normalised
output and its log2-sum-exp2 into a float32 workspace, then counts itself in on its (batch, head)'s arrival
counter; the split that arrives n_active-th merges, in the same launch (one kernel per layer, not two):
    out = sum_s 2^(lse_s - max lse) o_s / sum_s 2^(lse_s - max lse)
and sets the counter back to zero for the next launch. With a single split (large batch), or when one split
holds every key (a short cache), that program writes `out` directly.
"""

import math

import torch
import triton
import triton.language as tl

from igpt_fast import backend

from . import host_math, sync

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256

# Decode: keys per loop iteration of a split launch, and of a launch whose programs each walk a whole cache row (one
# split: batch x heads fill the GPU alone). 32 for the latter: on an H200 (fp16, imagegpt-small, 2026-12-04) the
# decode step took 1.150 ms instead of 1.254 at batch 64 and 2.900 instead of 3.027 at 256; batches 1 and 8, split
# 16 and 4 ways, were 6-9% slower with 32 (so it is not one value for all).
_DECODE_BLOCK_N = 64
_DECODE_WHOLE_ROW_BLOCK_N = 32
# How many programs a launch should have in flight: 256, not 512 (two per SM of an H100, not four). On an H200 (fp16,
# 2026-12-04 sweep) batch 8's decode step took 0.580 ms in 4 splits against 0.648 in 8 (2 splits 0.610, 1 split
# 0.625); batch 1 (16 splits, capped by the cache's 16 key blocks) and batch 64 (1 split) launch the same grid
# either way.
_DECODE_TARGET_PROGRAMS = 256
# Fewest keys a split of decode attention takes (rounded up to whole key blocks): below it, a short cache is
# split fewer ways, and under one split's worth the launch writes its output with no merge at all. 64 (one block,
# what the splits always took) until the sweep times 128 and 256: at batch 1 an image's first quarter would then skip
# the merge (a counter and a reload of the partials) for one program reading up to 256 keys.
_DECODE_MIN_SPLIT_KEYS = 64


@triton.jit
def _prefill_block(q, k_ptr, v_ptr, start_n, offs_m, offs_d, d_mask, stride_ks, stride_vs, seq_len, qk_scale_log2,
                   m_i, l_i, acc, BLOCK_N: tl.constexpr, CAUSAL_MASK: tl.constexpr):
    """One key block of the online softmax: (m_i, l_i, acc) updated with keys start_n .. start_n + BLOCK_N - 1.
    CAUSAL_MASK: hide keys after each query row and past S (loads masked so nothing past S is read); without it
    every key of the block must be visible to every row."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    if CAUSAL_MASK:
        kv_mask = (offs_n < seq_len)[:, None] & d_mask[None, :]
    else:
        kv_mask = d_mask[None, :]
    k = tl.load(k_ptr + offs_n[:, None] * stride_ks + offs_d[None, :], mask=kv_mask, other=0.0)
    scores = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale_log2
    if CAUSAL_MASK:
        visible = (offs_m[:, None] >= offs_n[None, :]) & (offs_n < seq_len)[None, :]
        scores = tl.where(visible, scores, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(scores, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(scores - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(v_ptr + offs_n[:, None] * stride_vs + offs_d[None, :], mask=kv_mask, other=0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
    return m_new, l_i, acc


@triton.jit
def _prefill_attention_kernel(
    q_ptr,  # [B, H, S, D] queries at positions 0..S-1, last dim contiguous
    k_ptr,  # [B, H, S_kv >= S, D] keys, only positions 0..S-1 are read
    v_ptr,  # [B, H, S_kv >= S, D] values, only positions 0..S-1 are read
    out_ptr,  # [B, H, S, D] output, last dim contiguous
    stride_qb,
    stride_qh,
    stride_qs,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    stride_os,
    n_head,
    seq_len,
    qk_scale_log2,  # caller's scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    # Heaviest query blocks (most keys under the causal mask) are scheduled first.
    block_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = tl.cast(pid_bh // n_head, tl.int64)  # int64: the cache behind the views can exceed 2^31 elements
    h = tl.cast(pid_bh % n_head, tl.int64)
    q_ptr += b * stride_qb + h * stride_qh
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    out_ptr += b * stride_ob + h * stride_oh

    offs_m = block_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM  # head_dim 96 runs in a 128-wide block
    m_mask = offs_m < seq_len
    q = tl.load(
        q_ptr + offs_m[:, None] * stride_qs + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of scaled scores (base 2)
    l_i = tl.zeros([BLOCK_M], tl.float32)  # running sum of 2^(score - m_i)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # Key 0 is visible to every row, so the first block makes m_i finite and l_i > 0 for all rows.
    kv_end = tl.minimum((block_m + 1) * BLOCK_M, seq_len)
    # Keys before this query block are visible to all its rows and lie inside S: a loop of their own with no causal
    # mask to build or apply and no bounds on the loads, as Triton's fused-attention tutorial does (BLOCK_N divides
    # BLOCK_M, so the blocks meet the diagonal block exactly). On an H200 (fp16, 2026-12-04) prefill took 5-22% less
    # than with every block masked.
    diagonal = block_m * BLOCK_M
    for start_n in range(0, diagonal, BLOCK_N):
        m_i, l_i, acc = _prefill_block(q, k_ptr, v_ptr, start_n, offs_m, offs_d, d_mask, stride_ks, stride_vs,
                                       seq_len, qk_scale_log2, m_i, l_i, acc, BLOCK_N, False)
    for start_n in range(diagonal, kv_end, BLOCK_N):
        m_i, l_i, acc = _prefill_block(q, k_ptr, v_ptr, start_n, offs_m, offs_d, d_mask, stride_ks, stride_vs,
                                       seq_len, qk_scale_log2, m_i, l_i, acc, BLOCK_N, True)

    acc = acc / l_i[:, None]
    tl.store(
        out_ptr + offs_m[:, None] * stride_os + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None] & d_mask[None, :],
    )


@triton.jit
def _merge_splits(part_out_ptr, part_lse_ptr, pid_bh, n_active, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                  NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
    """Combine the first n_active splits' outputs of one (batch, head); later splits' rows are stale."""
    offs_s = tl.arange(0, BLOCK_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < n_active
    rows = pid_bh * NUM_SPLITS + offs_s
    # .cg: read from L2, where the other programs' stores are, never from this SM's L1
    lse = tl.load(part_lse_ptr + rows, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
    weight = tl.exp2(lse - tl.max(lse, axis=0))  # 0 for the masked splits
    part = tl.load(part_out_ptr + rows[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=s_mask[:, None] & (offs_d < HEAD_DIM)[None, :], other=0.0, cache_modifier=".cg")
    return tl.sum(weight[:, None] * part, axis=0) / tl.sum(weight, axis=0)


@triton.jit
def _kv_block(k_ptr, v_ptr, first, end, offs_d, d_mask, stride_ks, stride_vs, BLOCK_N: tl.constexpr, lo=0):
    """Keys and values first .. first + BLOCK_N - 1 of one (batch, head); those at or past `end` (garbage past t,
    or another split's), or before `lo`, are never loaded (zeros)."""
    offs_n = first + tl.arange(0, BLOCK_N)
    mask = ((offs_n >= lo) & (offs_n < end))[:, None] & d_mask[None, :]
    k = tl.load(k_ptr + offs_n[:, None] * stride_ks + offs_d[None, :], mask=mask, other=0.0)
    v = tl.load(v_ptr + offs_n[:, None] * stride_vs + offs_d[None, :], mask=mask, other=0.0)
    return k, v


@triton.jit
def _decode_kernel(
    q_ptr,  # [B, H, D] one query per (batch, head), last dim contiguous
    k_ptr,  # [B, H, T, D] key cache, last dim contiguous; keys 0..t are read
    v_ptr,  # [B, H, T, D] value cache, last dim contiguous; values 0..t are read
    pos_ptr,  # int32 [1]: t, index of the newest key
    out_ptr,  # [B, H, D] output
    part_out_ptr,  # float32 [B*H, NUM_SPLITS, HEAD_DIM]: each split's normalised output
    part_lse_ptr,  # float32 [B*H, NUM_SPLITS]: each split's log2(sum 2^score)
    arrived_ptr,  # int32 [B*H]: splits done so far in this launch; 0 before and after it
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_ks,
    stride_vb,
    stride_vh,
    stride_vs,
    stride_ob,
    stride_oh,
    n_head,
    max_len,
    qk_scale_log2,  # caller's scale * log2(e)
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_SPLITS: tl.constexpr,
    MIN_CHUNK: tl.constexpr,  # fewest keys a split takes (a multiple of BLOCK_N)
    USE_PDL: tl.constexpr,
    KV_BEFORE_WAIT: tl.constexpr,  # pos and the first block's keys before t read before gdc_wait
):
    """Grid (batch * head, split)."""
    pid_bh = tl.program_id(0)  # batch * n_head + head
    split = tl.program_id(1)  # which part of the keys 0..t
    b = tl.cast(pid_bh // n_head, tl.int64)
    h = tl.cast(pid_bh % n_head, tl.int64)
    k_ptr += b * stride_kb + h * stride_kh
    v_ptr += b * stride_vb + h * stride_vh
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    if not KV_BEFORE_WAIT:  # everything read here (q, the cache, pos) is written by earlier kernels
        sync.wait_for_inputs(USE_PDL)

    t = tl.load(pos_ptr)
    n_keys = tl.minimum(tl.maximum(t, 0), max_len - 1) + 1  # a bad pos must not read outside the cache
    chunk = tl.maximum(tl.cdiv(tl.cdiv(n_keys, NUM_SPLITS), BLOCK_N) * BLOCK_N, MIN_CHUNK)
    start = split * chunk
    end = tl.minimum(start + chunk, n_keys)  # start >= end: a split beyond t, the loop is skipped
    if KV_BEFORE_WAIT:
        # The caller vouches that pos and the keys and values before t were final before the previous kernel began
        # (decode_attention(kv_before_wait=True)), so the first block's DRAM reads overlap that kernel; key t, which
        # the previous kernel writes, is read after the wait. Masked rows load as zeros, so the two add exactly.
        k_next, v_next = _kv_block(k_ptr, v_ptr, start, tl.minimum(end, n_keys - 1), offs_d, d_mask, stride_ks,
                                   stride_vs, BLOCK_N)
        sync.wait_for_inputs(USE_PDL)
        k_t, v_t = _kv_block(k_ptr, v_ptr, start, end, offs_d, d_mask, stride_ks, stride_vs, BLOCK_N, lo=n_keys - 1)
        k_next += k_t
        v_next += v_t
    else:  # the first block's loads go out before q's, whose round trip they then overlap
        k_next, v_next = _kv_block(k_ptr, v_ptr, start, end, offs_d, d_mask, stride_ks, stride_vs, BLOCK_N)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_d, mask=d_mask, other=0.0).to(tl.float32)

    # Each of the BLOCK_N key lanes keeps its own online softmax, merged once after the loop: no reduction across
    # warps inside it (one running softmax took three a block, each through shared memory with barriers, and made
    # the decode step up to 2% slower on an H200, fp16, 2026-12-04).
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        n_mask = start_n + tl.arange(0, BLOCK_N) < end
        # The next block's loads are in flight while this one is computed (Triton does not pipeline loads that
        # feed no tl.dot); past the split they are masked off. Loading each block only once the one before was
        # computed made the H200's decode step up to 14% slower (batch 8) and never more than 1% faster.
        k, v = k_next, v_next
        k_next, v_next = _kv_block(k_ptr, v_ptr, start_n + BLOCK_N, end, offs_d, d_mask, stride_ks, stride_vs,
                                   BLOCK_N)
        scores = tl.sum(q[None, :] * k.to(tl.float32), axis=1) * qk_scale_log2
        scores = tl.where(n_mask, scores, float("-inf"))
        m_new = tl.maximum(m_i, scores)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # a lane with no key yet: 2^(-inf - 0) = 0
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(scores - m_ref)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
        m_i = m_new
    # merge the lanes into the single running softmax the rest of the kernel expects
    m_max = tl.max(m_i, axis=0)
    weight = tl.exp2(m_i - tl.where(m_max == float("-inf"), 0.0, m_max))  # 0 for lanes that saw no key
    l_i = tl.sum(l_i * weight, axis=0)
    acc = tl.sum(acc * weight[:, None], axis=0)
    m_i = m_max

    out_ptr += b * stride_ob + h * stride_oh
    if NUM_SPLITS == 1:
        tl.store(out_ptr + offs_d, (acc / l_i).to(out_ptr.dtype.element_ty), mask=d_mask)
    else:
        n_active = tl.cdiv(n_keys, chunk)  # splits holding keys: the same in every program of this launch
        if n_active == 1:  # split 0 holds every key: it writes out, with no partials, counter or merge
            if split == 0:
                tl.store(out_ptr + offs_d, (acc / l_i).to(out_ptr.dtype.element_ty), mask=d_mask)
        elif split < n_active:  # empty splits neither store nor count
            row = pid_bh * NUM_SPLITS + split
            tl.store(part_out_ptr + row * HEAD_DIM + offs_d, acc / l_i, mask=d_mask)
            tl.store(part_lse_ptr + row, m_i + tl.log2(l_i))
            # The barrier puts every thread's stores before the counter's release; the acq_rel increment makes
            # the earlier splits' stores visible to the last one (the split-K semaphore pattern).
            tl.debug_barrier()
            arrived = tl.atomic_add(arrived_ptr + pid_bh, 1, sem="acq_rel", scope="gpu")
            if arrived == n_active - 1:
                out = _merge_splits(part_out_ptr, part_lse_ptr, pid_bh, n_active, HEAD_DIM, BLOCK_D, NUM_SPLITS,
                                    BLOCK_SPLITS)
                tl.store(out_ptr + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_mask)
                tl.atomic_xchg(arrived_ptr + pid_bh, 0, sem="relaxed", scope="gpu")  # ready for the next launch


def _check_tensor(name: str, x, shape_doc: str, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):  # every launcher error is a ValueError, as the API promises
        raise ValueError(  # noqa: TRY004
            f"{name} must be a torch.Tensor {shape_doc}, got {type(x).__name__}"
        )
    if x.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor {shape_doc}, got shape {tuple(x.shape)}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name}.dtype must be float32, float16 or bfloat16, got {x.dtype}")
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(
            f"{name} must have a contiguous last dim (stride 1), got strides {tuple(x.stride())}"
        )


def _check_like(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if x.dtype != ref.dtype:
        raise ValueError(f"{name}.dtype must equal {ref_name}.dtype ({ref.dtype}), got {x.dtype}")
    if x.device != ref.device:
        raise ValueError(f"{name} must be on {ref_name}'s device ({ref.device}), got {x.device}")


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite python float, got {scale!r}")


def _check_head_dim(head_dim: int) -> None:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head_dim must be in 1..{MAX_HEAD_DIM}, got {head_dim}")


def _prefill_launch_config(block_d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) by tile size: all stages of q, k, v fit in ~130 KB of smem
    (checked for sm_90), and the float32 accumulator [BLOCK_M, BLOCK_D] is at most 64 values a thread (ptxas
    reports no spills: tests/test_sm90_compile.py)."""
    if dtype == torch.float32:  # IEEE fp32 runs on FMA units: smaller tiles, fewer stages
        # Key blocks of 16 for heads wider than 64: with 32, heads of 96 and 128 (imagegpt-large and -medium) spilled
        # 0.9-1.2 KB of registers a thread on sm_90; with 16, none (110-120 registers).
        block_m, block_n, num_stages = 64, 32 if block_d <= 64 else 16, 2
    else:
        block_m, block_n, num_stages = 128, 64, 3
    if block_d > 128:
        block_m, block_n = block_m // 2, max(block_n // 2, 16)  # tl.dot tiles are at least 16 wide
    num_warps = min(8, max(4, block_m * block_d // 512))
    return block_m, block_n, num_warps, num_stages


def _decode_tile(block_d: int, dtype: torch.dtype, num_splits: int) -> tuple[int, int]:
    """(BLOCK_N, num_warps): _DECODE_BLOCK_N keys a block when the launch is split, _DECODE_WHOLE_ROW_BLOCK_N when
    not, halved while one [BLOCK_N, BLOCK_D] key tile is over 32 KB (256-wide float32 heads: with 64 keys they
    spilled 3.7 KB of registers a thread on sm_90); 4 warps while a tile is <= 8 KB, else 8 (keeps registers
    spill-free)."""
    block_n = _DECODE_BLOCK_N if num_splits > 1 else _DECODE_WHOLE_ROW_BLOCK_N
    while block_n > 16 and block_n * block_d * dtype.itemsize > 32768:
        block_n //= 2
    return block_n, 4 if block_n * block_d * dtype.itemsize <= 8192 else 8


def prefill_attention(q, k, v, *, scale: float, out=None) -> torch.Tensor:
    """Causal attention of S queries at positions 0..S-1 over keys/values 0..S-1.

    q: [B, H, S, D] (any strides, last dim contiguous). k, v: [B, H, S_kv, D] with S_kv >= S (only the
    first S positions are read; typically views of the KV cache [B, H, n_positions, D]; last dim
    contiguous). out: [B, H, S, D] any strides with last dim contiguous, same dtype as q; allocated when
    None. Returns out.
    """
    _check_tensor("q", q, "[B, H, S, D]", 4)
    _check_tensor("k", k, "[B, H, S_kv, D]", 4)
    _check_tensor("v", v, "[B, H, S_kv, D]", 4)
    _check_like("k", k, "q", q)
    _check_like("v", v, "q", q)
    _check_scale(scale)
    batch, n_head, seq_len, head_dim = q.shape
    _check_head_dim(head_dim)
    if seq_len < 1:
        raise ValueError(f"q must hold at least one query position, got shape {tuple(q.shape)}")
    for name, x in (("k", k), ("v", v)):
        if x.shape[0] != batch or x.shape[1] != n_head or x.shape[3] != head_dim or x.shape[2] < seq_len:
            raise ValueError(
                f"{name} must have shape [{batch}, {n_head}, S_kv >= {seq_len}, {head_dim}] to match q "
                f"{tuple(q.shape)}, got {tuple(x.shape)}"
            )
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    else:
        _check_tensor("out", out, "[B, H, S, D]", 4)
        _check_like("out", out, "q", q)
        if out.shape != q.shape:
            raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")

    block_d = max(16, host_math.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    block_m, block_n, num_warps, num_stages = _prefill_launch_config(block_d, q.dtype)
    assert block_m % block_n == 0, "the kernel's unmasked loop ends on the diagonal block's first key"
    grid = (batch * n_head, host_math.cdiv(seq_len, block_m))
    _prefill_attention_kernel[grid](
        q,
        k,
        v,
        out,
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k.stride(0),
        k.stride(1),
        k.stride(2),
        v.stride(0),
        v.stride(1),
        v.stride(2),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        n_head,
        seq_len,
        scale * math.log2(math.e),
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
        enable_fp_fusion=backend.FP_FUSION,
    )
    return out


def decode_num_splits(batch: int, n_head: int, max_len: int) -> int:
    """How many ways decode cuts the key range: enough programs to fill the GPU (~_DECODE_TARGET_PROGRAMS),
    a power of two, and never more splits than a full cache has whole key blocks (or _DECODE_MIN_SPLIT_KEYS)."""
    wanted = host_math.next_power_of_2(host_math.cdiv(_DECODE_TARGET_PROGRAMS, batch * n_head))
    return max(1, min(wanted, max_len // max(_DECODE_BLOCK_N, _DECODE_MIN_SPLIT_KEYS)))


def _partial_floats(batch: int, n_head: int, head_dim: int, max_len: int) -> int:
    """float32 values of split-K partials at this batch: per split, an output row and its lse."""
    num_splits = decode_num_splits(batch, n_head, max_len)
    return 0 if num_splits == 1 else batch * n_head * num_splits * (head_dim + 1)


def _workspace_floats(batch: int, n_head: int, head_dim: int, max_len: int) -> int:
    """What decode_attention needs of the workspace at this batch: partials, then one counter per (batch, head)."""
    partials = _partial_floats(batch, n_head, head_dim, max_len)
    return partials + batch * n_head if partials else 0


def decode_workspace(batch: int, n_head: int, head_dim: int, max_len: int, device) -> torch.Tensor:
    """Allocate once (outside the graph) the split-K workspace of decode_attention, for every batch 1..batch
    (smaller batches use more splits), so one buffer serves all graphs.

    float32 [P + batch * n_head]: P values of split-K partials (scratch), then the (batch, head) arrival counters,
    int32 bit patterns that must be zero between launches: zeroed here, and every launch leaves them zero (a
    batch b < batch uses the last b * n_head of them, never a partials value).
    """
    for name, value in (("batch", batch), ("n_head", n_head), ("head_dim", head_dim), ("max_len", max_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"decode_workspace: {name} must be a positive int, got {value!r}")
    _check_head_dim(head_dim)
    partials = max(_partial_floats(b, n_head, head_dim, max_len) for b in range(1, batch + 1))
    return torch.zeros(partials + batch * n_head if partials else 0, dtype=torch.float32, device=device)


def decode_attention(q, k_cache, v_cache, pos, *, scale: float, out, workspace,
                     kv_before_wait: bool = False) -> torch.Tensor:
    """One query per (batch, head) attending cached keys 0..t, with t read from device memory.

    q: [B, H, D] (last dim contiguous; e.g. a view of a [B, H*D] buffer); k_cache, v_cache: [B, H, T, D]
    (views of a bigger cache; batch stride may be anything, last dim contiguous); pos: int32 tensor [1]
    on the same device = index t of the newest key (already written into the cache by the caller; clamped
    to 0..T-1 on the device); attends keys 0..t. out: [B, H, D]. workspace: from decode_workspace(B_max >=
    B, H, D, T) (its counters must be zero: a hand-made buffer is not). One launch, no allocation, no host
    sync. Returns out.
    kv_before_wait: under programmatic dependent launch, read pos and the first key block's keys and values before
    t before waiting on the previous kernel (key t after it). Only for callers where neither pos nor those cache
    rows are written by the kernel launched just before this one, nor by anything after the one before it began:
    the engine's decode step, where they change between steps. Same results either way.
    """
    if not isinstance(kv_before_wait, bool):
        raise ValueError(f"kv_before_wait must be a bool, got {kv_before_wait!r}")
    _check_tensor("q", q, "[B, H, D]", 3)
    _check_tensor("k_cache", k_cache, "[B, H, T, D]", 4)
    _check_tensor("v_cache", v_cache, "[B, H, T, D]", 4)
    _check_tensor("out", out, "[B, H, D]", 3)
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache), ("out", out)):
        _check_like(name, x, "q", q)
    _check_scale(scale)
    batch, n_head, head_dim = q.shape
    _check_head_dim(head_dim)
    max_len = k_cache.shape[2]
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.shape[0] != batch or x.shape[1] != n_head or x.shape[3] != head_dim or x.shape[2] != max_len:
            raise ValueError(
                f"{name} must have shape [{batch}, {n_head}, {max_len}, {head_dim}] to match "
                f"q {tuple(q.shape)} and k_cache {tuple(k_cache.shape)}, got {tuple(x.shape)}"
            )
    if out.shape != q.shape:
        raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    if 0 in k_cache.shape[:3]:  # an empty cache has no key to attend (0 / 0: NaN out), no batch or head no split
        raise ValueError(f"k_cache must have B, H and T of at least 1, got shape {tuple(k_cache.shape)}")
    if not isinstance(pos, torch.Tensor) or pos.dtype != torch.int32 or pos.shape != (1,):
        got = f"{pos.dtype} shape {tuple(pos.shape)}" if isinstance(pos, torch.Tensor) else type(pos).__name__
        raise ValueError(f"pos must be an int32 tensor of shape [1], got {got}")
    if pos.device != q.device:
        raise ValueError(f"pos must be on q's device ({q.device}), got {pos.device}")
    if not isinstance(workspace, torch.Tensor) or workspace.dtype != torch.float32 or workspace.dim() != 1:
        got = (
            f"{workspace.dtype} shape {tuple(workspace.shape)}"
            if isinstance(workspace, torch.Tensor)
            else type(workspace).__name__
        )
        raise ValueError(f"workspace must be a 1-D float32 tensor from decode_workspace, got {got}")
    if workspace.device != q.device:
        raise ValueError(f"workspace must be on q's device ({q.device}), got {workspace.device}")
    if workspace.stride(0) != 1 and workspace.numel() > 1:
        raise ValueError(f"workspace must be contiguous, got stride {workspace.stride(0)}")
    num_splits = decode_num_splits(batch, n_head, max_len)
    needed = _workspace_floats(batch, n_head, head_dim, max_len)
    if workspace.numel() < needed:
        raise ValueError(
            f"workspace holds {workspace.numel()} float32 values but batch {batch} x {n_head} heads x "
            f"({num_splits} splits x (head_dim {head_dim} + 1) + 1 counter) needs {needed}: allocate it with "
            f"decode_workspace(batch >= {batch}, {n_head}, {head_dim}, {max_len}, device)"
        )

    n_rows = batch * n_head * num_splits
    part_out = workspace[: n_rows * head_dim]  # views: nothing is allocated
    part_lse = workspace[n_rows * head_dim : n_rows * (head_dim + 1)]
    arrived = workspace[workspace.numel() - batch * n_head :].view(torch.int32) if num_splits > 1 else workspace
    block_d = host_math.next_power_of_2(head_dim)
    block_n, num_warps = _decode_tile(block_d, q.dtype, num_splits)
    qk_scale_log2 = scale * math.log2(math.e)
    pdl = backend.use_pdl(q.device)
    _decode_kernel[(batch * n_head, num_splits)](
        q,
        k_cache,
        v_cache,
        pos,
        out,
        part_out,
        part_lse,
        arrived,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        out.stride(0),
        out.stride(1),
        n_head,
        max_len,
        qk_scale_log2,
        HEAD_DIM=head_dim,
        BLOCK_D=block_d,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        BLOCK_SPLITS=host_math.next_power_of_2(num_splits),
        MIN_CHUNK=host_math.cdiv(max(_DECODE_MIN_SPLIT_KEYS, 1), block_n) * block_n,
        USE_PDL=pdl,
        KV_BEFORE_WAIT=kv_before_wait,
        launch_pdl=pdl,
        num_warps=num_warps,
        enable_fp_fusion=backend.FP_FUSION,
    )
    return out
