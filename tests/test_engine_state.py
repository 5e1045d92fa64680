"""The engine's state across calls and its API edges: interrupted calls, interleaved modes and buckets, chunking,
outputs that must not alias internal buffers, inputs in every form, and values refused before anything runs.

Everything is checked against the reference (ReferenceImageGPT fed the engine's Philox numbers) or against a fresh
model: a call must not depend on what the calls before it did.
"""

import re
import sys

import numpy as np
import pytest
import torch
from helpers import TINY, philox, random_state_dict

from igpt_fast import ImageGPT

# Under the interpreter, the linears in a handful of programs each (conftest.py: few_linear_programs).
pytestmark = pytest.mark.usefixtures("few_linear_programs")
SOS = TINY.sos_token_id


def test_an_interrupted_generate_leaves_the_model_as_a_fresh_one(weights, monkeypatch):
    model = ImageGPT(TINY, weights, backend="torch")
    context = torch.cat([torch.full((3, 1), SOS), torch.randint(0, TINY.n_clusters, (3, 2))], 1)
    step, calls = model.decoder.step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    monkeypatch.setattr(model.decoder, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        model.generate(context, do_sample=True, seed=5, top_k=5)
    monkeypatch.undo()
    kwargs = dict(do_sample=True, seed=5, top_k=5, return_dict_in_generate=True, output_logits=True)
    after = model.generate(context, **kwargs)
    fresh = ImageGPT(TINY, weights, backend="torch").generate(context, **kwargs)
    assert torch.equal(after.sequences, fresh.sequences)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, fresh.logits, strict=True))


def test_chunks_copies_logits_and_per_row_values_together_match_the_reference(weights, reference):
    """max_batch=2 with 5 prompt rows x 2 copies: chunks of 2 rows (the last padded), each with its own seed offset,
    per-row values following their prompt row, per-step logits regrouped over the whole batch."""
    model = ImageGPT(TINY, weights, backend="torch", max_batch=2)
    prompt = torch.cat([torch.full((5, 1), SOS), torch.randint(0, TINY.n_clusters, (5, 3))], 1)
    rows = dict(temperature=[0.5, 1.0, 1.5, 0.8, 1.2], top_k=[3, 17, 0, 5, 40], top_p=[0.9, 1.0, 0.7, 0.5, 1.0])
    out = model.generate(prompt, max_new_tokens=5, do_sample=True, num_return_sequences=2, seed=77,
                         return_dict_in_generate=True, output_logits=True, **rows)
    copied = {name: [v for v in values for _ in range(2)] for name, values in rows.items()}
    copied["top_k"] = [TINY.n_clusters if k in (0, 40) else k for k in copied["top_k"]]
    expected = reference.generate(prompt.repeat_interleave(2, dim=0), max_new_tokens=5, do_sample=True,
                                  uniforms=philox(77), **copied)
    assert torch.equal(out.sequences, expected)
    with torch.no_grad():
        full = reference(expected[:, :-1]).logits
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full[:, 3:], rtol=1e-5, atol=1e-5)


def test_returned_tensors_do_not_change_when_the_model_is_called_again(weights):
    model = ImageGPT(TINY, weights, backend="torch")
    context = torch.full((2, 1), SOS)
    first = model.generate(context, max_new_tokens=5, do_sample=True, seed=1, return_dict_in_generate=True,
                           output_logits=True)
    kept = first.sequences.clone(), [logits.clone() for logits in first.logits]
    ids = torch.randint(0, TINY.vocab_size, (2, 6))
    forward, features = model(ids, output_hidden_states=True), model.features(ids, pool=None)
    kept_forward = forward.logits.clone(), [h.clone() for h in forward.hidden_states], features.clone()
    model.generate(context, max_new_tokens=5, do_sample=True, seed=2, return_dict_in_generate=True, output_logits=True)
    other = torch.randint(0, TINY.vocab_size, (2, 6))
    model(other, output_hidden_states=True), model.features(other, pool=None)
    assert torch.equal(first.sequences, kept[0]) and all(map(torch.equal, first.logits, kept[1]))
    assert torch.equal(forward.logits, kept_forward[0])
    assert all(map(torch.equal, forward.hidden_states, kept_forward[1]))
    assert torch.equal(features, kept_forward[2])


