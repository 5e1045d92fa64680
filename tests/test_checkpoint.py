"""Checkpoint folders: round trips with transformers, legacy .bin buffers, shards, the hub cache, bad files."""

import importlib.util
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TINY, hf_twin, make_checkpoint, random_clusters, random_state_dict

from igpt_fast.checkpoint import is_legacy_buffer, load_checkpoint, save_pretrained
from igpt_fast.reference import ReferenceImageGPT

transformers = pytest.importorskip("transformers")


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_the_checkout_kernels_folder_does_not_shadow_the_kernels_package_transformers_imports():
    """transformers >= 5.25 imports Hugging Face's `kernels`; run from this checkout, `kernels` must not name our
    kernels/ (igpt_fast.kernels), here or in a child Python started in the checkout (the harness sees to both)."""
    from igpt_fast import kernels as ours

    checkout = Path(ours.__file__).resolve().parent.parent
    child = subprocess.run([sys.executable, "-c", "import importlib.util as u; s = u.find_spec('kernels'); "
                            "print(s.origin if s else None)"], cwd=checkout, capture_output=True, text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    for origin in (str(getattr(importlib.util.find_spec("kernels"), "origin", None)), child.stdout.strip()):
        assert origin == "None" or Path(origin).resolve() != Path(ours.__file__).resolve()


def test_save_then_transformers_load_then_our_load(tmp_path):
    state = make_checkpoint(tmp_path / "ours")
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "ours")
    hf_state = {k: v for k, v in hf.state_dict().items() if not is_legacy_buffer(k)}
    assert_same_state(hf_state, state)
    hf.save_pretrained(tmp_path / "theirs")
    loaded = load_checkpoint(tmp_path / "theirs")
    assert loaded.config == TINY
    assert_same_state(loaded.state_dict, state)
    # the processor transformers loads from our preprocessor_config.json has our clusters
    processor = transformers.ImageGPTImageProcessorPil.from_pretrained(tmp_path / "ours")
    np.testing.assert_array_equal(np.asarray(processor.clusters, dtype=np.float32),
                                  load_checkpoint(tmp_path / "ours").clusters)


def test_a_model_saves_itself_in_its_dtype_for_both_loaders(tmp_path):
    from igpt_fast import ImageGPT

    state = make_checkpoint(tmp_path / "source")
    model = ImageGPT.from_pretrained(tmp_path / "source", backend="torch").half()
    model.save_pretrained(tmp_path / "half")
    saved = load_checkpoint(tmp_path / "half")
    assert saved.config == model.config
    assert all(saved.state_dict[k].dtype == torch.float16 and torch.equal(saved.state_dict[k], v.half())
               for k, v in state.items())
    again = ImageGPT.from_pretrained(tmp_path / "half", dtype="auto", backend="torch")
    ids = torch.randint(0, TINY.vocab_size, (2, 9))
    assert again.dtype == torch.float16 and torch.equal(again(ids).logits, model(ids).logits)
    transformers = pytest.importorskip("transformers")
    hf = transformers.ImageGPTForCausalImageModeling.from_pretrained(tmp_path / "half", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, ImageGPT(TINY, {k: v.half().float() for k, v in state.items()},
                                                             backend="torch")(ids).logits, rtol=1e-5, atol=1e-5)


def test_generation_defaults_a_checkpoint_sets_are_named_not_silently_dropped(tmp_path):
    """transformers' generate() takes its defaults from generation_config.json; ours does not read it, and says so
    when the file sets any (a folder's do_sample=True would otherwise decode greedily without a word)."""
    import warnings

    from igpt_fast import ImageGPT

    make_checkpoint(tmp_path)
    transformers.GenerationConfig().save_pretrained(tmp_path)  # what save_pretrained writes for a plain model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ImageGPT.from_pretrained(tmp_path, backend="torch")
    transformers.GenerationConfig(do_sample=True, top_k=2, pad_token_id=0).save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match=r"generation_config.json sets do_sample=True, top_k=2; igpt-fast's "
                                         r"generate\(\) does not read generation_config.json: pass these"):
        ImageGPT.from_pretrained(tmp_path, backend="torch")


