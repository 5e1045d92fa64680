"""Next-token choice for every sequence of a decode step: greedy, or temperature -> top-k -> top-p sampling.

One program per row of float32 logits [B, V] (the whole row in one block: V = 512 for ImageGPT).
  greedy:   token = argmax_i logits_i (first index on ties), like transformers' do_sample=False.
  sampling: score_i = logits_i / temperature                      (IEEE division, as torch does)
            top-k:  keep score_i >= k-th largest score             (ties kept; k = V keeps all)
            top-p:  probs = softmax of the top-k-kept scores;
                    keep i iff sum_{j: score_j > score_i} probs_j < p   (ties kept together; p = 1 keeps all)
            token = argmax over kept i of score_i - log(-log(u_i))  (Gumbel-max; first index on ties)
No sort: scores are mapped to an order-preserving integer key in [0, 2^32), and each threshold is the
largest key T with count(key >= T) >= k (top-k) or mass(key >= T) >= p (top-p), built one bit at a time
from the top: 32 block reductions, exact. The uniforms are u = tl.rand(seed + b, t * V + v) with seed and
t = pos[0] read from device memory, so a CUDA graph replays with new seeds and positions, a row's draws do
not depend on the batch it sits in, and igpt_fast.philox.philox_uniforms reproduces them bit for bit.
"""

import torch
import triton
import triton.language as tl

from igpt_fast import backend

from . import host_math, sync


@triton.jit
def _order_keys(scores):
    """float32 -> int64 in [0, 2^32) with the same order as the floats (-0.0 and +0.0 equal)."""
    bits = scores.to(tl.int32, bitcast=True)
    # Negative floats order backwards by their bits: flip all but the sign bit.
    keys = tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)
    keys = tl.where(keys == -1, 0, keys)  # -0.0 maps to -1: make it +0.0's key
    return keys.to(tl.int64) + 2147483648


@triton.jit
def _row_uniforms(seed_ptr, pos_ptr, row, cols, V):
    """The uniforms of one row: tl.rand(seed + row, pos * V + cols), mirrored by philox_uniforms."""
    seed = tl.load(seed_ptr)
    pos = tl.load(pos_ptr)
    return tl.rand(seed + row, pos.to(tl.int64) * V + cols)


@triton.jit
def _argmax_nan_first(values, cols, in_row, BLOCK_V: tl.constexpr):
    """torch.argmax's choice over the row's lanes (the PyTorch stand-in's): the first NaN if there is one, else the
    first of the largest. Compiled, tl.argmax compares with > and ==, which a NaN fails both ways, so over NaN
    logits (a float16 overflow upstream) it picks some other lane, and with V not a power of two it can end on a
    padding lane past V: a token the next step would embed from past the end of wte. (The interpreter's argmax is
    numpy's nanargmax, which skips NaN instead.)"""
    first_nan = tl.min(tl.where(in_row & (values != values), cols, BLOCK_V), axis=0)
    return tl.where(first_nan < BLOCK_V, first_nan, tl.argmax(values, axis=0, tie_break_left=True))