@pytest.mark.parametrize("form", ["list", "numpy int64", "numpy int32", "int32", "uint8", "non-contiguous"])
def test_prompts_in_every_form_give_the_same_int64_sequences(weights, form):
    model = ImageGPT(TINY, weights, backend="torch")
    prompt = torch.tensor([[SOS, 3, 4], [SOS, 5, 6]])
    given = {"list": prompt.tolist(), "numpy int64": prompt.numpy(), "numpy int32": prompt.numpy().astype(np.int32),
             "int32": prompt.int(), "uint8": prompt.to(torch.uint8),
             "non-contiguous": torch.stack([prompt, prompt], dim=2)[..., 0]}[form]
    before = torch.as_tensor(given).clone()
    out = model.generate(given, max_new_tokens=4, do_sample=True, seed=3)
    assert out.dtype == torch.int64 and out.device == torch.device("cpu")
    assert torch.equal(out, model.generate(prompt, max_new_tokens=4, do_sample=True, seed=3))
    assert torch.equal(torch.as_tensor(given), before)


@pytest.mark.parametrize("kwargs", [
    dict(temperature=1e-50),  # 0.0 in float32: failed inside the decode loop with "got 0.0"
    dict(temperature=[1.0, 1e-40]),  # a float32 subnormal: logits / temperature overflowed, token 0 or 1 came out
    dict(temperature=1e39),  # inf in float32
    dict(top_p=1e-50),  # 0.0 in float32
])
def test_values_the_float32_sampler_cannot_hold_are_refused_before_anything_is_allocated(weights, kwargs):
    model = ImageGPT(TINY, weights, backend="torch")
    name, value = next(iter(kwargs.items()))
    shown = repr(value[-1] if isinstance(value, list) else value)
    with pytest.raises(ValueError, match=f"{name} must .* got {re.escape(shown)}"):
        model.generate(torch.full((2, 1), SOS), max_new_tokens=3, do_sample=True, seed=1, **kwargs)
    assert not model.decoder.states
    assert model.generate(torch.full((2, 1), SOS), max_new_tokens=3, do_sample=True, seed=1).shape == (2, 4)


def launched_from(kernel_name: str) -> bool:
    """Whether the interpreter is running kernel_name (a frame of its Python body is on the stack)."""
    frame = sys._getframe()
    while frame is not None and frame.f_code.co_name != kernel_name:
        frame = frame.f_back
    return frame is not None


