"""Prefill and split-K decode attention against a float64 PyTorch reference.

Small cases run on the CPU under the Triton interpreter; full lengths, bfloat16, the imagegpt-small decode
shapes and CUDA-graph replay are GPU-only. Outputs and workspaces are filled with NaN before each run (an
unwritten element fails) and cache positions the kernel must not read hold NaN.
"""

import math

import pytest
import torch
import triton
from tolerances import tol

from igpt_fast.kernels import attention
from igpt_fast.kernels.attention import (
    decode_attention,
    decode_num_splits,
    decode_workspace,
    prefill_attention,
)

NAN = float("nan")


def reference_attention(q, k, v, scale):
    """float64 softmax(scale * q k^T, causal) v. q: [..., M, D], k, v: [..., N, D]; query i sits at
    position N - M + i, so M == N is prefill and M == 1 is a decode step over keys 0..N-1."""
    n_queries, n_keys = q.shape[-2], k.shape[-2]
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    visible = torch.ones(n_queries, n_keys, dtype=torch.bool, device=q.device).tril(
        diagonal=n_keys - n_queries
    )
    scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v.double()


def random_qkv(shape, dtype, device, spread=2.0):
    """q scaled by `spread` so scores span several units and the online max actually moves."""
    q = (spread * torch.randn(shape, device=device)).to(dtype)
    k = torch.randn(shape, device=device).to(dtype)
    v = torch.randn(shape, device=device).to(dtype)
    return q, k, v


# (batch, n_head, seq_len, head_dim, dtype, layer_idx): a covering set, not the cross product, so the
# interpreter stays fast. layer_idx > 0 checks that the caller's 1/(layer_idx+1) factor is honoured.
PREFILL_CASES = [
    (1, 1, 1, 64, torch.float32, 0),
    (1, 8, 2, 96, torch.float32, 0),
    (3, 1, 17, 128, torch.float32, 0),
    (1, 1, 63, 64, torch.float32, 5),
    (1, 1, 64, 96, torch.float32, 0),
    (1, 1, 65, 128, torch.float16, 0),
    (3, 16, 17, 64, torch.float16, 0),
    (1, 1, 65, 96, torch.float16, 23),
    (1, 1, 17, 256, torch.float32, 0),
    # Longer than one query block (64 in float32, 128 in 16-bit): blocks before the diagonal run unmasked.
    (2, 2, 130, 96, torch.float32, 0),
    (1, 1, 200, 64, torch.float16, 3),
]


@pytest.mark.parametrize("batch,n_head,seq_len,head_dim,dtype,layer_idx", PREFILL_CASES)
def test_prefill_matches_reference(device, batch, n_head, seq_len, head_dim, dtype, layer_idx):
    torch.manual_seed(seq_len * 1000 + head_dim)
    scale = 1.0 / math.sqrt(head_dim) / (layer_idx + 1)
    q, k, v = random_qkv((batch, n_head, seq_len, head_dim), dtype, device)
    out = torch.full_like(q, NAN)
    returned = prefill_attention(q, k, v, scale=scale, out=out)
    assert returned is out
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, scale), **tol("kernel", dtype))


def test_prefill_unmasked_loop_meets_the_masked_diagonal(device):
    """Three query blocks (float32): the last walks two blocks' keys unmasked, then its diagonal block masked."""
    torch.manual_seed(130)
    q, k, v = random_qkv((1, 2, 130, 64), torch.float32, device)
    out = prefill_attention(q, k, v, scale=0.125)
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, 0.125), **tol("kernel", torch.float32))


def test_prefill_scale_is_honoured(device):
    """The same inputs under two scales give two different, each correct, results."""
    torch.manual_seed(1)
    q, k, v = random_qkv((1, 2, 17, 64), torch.float32, device)
    plain = prefill_attention(q, k, v, scale=0.125)
    damped = prefill_attention(q, k, v, scale=0.125 / 12)
    torch.testing.assert_close(
        damped.double(), reference_attention(q, k, v, 0.125 / 12), **tol("kernel", torch.float32)
    )
    assert (plain - damped).abs().max() > 1e-2


