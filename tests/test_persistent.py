"""The one-launch decode step (kernels/persistent.py, decoder.PERSISTENT_DECODE) against the reference.

Under the interpreter programs run one after another, so the grid is one program; cutting the work for more
programs (PERSISTENT_WORK_PROGRAMS) has that one program take many items a phase and exercises split-K attention's
merge. A grid of two cannot pass a barrier there, which is how the give-up path is tested. GPU-marked tests run
imagegpt-small shapes with the real grid (one program per SM) and CUDA graphs.
"""

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch
from helpers import TINY, philox, random_state_dict
from tolerances import tol

import igpt_fast.decoder
from igpt_fast import ImageGPT, ImageGPTConfig, ReferenceImageGPT
from igpt_fast.kernels import persistent, sync

STEPS = 3  # interpreted steps are slow (about 0.5 s each at TINY)


@pytest.fixture
def persistent_decode(monkeypatch):
    monkeypatch.setattr(igpt_fast.decoder, "PERSISTENT_DECODE", True)


@pytest.fixture
def row_loop_in_float32(monkeypatch):
    """The row-by-row GEMV phases (16-bit weights on a GPU) in the float32 the reference is matched in."""
    monkeypatch.setattr(persistent, "ROW_LOOP_DTYPES", (torch.float32,))


# Batch 3 runs in bucket 4: its GEMV phases multiply row by row (persistent.ROW_LOOP_MAX_BATCH), or walk K in
# blocks of all the rows at once (ROW_LOOP_MAX_BATCH = 1: how batches 9-16 and float32 run).
@pytest.mark.parametrize("work_programs, row_loop_max_batch", [(None, 8), (64, 8), (64, 1)])
def test_greedy_tokens_and_per_step_logits_match_the_reference(work_programs, row_loop_max_batch, weights, reference,
                                                                persistent_decode, row_loop_in_float32, monkeypatch):
    monkeypatch.setattr(igpt_fast.decoder, "PERSISTENT_WORK_PROGRAMS", work_programs)
    monkeypatch.setattr(persistent, "ROW_LOOP_MAX_BATCH", row_loop_max_batch)
    model = ImageGPT(TINY, weights, backend="triton")
    context = torch.tensor([[TINY.sos_token_id], [3], [TINY.sos_token_id]])
    out = model.generate(context, max_new_tokens=STEPS, return_dict_in_generate=True, output_logits=True)
    assert model.decoder.persistent(model.decoder.states[4])
    assert torch.equal(out.sequences, reference.generate(context, max_new_tokens=STEPS))
    with torch.no_grad():
        full = reference(out.sequences[:, :-1]).logits
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full[:, -STEPS:], **tol("model", torch.float32))


def test_sampled_tokens_match_the_reference_fed_the_same_random_numbers(weights, reference, persistent_decode,
                                                                        row_loop_in_float32, monkeypatch):
    monkeypatch.setattr(igpt_fast.decoder, "PERSISTENT_WORK_PROGRAMS", 32)
    model = ImageGPT(TINY, weights, backend="triton")
    context = torch.full((4, 1), TINY.sos_token_id)
    kwargs = dict(max_new_tokens=STEPS, do_sample=True, temperature=[0.7, 1.0, 1.3, 1.0], top_k=[5, 17, 3, 8],
                  top_p=[0.9, 1.0, 0.8, 0.5])
    out = model.generate(context, seed=1234, **kwargs)
    assert torch.equal(out, reference.generate(context, uniforms=philox(1234), **kwargs))


def test_a_launch_leaves_its_sync_buffer_ready_and_advances_pos(weights, persistent_decode):
    model = ImageGPT(TINY, weights, backend="triton")
    model.generate(torch.full((1, 1), TINY.sos_token_id), max_new_tokens=2)  # prefill + one persistent step
    state = model.decoder.states[1]
    assert state.pos.item() == 2  # the prompt's token at 0, the first new one at 1, the step's at 2
    expected = torch.zeros_like(state.sync)
    expected[sync.SPIN_LIMIT.value] = persistent.INTERPRETER_SPIN_LIMIT
    assert torch.equal(state.sync, expected)  # counters and the error flag zero, the spin limit kept
    assert not persistent.launch_failed(state.sync)


