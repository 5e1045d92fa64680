"""The whole decode step in one persistent launch: the same per-program code as the step's 5 launches a layer + 3,
run as phases of one kernel separated by grid barriers (kernels/sync.py).

    phase 0              embed                      x = wte[ids] + wpe[pos]
    per layer l, 5 l + 1 norm_qkv                   ln_1 -> c_attn -> q, and k, v into the cache at pos
                 5 l + 2 decode attention           split-K over the keys 0..pos; the last split of a head merges
                 5 l + 3 attn c_proj                x += attn @ W + b
                 5 l + 4 ln_2 -> c_fc -> quick_gelu
                 5 l + 5 mlp c_proj                 x += hidden @ W + b
    5 L + 1              ln_f -> lm_head            float32 logits
    then                 sampling                   one row a program; the last program to finish advances pos

Why: a decode step at small batch moves about 150 MB (imagegpt-small, fp16) in about 0.36 ms on an H100
(2026-11-27), far above its bandwidth floor (about 50 us): the time is the 123 dependent launches' latency, about
2.9 us each even with PDL. Here a phase boundary is a barrier instead of a launch, and each phase's first weight
block is read before its barrier's spin, so the weights stream while the grid waits. Whether a barrier is cheaper
than a PDL launch on the card is what benchmarks/launch_floor.py measures; the benchmark's igpt-fast-one-launch rows
time this kernel against the launches (decoder.PERSISTENT_DECODE), and benchmarks/profile_step.py --one-launch
times its phases from inside.

The grid is one program per SM, so every program is resident at once, as a spin barrier needs; a program works
through its phase's items (GEMV column stripes, attention (batch, head, split) items, rows) with the grid's stride,
and a program with no item in a phase does not wait for it. The phases call the separate launches' per-program
functions, so the math is theirs; only the cut of the work differs (column stripes and key splits sized for one
program per SM, and 16-bit batches of 2-8 multiplied row by row: ROW_LOOP_MAX_BATCH), which reorders float32
sums. Batches of at most 16 rows (the GEMV path's; larger batches take the tiled path and stay with separate
launches).
"""

import torch
import triton
import triton.language as tl

from igpt_fast import backend

from . import attention, linear, sync
from .attention import _decode_program
from .embedding import _embed_row
from .linear import _gemv_program
from .sampling import _sample_row

MAX_BATCH = linear._GEMV_MAX_M
# Batches (from 2) whose GEMV phases multiply each W block by one row of x at a time (linear._gemv_program's
# ROW_LOOP), with 8 warps a program. Without it a phase's W block shrinks with the batch (the [rows, K, N] product is
# capped at linear._GEMV_TILE values), so at batch 8 ln_2 -> c_fc walks K = 512 in 8 serial steps of 2 KB of W, only
# the first read before the barrier; row by row every imagegpt-small phase reads its whole stripe of W in one step,
# before the barrier, as at batch 1. Compiled for sm_90 (triton 3.9, 2026-12-04): at 4 warps it spills 400-900 B at
# batch 8 (why it was off); at 8 warps batch 8 spills nothing (226 registers, 242 with linear._GEMV_PREFETCH = 2) and
# batch 16 still spills 600-700 B, hence 8; float32 (the exact mode, for parity more than speed) spills 72 B at batch
# 8, hence 16-bit weights only. Triton 3.6 (the GPU machine's): 255 registers and 32-36 B spilled at batch 8. Not
# timed on a GPU: the benchmark's igpt-fast-one-launch rows at batch 8 run it; ROW_LOOP_MAX_BATCH = 1 gives the K
# walk back.
ROW_LOOP_MAX_BATCH = 8
ROW_LOOP_DTYPES = (torch.float16, torch.bfloat16)
ROW_LOOP_NUM_WARPS = 8
# Barrier polls before a program gives up and flags the launch (sync.ERROR): about a second of ld.acquire round
# trips on an H100, far beyond any phase. Under the Triton interpreter, programs run one after another, so only a
# grid of one can pass a barrier, and a larger grid gives up after a few polls (what the tests check).
SPIN_LIMIT = 1 << 21
INTERPRETER_SPIN_LIMIT = 16