def test_prefill_engine_layout(device):
    """q is a transposed slice of a fused [B, S, 3, H, D] buffer, k/v are views of a longer cache whose
    unused positions hold NaN, and out is a transposed view of a [B, S, H, D] buffer."""
    torch.manual_seed(2)
    batch, n_head, seq_len, head_dim, max_len = 2, 3, 33, 96, 70
    qkv = torch.randn(batch, seq_len, 3, n_head, head_dim, device=device)
    q = qkv[:, :, 0].transpose(1, 2)  # [B, H, S, D], strides not contiguous
    k_cache = torch.full((batch, n_head, max_len, head_dim), NAN, device=device)
    v_cache = torch.full_like(k_cache, NAN)
    k_cache[:, :, :seq_len] = qkv[:, :, 1].transpose(1, 2)
    v_cache[:, :, :seq_len] = qkv[:, :, 2].transpose(1, 2)
    out_buffer = torch.full((batch, seq_len, n_head, head_dim), NAN, device=device)
    prefill_attention(q, k_cache, v_cache, scale=0.1, out=out_buffer.transpose(1, 2))
    expected = reference_attention(q, k_cache[:, :, :seq_len], v_cache[:, :, :seq_len], 0.1)
    torch.testing.assert_close(out_buffer.transpose(1, 2).double(), expected, **tol("kernel", torch.float32))


def test_prefill_allocates_out_and_leaves_inputs_alone(device):
    torch.manual_seed(3)
    q, k, v = random_qkv((1, 2, 5, 64), torch.float16, device)
    before = [x.clone() for x in (q, k, v)]
    out = prefill_attention(q, k, v, scale=0.125)
    assert out.shape == q.shape and out.dtype == q.dtype and out.device == q.device
    torch.testing.assert_close(
        out.double(), reference_attention(q, k, v, 0.125), **tol("kernel", torch.float16)
    )
    for x, original in zip((q, k, v), before, strict=True):
        assert torch.equal(x, original)


def run_decode_steps(device, batch, n_head, head_dim, max_len, dtype, steps, workspace=None, scale=None,
                     kv_before_wait=False):
    """Run decode at each t in `steps` over a cache whose positions > t hold NaN; check every output."""
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    k_full = torch.randn(batch, n_head, max_len, head_dim, device=device).to(dtype)
    v_full = torch.randn(batch, n_head, max_len, head_dim, device=device).to(dtype)
    if workspace is None:
        workspace = decode_workspace(batch, n_head, head_dim, max_len, device)
    pos = torch.zeros(1, dtype=torch.int32, device=device)
    for t in steps:
        q = (2.0 * torch.randn(batch, n_head, head_dim, device=device)).to(dtype)
        k_cache, v_cache = k_full.clone(), v_full.clone()
        k_cache[:, :, t + 1 :] = NAN
        v_cache[:, :, t + 1 :] = NAN
        out = torch.full_like(q, NAN)
        # Stale partials from an earlier, longer step must never be read. The tail holds the arrival counters
        # (zero between launches, see decode_workspace): they are left alone, and must come back zero.
        partials, counters = workspace[: workspace.numel() - batch * n_head], workspace[-batch * n_head :]
        partials.fill_(NAN)
        pos.fill_(t)
        decode_attention(q, k_cache, v_cache, pos, scale=scale, out=out, workspace=workspace,
                         kv_before_wait=kv_before_wait)
        assert workspace.numel() == 0 or not counters.view(torch.int32).any(), "a launch left a counter set"
        expected = reference_attention(q[:, :, None], k_full[:, :, : t + 1], v_full[:, :, : t + 1], scale)[
            :, :, 0
        ]
        torch.testing.assert_close(
            out.double(), expected, **tol("kernel", dtype), msg=lambda m, t=t: f"t={t}: {m}"
        )