def test_a_grid_that_cannot_pass_a_barrier_gives_up_and_is_reported(weights, reference, persistent_decode,
                                                                    monkeypatch):
    """Two programs under the interpreter: the first waits for the second, which runs only after it, so the first
    gives up after the spin limit instead of hanging; generate says so, and the next call works."""
    model = ImageGPT(TINY, weights, backend="triton")
    context = torch.full((1, 1), TINY.sos_token_id)
    monkeypatch.setattr(persistent, "default_programs", lambda device: 2)
    with pytest.raises(RuntimeError, match="could not keep its 2 programs resident at once"):
        model.generate(context, max_new_tokens=2)
    monkeypatch.setattr(persistent, "default_programs", lambda device: 1)
    assert torch.equal(model.generate(context, max_new_tokens=2), reference.generate(context, max_new_tokens=2))


def _step_arguments(model, batch: int) -> dict:
    return model.decoder.persistent_step_arguments(model.decoder.state(batch), greedy=True)


@pytest.mark.parametrize("change, match", [
    (lambda a: a.update(x=a["x"].double()), r"x must be a contiguous torch.float32 tensor of shape \(1, 32\)"),
    (lambda a: a.update(hidden=a["hidden"][:, :-1]), r"hidden must be .* shape \(1, 128\)"),
    (lambda a: a.update(sync_buffer=a["sync_buffer"][:-1]), r"sync_buffer must be .* shape \(15,\)"),
    (lambda a: a.update(layers={k: v for k, v in a["layers"].items() if k != "ln_2"}), "layers must be a dict of"),
    (lambda a: a.update(lm_head_w=a["lm_head_w"].t()), r"lm_head_w must be a contiguous .* \(17, 32\)"),
    (lambda a: a.update(greedy=1), "greedy must be a bool, got 1"),
    (lambda a: a.update(programs=0), "programs must be a positive int, got 0"),
    (lambda a: a.update(work_programs=2.0), "work_programs must be a positive int, got 2.0"),
])
def test_bad_arguments_are_refused_by_name_before_launching(change, match, weights):
    model = ImageGPT(TINY, weights, backend="triton")
    arguments = _step_arguments(model, 1)
    change(arguments)
    before = model.decoder.states[1].sync.clone()
    with pytest.raises(ValueError, match=match):
        persistent.decode_step(**arguments)
    assert torch.equal(model.decoder.states[1].sync, before)


def test_a_gemv_row_block_smaller_than_the_batch_is_refused(weights, monkeypatch):
    """The sweep's _GEMV_MAX_M = 1 (the dot path from batch 2) must not leave the one-launch step rows behind."""
    model = ImageGPT(TINY, weights, backend="triton")
    arguments = _step_arguments(model, 2)
    monkeypatch.setattr(persistent.linear, "_GEMV_MAX_M", 1)
    with pytest.raises(ValueError, match="batch 2 needs one GEMV row block, but linear._GEMV_MAX_M is 1"):
        persistent.decode_step(**arguments)


@pytest.mark.parametrize("batch, dtypes, row_loop", [(1, (torch.float32,), False), (2, (torch.float32,), True),
                                                     (8, (torch.float32,), True), (16, (torch.float32,), False),
                                                     (8, persistent.ROW_LOOP_DTYPES, False)])
def test_16_bit_batches_two_to_eight_multiply_row_by_row_with_eight_warps(batch, dtypes, row_loop, weights,
                                                                          monkeypatch):
    """(The interpreter runs float32 only: the last case is float32 as the GPU runs it, without the row loop.)"""
    monkeypatch.setattr(persistent, "ROW_LOOP_DTYPES", dtypes)
    model = ImageGPT(TINY, weights, backend="triton")
    arguments = _step_arguments(model, batch)
    launches = []
    monkeypatch.setattr(persistent, "_decode_step_kernel",
                        mock.MagicMock(__getitem__=lambda self, grid: lambda *args, **kwargs: launches.append(kwargs)))
    persistent.decode_step(**arguments)
    (kwargs,) = launches
    assert kwargs["ROW_LOOP"] is row_loop
    assert kwargs["num_warps"] == (persistent.ROW_LOOP_NUM_WARPS if row_loop else 4)  # 4: attention's, at TINY
    # Row by row, a W block is not cut by the rows: ln_2 -> c_fc reads its stripe of W (all 128 columns of TINY's,
    # with one program) in one K step of n_embd = 32, as at batch 1; 8 or 16 rows at once take two.
    assert (kwargs["FC_BLOCK_N"], kwargs["FC_BLOCK_K"]) == (128, 32 if row_loop or batch == 1 else 16)