def row_by_row(batch: int, dtype: torch.dtype) -> bool:
    """Whether the step's GEMV phases multiply W by one row of x at a time (ROW_LOOP_MAX_BATCH says why)."""
    return 1 < batch <= ROW_LOOP_MAX_BATCH and dtype in ROW_LOOP_DTYPES


def num_phases(n_layer: int) -> int:
    """Barrier counters of a step: embed, 5 a layer, lm_head."""
    return 5 * n_layer + 2


def timing_slots(n_layer: int) -> int:
    """Time stamps a program takes with phase timing: the start, then as each phase is done (sampling included)."""
    return 5 * n_layer + 4


def phase_spans(timing: torch.Tensor) -> torch.Tensor:
    """Each phase's span in nanoseconds, from one launch's stamps [programs, timing_slots]: from the moment the
    last program finished the phase before (for the first, from the first program's start) to the moment the last
    program finished this one: the step's critical path, phase by phase (on the device: no sync)."""
    done = timing[:, 1:].amax(dim=0)
    before = torch.cat([timing[:, :1].amin(dim=0), done[:-1]])
    return (done - before).double()


def sync_buffer(n_layer: int, device) -> torch.Tensor:
    """The int32 sync buffer of a persistent step (see kernels/sync.py), ready for a launch."""
    buffer = torch.zeros(sync.PHASES.value + num_phases(n_layer), dtype=torch.int32, device=device)
    reset_sync(buffer)
    return buffer


def reset_sync(buffer: torch.Tensor) -> None:
    """Zero the counters and the error flag (a launch stopped midway leaves counts behind) and set the spin limit."""
    buffer.zero_()
    buffer[sync.SPIN_LIMIT.value] = INTERPRETER_SPIN_LIMIT if backend.triton_interpreter_on() else SPIN_LIMIT


def launch_failed(buffer: torch.Tensor) -> bool:
    """Whether a launch since the last reset_sync gave up at a barrier (reads the device: a host sync)."""
    return bool(buffer[sync.ERROR.value].item())


@triton.jit
def _stamp(timing_ptr, pid, slots, slot, TIMING: tl.constexpr):
    if TIMING:
        tl.store(timing_ptr + pid * slots + slot, tl.extra.cuda.globaltimer())


@triton.jit
def _gemv_phase(
    pid, programs, wait_phase, sync_ptr,
    x_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, k_ptr, v_ptr, pos_ptr,
    M, N, K, stride_om, eps,
    head_dim, stride_kb, stride_kh, stride_kt,
    HAS_NORM: tl.constexpr, ACTIVATION: tl.constexpr, EPILOGUE: tl.constexpr, ONE_PART: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    ROW_LOOP: tl.constexpr, EARLY_LOADS: tl.constexpr, GRID_SYNC: tl.constexpr, HAS_BIAS: tl.constexpr = True,
):
    """One linear of the step: W [K, N] is the view of a row-major [N, K] (stride 1 along K); x has K columns,
    the output N (the caches, for "qkv", the same strides for k and v)."""
    for stripe in range(pid, tl.cdiv(N, BLOCK_N), programs):
        _gemv_program(stripe, 0, x_ptr, nw_ptr, w_ptr, b_ptr, out_ptr, k_ptr, v_ptr, pos_ptr,
                      M, N, K, K, stride_om, 1, K, eps, 1, head_dim,
                      stride_kb, stride_kh, stride_kt, stride_kb, stride_kh, stride_kt,
                      HAS_NORM, HAS_BIAS, ACTIVATION, EPILOGUE, ONE_PART, False, BLOCK_M, BLOCK_N, BLOCK_K, PREFETCH,
                      ROW_LOOP, EARLY_LOADS, GRID_SYNC=GRID_SYNC, sync_ptr=sync_ptr,
                      wait_phase=tl.where(stripe == pid, wait_phase, -1))  # the first item waits
    sync.grid_arrive(sync_ptr, wait_phase + 1)