@triton.jit
def _sample_kernel(
    logits_ptr,  # float32 [B, V], row stride stride_logits, columns contiguous
    temperature_ptr,  # float32 [B]
    top_k_ptr,  # int32 [B]
    top_p_ptr,  # float32 [B]
    seed_ptr,  # int64 [1]: the Philox seed of row 0 (row b uses seed + b)
    pos_ptr,  # int32 [1]: the decode step t (offsets of the uniforms, and where sequences is written)
    out_ids_ptr,  # int64 [B]: the chosen token of each row
    sequences_ptr,  # int64 [B, L], row stride stride_sequences; written at [b, t + 1] if WRITE_SEQUENCES
    arrivals_ptr,  # int32 [1], zero between launches: with ADVANCE_POS, the programs that have read pos so far
    stride_logits,
    stride_sequences,
    V,
    BLOCK_V: tl.constexpr,
    GREEDY: tl.constexpr,
    WRITE_SEQUENCES: tl.constexpr,
    ADVANCE_POS: tl.constexpr,  # pos[0] += 1 once every program has read it (the last to arrive writes it)
    USE_PDL: tl.constexpr,
):
    """One program per row of logits."""
    row = tl.program_id(0)
    n_rows = tl.num_programs(0)  # B: how many programs count themselves in on arrivals
    sync.wait_for_inputs(USE_PDL)  # the logits are the previous kernel's output
    row = tl.cast(row, tl.int64)
    cols = tl.arange(0, BLOCK_V)
    in_row = cols < V
    logits = tl.load(logits_ptr + row * stride_logits + cols, mask=in_row, other=float("-inf"))
    pos = tl.load(pos_ptr)

    if GREEDY:
        token = _argmax_nan_first(logits, cols, in_row, BLOCK_V)
    else:
        temperature = tl.load(temperature_ptr + row)
        top_k = tl.load(top_k_ptr + row)
        top_p = tl.load(top_p_ptr + row)
        scores = tl.math.div_rn(logits, temperature)
        keys = tl.where(in_row, _order_keys(scores), -1)  # padding lanes sit below every real key

        # top-k: the largest key T with count(key >= T) >= k is the k-th largest score's key.
        threshold = top_k.to(tl.int64) * 0
        if top_k < V:
            bit = threshold + 2147483648  # 2^31, then halved: int64, so no shift overflows
            for _ in range(32):
                candidate = threshold + bit
                count = tl.sum((keys >= candidate).to(tl.int32), axis=0)
                threshold = tl.where(count >= top_k, candidate, threshold)
                bit = bit // 2
        kept = keys >= threshold

        # top-p over the softmax of the top-k-kept scores: the largest key T with mass(key >= T) >= p.
        # Every key at or above it has less than p of the mass strictly above it; every key below has >= p.
        if top_p < 1.0:
            best = tl.max(tl.where(kept, scores, float("-inf")), axis=0)
            weights = tl.where(kept, tl.exp(scores - best), 0.0)
            probs = weights / tl.sum(weights, axis=0)
            threshold = top_k.to(tl.int64) * 0
            bit = threshold + 2147483648
            for _ in range(32):
                candidate = threshold + bit
                mass = tl.sum(tl.where(keys >= candidate, probs, 0.0), axis=0)
                threshold = tl.where(mass >= top_p, candidate, threshold)
                bit = bit // 2
            kept = kept & (keys >= threshold)

        uniforms = _row_uniforms(seed_ptr, pos_ptr, row, cols, V)
        perturbed = tl.where(kept, scores - tl.log(-tl.log(uniforms)), float("-inf"))
        token = _argmax_nan_first(perturbed, cols, in_row, BLOCK_V)

    token = token.to(tl.int64)
    tl.store(out_ids_ptr + row, token)
    if WRITE_SEQUENCES:
        tl.store(sequences_ptr + row * stride_sequences + pos + 1, token)
    if ADVANCE_POS:
        # Every program read pos (above, and in _row_uniforms) before its acq_rel increment; the last to arrive
        # advances it for the next step and leaves the counter zero for the next launch.
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals_ptr, 1, sem="acq_rel", scope="gpu")
        if arrived == n_rows - 1:
            tl.store(pos_ptr, pos + 1)
            tl.atomic_xchg(arrivals_ptr, 0, sem="relaxed", scope="gpu")