def test_pickle_with_legacy_buffers(tmp_path):
    state = random_state_dict(TINY, seed=4)
    legacy = dict(state)
    for i in range(TINY.n_layer):  # what older .bin files carry besides parameters
        legacy[f"transformer.h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 24, 24, dtype=torch.uint8))
        legacy[f"transformer.h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    TINY.to_json_file(tmp_path / "config.json")
    torch.save(legacy, tmp_path / "pytorch_model.bin")
    loaded = load_checkpoint(tmp_path)
    assert_same_state(loaded.state_dict, state)  # c_attn.bias kept, only the masks dropped
    assert loaded.clusters is None


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_sharded_weights(tmp_path, kind, monkeypatch):
    """model-0000i-of-00002.safetensors with model.safetensors.index.json, or older transformers' pickled shards
    pytorch_model-0000i-of-00002.bin with pytorch_model.bin.index.json (read with weights_only=True, as one .bin is)."""
    from safetensors.torch import save_file

    state = random_state_dict(TINY, seed=6)
    TINY.to_json_file(tmp_path / "config.json")
    keys = sorted(state)
    prefix, suffix = ("model", "safetensors") if kind == "safetensors" else ("pytorch_model", "bin")
    shards = {f"{prefix}-00001-of-00002.{suffix}": keys[: len(keys) // 2],
              f"{prefix}-00002-of-00002.{suffix}": keys[len(keys) // 2:]}
    weight_map = {}
    for name, shard_keys in shards.items():
        (save_file if kind == "safetensors" else torch.save)({k: state[k] for k in shard_keys}, tmp_path / name)
        weight_map.update({k: name for k in shard_keys})
    index = tmp_path / f"{prefix}.{suffix}.index.json"
    if kind == "bin":  # a shard that runs code when unpickled is refused, and runs nothing
        monkeypatch.chdir(tmp_path)
        with open(tmp_path / "evil.bin", "wb") as f:
            pickle.dump({keys[0]: _RunsCode()}, f)
        index.write_text(json.dumps({"metadata": {}, "weight_map": {**weight_map, keys[0]: "evil.bin"}}))
        with pytest.raises(ValueError, match="weights_only=True"):
            load_checkpoint(tmp_path)
        assert not (tmp_path / "pwned.txt").exists()
    index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_state(load_checkpoint(tmp_path).state_dict, state)
    for malformed in (keys, {keys[0]: 5}, {keys[0]: None}, None):
        index.write_text(json.dumps({"metadata": {}, "weight_map": malformed}))
        with pytest.raises(ValueError, match="'weight_map' must map each key to a shard's file name"):
            load_checkpoint(tmp_path)


def test_hub_id_resolves_offline_from_the_cache(tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    cache = tmp_path / "hub"
    snapshot = cache / "models--openai--imagegpt-tiny" / "snapshots" / "0123abcd"
    state = make_checkpoint(snapshot)
    (cache / "models--openai--imagegpt-tiny" / "refs").mkdir()
    (cache / "models--openai--imagegpt-tiny" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = load_checkpoint("openai/imagegpt-tiny")
    assert_same_state(loaded.state_dict, state)
    with pytest.raises(FileNotFoundError, match="openai/imagegpt-missing"):
        load_checkpoint("openai/imagegpt-missing")


def test_hub_options_pick_the_cache_folder_and_the_revision(tmp_path, monkeypatch):
    """cache_dir, revision and local_files_only as transformers' from_pretrained takes them, for the model and the
    image processor alike."""
    pytest.importorskip("huggingface_hub")
    from igpt_fast import ImageGPT, ImageProcessor

    cache = tmp_path / "elsewhere"
    repo = cache / "models--openai--imagegpt-tiny"
    states = {}
    for ref, commit, seed in (("main", "0123abcd", 1), ("v1", "4567ef01", 2)):
        states[ref] = make_checkpoint(repo / "snapshots" / commit, seed=seed)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # nothing may reach the network here
    for ref, options in (("main", {}), ("v1", {"revision": "v1"})):
        loaded = load_checkpoint("openai/imagegpt-tiny", cache_dir=cache, **options)
        assert_same_state(loaded.state_dict, states[ref])
    model = ImageGPT.from_pretrained("openai/imagegpt-tiny", cache_dir=cache, revision="v1", local_files_only=True)
    assert torch.equal(model._state_dict["lm_head.weight"], states["v1"]["lm_head.weight"])
    assert ImageProcessor.from_pretrained("openai/imagegpt-tiny", cache_dir=cache).n_clusters == TINY.n_clusters
    with pytest.raises(FileNotFoundError, match=r"revision v2\) is not in the Hugging Face cache .* local_files_only"):
        load_checkpoint("openai/imagegpt-tiny", cache_dir=cache, revision="v2", local_files_only=True)


def test_reference_from_pretrained_matches_saved_weights(tmp_path):
    state = make_checkpoint(tmp_path)
    ref = ReferenceImageGPT.from_pretrained(tmp_path)
    ids = torch.randint(0, TINY.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(ref(ids).logits, hf_twin(TINY, state)(ids).logits, atol=1e-5, rtol=1e-5)


# ---- bad checkpoints: each a clear error, nothing half-built ----

def _folder_with(tmp_path, state, config=TINY):
    config.to_json_file(tmp_path / "config.json")
    from safetensors.torch import save_file

    save_file(state, tmp_path / "model.safetensors")
    return tmp_path


def test_missing_extra_and_misshapen_keys_are_listed(tmp_path):
    state = random_state_dict(TINY)
    del state["transformer.h.1.mlp.c_fc.bias"]
    state["transformer.h.0.attn.extra"] = torch.zeros(3)
    state["lm_head.weight"] = torch.zeros(5, TINY.n_embd)
    with pytest.raises(ValueError) as err:
        load_checkpoint(_folder_with(tmp_path, state))
    message = str(err.value)
    assert "missing keys (1): transformer.h.1.mlp.c_fc.bias" in message
    assert "unexpected keys (1): transformer.h.0.attn.extra" in message
    assert f"lm_head.weight: checkpoint (5, {TINY.n_embd}), config expects ({TINY.n_clusters}, {TINY.n_embd})" \
        in message


def test_config_that_disagrees_with_weights(tmp_path):
    state = random_state_dict(TINY)
    with pytest.raises(ValueError, match="shape mismatches"):
        load_checkpoint(_folder_with(tmp_path, state, TINY.replace(n_embd=64)))
    with pytest.raises(ValueError, match=r"missing keys \(10\)"):
        load_checkpoint(_folder_with(tmp_path, state, TINY.replace(n_layer=3)))


def test_truncated_safetensors(tmp_path):
    make_checkpoint(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot read .*model.safetensors"):
        load_checkpoint(tmp_path)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_pickle_that_tries_to_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    TINY.to_json_file(tmp_path / "config.json")
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"transformer.wte.weight": _RunsCode()}, f)
    with pytest.raises(ValueError, match="weights_only=True") as refused:
        load_checkpoint(tmp_path)
    assert not (tmp_path / "pwned.txt").exists()
    assert "weights_only=False" not in str(refused.value) and "weights_only` set to `False`" not in str(refused.value)


def test_nan_or_infinite_weights_are_refused(tmp_path):
    state = random_state_dict(TINY)
    state["transformer.h.0.ln_1.weight"][3] = float("nan")
    state["lm_head.weight"][0, :2] = float("inf")
    with pytest.raises(ValueError, match=r"NaN or infinite values \(2\)") as refused:
        load_checkpoint(_folder_with(tmp_path, state))
    assert "transformer.h.0.ln_1.weight: 1 of 32" in str(refused.value)
    assert "lm_head.weight: 2 of 544" in str(refused.value)


def test_missing_files_and_bad_json(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint folder"):
        load_checkpoint(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_checkpoint(tmp_path)
    TINY.to_json_file(tmp_path / "config.json")
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_checkpoint(tmp_path)


def test_clusters_must_match_the_vocabulary(tmp_path):
    state = random_state_dict(TINY)
    save_pretrained(tmp_path, TINY, state, clusters=random_clusters(TINY.n_clusters))
    data = json.loads((tmp_path / "preprocessor_config.json").read_text())
    data["clusters"] = data["clusters"][:-1]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=f"{TINY.n_clusters - 1} clusters"):
        load_checkpoint(tmp_path)
    data["clusters"] = [["red", "green", "blue"]] * TINY.n_clusters
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"preprocessor_config.json: clusters must be \[n_clusters, 3\] numbers"):
        load_checkpoint(tmp_path)