# (batch, n_head, head_dim, max_len, dtype): max_len 256 splits 1 or 2 heads four ways (decode_num_splits),
# so empty splits (t < 64..192), partial last blocks and the merge all run; 65 and 17 run a single split (whole rows
# in 32-key blocks).
DECODE_CASES = [
    (1, 1, 64, 256, torch.float32),
    (1, 2, 96, 256, torch.float16),
    (3, 1, 128, 130, torch.float32),
    (1, 8, 64, 65, torch.float16),
    (3, 16, 96, 17, torch.float32),
]


@pytest.mark.parametrize("batch,n_head,head_dim,max_len,dtype", DECODE_CASES)
def test_decode_matches_reference(device, batch, n_head, head_dim, max_len, dtype):
    torch.manual_seed(batch * 100 + n_head + head_dim + max_len)
    steps = sorted({0, 1, 16, 62, 63, 64, 65, 127, 200, max_len - 1} & set(range(max_len)))
    run_decode_steps(device, batch, n_head, head_dim, max_len, dtype, steps)


@pytest.mark.parametrize("block_n", [16, 64])
@pytest.mark.parametrize("batch,n_head,head_dim,max_len,dtype", [DECODE_CASES[3], DECODE_CASES[4]])
def test_decode_whole_row_key_blocks_the_sweep_times(device, batch, n_head, head_dim, max_len, dtype, block_n,
                                                     monkeypatch):
    """A launch of one split walks each cache row in _DECODE_WHOLE_ROW_BLOCK_N-key blocks (32; the sweep's 16),
    whatever the split launches' _DECODE_BLOCK_N."""
    monkeypatch.setattr(attention, "_DECODE_WHOLE_ROW_BLOCK_N", block_n)
    assert decode_num_splits(batch, n_head, max_len) == 1
    assert attention._decode_tile(triton.next_power_of_2(head_dim), dtype, 1)[0] == block_n
    torch.manual_seed(block_n + batch)
    steps = sorted({0, 15, 16, 17, 31, 32, 63, 64, max_len - 1} & set(range(max_len)))
    run_decode_steps(device, batch, n_head, head_dim, max_len, dtype, steps)


@pytest.mark.parametrize("head_dim", [200, 256])
def test_decode_of_the_widest_float32_heads_walks_smaller_key_blocks(device, head_dim, monkeypatch):
    """A 64-key block of 256 float32 values a key is 64 KB (it spilled on sm_90): such heads walk 32-key blocks,
    and the splits, their chunks and their merge follow."""
    assert attention._decode_tile(256, torch.float32, 2) == (32, 8)  # BLOCK_D of both head widths
    assert attention._decode_tile(128, torch.float32, 2) == (64, 8)  # imagegpt-medium's heads keep 64 keys
    assert attention._decode_tile(64, torch.float16, 2) == (64, 4)  # and imagegpt-small's
    assert attention._decode_tile(64, torch.float16, 1) == (32, 4)  # unless one split walks each whole row
    monkeypatch.setattr(attention, "_DECODE_TARGET_PROGRAMS", 2)
    assert decode_num_splits(1, 1, 160) == 2  # chunks of 64 keys or more: 2 blocks of 32, or 3 past t = 127
    torch.manual_seed(head_dim)
    run_decode_steps(device, 1, 1, head_dim, 160, torch.float32, [0, 31, 32, 33, 63, 64, 65, 100, 159])


@pytest.mark.parametrize("batch,n_head,head_dim,max_len,dtype", DECODE_CASES)
def test_decode_with_keys_read_before_the_wait(device, batch, n_head, head_dim, max_len, dtype):
    """kv_before_wait: the first block without key t, then key t alone, add up to the block (every split, t at
    block edges; NaN past t is never read)."""
    torch.manual_seed(batch + n_head + max_len)
    steps = sorted({0, 1, 63, 64, 65, 127, 128, max_len - 1} & set(range(max_len)))
    run_decode_steps(device, batch, n_head, head_dim, max_len, dtype, steps, kv_before_wait=True)


