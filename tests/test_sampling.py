"""The sampling kernel against the PyTorch reference, transformers' warpers and the target distribution.

Kernel runs on the CPU interpreter are small (it runs one program at a time); the reference sampler, which
the kernel must match draw for draw under philox_uniforms, carries the 1e5-draw distribution tests.
"""

import math

import numpy as np
import pytest
import torch
import triton
import triton.language as tl

from igpt_fast.kernels.sampling import _row_uniforms, sample_tokens
from igpt_fast.philox import philox_uniforms
from igpt_fast.sampling import check_sampling_args, sample_reference, sampling_tensors, warp_logits

POISON = -1  # no token id: an out_ids entry the kernel did not write stays at it


def run_kernel(logits, temperature=1.0, top_k=None, top_p=None, *, seed=0, pos=0, greedy=False, sequences=None):
    batch, vocab = logits.shape
    t, k, p = sampling_tensors(temperature, top_k, top_p, batch=batch, vocab=vocab, device=logits.device)
    out = torch.full((batch,), POISON, dtype=torch.int64, device=logits.device)
    sample_tokens(
        logits,
        temperature=t,
        top_k=k,
        top_p=p,
        seed=torch.tensor([seed], dtype=torch.int64, device=logits.device),
        pos=torch.tensor([pos], dtype=torch.int32, device=logits.device),
        out_ids=out,
        sequences=sequences,
        greedy=greedy,
    )
    return out


def reference(logits, temperature=1.0, top_k=None, top_p=None, *, seed=0, pos=0):
    batch, vocab = logits.shape
    uniforms = philox_uniforms(seed, pos, batch, vocab).to(logits.device)
    return sample_reference(logits, uniforms=uniforms, temperature=temperature, top_k=top_k, top_p=top_p)


