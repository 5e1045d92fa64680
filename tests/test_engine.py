"""The engine against the reference: logits, per-step logits, greedy and sampled sequences, completion, bad input.

Runs the decoder twice on the CPU: with the PyTorch stand-ins (backend="torch", full lengths) and with the real
Triton kernels under the interpreter (backend="triton", a few steps: the interpreter is slow), so CI exercises
the kernels inside the real control flow. GPU-marked tests run imagegpt-small shapes with CUDA graphs.
"""

import numpy as np
import pytest
import torch
from helpers import TINY, decode_step_kernels, mean_kl, philox, random_state_dict
from tolerances import tol

import igpt_fast.decoder
import igpt_fast.model
from igpt_fast import ImageGPT, ImageGPTConfig, ReferenceImageGPT, backend
from igpt_fast.kernels import linear
from igpt_fast.philox import generation_key

# Under the interpreter, the linears in a handful of programs each (conftest.py: few_linear_programs).
pytestmark = pytest.mark.usefixtures("few_linear_programs")
BACKENDS = ["torch", "triton"]
# Interpreted Triton runs ~1 s per decode step at TINY: keep its sequences short.
STEPS = {"torch": TINY.n_positions, "triton": 4}


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_match_reference(backend, weights, reference):
    model = ImageGPT(TINY, weights, backend=backend)
    ids = torch.randint(0, TINY.vocab_size, (3, 17))
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(model(ids).logits, expected, **tol("model", torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_with_labels_and_hidden_states_matches_transformers(backend, weights):
    pytest.importorskip("transformers")
    from helpers import hf_twin

    model = ImageGPT(TINY, weights, backend=backend)
    ids = torch.cat([torch.full((3, 1), TINY.sos_token_id), torch.randint(0, TINY.n_clusters, (3, 12))], 1)
    labels = ids.clone()
    labels[1, 5], labels[2, 1:4] = -100, -100  # skipped by the loss, as in transformers
    with torch.no_grad():
        expected = hf_twin(TINY, weights)(ids, labels=labels, output_hidden_states=True)
    out = model(ids, labels=labels, output_hidden_states=True)
    torch.testing.assert_close(out.logits, expected.logits, **tol("model", torch.float32))
    torch.testing.assert_close(out.loss, expected.loss, **tol("model", torch.float32))
    assert len(out.hidden_states) == TINY.n_layer + 1
    torch.testing.assert_close(out.hidden_states, expected.hidden_states, **tol("model", torch.float32))
    loss, logits, hidden_states = model(ids, labels=labels, output_hidden_states=True, return_dict=False)
    assert torch.equal(loss, out.loss) and torch.equal(logits, out.logits)
    assert len(hidden_states) == TINY.n_layer + 1
    plain, as_tuple = model(ids), model(ids, return_dict=False)
    assert plain.loss is None and plain.hidden_states is None
    assert len(as_tuple) == 1 and torch.equal(as_tuple[0], plain.logits)


@pytest.mark.parametrize("labels, match", [
    (torch.zeros(3, 4, dtype=torch.long), r"shaped like input_ids \[3, 5\], got torch.int64 \[3, 4\]"),
    (torch.zeros(3, 5), "integer tensor"),
    (torch.full((3, 5), TINY.sos_token_id), f"got {TINY.sos_token_id}"),
    (torch.full((3, 5), -1), "got -1"),
])
def test_bad_labels_are_refused(weights, labels, match):
    model = ImageGPT(TINY, weights, backend="torch")
    ids = torch.full((3, 5), TINY.sos_token_id)
    with pytest.raises(ValueError, match=match):
        model(ids, labels=labels)
    first_is_never_a_target = torch.cat([torch.full((3, 1), TINY.sos_token_id), torch.zeros(3, 4, dtype=torch.long)],
                                        dim=1)
    assert model(ids, labels=first_is_never_a_target).loss.isfinite()
    with pytest.raises(TypeError, match="output_hidden_states must be a bool"):
        model(ids, output_hidden_states="yes")


# Every attention option a config.json may set, and imagegpt-large's 96-wide heads, through the engine.
ODD_CONFIGS = {
    "96-wide heads": ImageGPTConfig(vocab_size=21, n_positions=19, n_embd=192, n_layer=1, n_head=2),
    "inverse layer idx": ImageGPTConfig(vocab_size=21, n_positions=19, n_embd=48, n_layer=3, n_head=3,
                                        scale_attn_by_inverse_layer_idx=True),
    "upcast, unscaled": ImageGPTConfig(vocab_size=21, n_positions=19, n_embd=40, n_layer=2, n_head=5,
                                       reorder_and_upcast_attn=True, scale_attn_weights=False),
    "n_inner 72": ImageGPTConfig(vocab_size=21, n_positions=19, n_embd=48, n_layer=2, n_head=2, n_inner=72),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", sorted(ODD_CONFIGS))
def test_config_options_match_reference(name, backend):
    config = ODD_CONFIGS[name]
    state = random_state_dict(config, seed=len(name))
    model, reference = ImageGPT(config, state, backend=backend), ReferenceImageGPT.from_state_dict(config, state)
    ids = torch.randint(0, config.vocab_size, (3, 17))
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(model(ids).logits, expected, **tol("model", torch.float32))
    context = torch.full((1, 1), config.sos_token_id)
    steps = 3 if backend == "triton" else config.n_positions
    assert torch.equal(model.generate(context, max_new_tokens=steps),
                       reference.generate(context, max_new_tokens=steps))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_logits_stay_close_to_float32(weights, reference, dtype):
    """The CPU stand-ins in 16-bit storage (float32 math) against the float32 reference."""
    model = ImageGPT(TINY, weights, backend="torch", dtype=dtype)
    ids = torch.randint(0, TINY.vocab_size, (2, TINY.n_positions))
    with torch.no_grad():
        expected = reference(ids).logits
    torch.testing.assert_close(model(ids).logits, expected, **tol("model", dtype))
    out = model.generate(ids[:, :1], do_sample=True, seed=0)
    assert out.shape == (2, TINY.n_positions + 1) and (out[:, 1:] < TINY.n_clusters).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_and_per_step_logits_match_reference(backend, weights, reference):
    model = ImageGPT(TINY, weights, backend=backend)
    context = torch.tensor([[TINY.sos_token_id], [3], [TINY.sos_token_id]])
    max_length = STEPS[backend] + 1
    out = model.generate(context, max_length=max_length, return_dict_in_generate=True, output_logits=True)
    assert torch.equal(out.sequences, reference.generate(context, max_length=max_length))
    with torch.no_grad():  # logits of each step = a full forward over the generated sequence
        full = reference(out.sequences[:, :-1]).logits
    assert len(out.logits) == max_length - 1
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, **tol("model", torch.float32))


@pytest.mark.parametrize("batch,max_batch", [(1, None), (2, 2)])
def test_attention_reading_keys_before_its_wait_generates_the_same(weights, reference, monkeypatch, batch, max_batch):
    """Decode attention reading pos and the keys before t ahead of its wait (kv_before_wait), through the Triton
    kernels: in bucket 1 by default (ATTENTION_KV_BEFORE_WAIT_MAX_BATCH = 1), in bucket 2 with the sweep's value 2.
    (Every other engine test of bucket 2 and up runs it off.)"""
    if max_batch is not None:
        monkeypatch.setattr(igpt_fast.decoder, "ATTENTION_KV_BEFORE_WAIT_MAX_BATCH", max_batch)
    assert batch <= igpt_fast.decoder.ATTENTION_KV_BEFORE_WAIT_MAX_BATCH
    context = torch.tensor([[TINY.sos_token_id], [3]])[:batch]
    out = ImageGPT(TINY, weights, backend="triton").generate(context, max_length=STEPS["triton"] + 1)
    assert torch.equal(out, reference.generate(context, max_length=STEPS["triton"] + 1))


def test_residual_projections_split_over_k_generate_the_same(weights, reference, monkeypatch):
    """The residual projections split over K (the sweep's _RESIDUAL_MAX_SPLITS; off by default), through the Triton
    kernels at TINY's widths (attn c_proj's K = 32 in 2 chunks, mlp c_proj's 128 in 4): greedy tokens and each step's
    logits as the reference's, and a second call (the counters each launch left at zero) the same."""
    monkeypatch.setattr(linear, "_RESIDUAL_MAX_SPLITS", 4)
    monkeypatch.setattr(linear, "_SPLIT_MIN_K", 16)
    assert linear._gemv_config(2, TINY.n_embd, TINY.inner_dim, linear._residual_splits(TINY.inner_dim))["SPLITS"] == 4
    model = ImageGPT(TINY, weights, backend="triton")
    context = torch.tensor([[TINY.sos_token_id], [3]])
    max_length = STEPS["triton"] + 1
    out = model.generate(context, max_length=max_length, return_dict_in_generate=True, output_logits=True)
    assert model.decoder.states[2].residual_workspace.numel() > 0
    assert torch.equal(out.sequences, reference.generate(context, max_length=max_length))
    with torch.no_grad():
        full = reference(out.sequences[:, :-1]).logits
    torch.testing.assert_close(torch.stack(out.logits, dim=1), full, **tol("model", torch.float32))
    assert torch.equal(model.generate(context, max_length=max_length), out.sequences)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sampling_matches_reference_fed_the_same_random_numbers(backend, weights, reference):
    model = ImageGPT(TINY, weights, backend=backend)
    context = torch.full((4, 1), TINY.sos_token_id)
    max_length = STEPS[backend] + 1
    kwargs = dict(max_length=max_length, do_sample=True, temperature=[0.7, 1.0, 1.3, 1.0], top_k=[5, 17, 3, 8],
                  top_p=[0.9, 1.0, 0.8, 0.5])
    out = model.generate(context, seed=1234, **kwargs)
    assert torch.equal(out, reference.generate(context, uniforms=philox(1234), **kwargs))
    assert torch.equal(out, model.generate(context, seed=1234, **kwargs))  # same seed, same images
    assert not torch.equal(out, model.generate(context, seed=4321, **kwargs))


@pytest.mark.parametrize("batch, backend", [(1, "torch"), (17, "torch"), (17, "triton")])
def test_odd_batches_are_padded_to_a_bucket_and_sliced_back(batch, backend, weights, reference):
    """Batch 17 runs in bucket 32: with the kernels, the decode step's linears take the tiled dot path (over 16 rows),
    the qkv one scattering k and v into the cache at pos."""
    model = ImageGPT(TINY, weights, backend=backend)
    prompt = torch.randint(0, TINY.n_clusters, (batch, 3))
    new_tokens = 6 if backend == "torch" else 3
    out = model.generate(prompt, max_new_tokens=new_tokens, do_sample=True, top_k=6, seed=99)
    assert out.shape == (batch, 3 + new_tokens) and set(model.decoder.states) == {1 if batch == 1 else 32}
    assert torch.equal(out, reference.generate(prompt, max_new_tokens=new_tokens, do_sample=True, top_k=6,
                                               uniforms=philox(99)))


def test_float32_decode_step_over_16_rows_in_the_gemv_path_samples_the_same(weights, reference, monkeypatch):
    """float32's own GEMV limit (_FLOAT32_GEMV_MAX_M, 16 until a GPU has timed more) raised to 32: batch 17's decode
    step (bucket 32) runs the GEMV over two row blocks of 16, through the Triton kernels, and samples the reference's
    tokens; the prompt's prefill (96 rows) still takes the dot path."""
    monkeypatch.setattr(linear, "_FLOAT32_GEMV_MAX_M", 32)
    paths, launch = set(), linear._launch

    def recorded(path, x, *args, **kwargs):
        paths.add((path, x.shape[0]))
        return launch(path, x, *args, **kwargs)

    monkeypatch.setattr(linear, "_launch", recorded)
    prompt = torch.randint(0, TINY.n_clusters, (17, 3))
    out = ImageGPT(TINY, weights, backend="triton").generate(prompt, max_new_tokens=2, do_sample=True, top_k=6,
                                                              seed=99)
    assert ("gemv", 32) in paths and ("dot", 32) not in paths and ("dot", 96) in paths
    assert torch.equal(out, reference.generate(prompt, max_new_tokens=2, do_sample=True, top_k=6, uniforms=philox(99)))


def seed_with_key(key: int) -> int:
    """The seed whose generation_key is `key`: SplitMix64's steps undone."""
    z = key % 2**64
    z ^= (z >> 31) ^ (z >> 62)
    z = z * pow(0x94D049BB133111EB, -1, 2**64) % 2**64
    z ^= (z >> 27) ^ (z >> 54)
    z = z * pow(0xBF58476D1CE4E5B9, -1, 2**64) % 2**64
    z ^= (z >> 30) ^ (z >> 60)
    z = (z - 0x9E3779B97F4A7C15) % 2**64
    return z - 2**64 if z >= 2**63 else z


@pytest.mark.parametrize("key", [7, 2**63 - 3])  # the latter: row b's key + b wraps past int64's top, as on device
def test_image_of_a_seed_does_not_depend_on_the_batch(weights, key):
    seed = seed_with_key(key)
    assert generation_key(seed) == key
    context = torch.full((5, 1), TINY.sos_token_id)
    chunked = ImageGPT(TINY, weights, backend="torch", max_batch=2).generate(context, do_sample=True, seed=seed)
    whole = ImageGPT(TINY, weights, backend="torch").generate(context, do_sample=True, seed=seed)  # bucket 8
    assert chunked.shape == (5, TINY.n_positions + 1)
    assert torch.equal(chunked, whole)  # buckets 2, 2 and 1 (padded) drew each row's stream, as bucket 8 did


def test_consecutive_seeds_draw_unrelated_images(weights):
    """No image of seed 1 is one of seed 0's: when row b drew with the seed + b, seed 1's first was seed 0's second."""
    model = ImageGPT(TINY, weights, backend="torch")
    context = torch.full((3, 1), TINY.sos_token_id)
    first, second = (model.generate(context, do_sample=True, seed=seed) for seed in (0, 1))
    assert not any(torch.equal(a, b) for a in first for b in second)


@pytest.mark.parametrize("backend", BACKENDS)
def test_completion_keeps_the_prefix(backend, weights, reference):
    model = ImageGPT(TINY, weights, backend=backend)
    prefix = torch.cat([torch.full((2, 1), TINY.sos_token_id), torch.randint(0, TINY.n_clusters, (2, 9))], 1)
    out = model.generate(prefix, max_new_tokens=STEPS[backend] // 2 + 1, do_sample=True, seed=5, top_k=4)
    assert torch.equal(out[:, :10], prefix)
    expected = reference.generate(prefix, max_new_tokens=STEPS[backend] // 2 + 1, do_sample=True, top_k=4,
                                  uniforms=philox(5))
    assert torch.equal(out, expected)


def test_num_return_sequences_samples_each_prompt_row_n_times_as_transformers_does(weights, reference):
    model = ImageGPT(TINY, weights, backend="torch")
    prefix = torch.cat([torch.full((2, 1), TINY.sos_token_id), torch.randint(0, TINY.n_clusters, (2, 5))], 1)
    out = model.generate(prefix, max_new_tokens=8, do_sample=True, top_k=[2, 5], num_return_sequences=3, seed=6)
    assert out.shape == (6, 14) and torch.equal(out[:, :6], prefix.repeat_interleave(3, dim=0))
    assert len({tuple(row) for row in out[:3, 6:].tolist()}) > 1  # copies of a row draw different pixels
    expected = reference.generate(prefix.repeat_interleave(3, dim=0), max_new_tokens=8, do_sample=True,
                                  top_k=[2, 2, 2, 5, 5, 5], uniforms=philox(6))
    assert torch.equal(out, expected)


def test_model_card_call_forms(weights):
    model = ImageGPT(TINY, weights, backend="torch")
    context = torch.full((2, 1), TINY.vocab_size - 1)
    a = model.generate(pixel_values=context, max_length=TINY.n_positions + 1, temperature=1.0, do_sample=True,
                       top_k=40 % TINY.n_clusters, seed=3)
    b = model.generate(input_ids=context, max_length=TINY.n_positions + 1, temperature=1.0, do_sample=True,
                       top_k=40 % TINY.n_clusters, seed=3)
    c = model.generate(inputs=context, max_length=TINY.n_positions + 1, temperature=1.0, do_sample=True,
                       top_k=40 % TINY.n_clusters, seed=3)  # transformers' own name for its first parameter
    assert a.dtype == torch.int64 and a.shape == (2, TINY.n_positions + 1) and torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(ValueError, match="pass the prompt once, .* got 2"):
        model.generate(input_ids=context, inputs=context, max_new_tokens=1)
    assert (a[:, 0] == TINY.sos_token_id).all() and (a[:, 1:] < TINY.n_clusters).all()
    assert model.eval() is model and model.config.vocab_size == TINY.vocab_size
    # transformers' default top_k=50 is clamped to the vocabulary when unset
    assert model.generate(context, max_new_tokens=3, do_sample=True, seed=1).shape == (2, 4)


def test_arguments_transformers_code_passes_to_silence_warnings_change_nothing(weights):
    model = ImageGPT(TINY, weights, backend="torch")
    prefix = torch.cat([torch.full((2, 1), TINY.sos_token_id), torch.randint(0, TINY.n_clusters, (2, 4))], 1)
    plain = model.generate(prefix, max_new_tokens=6, do_sample=True, top_k=5, seed=8)
    quiet = model.generate(prefix, max_new_tokens=6, do_sample=True, top_k=5, seed=8, use_cache=False,
                           attention_mask=torch.ones_like(prefix), pad_token_id=TINY.sos_token_id)
    assert torch.equal(quiet, plain)


def test_top_k_zero_or_above_the_vocabulary_keeps_every_color_as_in_transformers(weights):
    model = ImageGPT(TINY, weights, backend="torch")
    context = torch.full((2, 1), TINY.sos_token_id)
    every_color = model.generate(context, max_new_tokens=5, do_sample=True, top_k=TINY.n_clusters, seed=4)
    for top_k in (0, 40, [0, 40], torch.tensor([40, TINY.n_clusters])):
        assert torch.equal(model.generate(context, max_new_tokens=5, do_sample=True, top_k=top_k, seed=4),
                           every_color)
    greedy = model.generate(context, max_new_tokens=5)
    assert torch.equal(model.generate(context, max_new_tokens=5, top_k=0), greedy)  # ignored, as in transformers
    assert not torch.equal(model.generate(context, max_new_tokens=5, do_sample=True, top_k=1, seed=4),
                           every_color)  # a top_k within the vocabulary still filters


def test_global_rng_and_generator_pick_the_stream(weights):
    model = ImageGPT(TINY, weights, backend="torch")
    context = torch.full((1, 1), TINY.sos_token_id)
    torch.manual_seed(0)
    a = model.generate(context, do_sample=True)
    torch.manual_seed(0)
    assert torch.equal(a, model.generate(context, do_sample=True))
    torch.manual_seed(1)
    assert not torch.equal(a, model.generate(context, do_sample=True))  # another global seed, another image
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    b = model.generate(context, do_sample=True, generator=g1)
    torch.manual_seed(0)  # with a generator the global RNG does not matter: reseeding it changes nothing
    assert torch.equal(b, model.generate(context, do_sample=True, generator=g2))
    assert not torch.equal(b, model.generate(context, do_sample=True, generator=torch.Generator().manual_seed(10)))


def test_generate_does_not_mutate_its_input(weights):
    model = ImageGPT(TINY, weights, backend="torch")
    context = torch.full((2, 3), 2)
    before = context.clone()
    model.generate(context, max_new_tokens=2)
    assert torch.equal(context, before)


@pytest.mark.parametrize("output_logits", [False, True])
def test_progress_reports_the_tokens_done_after_each_run_of_steps(weights, monkeypatch, output_logits):
    monkeypatch.setattr(igpt_fast.model, "PROGRESS_STEPS", 5)
    model = ImageGPT(TINY, weights, backend="torch", max_batch=2)  # 3 rows: chunks of 2 and 1
    context = torch.full((3, 1), TINY.sos_token_id)
    kwargs = dict(do_sample=True, seed=3, return_dict_in_generate=True, output_logits=output_logits)
    reports = []
    out = model.generate(context, progress=lambda done, total: reports.append((done, total)), **kwargs)
    # 24 new tokens a row: the first, then runs of 5, 5, 5, 5 and 3 decode steps
    per_row = [1, 6, 11, 16, 21, 24]
    assert reports == [(2 * n, 72) for n in per_row] + [(48 + n, 72) for n in per_row]
    plain = model.generate(context, **kwargs)  # reporting changes no token
    assert torch.equal(out.sequences, plain.sequences)
    if output_logits:
        assert all(torch.equal(a, b) for a, b in zip(out.logits, plain.logits, strict=True))


def test_progress_of_a_single_new_token_is_reported_once(weights):
    reports = []
    ImageGPT(TINY, weights, backend="torch").generate(torch.full((2, 1), TINY.sos_token_id), max_new_tokens=1,
                                                       progress=lambda done, total: reports.append((done, total)))
    assert reports == [(2, 2)]  # the first new token, once


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(input_ids=torch.tensor([[TINY.vocab_size]])), ValueError, f"token id {TINY.vocab_size}"),
    (dict(input_ids=torch.tensor([[-3]])), ValueError, "token id -3"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "empty"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.int8)), ValueError, r"of dtype torch.int64, .*got dtype torch.int8"),
    (dict(input_ids=torch.zeros(1, 1)), ValueError, "got dtype torch.float32"),
    (dict(input_ids=torch.zeros(1, TINY.n_positions + 1, dtype=torch.long)), ValueError, "exceeds"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.long), max_length=TINY.n_positions + 2), ValueError,
     "exceeds n_positions"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.long), do_sample=True, temperature=0.0), ValueError,
     "temperature"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.long), do_sample=True, top_k=-1), ValueError, "got -1"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.long), max_new_tokens=0), ValueError,
     "max_new_tokens must be an int >= 1, got 0"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.long), max_length=8.0), ValueError,
     "max_length must be an int >= 1, got 8.0"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.long), do_sample=True, top_p=1.5), ValueError, "top_p"),
    (dict(input_ids=torch.zeros(2, 1, dtype=torch.long), do_sample=True, top_k=[1, 2, 3]), ValueError,
     "one per row"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.long), num_beams=4), ValueError, "num_beams"),
    (dict(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]])),
     ValueError, r"attention_mask must be all ones, .* got torch.int64 \[2, 3\] with 1 entries other than 1"),
    (dict(input_ids=torch.zeros(2, 3, dtype=torch.long), attention_mask=torch.ones(2, 2)), ValueError,
     r"shaped like the prompt \[2, 3\]"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.long), pad_token_id="0"), ValueError, "pad_token_id must be"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.long), use_cache="yes"), TypeError, "use_cache must be a bool"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.long), do_sample=True, num_return_sequences=0), ValueError,
     "num_return_sequences must be an int >= 1, got 0"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.long), num_return_sequences=2), ValueError,
     "num_return_sequences=2 needs do_sample=True"),
    (dict(), ValueError, "pass the prompt once, .* got 0"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.long), seed=1, generator=torch.Generator()), ValueError,
     "not both"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.long), do_sample=True, seed=2**63), ValueError,
     r"seed must be an int in \[-2\*\*63, 2\*\*63\), got 9223372036854775808"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.long), do_sample=True, seed=1.5), ValueError, "got 1.5"),
    (dict(input_ids=torch.zeros(1, 1, dtype=torch.long), progress="bar"), TypeError,
     "progress must be a callable progress\\(done, total\\) or None, got 'bar'"),
])
def test_bad_input_is_refused_and_the_next_call_works(weights, kwargs, error, match):
    model = ImageGPT(TINY, weights, backend="torch")
    with pytest.raises(error, match=match):
        model.generate(**kwargs)
    out = model.generate(torch.full((1, 1), TINY.sos_token_id), max_new_tokens=2)
    assert out.shape == (1, 3)