@pytest.mark.parametrize("kernel_name", ["_decode_kernel", "_sample_kernel", "_gemv_kernel"])
def test_a_launch_interrupted_between_its_arrivals_does_not_poison_later_calls(kernel_name, monkeypatch):
    """Split-K decode attention counts the splits of each (batch, head) in the workspace, the residual projections
    split over K (the sweep's setting, on here for the GEMV kernel) the splits of each tile, and the sampler its
    programs in sample_arrivals; the last one to arrive merges (or advances pos) and zeroes the counter. Under the
    interpreter a launch can stop between two arrivals (Ctrl-C, an error): the counter it left made the next launches
    act too early, and every later call's tokens and logits were wrong. Each kernel is interrupted at its own second
    arrival (the sampler runs first, after the prefill, so counting every atomic would interrupt it alone)."""
    from triton.runtime.interpreter import InterpreterBuilder

    from igpt_fast.kernels import linear
    from igpt_fast.kernels.attention import decode_num_splits

    if kernel_name == "_gemv_kernel":
        monkeypatch.setattr(linear, "_RESIDUAL_MAX_SPLITS", 4)
        monkeypatch.setattr(linear, "_SPLIT_MIN_K", 16)

    config = TINY.replace(n_positions=128)
    assert decode_num_splits(2, config.n_head, config.n_positions) == 2
    state = random_state_dict(config)
    prompt = torch.randint(0, config.n_clusters, (2, 70))  # past the first 64-key block: both splits hold keys
    # The interrupted call's prompt is another one: partials it left behind must not pass for the next call's.
    interrupted_prompt = (prompt + 1) % config.n_clusters
    # one decode step after the prefill's token: the first launches after an interruption are the ones it poisoned
    kwargs = dict(max_new_tokens=2, do_sample=True, seed=1, return_dict_in_generate=True, output_logits=True)
    model = ImageGPT(config, state, backend="triton")
    atomic, arrivals = InterpreterBuilder.create_atomic_rmw, []

    def interrupted(self, *args, **kwargs):
        if launched_from(kernel_name):
            arrivals.append(1)
            if len(arrivals) == 2:  # the first program has counted itself in, the second has not
                raise KeyboardInterrupt
        return atomic(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(InterpreterBuilder, "create_atomic_rmw", interrupted)
        model.generate(interrupted_prompt, **kwargs)
    assert len(arrivals) == 2
    after = model.generate(prompt, **kwargs)
    fresh = ImageGPT(config, state, backend="triton").generate(prompt, **kwargs)
    assert torch.equal(after.sequences, fresh.sequences)
    assert all(torch.equal(a, b) for a, b in zip(after.logits, fresh.logits, strict=True))


def test_greedy_generate_leaves_the_random_streams_alone(weights):
    """Greedy decoding draws nothing (as in transformers): a greedy call between torch.manual_seed and a sampled
    call used to consume a seed from the global RNG (or the generator), so the sampled images changed."""
    model = ImageGPT(TINY, weights, backend="torch")
    context = torch.full((2, 1), SOS)
    torch.manual_seed(0)
    sampled = model.generate(context, max_new_tokens=6, do_sample=True)
    torch.manual_seed(0)
    model.generate(context, max_new_tokens=6)
    assert torch.equal(model.generate(context, max_new_tokens=6, do_sample=True), sampled)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    model.generate(context, max_new_tokens=6, generator=generator)
    assert torch.equal(generator.get_state(), state)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(generator="cuda"), TypeError, "generator must be a torch.Generator, got 'cuda'"),
    (dict(generator=5), TypeError, "generator must be a torch.Generator, got 5"),
    (dict(return_dict_in_generate="no"), TypeError, "return_dict_in_generate must be a bool, got 'no'"),
    (dict(output_logits=1), TypeError, "output_logits must be a bool, got 1"),
])
def test_bad_generate_options_are_refused_by_name(weights, kwargs, error, match):
    """A generator that is not one failed with "'str' object has no attribute 'device'"; a string flag such as
    output_logits="no" was read as true. The forward already refuses non-bool flags."""
    model = ImageGPT(TINY, weights, backend="torch")
    with pytest.raises(error, match=match):
        model.generate(torch.full((1, 1), SOS), max_new_tokens=2, do_sample=True, **kwargs)
    assert not model.decoder.states


def test_per_row_values_may_be_zero_dim_tensors_or_numpy_scalars(weights):
    """temperature=[torch.tensor(0.7), torch.tensor(1.3)] was refused with "must be a finite number > 0, got
    tensor(0.7000)": the per-row list held tensors, not numbers."""
    model = ImageGPT(TINY, weights, backend="torch")
    context = torch.full((2, 1), SOS)
    plain = model.generate(context, max_new_tokens=4, do_sample=True, seed=2, temperature=[0.7, 1.3], top_k=[3, 5],
                           top_p=[0.9, 1.0])
    given = model.generate(context, max_new_tokens=4, do_sample=True, seed=2,
                           temperature=[torch.tensor(0.7), np.float64(1.3)],
                           top_k=[torch.tensor(3, dtype=torch.int16), np.int64(5)], top_p=[torch.tensor(0.9), 1])
    assert torch.equal(given, plain)


def test_decode_replays_the_graph_of_its_sampling_mode(weights):
    """A decode step replays the bucket's graph captured for its sampling mode (sampled or greedy), and runs eagerly
    without one; stand-ins for the graphs run the eager step (CUDA graphs exist only on a GPU)."""
    model = ImageGPT(TINY, weights, backend="torch")
    context = torch.full((2, 1), SOS)
    expected = model.generate(context, max_new_tokens=12, do_sample=True, seed=3)
    state, replayed = model.decoder.states[2], []

    greedy = model.generate(context, max_new_tokens=12)

    class StandIn:
        def __init__(self, greedy):
            self.greedy = greedy

        def replay(self):
            replayed.append(self.greedy)
            model.decoder._decode_step(state, self.greedy)

    state.graphs.update({False: StandIn(False)})
    assert torch.equal(model.generate(context, max_new_tokens=12, do_sample=True, seed=3), expected)
    assert replayed == [False] * 11  # the 11 steps after the prefill's token
    assert torch.equal(model.generate(context, max_new_tokens=12), greedy)
    assert replayed == [False] * 11  # no greedy graph: the greedy steps ran eagerly
    state.graphs.update({True: StandIn(True)})
    assert torch.equal(model.generate(context, max_new_tokens=12), greedy)
    assert replayed == [False] * 11 + [True] * 11