@triton.jit
def _decode_step_kernel(
    ids_ptr,  # int64 [B]: the tokens fed in at pos
    pos_ptr,  # int32 [1]
    wte_ptr, wpe_ptr,  # [V + 1, d], [P, d]
    ln_1_ptr, c_attn_w_ptr, c_attn_b_ptr,  # [L, d], [L, 3d, d] (every W [L, out, in], rows contiguous), [L, 3d]
    attn_proj_w_ptr, attn_proj_b_ptr,  # [L, d, d], [L, d]
    ln_2_ptr, c_fc_w_ptr, c_fc_b_ptr,  # [L, d], [L, inner, d], [L, inner]
    mlp_proj_w_ptr, mlp_proj_b_ptr,  # [L, d, inner], [L, d]
    ln_f_ptr, lm_head_w_ptr,  # [d], [n_clusters, d]
    qk_scale_log2_ptr,  # float32 [L]: each layer's attention scale times log2(e)
    cache_ptr,  # [L, 2, B, H, T, head_dim] contiguous
    x_ptr, q_ptr, attn_ptr, hidden_ptr,  # [B, d] residual stream, [B, d], [B, d], [B, inner] (contiguous)
    logits_ptr,  # float32 [B, n_clusters]
    part_out_ptr, part_lse_ptr, arrived_ptr,  # decode attention's split-K workspace
    temperature_ptr, top_k_ptr, top_p_ptr, seed_ptr,  # sampling parameters ([B] each; seed [1])
    sequences_ptr,  # int64 [B, n_positions + 1]
    stride_sequences,
    sync_ptr,  # int32: kernels/sync.py's buffer
    timing_ptr,  # with TIMING: int64 [programs, timing_slots(n_layer)], each program's %globaltimer at each stamp
    B, n_layer, d, inner, n_clusters, n_head, max_len, eps,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    EMBED_BLOCK: tl.constexpr,
    QKV_BLOCK_N: tl.constexpr, QKV_BLOCK_K: tl.constexpr, QKV_ONE_PART: tl.constexpr,
    O_BLOCK_N: tl.constexpr, O_BLOCK_K: tl.constexpr,
    FC_BLOCK_N: tl.constexpr, FC_BLOCK_K: tl.constexpr,
    PROJ_BLOCK_N: tl.constexpr, PROJ_BLOCK_K: tl.constexpr,
    HEAD_BLOCK_N: tl.constexpr, HEAD_BLOCK_K: tl.constexpr,
    PREFETCH: tl.constexpr, ROW_LOOP: tl.constexpr, EARLY_LOADS: tl.constexpr,
    ATT_BLOCK_D: tl.constexpr, ATT_BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_SPLITS: tl.constexpr,
    MIN_CHUNK: tl.constexpr, ATT_PREFETCH: tl.constexpr, PER_LANE: tl.constexpr,
    BLOCK_V: tl.constexpr, GREEDY: tl.constexpr,
    PHASE_BLOCK: tl.constexpr,  # >= the number of phases
    GRID_SYNC: tl.constexpr,  # sync.ACQUIRE_ATOMIC or sync.ACQUIRE_LOAD
    TIMING: tl.constexpr,  # stamp the time at the start and as each phase is done (a GPU's %globaltimer)
):
    pid = tl.program_id(0)
    programs = tl.num_programs(0)
    slots = 5 * n_layer + 4
    _stamp(timing_ptr, pid, slots, 0, TIMING)
    # Phase 0: embed (its inputs are the previous step's: no wait)
    for row in range(pid, B, programs):
        _embed_row(row, ids_ptr, wte_ptr, wpe_ptr, pos_ptr, x_ptr, 1, d, 1, d, EMBED_BLOCK, False,
                   GRID_SYNC=GRID_SYNC, sync_ptr=sync_ptr, wait_phase=-1)
    sync.grid_arrive(sync_ptr, 0)
    _stamp(timing_ptr, pid, slots, 1, TIMING)

    stride_cache_kv = B * n_head * max_len * HEAD_DIM
    for layer in range(n_layer):
        phase = 5 * layer  # the phase this layer's first reads (embed, or the previous layer's mlp c_proj)
        at = tl.cast(layer, tl.int64)  # 64-bit offsets: a large model's stacked weights or cache pass 2^31
        k_ptr = cache_ptr + 2 * at * stride_cache_kv
        v_ptr = k_ptr + stride_cache_kv
        ln_1, ln_2 = ln_1_ptr + at * d, ln_2_ptr + at * d
        _gemv_phase(pid, programs, phase, sync_ptr, x_ptr, ln_1, c_attn_w_ptr + at * 3 * d * d,
                    c_attn_b_ptr + at * 3 * d, q_ptr, k_ptr, v_ptr, pos_ptr, B, 3 * d, d, d, eps,
                    HEAD_DIM, n_head * max_len * HEAD_DIM, max_len * HEAD_DIM, HEAD_DIM,
                    True, None, "qkv", QKV_ONE_PART, BLOCK_M, QKV_BLOCK_N, QKV_BLOCK_K, PREFETCH, ROW_LOOP,
                    EARLY_LOADS, GRID_SYNC)
        _stamp(timing_ptr, pid, slots, phase + 2, TIMING)
        qk_scale_log2 = tl.load(qk_scale_log2_ptr + at)
        for item in range(pid, B * n_head * NUM_SPLITS, programs):
            _decode_program(item // NUM_SPLITS, item % NUM_SPLITS, q_ptr, k_ptr, v_ptr, pos_ptr, attn_ptr,
                            part_out_ptr, part_lse_ptr, arrived_ptr, n_head * HEAD_DIM, HEAD_DIM,
                            n_head * max_len * HEAD_DIM, max_len * HEAD_DIM, HEAD_DIM,
                            n_head * max_len * HEAD_DIM, max_len * HEAD_DIM, HEAD_DIM,
                            n_head * HEAD_DIM, HEAD_DIM, n_head, max_len, qk_scale_log2, HEAD_DIM, ATT_BLOCK_D,
                            ATT_BLOCK_N, NUM_SPLITS, BLOCK_SPLITS, MIN_CHUNK, ATT_PREFETCH, PER_LANE, False,
                            ATT_PREFETCH,  # pos and the keys before t are final for the whole launch
                            GRID_SYNC=GRID_SYNC, sync_ptr=sync_ptr, wait_phase=tl.where(item == pid, phase + 1, -1))
        sync.grid_arrive(sync_ptr, phase + 2)
        _stamp(timing_ptr, pid, slots, phase + 3, TIMING)
        _gemv_phase(pid, programs, phase + 2, sync_ptr, attn_ptr, ln_1, attn_proj_w_ptr + at * d * d,
                    attn_proj_b_ptr + at * d, x_ptr, x_ptr, x_ptr, pos_ptr, B, d, d, d, eps, 1, 0, 0, 0,
                    False, None, "residual", False, BLOCK_M, O_BLOCK_N, O_BLOCK_K, PREFETCH, ROW_LOOP, EARLY_LOADS,
                    GRID_SYNC)
        _stamp(timing_ptr, pid, slots, phase + 4, TIMING)
        _gemv_phase(pid, programs, phase + 3, sync_ptr, x_ptr, ln_2, c_fc_w_ptr + at * inner * d,
                    c_fc_b_ptr + at * inner, hidden_ptr, x_ptr, x_ptr, pos_ptr, B, inner, d, inner, eps, 1, 0, 0, 0,
                    True, "quick_gelu", "store", False, BLOCK_M, FC_BLOCK_N, FC_BLOCK_K, PREFETCH, ROW_LOOP,
                    EARLY_LOADS, GRID_SYNC)
        _stamp(timing_ptr, pid, slots, phase + 5, TIMING)
        _gemv_phase(pid, programs, phase + 4, sync_ptr, hidden_ptr, ln_2, mlp_proj_w_ptr + at * d * inner,
                    mlp_proj_b_ptr + at * d, x_ptr, x_ptr, x_ptr, pos_ptr, B, d, inner, d, eps, 1, 0, 0, 0,
                    False, None, "residual", False, BLOCK_M, PROJ_BLOCK_N, PROJ_BLOCK_K, PREFETCH, ROW_LOOP,
                    EARLY_LOADS, GRID_SYNC)
        _stamp(timing_ptr, pid, slots, phase + 6, TIMING)
    last = 5 * n_layer
    _gemv_phase(pid, programs, last, sync_ptr, x_ptr, ln_f_ptr, lm_head_w_ptr, ln_f_ptr, logits_ptr, x_ptr, x_ptr,
                pos_ptr, B, n_clusters, d, n_clusters, eps, 1, 0, 0, 0,
                True, None, "store", False, BLOCK_M, HEAD_BLOCK_N, HEAD_BLOCK_K, PREFETCH, ROW_LOOP, EARLY_LOADS,
                GRID_SYNC, HAS_BIAS=False)
    _stamp(timing_ptr, pid, slots, last + 2, TIMING)
    for row in range(pid, B, programs):
        _sample_row(row, B, logits_ptr, temperature_ptr, top_k_ptr, top_p_ptr, seed_ptr, pos_ptr, ids_ptr,
                    sequences_ptr, sync_ptr, n_clusters, stride_sequences, n_clusters, BLOCK_V, GREEDY, True, False,
                    False, GRID_SYNC=GRID_SYNC, sync_ptr=sync_ptr, wait_phase=tl.where(row == pid, last + 1, -1))
    _stamp(timing_ptr, pid, slots, last + 3, TIMING)

    # The last program out (every other one is past its last wait) advances pos and readies the buffer.
    tl.debug_barrier()
    exited = tl.atomic_add(sync_ptr + sync.EXITS, 1, sem="acq_rel", scope="gpu")
    if exited == programs - 1:
        tl.store(pos_ptr, tl.load(pos_ptr) + 1)
        offs = tl.arange(0, PHASE_BLOCK)
        tl.store(sync_ptr + sync.PHASES + offs, tl.zeros([PHASE_BLOCK], tl.int32), mask=offs < 5 * n_layer + 2)
        tl.store(sync_ptr + sync.EXITS, 0)


