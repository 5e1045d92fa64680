"""Token + position embedding: out[m, :] = wte[ids[m]] + wpe[pos[0] + m % seq_len].

ids [M] (int64 or int32, any stride), wte [V, d], wpe [P, d] (contiguous, one float dtype), pos int32 [1]
on the device (read in-kernel, so the decode step can be graph-captured: decode has seq_len=1 and pos=t,
prefill seq_len=S and pos=0), out [M, d] in the weights' dtype. The sum is formed in float32 and rounded once,
which equals the correctly rounded sum in the weights' dtype that PyTorch computes.
"""

import torch
import triton
import triton.language as tl

from igpt_fast import backend

from . import host_math, sync
from .linear import _check_pos, _check_seq_len, _check_shape, _check_tensor, _fail


@triton.jit
def _embed_kernel(
    ids_ptr,  # [M] token ids, any stride
    wte_ptr,  # [V, d] token embedding, contiguous
    wpe_ptr,  # [P, d] position embedding, contiguous
    pos_ptr,  # int32 [1], position of each sequence's first row
    out_ptr,  # [M, d] output, last dim contiguous
    seq_len,
    d,
    stride_ids,
    stride_om,
    BLOCK_D: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program per row of out."""
    row = tl.program_id(0)
    sync.wait_for_inputs(USE_PDL)  # ids and pos come from the previous step
    row = tl.cast(row, tl.int64)
    token = tl.load(ids_ptr + row * stride_ids).to(tl.int64)
    position = tl.load(pos_ptr).to(tl.int64) + row % seq_len
    offs = tl.arange(0, BLOCK_D)
    mask = offs < d
    tok = tl.load(wte_ptr + token * d + offs, mask=mask, other=0.0).to(tl.float32)
    pe = tl.load(wpe_ptr + position * d + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_om + offs, (tok + pe).to(out_ptr.dtype.element_ty), mask=mask)


def embed(ids, wte, wpe, pos, *, seq_len: int, out) -> torch.Tensor:
    """out[m, :] = wte[ids[m]] + wpe[pos[0] + m % seq_len]; writes and returns out [M, d] (wte's dtype).

    ids and positions are not range-checked (they are device values): the caller keeps ids < V and
    pos[0] + seq_len <= P.
    """
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in (torch.int64, torch.int32):
        got = type(ids).__name__
        if isinstance(ids, torch.Tensor):
            got = f"{ids.dtype} of shape {tuple(ids.shape)}"
        _fail(f"ids must be a 1-D torch.int64 or torch.int32 tensor, got {got}")
    device = ids.device
    _check_tensor("wte", wte, ndim=2, device=device, contiguous=True)
    _check_tensor("wpe", wpe, ndim=2, dtype=wte.dtype, device=device, contiguous=True)
    d = wte.shape[1]
    if wpe.shape[1] != d:
        _fail(f"wpe must be [P, d={d}] like wte {tuple(wte.shape)}, got shape {tuple(wpe.shape)}")
    _check_pos(pos, device)
    M = ids.shape[0]
    _check_seq_len(seq_len, M)
    if seq_len > wpe.shape[0]:
        _fail(f"seq_len={seq_len} is longer than the position table wpe {tuple(wpe.shape)}")
    _check_tensor("out", out, ndim=2, dtype=wte.dtype, device=device)
    _check_shape("out", out, (M, d))
    if M > 0:
        pdl = backend.use_pdl(device)
        _embed_kernel[(M,)](ids, wte, wpe, pos, out, seq_len, d, ids.stride(0), out.stride(0),
                            BLOCK_D=host_math.next_power_of_2(d), USE_PDL=pdl, launch_pdl=pdl,
                            num_warps=4 if d <= 1024 else 8, enable_fp_fusion=backend.FP_FUSION)
    return out