def test_bad_construction(weights):
    with pytest.raises(ValueError, match="dtype must be one of"):
        ImageGPT(TINY, weights, dtype=torch.int8)
    with pytest.raises(ValueError, match="backend must be"):
        ImageGPT(TINY, weights, backend="cuda")
    with pytest.raises(ValueError, match="max_batch"):
        ImageGPT(TINY, weights, max_batch=3)
    with pytest.raises(ValueError, match="missing keys"):
        ImageGPT(TINY.replace(n_layer=3), weights)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            ImageGPT(TINY, weights, device="cuda")


def test_bfloat16_is_refused_before_anything_moves_on_a_gpu_without_it(weights, monkeypatch):
    """A Turing GPU (a T4: compute capability 7.5) has no bfloat16 tensor cores for the kernels."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(backend, "_capability_major", lambda index: 7)
    monkeypatch.setattr(igpt_fast.model.PackedWeights, "pack", None)  # reaching the packing would fail otherwise
    with pytest.raises(ValueError, match=r"compute capability 8.0 or newer .* cuda:0 is 7.x: use dtype=torch.float16"):
        ImageGPT(TINY, weights, device="cuda:0", dtype=torch.bfloat16)


def test_features_and_likelihood_match_reference(weights, reference):
    model = ImageGPT(TINY, weights, backend="torch")
    pixels = torch.randint(0, TINY.n_clusters, (3, TINY.n_positions))
    with torch.no_grad():
        ids = torch.cat([torch.full((3, 1), TINY.sos_token_id), pixels[:, :-1]], 1)
        out = reference(ids, output_hidden_states=True)
    for layer in range(TINY.n_layer + 1):
        torch.testing.assert_close(model.features(ids, layer=layer), out.hidden_states[layer].mean(1),
                                   **tol("model", torch.float32))
    assert model.features(ids, pool=None).shape == (3, TINY.n_positions, TINY.n_embd)
    expected_nll = torch.nn.functional.cross_entropy(out.logits.transpose(1, 2), pixels, reduction="none").mean(1)
    result = model.log_likelihood(pixels)
    torch.testing.assert_close(result.nll, expected_nll, **tol("model", torch.float32))
    torch.testing.assert_close(result.bits_per_dim, expected_nll / torch.log(torch.tensor(2.0)))
    with pytest.raises(ValueError, match="layer must be"):
        model.features(ids, layer=TINY.n_layer + 1)
    torch.testing.assert_close(model.features(ids, layer=np.int64(1)), model.features(ids, layer=1))  # numpy ints
    with pytest.raises(ValueError, match="SOS"):
        model.log_likelihood(ids)


@pytest.mark.parametrize("images_per_chunk", [1, 2])
def test_whole_image_forwards_in_chunks_equal_one_pass(weights, monkeypatch, images_per_chunk):
    model = ImageGPT(TINY, weights, backend="torch")
    pixels = torch.randint(0, TINY.n_clusters, (3, TINY.n_positions))
    ids = torch.cat([torch.full((3, 1), TINY.sos_token_id), pixels[:, :-1]], 1)
    def every_forward():
        out = model(ids, labels=ids, output_hidden_states=True)
        return (out.logits, out.loss, out.hidden_states, model.features(ids), model.features(ids, pool=None),
                model.log_likelihood(pixels).nll)

    whole = every_forward()
    monkeypatch.setattr(igpt_fast.model, "FORWARD_CHUNK_TOKENS", images_per_chunk * TINY.n_positions + 1)
    prefill, batches = model.decoder.prefill, []

    def recording_prefill(ids, *args, **kwargs):
        batches.append(len(ids))
        return prefill(ids, *args, **kwargs)

    monkeypatch.setattr(model.decoder, "prefill", recording_prefill)
    chunked = every_forward()
    per_call = {1: [1, 1, 1], 2: [2, 1]}[images_per_chunk]  # images in each prefill of a 3-image call
    assert batches == per_call * 4
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-6)


def test_bucket_memory_estimate_covers_what_a_bucket_allocates():
    """The estimate the out-of-memory refusal compares with free GPU memory, against the bytes a bucket's state
    really holds (KV cache, activations, split-K workspace, ...), allocated here on the CPU."""
    from igpt_fast.checkpoint import expected_shapes

    for config, batches in ((TINY, (1, 4)), (ImageGPTConfig.small(), (1, 8))):
        weights = {name: torch.zeros(shape) for name, shape in expected_shapes(config).items()}
        decoder = ImageGPT(config, weights, backend="triton", dtype=torch.float16).decoder
        for batch in batches:
            state = decoder.state(batch)
            allocated = sum(v.nbytes for v in vars(state).values() if isinstance(v, torch.Tensor))
            assert allocated <= decoder.bucket_bytes(batch) <= 1.01 * allocated + 2**16, (config, batch)
            decoder.release_caches()


# ---- GPU: imagegpt-small shapes, CUDA graphs ----

SMALL = ImageGPTConfig.small()


@pytest.fixture(scope="module")
def small_weights():
    return random_state_dict(SMALL, seed=21)


@pytest.mark.gpu
def test_gpu_fp32_greedy_equals_reference_over_a_whole_image(small_weights, monkeypatch):
    reference = ReferenceImageGPT.from_state_dict(SMALL, small_weights).cuda()
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # the reference in IEEE float32 too
    model = ImageGPT(SMALL, small_weights, device="cuda")
    context = torch.full((2, 1), SMALL.sos_token_id, device="cuda")
    out = model.generate(context, max_length=SMALL.n_positions + 1)
    # The reference's greedy choice at every position, given the engine's tokens before it, from one forward over the
    # whole sequence (teacher forcing): by induction, out is the reference's greedy image exactly when every choice
    # agrees. reference.generate computes the same choices one eager KV-cache step at a time: 1024 forwards, 48 of the
    # 88 s this test file took on an H200 (2026-12-04), with logits that differ from these by rounding only.
    with torch.no_grad():
        logits = reference(out[:, :-1]).logits.float()
    expected = logits.argmax(dim=-1)
    agree = (out[:, 1:] == expected).float().mean().item()
    print(f"fp32 greedy agreement with the reference over 1024 steps: {agree:.4f}")
    # Measured on a CPU for these weights: the reference's greedy path has its smallest top-2 logit gap, 2.0e-4, at
    # step 985 (logits about N(0, 1)), and float32 logits of a 1024-token prefill are within 3.1e-6 of float64's.
    # A flip needs the engine off by 1e-4, 30x that: a bug, not rounding. The failure message says where.
    if not torch.equal(out[:, 1:], expected):  # a near tie in the logits, or a bug: say which
        row, position = (out[:, 1:] != expected).nonzero()[0].tolist()
        top2 = logits[row, position].topk(2).values
        pytest.fail(f"greedy tokens differ first at row {row}, position {position + 1}, where the reference's two "
                    f"largest logits are {top2[0]:.6f} and {top2[1]:.6f} (gap {top2[0] - top2[1]:.1e})")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_low_precision_next_token_distributions_are_close(small_weights, dtype):
    reference = ReferenceImageGPT.from_state_dict(SMALL, small_weights).cuda()
    model = ImageGPT(SMALL, small_weights, device="cuda", dtype=dtype)
    ids = torch.randint(0, SMALL.n_clusters, (4, 256), device="cuda")
    with torch.no_grad():
        kl = mean_kl(reference(ids).logits, model(ids).logits)
    print(f"{dtype}: mean KL(reference fp32 || engine) over 1024 next-token distributions = {kl:.2e}")
    # PyTorch ops in the same storage dtypes on a CPU give 1.1e-6 (fp16) and 6.7e-5 (bf16) on these inputs: the
    # bounds leave 100x and 30x for the kernels' different summation orders, and catch a real error (KL ~ 0.1).
    assert kl < (1e-4 if dtype == torch.float16 else 2e-3)
    # the graphed decode path too: sampled images have valid tokens and the SOS kept
    out = model.generate(torch.full((3, 1), SMALL.sos_token_id, device="cuda"), do_sample=True, top_k=40, seed=1)
    assert out.shape == (3, SMALL.n_positions + 1) and (out[:, 1:] < SMALL.n_clusters).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, batch", [(torch.float16, 8), (torch.bfloat16, 8), (torch.float16, 64),
                                          (torch.float16, 256)])
def test_gpu_low_precision_decode_steps_give_the_reference_next_token_distributions(small_weights, dtype, batch):
    """The decode step itself (the test above checks the prefill's forward): each step's logits against the float32
    reference's forward over the sampled sequence. Batch 8 runs the GEMV linears and split-K attention; 64 and 256
    the tiled dot linears and attention in one split per (batch, head), in buckets no GPU test ran before."""
    check_decode_steps_against_reference(small_weights, dtype, batch)


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [8, 64])
def test_gpu_residual_projections_split_over_k_give_the_reference_distributions(small_weights, monkeypatch, batch):
    """The sweep's split-K residual projections (mlp c_proj in 4 chunks of K; GEMV at batch 8, dot tiles at 64) in
    captured graphs, under programmatic dependent launch where the card has it: a merge that raced its splits'
    stores, or a counter left set, would show in these distributions."""
    monkeypatch.setattr(linear, "_RESIDUAL_MAX_SPLITS", 4)
    model = check_decode_steps_against_reference(small_weights, torch.float16, batch)
    assert model.decoder.states[batch].residual_workspace.numel() > 0  # the projections did split


def check_decode_steps_against_reference(small_weights, dtype, batch) -> ImageGPT:
    reference = ReferenceImageGPT.from_state_dict(SMALL, small_weights).cuda()
    model = ImageGPT(SMALL, small_weights, device="cuda", dtype=dtype)
    steps = 64
    out = model.generate(torch.full((batch, 1), SMALL.sos_token_id, device="cuda"), max_new_tokens=steps,
                         do_sample=True, top_k=40, seed=3, return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        kl = mean_kl(reference(out.sequences[:, :-1]).logits[:, -steps:], torch.stack(out.logits, dim=1))
    print(f"{dtype} decode steps at batch {batch} (residual projections split up to {linear._RESIDUAL_MAX_SPLITS} "
          f"ways): mean KL(reference fp32 || engine) over {batch * steps} next-token distributions = {kl:.2e}")
    # The PyTorch stand-ins in fp16 on a CPU give 1.2e-6 here (and 1.1e-6 for the forward above): the same bounds.
    assert kl < (1e-4 if dtype == torch.float16 else 2e-3)
    return model


@pytest.mark.gpu
def test_gpu_graphs_for_several_buckets_and_flat_memory(small_weights):
    model = ImageGPT(SMALL, small_weights, device="cuda", dtype=torch.float16)
    for batch in (1, 3, 8):  # buckets 1, 4, 8
        out = model.generate(torch.full((batch, 1), SMALL.sos_token_id, device="cuda"), max_new_tokens=64,
                             do_sample=True, seed=batch)
        assert out.shape == (batch, 65)
    assert set(model.decoder.states) == {1, 4, 8} and all(s.graphs for s in model.decoder.states.values())
    context = torch.full((8, 1), SMALL.sos_token_id, device="cuda")
    model.generate(context, max_new_tokens=64, do_sample=True, seed=0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    baseline = torch.cuda.max_memory_allocated()
    for i in range(100):
        model.generate(context, max_new_tokens=64, do_sample=True, seed=i)
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated() - baseline
    print(f"peak memory growth over 100 generate() calls: {growth} bytes")
    assert growth < 16 * 2**20


@pytest.mark.gpu
def test_gpu_eager_switch_gives_the_same_tokens(small_weights):
    context = torch.full((2, 1), SMALL.sos_token_id, device="cuda")
    graphed = ImageGPT(SMALL, small_weights, device="cuda", dtype=torch.float16)
    eager = ImageGPT(SMALL, small_weights, device="cuda", dtype=torch.float16, use_cuda_graphs=False)
    kwargs = dict(max_new_tokens=128, do_sample=True, seed=42, top_k=40)
    assert torch.equal(graphed.generate(context, **kwargs), eager.generate(context, **kwargs))


@pytest.mark.gpu
def test_gpu_progress_reports_as_runs_finish_and_changes_no_token(small_weights, monkeypatch):
    monkeypatch.setattr(igpt_fast.model, "PROGRESS_STEPS", 32)
    context = torch.full((2, 1), SMALL.sos_token_id, device="cuda")
    model = ImageGPT(SMALL, small_weights, device="cuda", dtype=torch.float16)
    kwargs = dict(max_new_tokens=100, do_sample=True, seed=42, top_k=40)
    reports = []
    out = model.generate(context, progress=lambda done, total: reports.append((done, total)), **kwargs)
    assert reports == [(2 * n, 200) for n in (1, 33, 65, 97, 100)]  # the first token, then runs of 32, 32, 32, 3
    assert torch.equal(out, model.generate(context, **kwargs))


@pytest.mark.gpu
def test_gpu_a_cuda_generator_picks_the_stream(small_weights):
    """generate(generator=) draws the seed on the generator's device: torch refuses a CUDA generator on the CPU."""
    model = ImageGPT(SMALL, small_weights, device="cuda", dtype=torch.float16)
    context = torch.full((2, 1), SMALL.sos_token_id, device="cuda")
    def sample(generator_seed):
        generator = torch.Generator("cuda").manual_seed(generator_seed)
        return model.generate(context, max_new_tokens=16, do_sample=True, generator=generator)

    assert torch.equal(sample(5), sample(5)) and not torch.equal(sample(5), sample(6))


@pytest.mark.gpu
def test_gpu_programmatic_dependent_launch_gives_the_same_tokens(small_weights, monkeypatch):
    """PDL (on by default from sm_90) lets kernels overlap their predecessor's tail: a missing wait would race."""
    context = torch.full((8, 1), SMALL.sos_token_id, device="cuda")
    kwargs = dict(max_new_tokens=256, do_sample=True, seed=7, top_k=40)
    print(f"programmatic dependent launch on this card: {backend.use_pdl(torch.device('cuda'))}")
    with_pdl = ImageGPT(SMALL, small_weights, device="cuda", dtype=torch.float16).generate(context, **kwargs)
    monkeypatch.setenv(backend.PDL_ENV, "0")
    without = ImageGPT(SMALL, small_weights, device="cuda", dtype=torch.float16).generate(context, **kwargs)
    assert torch.equal(with_pdl, without)
    # Decode attention reading pos and the cache rows before t ahead of its wait (by default only in bucket 1).
    monkeypatch.setenv(backend.PDL_ENV, "1")
    monkeypatch.setattr(igpt_fast.decoder, "ATTENTION_KV_BEFORE_WAIT_MAX_BATCH", 8)
    early = ImageGPT(SMALL, small_weights, device="cuda", dtype=torch.float16).generate(context, **kwargs)
    assert torch.equal(early, without)


@pytest.mark.gpu
def test_gpu_batch_that_does_not_fit_is_refused_before_allocating(small_weights, monkeypatch):
    model = ImageGPT(SMALL, small_weights, device="cuda", dtype=torch.float16)
    context = torch.full((64, 1), SMALL.sos_token_id, device="cuda")
    real = torch.cuda.mem_get_info
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, real(device)[1]))
    before = torch.cuda.memory_allocated()
    with pytest.raises(MemoryError, match="batch bucket 64 needs"):
        model.generate(context, max_new_tokens=4)
    assert not model.decoder.states and torch.cuda.memory_allocated() == before
    monkeypatch.undo()
    assert model.generate(context, max_new_tokens=4).shape == (64, 5)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_a_model_on_another_device_than_the_current_one(small_weights):
    """Triton launches on the current device, not the tensors' one: the model makes its own device current."""
    kwargs = dict(max_new_tokens=32, do_sample=True, seed=3, top_k=40)
    context = torch.full((2, 1), SMALL.sos_token_id)
    on_first = ImageGPT(SMALL, small_weights, device="cuda:0", dtype=torch.float16)
    on_second = ImageGPT(SMALL, small_weights, device="cuda:1", dtype=torch.float16)
    torch.cuda.set_device(0)
    out = on_second.generate(context.to("cuda:1"), **kwargs)
    assert out.device == torch.device("cuda:1") and torch.cuda.current_device() == 0
    assert torch.equal(out.cpu(), on_first.generate(context.to("cuda:0"), **kwargs).cpu())
    ids = context.expand(2, 64).to("cuda:1")
    torch.testing.assert_close(on_second(ids).logits.cpu(), on_first(ids.to("cuda:0")).logits.cpu())


