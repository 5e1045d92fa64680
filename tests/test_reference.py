"""The reference model against transformers: same logits (float32, <= 1e-5), same hidden states, same greedy
generation token for token."""

import zlib

import pytest
import torch
from helpers import TINY, hf_twin, random_state_dict
from tolerances import tol

from igpt_fast.config import ImageGPTConfig
from igpt_fast.reference import ReferenceImageGPT

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "plain": ImageGPTConfig(vocab_size=33, n_positions=40, n_embd=64, n_layer=3, n_head=4),
    # imagegpt-large's head shape: 16 heads of 96, one layer to keep CPU time small
    "16x96": ImageGPTConfig(vocab_size=513, n_positions=20, n_embd=1536, n_layer=1, n_head=16),
    "inverse_layer_idx": ImageGPTConfig(vocab_size=21, n_positions=33, n_embd=48, n_layer=3, n_head=3,
                                        scale_attn_by_inverse_layer_idx=True),
    "upcast_unscaled": ImageGPTConfig(vocab_size=21, n_positions=17, n_embd=40, n_layer=2, n_head=5,
                                      reorder_and_upcast_attn=True, scale_attn_weights=False),
    "n_inner": ImageGPTConfig(vocab_size=21, n_positions=29, n_embd=48, n_layer=2, n_head=2, n_inner=72),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_match_transformers(name):
    config = CONFIGS[name]
    state = random_state_dict(config, seed=zlib.crc32(name.encode()))  # hash() of a str changes per process
    hf, ref = hf_twin(config, state), ReferenceImageGPT.from_state_dict(config, state)
    ids = torch.randint(0, config.vocab_size, (2, config.n_positions), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(ids, output_hidden_states=True)
        actual = ref(ids, output_hidden_states=True)
    diff = (actual.logits - expected.logits).abs().max().item()
    print(f"{name}: logits max abs diff vs transformers {diff:.3g}")
    torch.testing.assert_close(actual.logits, expected.logits, **tol("exact", torch.float32))
    assert len(actual.hidden_states) == len(expected.hidden_states) == config.n_layer + 1
    for mine, theirs in zip(actual.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, **tol("exact", torch.float32))


def test_cached_steps_equal_full_forward():
    config = CONFIGS["inverse_layer_idx"]
    ref = ReferenceImageGPT.from_state_dict(config, random_state_dict(config, seed=3))
    ids = torch.randint(0, config.vocab_size, (3, 12))
    with torch.no_grad():
        full = ref(ids).logits
        out = ref(ids[:, :5], use_cache=True)
        steps = [out.logits]
        for t in range(5, 12):
            out = ref(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, **tol("exact", torch.float32))


@pytest.mark.parametrize("config", [TINY, CONFIGS["inverse_layer_idx"]], ids=["tiny", "inverse_layer_idx"])
def test_greedy_generation_matches_transformers(config):
    state = random_state_dict(config, seed=5)
    hf, ref = hf_twin(config, state), ReferenceImageGPT.from_state_dict(config, state)
    context = torch.full((3, 1), config.sos_token_id)
    context[1:, 0] = torch.tensor([0, 4])  # not only the SOS: any prefix token
    max_length = config.n_positions + 1
    expected = hf.generate(input_ids=context, max_length=max_length, do_sample=False)
    actual = ref.generate(context, max_length=max_length)
    assert actual.shape == (3, max_length)
    assert torch.equal(actual, expected)


def test_prefix_longer_than_one_is_kept_and_continued():
    ref = ReferenceImageGPT.from_state_dict(TINY, random_state_dict(TINY, seed=2))
    prefix = torch.randint(0, TINY.n_clusters, (2, 7))
    out = ref.generate(prefix, max_new_tokens=5)
    assert out.shape == (2, 12) and torch.equal(out[:, :7], prefix)
    # greedy continuation equals argmax of a full forward at each position
    with torch.no_grad():
        logits = ref(out[:, :-1]).logits
    assert torch.equal(out[:, 7:], logits[:, 6:].argmax(-1))


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_length=TINY.n_positions + 2), "exceeds n_positions"),
    (dict(max_length=1), "nothing to generate"),
])
def test_bad_lengths(kwargs, match):
    ref = ReferenceImageGPT.from_state_dict(TINY, random_state_dict(TINY))
    with pytest.raises(ValueError, match=match):
        ref.generate(torch.full((1, 1), TINY.sos_token_id), **kwargs)


def test_max_new_tokens_takes_precedence_over_max_length_with_a_warning_as_in_transformers():
    from igpt_fast import ImageGPT

    weights = random_state_dict(TINY)
    context = torch.full((2, 3), TINY.sos_token_id)
    for model in (ReferenceImageGPT.from_state_dict(TINY, weights), ImageGPT(TINY, weights, backend="torch")):
        with pytest.warns(UserWarning, match="max_new_tokens takes precedence"):
            out = model.generate(context, max_length=5, max_new_tokens=7)
        assert out.shape == (2, 10)


@pytest.mark.parametrize("ids, match", [
    (torch.tensor([[TINY.vocab_size]]), f"token id {TINY.vocab_size}"),
    (torch.tensor([[-1]]), "token id -1"),
    (torch.zeros(2, 0, dtype=torch.long), "empty"),
    (torch.zeros(3, dtype=torch.long), "batch, sequence"),
    (torch.zeros(1, 2), "integer"),
])
def test_bad_input_ids(ids, match):
    ref = ReferenceImageGPT.from_state_dict(TINY, random_state_dict(TINY))
    with pytest.raises(ValueError, match=match):
        ref(ids)


def test_config_presets_and_validation():
    assert ImageGPTConfig.small().num_parameters() == 76_682_240
    assert ImageGPTConfig.medium().num_parameters() == 455_489_536
    assert ImageGPTConfig.large().num_parameters() == 1_362_914_304
    assert ImageGPTConfig.large().head_dim == 96
    for hf_name in ("openai/imagegpt-small",):
        assert ImageGPTConfig.preset(hf_name.split("-")[-1]) == ImageGPTConfig.small()
    with pytest.raises(ValueError, match="n_embd .100. must be divisible by n_head .3."):
        ImageGPTConfig(n_embd=100, n_head=3)
    with pytest.raises(ValueError, match="activation_function='gelu_new'"):
        ImageGPTConfig(activation_function="gelu_new")
    # config.json's Infinity and true: every normalized activation zero, or an epsilon of 1 (both once accepted)
    for eps in (float("inf"), float("nan"), True, 0.0):
        with pytest.raises(ValueError, match=f"layer_norm_epsilon must be a finite positive number, got {eps!r}"):
            ImageGPTConfig(layer_norm_epsilon=eps)
    with pytest.raises(ValueError, match="n_inner must be None or a positive integer, got True"):
        ImageGPTConfig(n_inner=True)
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        ImageGPTConfig.from_dict({"tie_word_embeddings": True})
    with pytest.raises(ValueError, match="add_cross_attention"):
        ImageGPTConfig.from_dict({"add_cross_attention": True})
    # unknown keys are ignored, HF long names are read
    assert ImageGPTConfig.from_dict({"foo": 1, "hidden_size": 64, "num_attention_heads": 2}).n_embd == 64


def test_config_round_trips_through_transformers(tmp_path):
    config = CONFIGS["inverse_layer_idx"]
    config.to_json_file(tmp_path / "config.json")
    hf_config = transformers.ImageGPTConfig.from_pretrained(tmp_path)
    assert hf_config.scale_attn_by_inverse_layer_idx and hf_config.n_head == 3
    assert ImageGPTConfig.from_hf(hf_config) == config