def _check(tensor, name, dtype, shape, device):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"sample_tokens: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype != dtype:
        raise TypeError(f"sample_tokens: {name} must be {dtype}, got {tensor.dtype}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"sample_tokens: {name} must have shape {list(shape)}, got {list(tensor.shape)}")
    if tensor.device != device:
        raise ValueError(f"sample_tokens: {name} is on {tensor.device}, logits on {device}")
    if tensor.dim() == 1 and tensor.numel() > 1 and tensor.stride(0) != 1:
        raise ValueError(f"sample_tokens: {name} must be contiguous, got stride {tensor.stride()}")


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    seed: torch.Tensor,
    pos: torch.Tensor,
    out_ids: torch.Tensor,
    sequences: torch.Tensor | None = None,
    greedy: bool = False,
    arrivals: torch.Tensor | None = None,
) -> None:
    """Choose one token per row of logits and write it to out_ids (and sequences[:, pos[0] + 1]); with `arrivals`,
    also advance pos[0] by one.

    logits float32 [B, V] (any row stride, contiguous columns); temperature float32 [B], top_k int32 [B],
    top_p float32 [B]: per-row parameters on the device (top_k = V and top_p = 1.0 switch a filter off;
    their values are checked at the API boundary by igpt_fast.sampling.check_sampling_args, not here,
    because reading them would sync the host); seed int64 [1]; pos int32 [1]; out_ids int64 [B];
    sequences int64 [B, L] with L > pos[0] + 1, or None. With greedy=True the argmax of the raw logits is
    taken and the sampling parameters are not read. arrivals: int32 [1], zero between launches (every complete
    launch leaves it so), or None: the programs count themselves in on it after reading pos, and the last one
    writes pos[0] + 1, so a decode step needs no launch of its own to advance. No allocation, no host sync: safe
    to capture.
    """
    if not isinstance(logits, torch.Tensor) or logits.dtype != torch.float32 or logits.dim() != 2:
        got = f"{logits.dtype} {list(logits.shape)}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"sample_tokens: logits must be a float32 [B, V] tensor, got {got}")
    batch, vocab = logits.shape
    if batch < 1 or vocab < 1:
        raise ValueError(f"sample_tokens: logits must have B >= 1 and V >= 1, got {list(logits.shape)}")
    if vocab > 1 and logits.stride(1) != 1:
        raise ValueError(f"sample_tokens: logits columns must be contiguous, got strides {logits.stride()}")
    if not isinstance(greedy, bool):
        raise TypeError(f"sample_tokens: greedy must be a bool, got {greedy!r}")
    device = logits.device
    if not backend.use_triton(device):
        raise ValueError(
            f"sample_tokens: logits on {device} need CUDA or TRITON_INTERPRET=1; "
            "igpt_fast.sampling.sample_reference computes the same choice in PyTorch"
        )
    _check(temperature, "temperature", torch.float32, (batch,), device)
    _check(top_k, "top_k", torch.int32, (batch,), device)
    _check(top_p, "top_p", torch.float32, (batch,), device)
    _check(seed, "seed", torch.int64, (1,), device)
    _check(pos, "pos", torch.int32, (1,), device)
    _check(out_ids, "out_ids", torch.int64, (batch,), device)
    if arrivals is not None:
        _check(arrivals, "arrivals", torch.int32, (1,), device)
    if sequences is not None:
        if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2:
            raise ValueError(f"sample_tokens: sequences must be an int64 [B, L] tensor or None, got {sequences!r}")
        _check(sequences, "sequences", torch.int64, (batch, sequences.shape[1]), device)
        if sequences.shape[1] > 1 and sequences.stride(1) != 1:
            raise ValueError(f"sample_tokens: sequences columns must be contiguous, got strides {sequences.stride()}")

    block_v = host_math.next_power_of_2(vocab)
    # One warp holds a 512-wide row in 16 registers per thread; the 64 threshold reductions then need no
    # shared memory or barriers. Wider rows get more warps.
    num_warps = min(8, max(1, block_v // 1024))
    pdl = backend.use_pdl(device)
    _sample_kernel[(batch,)](
        logits,
        temperature,
        top_k,
        top_p,
        seed,
        pos,
        out_ids,
        sequences if sequences is not None else out_ids,  # never written without WRITE_SEQUENCES
        arrivals if arrivals is not None else pos,  # never touched without ADVANCE_POS
        logits.stride(0),
        sequences.stride(0) if sequences is not None else 0,
        vocab,
        BLOCK_V=block_v,
        GREEDY=greedy,
        WRITE_SEQUENCES=sequences is not None,
        ADVANCE_POS=arrivals is not None,
        USE_PDL=pdl,
        launch_pdl=pdl,
        num_warps=num_warps,
        enable_fp_fusion=backend.FP_FUSION,
    )