def tie_free_logits(batch, vocab, seed, scale=2.0):
    """Distinct values with gaps far above float32 rounding, in random order per row."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(vocab, generator=g) for _ in range(batch)]).float()
    return scale * (ranks / vocab * 4 - 2) + 1e-3 * torch.rand(batch, vocab, generator=g)


def chi_square_p_ok(counts: torch.Tensor, probs: torch.Tensor) -> bool:
    """Chi-square goodness of fit at the 1e-4 level over the categories with probability > 0.

    Critical value by the Wilson-Hilferty approximation (accurate to a few percent for >= 2 degrees of
    freedom); every category must also expect >= 5 draws, or the test is not valid.
    """
    support = probs > 0
    expected = probs[support] * counts.sum()
    assert expected.min() >= 5, f"too few draws for a chi-square test: min expected {expected.min():.1f}"
    statistic = ((counts[support] - expected) ** 2 / expected).sum().item()
    dof = int(support.sum()) - 1
    z = 3.719  # the 1 - 1e-4 normal quantile
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    return statistic < critical


# --- Philox: the PyTorch mirror against the kernel's own uniforms ------------------------------------------


@triton.jit
def _uniforms_kernel(seed_ptr, pos_ptr, out_ptr, V, BLOCK_V: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_V)
    uniforms = _row_uniforms(seed_ptr, pos_ptr, row.to(tl.int64), cols, V)
    tl.store(out_ptr + row * V + cols, uniforms, mask=cols < V)


@pytest.mark.parametrize("seed", [0, 42, -7, 2**40 + 3, 2**63 - 2, -(2**63)])
@pytest.mark.parametrize("pos", [0, 1, 1023])
def test_philox_uniforms_bit_exact(device, seed, pos):
    batch, vocab = 3, 17  # seed 2**63 - 2 with 3 rows wraps around int64, as the kernel's addition does
    out = torch.full((batch, vocab), float("nan"), device=device)
    _uniforms_kernel[(batch,)](
        torch.tensor([seed], device=device),
        torch.tensor([pos], dtype=torch.int32, device=device),
        out,
        vocab,
        BLOCK_V=32,
    )
    expected = philox_uniforms(seed, pos, batch, vocab)
    assert torch.equal(out.cpu().view(torch.int32), expected.view(torch.int32))
    assert expected.min() >= 0 and expected.max() < 1


def test_philox_uniforms_are_uniform():
    u = philox_uniforms(123, 4, 256, 512).flatten()
    counts = torch.histc(u, bins=64, min=0, max=1)
    assert chi_square_p_ok(counts, torch.full((64,), 1 / 64))


# --- greedy and the limits of top-k ---------------------------------------------------------------------


@pytest.mark.parametrize("batch,vocab", [(1, 1), (3, 3), (5, 17), (2, 100)])
def test_greedy_is_argmax(device, batch, vocab):
    logits = torch.randn(batch, vocab)
    logits[0, -1] = logits[0, 0] = logits[0].max() + 1  # a tie: the first index wins
    out = run_kernel(logits.to(device), greedy=True)
    torch.testing.assert_close(out.cpu(), logits.argmax(dim=-1))
    assert out[0].item() == 0
    torch.testing.assert_close(sample_reference(logits, uniforms=None, temperature=None, top_k=None,
                                                top_p=None, greedy=True), logits.argmax(dim=-1))


def test_top_k_1_is_greedy(device):
    batch, vocab = 6, 17
    logits = tie_free_logits(batch, vocab, seed=1)
    temperatures = [0.3, 0.7, 1.0, 1.5, 2.0, 5.0]
    top_p = [1.0, 0.5, 0.9, 1.0, 0.2, 0.05]
    for seed in (0, 1):
        out = run_kernel(logits.to(device), temperatures, 1, top_p, seed=seed, pos=seed)
        torch.testing.assert_close(out.cpu(), logits.argmax(dim=-1))


def test_ties_are_kept_together(device):
    batch = 48  # one row per draw: row b draws with seed + b
    rows = {
        # top-k = 1 keeps both zeros, -0.0 included (equal as floats)
        "top_k": (torch.tensor([-0.0, 0.0, -5.0, -5.0]), 1, 1.0, {0, 1}),
        # top-p = 0.3: nothing has more score than the tied pair, so both stay; 2 and 3 have 0.84 above them
        "top_p": (torch.tensor([1.0, 1.0, 0.0, -3.0]), 4, 0.3, {0, 1}),
    }
    for logits_row, top_k, top_p, allowed in rows.values():
        logits = logits_row.expand(batch, -1).contiguous()
        out = run_kernel(logits.to(device), 1.0, top_k, top_p, seed=5).cpu()
        assert set(out.tolist()) == allowed
        torch.testing.assert_close(out, reference(logits, 1.0, top_k, top_p, seed=5))


NAN_CASES = [(True, None, None), (False, None, None), (False, 3, None), (False, None, 0.9)]


def check_nan_rows(device, vocab, greedy, top_k, top_p):
    """NaN logits (a float16 overflow upstream) choose the first NaN, as torch.argmax (the stand-in's) does: never
    one of the lanes past V that the kernel pads its row to, which the next step would embed past wte with."""
    logits = tie_free_logits(3, vocab, seed=2)
    logits[0, 5] = logits[0, 11] = float("nan")
    logits[1] = float("nan")
    logits[2, vocab - 1] = float("nan")
    out = run_kernel(logits.to(device), 1.0, top_k, top_p, seed=3, greedy=greedy).cpu()
    assert out.tolist() == [5, 0, vocab - 1]
    if greedy:
        torch.testing.assert_close(out, logits.argmax(dim=-1))
    else:
        torch.testing.assert_close(out, reference(logits, 1.0, top_k, top_p, seed=3))


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the interpreter's numpy on NaN
@pytest.mark.parametrize("greedy,top_k,top_p", NAN_CASES)
def test_nan_logits_give_torch_argmax_choice_never_a_padding_lane(device, greedy, top_k, top_p):
    check_nan_rows(device, 17, greedy, top_k, top_p)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [17, 512])
@pytest.mark.parametrize("greedy,top_k,top_p", NAN_CASES)
def test_nan_logits_compiled(vocab, greedy, top_k, top_p):
    """Compiled, where tl.argmax itself never picks a NaN (the interpreter's, numpy's nanargmax, skips them)."""
    check_nan_rows(torch.device("cuda"), vocab, greedy, top_k, top_p)


# --- the warpers against transformers ---------------------------------------------------------------------


def test_warp_logits_matches_transformers():
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    batch, vocab = 12, 53
    logits = tie_free_logits(batch, vocab, seed=2)
    temperatures = [0.5, 1.0, 1.7] * 4
    top_ks = [1, 2, 5, 17, 52, 53] * 2
    top_ps = [1.0, 0.95, 0.5, 0.1, 0.999, 0.3] * 2
    ours = warp_logits(logits, temperature=temperatures, top_k=top_ks, top_p=top_ps)
    for b in range(batch):
        scores = TemperatureLogitsWarper(temperatures[b])(None, logits[b : b + 1])
        scores = TopKLogitsWarper(top_ks[b])(None, scores)
        if top_ps[b] < 1.0:  # transformers does not add the top-p warper at 1.0
            scores = TopPLogitsWarper(top_ps[b])(None, scores)
        torch.testing.assert_close(ours[b : b + 1], scores, atol=0, rtol=0)
    kept = torch.isfinite(ours).sum(dim=-1)
    assert kept[0] == 1 and kept.max() > 20  # the cases span one token to most of the row


def test_warp_logits_top_k_keeps_ties():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    scores = warp_logits(logits, temperature=1.0, top_k=2, top_p=None)
    torch.testing.assert_close(scores, torch.tensor([[3.0, -math.inf, 2.0, 2.0, -math.inf]]))


# --- kernel == reference, draw for draw -----------------------------------------------------------------


@pytest.mark.parametrize("batch,vocab", [(1, 1), (7, 3), (16, 17), (8, 129)])
def test_kernel_matches_reference(device, batch, vocab):
    g = torch.Generator().manual_seed(batch * 1000 + vocab)
    wide = 3 * torch.randn(batch, vocab + 5, generator=g)
    logits = wide[:, 2 : 2 + vocab]  # a row stride that is not the row length
    logits[0, : min(vocab, 3)] = logits[0, 0]  # ties
    temperatures = (0.25 + 2 * torch.rand(batch, generator=g)).tolist()
    top_ks = torch.randint(1, vocab + 1, (batch,), generator=g).tolist()
    top_ps = [1.0 if b % 3 == 0 else 0.05 + 0.9 * torch.rand(1, generator=g).item() for b in range(batch)]
    top_ks[-1] = vocab  # a row with top-k off
    for seed, pos in [(0, 0), (99, 5)]:
        out = run_kernel(logits.to(device), temperatures, top_ks, top_ps, seed=seed, pos=pos)
        expected = reference(logits, temperatures, top_ks, top_ps, seed=seed, pos=pos)
        torch.testing.assert_close(out.cpu(), expected)


def test_same_seed_same_tokens_and_rows_independent_of_batch(device):
    batch, vocab = 8, 37
    logits = torch.randn(batch, vocab).to(device)  # flat enough that many tokens are likely
    first = run_kernel(logits, 1.0, None, None, seed=7, pos=3)
    again = run_kernel(logits, 1.0, None, None, seed=7, pos=3)
    other_seed = run_kernel(logits, 1.0, None, None, seed=8, pos=3)
    other_step = run_kernel(logits, 1.0, None, None, seed=7, pos=4)
    torch.testing.assert_close(first, again)
    assert not torch.equal(first, other_seed) and not torch.equal(first, other_step)
    # Row b of a smaller batch draws what row b of the larger one drew: padding never changes an image.
    torch.testing.assert_close(run_kernel(logits[:3], 1.0, None, None, seed=7, pos=3), first[:3])


def test_sequences_written_at_pos_plus_one_only(device):
    batch, vocab, length, pos = 4, 17, 9, 5
    logits = torch.randn(batch, vocab).to(device)
    sequences = torch.full((batch, length), -7, dtype=torch.int64, device=device)
    out = run_kernel(logits, 0.8, 5, 0.9, seed=3, pos=pos, sequences=sequences)
    expected = torch.full((batch, length), -7, dtype=torch.int64)
    expected[:, pos + 1] = out.cpu()
    torch.testing.assert_close(sequences.cpu(), expected)
    assert out.min() >= 0


@pytest.mark.parametrize("greedy", [False, True])
def test_arrivals_advance_pos_once_per_launch(device, greedy):
    """With an arrival counter the launch also advances pos (once, whatever the batch), leaves the counter zero,
    and picks the same tokens (from the pos it read) as without."""
    batch, vocab = 5, 33
    logits = torch.randn(batch, vocab).to(device)
    t, k, p = sampling_tensors(0.9, 7, 0.95, batch=batch, vocab=vocab, device=device)
    pos = torch.tensor([4], dtype=torch.int32, device=device)
    arrivals = torch.zeros(1, dtype=torch.int32, device=device)
    for step in range(3):
        out = torch.full((batch,), POISON, dtype=torch.int64, device=device)
        sample_tokens(logits, temperature=t, top_k=k, top_p=p, seed=torch.tensor([11], device=device), pos=pos,
                      out_ids=out, greedy=greedy, arrivals=arrivals)
        assert int(pos[0]) == 5 + step and int(arrivals[0]) == 0
        expected = run_kernel(logits, 0.9, 7, 0.95, seed=11, pos=4 + step, greedy=greedy)
        assert torch.equal(out, expected)


# --- the distribution -----------------------------------------------------------------------------------

# One distribution with some weight everywhere: top-k = 6 keeps 6 tokens, top-p = 0.8 keeps 5 (4 after top-k).
DIST_LOGITS = torch.tensor([0.3, 2.0, -1.0, 1.5, 0.0, 1.0, 2.2, -0.5, 1.7, 0.8, -2.0])
DIST_CASES = {"top_k": (1.3, 6, 1.0), "top_p": (1.0, None, 0.8), "both": (0.9, 6, 0.8), "off": (1.0, None, None)}


def target_probs(temperature, top_k, top_p):
    scores = warp_logits(DIST_LOGITS[None], temperature=temperature, top_k=top_k, top_p=top_p)[0]
    return torch.softmax(scores.double(), dim=-1)


def test_target_probs_cover_the_cases():
    kept = {name: int((target_probs(*case) > 0).sum()) for name, case in DIST_CASES.items()}
    assert kept == {"top_k": 6, "top_p": 5, "both": 4, "off": 11}


@pytest.mark.parametrize("case", list(DIST_CASES))
def test_reference_distribution_chi_square(case):
    batch, steps = 4096, 32  # 131072 draws with the kernel's own uniforms
    logits = DIST_LOGITS.expand(batch, -1)
    probs = target_probs(*DIST_CASES[case])
    counts = torch.zeros(len(DIST_LOGITS), dtype=torch.float64)
    for step in range(steps):
        tokens = reference(logits, *DIST_CASES[case], seed=11, pos=step)
        counts += torch.bincount(tokens, minlength=len(DIST_LOGITS))
    assert counts[probs == 0].sum() == 0
    assert chi_square_p_ok(counts, probs)


def test_kernel_distribution_chi_square_small(device):
    case = "both"  # top-k and top-p at once; the interpreter runs one row at a time: 256 draws
    batch, steps = 128, 2
    logits = DIST_LOGITS.expand(batch, -1).contiguous().to(device)
    counts = torch.zeros(len(DIST_LOGITS), dtype=torch.float64)
    for step in range(steps):
        counts += torch.bincount(run_kernel(logits, *DIST_CASES[case], seed=13, pos=step).cpu(),
                                 minlength=len(DIST_LOGITS))
    probs = target_probs(*DIST_CASES[case])
    assert counts[probs == 0].sum() == 0
    assert chi_square_p_ok(counts, probs)


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(DIST_CASES))
def test_kernel_distribution_chi_square_full(case):
    batch, steps, vocab = 2048, 64, 512  # 131072 draws, ImageGPT's row width
    logits = torch.full((batch, vocab), -30.0, device="cuda")  # negligible weight off the test tokens
    logits[:, : len(DIST_LOGITS)] = DIST_LOGITS.cuda()
    counts = torch.zeros(vocab, dtype=torch.float64)
    for step in range(steps):
        counts += torch.bincount(run_kernel(logits, *DIST_CASES[case], seed=17, pos=step).cpu(), minlength=vocab)
    scores = warp_logits(logits[:1].cpu(), temperature=DIST_CASES[case][0], top_k=DIST_CASES[case][1],
                         top_p=DIST_CASES[case][2])[0]
    probs = torch.softmax(scores.double(), dim=-1)
    probs[len(DIST_LOGITS):] = 0  # exp(-30) tails: expected counts far below one draw
    assert counts[len(DIST_LOGITS):].sum() <= 2
    assert chi_square_p_ok(counts[: len(DIST_LOGITS)], probs[: len(DIST_LOGITS)])


@pytest.mark.gpu
def test_kernel_matches_reference_full_size_and_replays_in_a_cuda_graph():
    batch, vocab, length = 256, 512, 1025
    logits = 4 * torch.randn(batch, vocab, device="cuda")
    g = torch.Generator().manual_seed(0)
    temperatures = (0.25 + 2 * torch.rand(batch, generator=g)).tolist()
    top_ks = torch.randint(1, vocab + 1, (batch,), generator=g).tolist()
    top_ps = (0.05 + 0.95 * torch.rand(batch, generator=g)).tolist()
    t, k, p = sampling_tensors(temperatures, top_ks, top_ps, batch=batch, vocab=vocab, device="cuda")
    seed = torch.zeros(1, dtype=torch.int64, device="cuda")
    pos = torch.zeros(1, dtype=torch.int32, device="cuda")
    out = torch.full((batch,), POISON, dtype=torch.int64, device="cuda")
    sequences = torch.full((batch, length), -7, dtype=torch.int64, device="cuda")

    def step():
        sample_tokens(logits, temperature=t, top_k=k, top_p=p, seed=seed, pos=pos, out_ids=out,
                      sequences=sequences)

    step()  # warm-up (compile) before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for new_seed, new_pos in [(1, 0), (2**40 + 5, 17), (-3, 1022)]:
        seed.fill_(new_seed)
        pos.fill_(new_pos)
        graph.replay()
        expected = reference(logits.cpu(), temperatures, top_ks, top_ps, seed=new_seed, pos=new_pos)
        torch.testing.assert_close(out.cpu(), expected)
        torch.testing.assert_close(sequences[:, new_pos + 1].cpu(), expected)
    greedy = run_kernel(logits, greedy=True)
    torch.testing.assert_close(greedy, logits.argmax(dim=-1))


# --- argument checks ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": [1.0, 0.0]}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": 18}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_k": torch.tensor([3, 40])}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": float("nan")}, "top_p"),
    ],
)
def test_check_sampling_args_rejects(kwargs, message):
    args = {"do_sample": True, "temperature": 1.0, "top_k": 5, "top_p": 0.9} | kwargs
    with pytest.raises(ValueError, match=message):
        check_sampling_args(args["do_sample"], args["temperature"], args["top_k"], args["top_p"], 17)


def test_check_sampling_args_rejects_a_non_bool_do_sample():
    with pytest.raises(TypeError, match="do_sample"):
        check_sampling_args(1, 1.0, 5, 0.9, 17)


def test_check_sampling_args_accepts():
    check_sampling_args(True, 0.5, 17, 1.0, 17)
    check_sampling_args(False, None, None, None, 17)
    check_sampling_args(True, torch.tensor([0.5, 2.0]), torch.tensor([1, 17], dtype=torch.int32), [0.1, 1.0], 17)
    t, k, p = sampling_tensors(np.float32(0.5), np.array([3, 17]), (0.25, 1.0), batch=2, vocab=17)
    torch.testing.assert_close(t, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(k, torch.tensor([3, 17], dtype=torch.int32))
    torch.testing.assert_close(p, torch.tensor([0.25, 1.0]))
    _, k, p = sampling_tensors(1.0, None, None, batch=3, vocab=17)  # None: the filter is off
    assert k.tolist() == [17] * 3 and p.tolist() == [1.0] * 3
    with pytest.raises(ValueError, match="one per row"):
        sampling_tensors(1.0, [1, 2], None, batch=3, vocab=17)


def test_sample_tokens_rejects_bad_tensors(device):
    batch, vocab = 2, 17
    good = {
        "temperature": torch.ones(batch, device=device),
        "top_k": torch.full((batch,), vocab, dtype=torch.int32, device=device),
        "top_p": torch.ones(batch, device=device),
        "seed": torch.zeros(1, dtype=torch.int64, device=device),
        "pos": torch.zeros(1, dtype=torch.int32, device=device),
        "out_ids": torch.full((batch,), POISON, dtype=torch.int64, device=device),
    }
    logits = torch.randn(batch, vocab, device=device)
    bad_cases = [
        ({}, logits.double(), "logits must be a float32"),
        ({}, logits[:, ::2], "columns must be contiguous"),
        ({"top_k": good["top_k"].long()}, logits, "top_k must be torch.int32"),
        ({"temperature": torch.ones(batch + 1, device=device)}, logits, r"temperature must have shape \[2\]"),
        ({"seed": torch.zeros(1, dtype=torch.int32, device=device)}, logits, "seed must be torch.int64"),
        ({"pos": torch.zeros(2, dtype=torch.int32, device=device)}, logits, r"pos must have shape \[1\]"),
        ({"out_ids": torch.zeros(2 * batch, dtype=torch.int64, device=device)[::2]}, logits, "contiguous"),
        ({"sequences": torch.zeros(batch, 9, dtype=torch.int32, device=device)}, logits, "sequences must be"),
        ({"sequences": torch.zeros(batch + 1, 9, dtype=torch.int64, device=device)}, logits, "sequences must"),
        # a parameter on another device than the logits: "meta" never is the logits' device, so this runs on a
        # machine without a GPU too (a cpu seed beside CUDA logits takes the same check)
        ({"seed": torch.zeros(1, dtype=torch.int64, device="meta")}, logits, f"seed is on meta, logits on {device}"),
        ({"top_p": torch.ones(batch, device="meta")}, logits, f"top_p is on meta, logits on {device}"),
        ({"arrivals": torch.zeros(1, dtype=torch.int64, device=device)}, logits, "arrivals must be torch.int32"),
    ]
    for override, bad_logits, message in bad_cases:
        with pytest.raises((TypeError, ValueError), match=message):
            sample_tokens(bad_logits, **(good | override))
        assert (good["out_ids"] == POISON).all()  # rejected before anything was written