@pytest.mark.parametrize("min_keys", [128, 256])
@pytest.mark.parametrize("batch,n_head,head_dim,max_len,dtype", [DECODE_CASES[0], DECODE_CASES[2]])
def test_decode_splits_of_at_least_min_keys(device, batch, n_head, head_dim, max_len, dtype, min_keys, monkeypatch):
    """The sweep's _DECODE_MIN_SPLIT_KEYS: short caches in one split (no merge), longer ones in fewer splits."""
    monkeypatch.setattr(attention, "_DECODE_MIN_SPLIT_KEYS", min_keys)
    splits = decode_num_splits(batch, n_head, max_len)
    assert splits <= max(1, max_len // min_keys)  # no split could ever be empty for a full cache
    assert splits == 2 or (batch, min_keys) != (1, 128)  # that case merges two splits of 128 keys at t >= 128
    torch.manual_seed(min_keys + batch)
    steps = sorted({0, 63, 64, 127, 128, 129, 255, max_len - 1} & set(range(max_len)))
    run_decode_steps(device, batch, n_head, head_dim, max_len, dtype, steps)


def test_decode_splits_are_exercised():
    """The CPU cases above do cover the split-K path: check the heuristic gives them several splits."""
    assert decode_num_splits(1, 1, 256) == 4
    assert decode_num_splits(1, 2, 256) == 4
    assert decode_num_splits(3, 1, 130) == 2
    assert decode_num_splits(1, 8, 65) == 1


def test_decode_num_splits_fills_an_h100():
    assert decode_num_splits(1, 8, 1024) == 16  # 128 programs for batch 1, imagegpt-small
    assert decode_num_splits(8, 8, 1024) == 4  # 256 programs
    assert decode_num_splits(64, 8, 1024) == 1  # 512 (batch, head) programs already: no merge
    assert decode_num_splits(1, 1, 32) == 1  # never more splits than whole 64-key blocks
    for batch in (1, 2, 3, 5, 8, 17, 64, 256):
        splits = decode_num_splits(batch, 8, 1024)
        assert splits & (splits - 1) == 0 and 1 <= splits <= 16


def test_decode_scale_is_honoured(device):
    torch.manual_seed(4)
    run_decode_steps(device, 1, 2, 64, 128, torch.float32, [0, 70, 127], scale=0.125 / 24)


def test_decode_workspace_from_larger_batch(device, monkeypatch):
    """One workspace sized for batch B serves every batch below it, including one that uses more splits per
    (batch, head) and so more partials than B itself: batch 5 of imagegpt-small's 8 heads x 1024 positions takes
    8 splits where batch 8 takes 4."""
    assert decode_num_splits(5, 8, 1024) == 8 and decode_num_splits(8, 8, 1024) == 4
    assert attention._workspace_floats(5, 8, 64, 1024) > attention._workspace_floats(8, 8, 64, 1024)
    assert decode_workspace(8, 8, 64, 1024, device).numel() >= attention._workspace_floats(5, 8, 64, 1024)
    # Run: batch 1 in batch 4's workspace (its counters at the tail, past fewer partials); then the case above at
    # interpreter size: with a program target of 8, batch 3 of one head takes 4 splits where batch 4 takes 2.
    workspace = decode_workspace(4, 1, 64, 256, device)
    torch.manual_seed(5)
    run_decode_steps(device, 1, 1, 64, 256, torch.float32, [5, 255], workspace=workspace)
    monkeypatch.setattr(attention, "_DECODE_TARGET_PROGRAMS", 8)
    assert decode_num_splits(3, 1, 256) == 4 and decode_num_splits(4, 1, 256) == 2
    assert attention._workspace_floats(3, 1, 64, 256) > attention._workspace_floats(4, 1, 64, 256)
    workspace = decode_workspace(4, 1, 64, 256, device)
    run_decode_steps(device, 3, 1, 64, 256, torch.float32, [5, 255], workspace=workspace)


def test_decode_engine_layout(device):
    """q is a head view of a fused [B, 3*H*D] projection, the caches are batch slices of a bigger
    [layers, B_max, H, T, D] cache, and out is a view of a [B, H*D] buffer."""
    torch.manual_seed(6)
    batch, batch_max, n_head, head_dim, max_len, t = 2, 3, 2, 96, 200, 150
    qkv = torch.randn(batch, 3 * n_head * head_dim, device=device)
    q = qkv[:, : n_head * head_dim].view(batch, n_head, head_dim)
    cache = torch.full((2, 2, batch_max, n_head, max_len, head_dim), NAN, device=device)  # [k|v, layer, ...]
    cache[:, 1, :batch, :, : t + 1] = torch.randn(2, batch, n_head, t + 1, head_dim, device=device)
    k_cache, v_cache = cache[0, 1, :batch], cache[1, 1, :batch]
    out_buffer = torch.full((batch, n_head * head_dim), NAN, device=device)
    pos = torch.tensor([t], dtype=torch.int32, device=device)
    workspace = decode_workspace(batch_max, n_head, head_dim, max_len, device)
    out = decode_attention(
        q, k_cache, v_cache, pos, scale=0.1, out=out_buffer.view(batch, n_head, head_dim), workspace=workspace
    )
    assert out.data_ptr() == out_buffer.data_ptr()
    expected = reference_attention(q[:, :, None], k_cache[:, :, : t + 1], v_cache[:, :, : t + 1], 0.1)[
        :, :, 0
    ]
    torch.testing.assert_close(
        out_buffer.view(batch, n_head, head_dim).double(), expected, **tol("kernel", torch.float32)
    )


def _decode_inputs(device, dtype=torch.float32, batch=1, n_head=2, head_dim=64, max_len=128):
    return {
        "q": torch.randn(batch, n_head, head_dim, device=device, dtype=dtype),
        "k_cache": torch.randn(batch, n_head, max_len, head_dim, device=device, dtype=dtype),
        "v_cache": torch.randn(batch, n_head, max_len, head_dim, device=device, dtype=dtype),
        "pos": torch.tensor([3], dtype=torch.int32, device=device),
        "out": torch.full((batch, n_head, head_dim), NAN, device=device, dtype=dtype),
        "workspace": decode_workspace(batch, n_head, head_dim, max_len, device),
    }


BAD_DECODE = {
    "q rank": (
        lambda a: a.update(q=a["q"][None]),
        r"q must be a 3-D tensor \[B, H, D\], got shape \(1, 1, 2, 64\)",
    ),
    "q int dtype": (
        lambda a: a.update(q=a["q"].long()),
        r"q.dtype must be float32, float16 or bfloat16, got torch.int64",
    ),
    "k dtype": (
        lambda a: a.update(k_cache=a["k_cache"].half()),
        r"k_cache.dtype must equal q.dtype \(torch.float32\), got torch.float16",
    ),
    "v head_dim": (
        lambda a: a.update(v_cache=a["v_cache"][..., :32]),
        r"v_cache must have shape \[1, 2, 128, 64\].*got \(1, 2, 128, 32\)",
    ),
    "k last dim strided": (
        lambda a: a.update(k_cache=a["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)),
        r"k_cache must have a contiguous last dim",
    ),
    "pos int64": (
        lambda a: a.update(pos=a["pos"].long()),
        r"pos must be an int32 tensor of shape \[1\], got torch.int64",
    ),
    "pos shape": (
        lambda a: a.update(pos=a["pos"].reshape(())),
        r"pos must be an int32 tensor of shape \[1\], got torch.int32 shape \(\)",
    ),
    "pos python int": (lambda a: a.update(pos=3), r"pos must be an int32 tensor of shape \[1\], got int"),
    "workspace small": (
        lambda a: a.update(workspace=a["workspace"][:100]),
        r"workspace holds 100 float32 values but .* needs 262",
    ),
    "workspace dtype": (
        lambda a: a.update(workspace=a["workspace"].half()),
        r"workspace must be a 1-D float32 tensor .* got torch.float16",
    ),
    "out dtype": (lambda a: a.update(out=a["out"].half()), r"out.dtype must equal q.dtype"),
    "out shape": (
        lambda a: a.update(out=a["out"][:, :1]),
        r"out must have q's shape \(1, 2, 64\), got \(1, 1, 64\)",
    ),
    "scale tensor": (
        lambda a: a.update(scale=torch.tensor(0.1)),
        r"scale must be a finite python float, got tensor",
    ),
    "kv_before_wait not a bool": (
        lambda a: a.update(kv_before_wait=1),
        r"kv_before_wait must be a bool, got 1",
    ),
    # an empty cache: no key to attend (the output was NaN); no batch or head: no split (a ZeroDivisionError)
    "empty cache": (
        lambda a: a.update(k_cache=a["k_cache"][:, :, :0], v_cache=a["v_cache"][:, :, :0]),
        r"k_cache must have B, H and T of at least 1, got shape \(1, 2, 0, 64\)",
    ),
    "no head": (
        lambda a: a.update(q=a["q"][:, :0], k_cache=a["k_cache"][:, :0], v_cache=a["v_cache"][:, :0],
                           out=a["out"][:, :0]),
        r"k_cache must have B, H and T of at least 1, got shape \(1, 0, 128, 64\)",
    ),
}


@pytest.mark.parametrize("case", BAD_DECODE)
def test_decode_rejects_bad_inputs_before_writing(device, case):
    mutate, message = BAD_DECODE[case]
    args = _decode_inputs(device)
    args["scale"] = 0.125
    mutate(args)
    with pytest.raises(ValueError, match=message):
        decode_attention(args.pop("q"), args.pop("k_cache"), args.pop("v_cache"), args.pop("pos"), **args)
    assert torch.isnan(args["out"]).all()


BAD_PREFILL = {
    "q rank": (
        lambda a: a.update(q=a["q"][0]),
        r"q must be a 4-D tensor \[B, H, S, D\], got shape \(2, 5, 64\)",
    ),
    "k dtype": (
        lambda a: a.update(k=a["k"].double()),
        r"k.dtype must be float32, float16 or bfloat16, got torch.float64",
    ),
    "v dtype": (
        lambda a: a.update(v=a["v"].half()),
        r"v.dtype must equal q.dtype \(torch.float32\), got torch.float16",
    ),
    "k head_dim": (
        lambda a: a.update(k=a["k"][..., :48]),
        r"k must have shape \[1, 2, S_kv >= 5, 64\].*got \(1, 2, 5, 48\)",
    ),
    "k too short": (
        lambda a: a.update(k=a["k"][:, :, :4]),
        r"k must have shape \[1, 2, S_kv >= 5, 64\].*got \(1, 2, 4, 64\)",
    ),
    "q last dim strided": (
        lambda a: a.update(q=a["q"].transpose(2, 3).contiguous().transpose(2, 3)),
        r"q must have a contiguous last dim \(stride 1\), got strides \(640, 320, 1, 5\)",
    ),
    "out shape": (
        lambda a: a.update(out=a["out"][:, :, :4]),
        r"out must have q's shape \(1, 2, 5, 64\), got \(1, 2, 4, 64\)",
    ),
    "head_dim too big": (
        lambda a: a.update(**{n: torch.zeros(1, 1, 2, 512, device=a["q"].device) for n in "qkv"}, out=None),
        r"head_dim must be in 1..256, got 512",
    ),
    "scale nan": (lambda a: a.update(scale=NAN), r"scale must be a finite python float, got nan"),
}


@pytest.mark.parametrize("case", BAD_PREFILL)
def test_prefill_rejects_bad_inputs(device, case):
    mutate, message = BAD_PREFILL[case]
    q, k, v = random_qkv((1, 2, 5, 64), torch.float32, device)
    args = {"q": q, "k": k, "v": v, "out": torch.full_like(q, NAN), "scale": 0.125}
    poisoned_out = args["out"]
    mutate(args)
    with pytest.raises(ValueError, match=message):
        prefill_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)
    assert torch.isnan(poisoned_out).all()


def test_decode_workspace_rejects_bad_sizes(device):
    with pytest.raises(ValueError, match=r"batch must be a positive int, got 0"):
        decode_workspace(0, 8, 64, 1024, device)
    with pytest.raises(ValueError, match=r"head_dim must be in 1..256, got 300"):
        decode_workspace(1, 8, 300, 1024, device)


# ----------------------------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("seq_len", [1023, 1024])
def test_prefill_full_length(device, dtype, head_dim, seq_len):
    torch.manual_seed(seq_len + head_dim)
    n_head = 16 if head_dim == 96 else 8
    q, k, v = random_qkv((2, n_head, seq_len, head_dim), dtype, device)
    out = torch.full_like(q, NAN)
    prefill_attention(q, k, v, scale=1.0 / math.sqrt(head_dim), out=out)
    torch.testing.assert_close(
        out.double(), reference_attention(q, k, v, 1.0 / math.sqrt(head_dim)), **tol("kernel", dtype)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("batch,n_head,head_dim", [(1, 8, 64), (3, 8, 128), (2, 16, 96)])
def test_decode_full_length(device, dtype, batch, n_head, head_dim):
    torch.manual_seed(batch + head_dim)
    run_decode_steps(device, batch, n_head, head_dim, 1024, dtype, [0, 1, 63, 64, 511, 1000, 1022, 1023])


@pytest.mark.gpu
@pytest.mark.parametrize("kv_before_wait", [False, True])
@pytest.mark.parametrize("batch,splits", [(1, 16), (8, 4), (64, 1), (256, 1)])
def test_decode_imagegpt_small_batches(device, batch, splits, kv_before_wait):
    """imagegpt-small's decode shapes on the card at the batches the launch heuristics tell apart: 64-key blocks in
    16 and 4 splits, one split walking whole rows in 32-key blocks; keys read before the wait or after it."""
    assert decode_num_splits(batch, 8, 1024) == splits
    torch.manual_seed(batch)
    run_decode_steps(device, batch, 8, 64, 1024, torch.float16, [0, 31, 64, 511, 1023], kv_before_wait=kv_before_wait)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_small_prefill_odd_sizes_bf16(device, dtype):
    for batch, n_head, seq_len, head_dim, _, _ in PREFILL_CASES:
        q, k, v = random_qkv((batch, n_head, seq_len, head_dim), dtype, device)
        out = prefill_attention(q, k, v, scale=0.1)
        torch.testing.assert_close(out.double(), reference_attention(q, k, v, 0.1), **tol("kernel", dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8, 64])
def test_decode_in_cuda_graph_follows_pos(device, batch):
    """One captured graph serves every step: pos is changed in place between replays, nothing else."""
    torch.manual_seed(8)
    n_head, head_dim, max_len, dtype = 8, 64, 1024, torch.float16
    q = torch.randn(batch, n_head, head_dim, device=device, dtype=dtype)
    k_cache = torch.randn(batch, n_head, max_len, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn(batch, n_head, max_len, head_dim, device=device, dtype=dtype)
    out = torch.full_like(q, NAN)
    pos = torch.tensor([max_len - 1], dtype=torch.int32, device=device)
    workspace = decode_workspace(batch, n_head, head_dim, max_len, device)
    decode_attention(q, k_cache, v_cache, pos, scale=0.125, out=out, workspace=workspace)  # warm-up: compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k_cache, v_cache, pos, scale=0.125, out=out, workspace=workspace)
    for t in (0, 1, 100, 640, 1023, 5):
        pos.fill_(t)
        out.fill_(NAN)
        graph.replay()
        expected = reference_attention(q[:, :, None], k_cache[:, :, : t + 1], v_cache[:, :, : t + 1], 0.125)[
            :, :, 0
        ]
        torch.testing.assert_close(
            out.double(), expected, **tol("kernel", dtype), msg=lambda m, t=t: f"t={t}: {m}"
        )


@pytest.mark.gpu
def test_rejects_mixed_devices(device):
    q, k, v = random_qkv((1, 2, 5, 64), torch.float16, device)
    with pytest.raises(ValueError, match=r"k must be on q's device \(cuda:0\), got cpu"):
        prefill_attention(q, k.cpu(), v, scale=0.125)
    args = _decode_inputs(device, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"pos must be on q's device \(cuda:0\), got cpu"):
        decode_attention(
            args["q"],
            args["k_cache"],
            args["v_cache"],
            args["pos"].cpu(),
            scale=0.1,
            out=args["out"],
            workspace=args["workspace"],
        )