LAYER_WEIGHTS = ("ln_1", "c_attn_w", "c_attn_b", "attn_proj_w", "attn_proj_b", "ln_2", "c_fc_w", "c_fc_b",
                 "mlp_proj_w", "mlp_proj_b")


def _fail(msg: str):
    raise ValueError(f"persistent decode_step: {msg}")


def _check(name: str, t, shape: tuple, dtype, device) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != device or not t.is_contiguous():
        _fail(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got "
              f"{t.dtype} {tuple(t.shape)} strides {t.stride()} on {t.device}")


def default_programs(device: torch.device) -> int:
    """One program per SM (all resident at once), or one under the interpreter, which runs programs in turn."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def grid_sync_mode(device: torch.device):
    """How barriers read their counters: plain acquire loads on a GPU, acquire atomics under the interpreter (which
    cannot run inline PTX)."""
    return sync.ACQUIRE_LOAD if device.type == "cuda" else sync.ACQUIRE_ATOMIC


def attention_splits(batch: int, n_head: int, max_len: int, programs: int) -> int:
    """Key splits of the step's attention phase: the most (a power of two) that keep its batch * n_head * splits
    items within one per program, as for decode_attention never more than a full cache has whole key blocks."""
    fit = max(1, programs // (batch * n_head))
    splits = 1 << (fit.bit_length() - 1)
    return max(1, min(splits, max_len // max(attention._DECODE_BLOCK_N, attention._DECODE_MIN_SPLIT_KEYS)))


def decode_step(*, ids, pos, wte, wpe, layers: dict, ln_f, lm_head_w, qk_scale_log2, kv_cache, x, q, attn, hidden,
                logits, workspace, temperature, top_k, top_p, seed, sequences, sync_buffer, eps: float,
                greedy: bool, programs: int | None = None, work_programs: int | None = None,
                timing: torch.Tensor | None = None) -> None:
    """One decode step of every sequence in one launch: feed ids at pos, write the next token to ids and to
    sequences[:, pos + 1], advance pos, as the engine's separate launches do (decoder.StaticDecoder._decode_step).

    layers: LAYER_WEIGHTS stacked over the layers, linear weights [L, out, in] (nn.Linear's layout); lm_head_w
    [n_clusters, d]; qk_scale_log2 float32 [L]; kv_cache [L, 2, B, H, T, head_dim]; x, q, attn [B, d], hidden
    [B, inner], logits float32 [B, n_clusters]; workspace from attention.decode_workspace(B or more, H, head_dim, T);
    sync_buffer from sync_buffer(L); the rest as sample_tokens takes them. programs: the grid (default
    default_programs); work_programs: the grid the work is cut for (default programs; more cuts finer, and each
    program then takes several items a phase: how the tests exercise multi-item phases and split merges on the
    interpreter's one-program grid). timing: int64 [programs, timing_slots(L)], or None: each program stamps
    the GPU's %globaltimer (ns) there at the start and as each phase is done (phase_spans reads them; a GPU only).
    Every tensor contiguous, the float ones in wte's dtype. B <= MAX_BATCH. No allocation, no host sync: safe to
    capture. After a launch that could not keep its grid resident, launch_failed(sync_buffer) is true and the
    step's outputs are garbage.
    """
    if not isinstance(greedy, bool):
        _fail(f"greedy must be a bool, got {greedy!r}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0:
        _fail(f"eps must be a non-negative float, got {eps!r}")
    if not isinstance(kv_cache, torch.Tensor) or kv_cache.dim() != 6 or kv_cache.shape[1] != 2:
        _fail(f"kv_cache must be a [L, 2, B, H, T, head_dim] tensor, got "
              f"{tuple(kv_cache.shape) if isinstance(kv_cache, torch.Tensor) else type(kv_cache).__name__}")
    n_layer, _, batch, n_head, max_len, head_dim = kv_cache.shape
    dtype, device = kv_cache.dtype, kv_cache.device
    if dtype not in linear._FLOAT_DTYPES:
        _fail(f"kv_cache must be float32, float16 or bfloat16, got {dtype}")
    if not 1 <= batch <= MAX_BATCH:
        _fail(f"batch must be 1..{MAX_BATCH} (larger batches take the tiled path, one launch a kernel), got {batch}")
    if not backend.use_triton(device):
        _fail(f"tensors on {device} need CUDA or TRITON_INTERPRET=1")
    d = n_head * head_dim
    attention._check_head_dim(head_dim)
    _check("kv_cache", kv_cache, (n_layer, 2, batch, n_head, max_len, head_dim), dtype, device)
    if not isinstance(layers, dict) or set(layers) != set(LAYER_WEIGHTS):
        _fail(f"layers must be a dict of {LAYER_WEIGHTS}, got {sorted(layers) if isinstance(layers, dict) else layers}")
    inner = layers["c_fc_b"].shape[-1] if isinstance(layers["c_fc_b"], torch.Tensor) else -1
    n_clusters = logits.shape[-1] if isinstance(logits, torch.Tensor) else -1
    shapes = {"ln_1": (n_layer, d), "c_attn_w": (n_layer, 3 * d, d), "c_attn_b": (n_layer, 3 * d),
              "attn_proj_w": (n_layer, d, d), "attn_proj_b": (n_layer, d), "ln_2": (n_layer, d),
              "c_fc_w": (n_layer, inner, d), "c_fc_b": (n_layer, inner), "mlp_proj_w": (n_layer, d, inner),
              "mlp_proj_b": (n_layer, d)}
    for name, shape in shapes.items():
        _check(name, layers[name], shape, dtype, device)
    for name, t, shape in (("wte", wte, (n_clusters + 1, d)), ("ln_f", ln_f, (d,)), ("lm_head_w", lm_head_w,
                           (n_clusters, d)), ("x", x, (batch, d)), ("q", q, (batch, d)), ("attn", attn, (batch, d)),
                           ("hidden", hidden, (batch, inner))):
        _check(name, t, shape, dtype, device)
    _check("wpe", wpe, (max_len, d), dtype, device)
    for name, t, shape, want in (("logits", logits, (batch, n_clusters), torch.float32),
                                 ("qk_scale_log2", qk_scale_log2, (n_layer,), torch.float32),
                                 ("ids", ids, (batch,), torch.int64), ("pos", pos, (1,), torch.int32),
                                 ("temperature", temperature, (batch,), torch.float32),
                                 ("top_k", top_k, (batch,), torch.int32), ("top_p", top_p, (batch,), torch.float32),
                                 ("seed", seed, (1,), torch.int64),
                                 ("sequences", sequences, (batch, max_len + 1), torch.int64),
                                 ("sync_buffer", sync_buffer, (sync.PHASES.value + num_phases(n_layer),), torch.int32),
                                 ("workspace", workspace, tuple(workspace.shape) if isinstance(workspace, torch.Tensor)
                                  else (), torch.float32)):
        _check(name, t, shape, want, device)
    programs = default_programs(device) if programs is None else programs
    work_programs = programs if work_programs is None else work_programs
    for name, value in (("programs", programs), ("work_programs", work_programs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            _fail(f"{name} must be a positive int, got {value!r}")
    if timing is not None:
        if grid_sync_mode(device) != sync.ACQUIRE_LOAD:
            _fail("timing reads the GPU's %globaltimer: it needs CUDA tensors")
        _check("timing", timing, (programs, timing_slots(n_layer)), torch.int64, device)
    num_splits = attention_splits(batch, n_head, max_len, work_programs)
    rows = batch * n_head * num_splits
    if num_splits > 1 and workspace.numel() < rows * (head_dim + 1) + batch * n_head:
        _fail(f"workspace holds {workspace.numel()} float32 values, {rows} split rows of head_dim {head_dim} need "
              f"{rows * (head_dim + 1) + batch * n_head}: allocate it with attention.decode_workspace")

    row_loop = row_by_row(batch, dtype)
    gemv = {name: linear._gemv_config(batch, n, k, target_programs=work_programs, row_loop=row_loop)
            for name, n, k in (("QKV", 3 * d, d), ("O", d, d), ("FC", inner, d), ("PROJ", d, inner),
                               ("HEAD", n_clusters, d))}
    if gemv["QKV"]["grid"][1] != 1:  # the phases take every row in one block
        _fail(f"batch {batch} needs one GEMV row block, but linear._GEMV_MAX_M is {linear._GEMV_MAX_M}")
    blocks = {f"{name}_{key}": config[key] for name, config in gemv.items() for key in ("BLOCK_N", "BLOCK_K")}
    att_block_d = triton.next_power_of_2(head_dim)
    att_block_n, num_warps = attention._decode_tile(att_block_d, dtype)
    if row_loop:
        num_warps = ROW_LOOP_NUM_WARPS
    _decode_step_kernel[(programs,)](
        ids, pos, wte, wpe, *(layers[name] for name in LAYER_WEIGHTS), ln_f, lm_head_w, qk_scale_log2, kv_cache,
        x, q, attn, hidden, logits,
        workspace[: rows * head_dim], workspace[rows * head_dim: rows * (head_dim + 1)],
        workspace[workspace.numel() - batch * n_head:].view(torch.int32) if num_splits > 1 else workspace,
        temperature, top_k, top_p, seed, sequences, sequences.stride(0), sync_buffer,
        timing if timing is not None else sync_buffer,
        batch, n_layer, d, inner, n_clusters, n_head, max_len, float(eps),
        HEAD_DIM=head_dim, BLOCK_M=gemv["QKV"]["BLOCK_M"], EMBED_BLOCK=triton.next_power_of_2(d),
        QKV_ONE_PART=d % gemv["QKV"]["BLOCK_N"] == 0, **blocks,
        PREFETCH=linear._GEMV_PREFETCH, ROW_LOOP=row_loop, EARLY_LOADS=linear._EARLY_LOADS,
        ATT_BLOCK_D=att_block_d, ATT_BLOCK_N=att_block_n, NUM_SPLITS=num_splits,
        BLOCK_SPLITS=triton.next_power_of_2(num_splits),
        MIN_CHUNK=triton.cdiv(max(attention._DECODE_MIN_SPLIT_KEYS, 1), att_block_n) * att_block_n,
        ATT_PREFETCH=attention._DECODE_PREFETCH, PER_LANE=attention._DECODE_PER_LANE_SOFTMAX,
        BLOCK_V=triton.next_power_of_2(n_clusters), GREEDY=greedy,
        PHASE_BLOCK=triton.next_power_of_2(num_phases(n_layer)),
        GRID_SYNC=grid_sync_mode(device),
        TIMING=timing is not None,
        num_warps=num_warps, enable_fp_fusion=backend.FP_FUSION,
    )