def test_a_decode_step_allocates_nothing_and_never_reads_the_device(weights, monkeypatch):
    """What CUDA-graph replay needs, checked on the CPU with the real kernels (interpreter): one decode step
    calls no tensor factory and reads no device value on the host."""
    model = ImageGPT(TINY, weights, backend="triton")
    model.generate(torch.full((2, 1), TINY.sos_token_id), max_new_tokens=2, do_sample=True, seed=1)
    state = model.decoder.states[2]
    calls = []

    def forbidden(name):
        def record(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"the decode step called {name}")
        return record

    for name in ("empty", "zeros", "ones", "full", "empty_like", "zeros_like", "tensor", "empty_strided",
                 "arange", "cat", "stack"):
        monkeypatch.setattr(torch, name, forbidden(f"torch.{name}"))
    for name in ("item", "tolist", "cpu", "numpy", "__int__", "__float__", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden(f"Tensor.{name}"))
    model.decoder.step(state, greedy=False)
    monkeypatch.undo()
    assert calls == []
    assert int(state.pos[0]) == 3  # the step ran: SOS at 0, tokens at 1 and 2 sampled, now feeding position 3


def test_a_decode_step_is_five_launches_per_layer(monkeypatch):
    """Launch gaps decide small-batch speed (shared/docs/performance.md): a decode step launches embed, five kernels
    per layer (QKV, attention with its merge, two projections, the MLP), lm_head and sampling, nothing else."""
    from igpt_fast.kernels.attention import decode_num_splits

    config = TINY.replace(n_positions=128)  # long enough for split-K decode, whose merge needs no launch of its own
    assert decode_num_splits(2, config.n_head, config.n_positions) == 2
    model = ImageGPT(config, random_state_dict(config), backend="triton")
    launched = decode_step_kernels(model, 2, monkeypatch)
    per_layer = ["_gemv_kernel", "_decode_kernel", "_gemv_kernel", "_gemv_kernel", "_gemv_kernel"]
    assert launched == ["_embed_kernel", *per_layer * config.n_layer, "_gemv_kernel", "_sample_kernel"], launched