def test_phase_timing_is_refused_off_a_gpu(weights):
    """The stamps read %globaltimer, which the interpreter cannot run."""
    model = ImageGPT(TINY, weights, backend="triton")
    arguments = _step_arguments(model, 1)
    timing = torch.zeros(1, persistent.timing_slots(TINY.n_layer), dtype=torch.int64)
    with pytest.raises(ValueError, match="timing reads the GPU's %globaltimer: it needs CUDA tensors"):
        persistent.decode_step(**{**arguments, "timing": timing})


def test_batches_over_sixteen_keep_the_separate_launches(weights, persistent_decode):
    model = ImageGPT(TINY, weights, backend="triton")
    decoder = model.decoder
    assert decoder.persistent(decoder.state(16)) and not decoder.persistent(decoder.state(32))
    arguments = _step_arguments(model, 32)
    with pytest.raises(ValueError, match="batch must be 1..16"):
        persistent.decode_step(**arguments)


@pytest.mark.parametrize("value, on", [("1", True), ("0", False), (None, False)])
def test_the_environment_turns_the_one_launch_step_on_at_import(value, on):
    env = {k: v for k, v in os.environ.items() if k != igpt_fast.decoder.ONE_LAUNCH_ENV}
    if value is not None:
        env[igpt_fast.decoder.ONE_LAUNCH_ENV] = value
    code = "import igpt_fast.decoder as d; print(d.PERSISTENT_DECODE)"
    ran = subprocess.run([sys.executable, "-P", "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert ran.returncode == 0 and ran.stdout.strip() == str(on), ran.stderr


def test_attention_splits_fill_the_grid_with_one_item_a_program():
    assert persistent.attention_splits(1, 8, 1024, 132) == 16  # 128 items on an H100's 132 SMs
    assert persistent.attention_splits(8, 8, 1024, 132) == 2
    assert persistent.attention_splits(16, 8, 1024, 132) == 1
    assert persistent.attention_splits(1, 2, 128, 132) == 2  # never more than the cache has 64-key blocks
    assert persistent.attention_splits(1, 1, 1024, 1) == 1


# ---- GPU: imagegpt-small shapes, one program per SM ----

SMALL = ImageGPTConfig.small()


@pytest.fixture(scope="module")
def small_weights():
    return random_state_dict(SMALL, seed=21)  # test_engine's: its fp32 whole-image greedy test says why


@pytest.mark.gpu
def test_gpu_fp32_greedy_equals_reference_over_a_whole_image(small_weights, persistent_decode, monkeypatch):
    reference = ReferenceImageGPT.from_state_dict(SMALL, small_weights).cuda()
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = ImageGPT(SMALL, small_weights, device="cuda")
    context = torch.full((2, 1), SMALL.sos_token_id, device="cuda")
    out = model.generate(context, max_length=SMALL.n_positions + 1)
    assert model.decoder.persistent(model.decoder.states[2])
    expected = reference.generate(context, max_length=SMALL.n_positions + 1)
    print(f"one-launch steps: fp32 greedy agreement with the reference over 1024 steps: "
          f"{(out == expected).float().mean().item():.4f}")
    assert torch.equal(out, expected)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 8])
def test_gpu_captured_steps_sample_what_eager_steps_sample(batch, small_weights, persistent_decode):
    """The persistent kernel in CUDA graphs against the same kernel launched eagerly: the same tokens, and no
    launch gave up at a barrier (generate would raise)."""
    context = torch.full((batch, 1), SMALL.sos_token_id, device="cuda")
    kwargs = dict(max_new_tokens=128, do_sample=True, seed=3, top_k=40)
    graphed = ImageGPT(SMALL, small_weights, device="cuda", dtype=torch.float16)
    eager = ImageGPT(SMALL, small_weights, device="cuda", dtype=torch.float16, use_cuda_graphs=False)
    out = graphed.generate(context, **kwargs)
    assert graphed.decoder.states[batch].graphs and graphed.decoder.persistent(graphed.decoder.states[batch])
    assert torch.equal(out, eager.generate(context, **kwargs))
