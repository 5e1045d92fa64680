"""The public model card's generation code runs with only its import line changed."""

import json

import numpy as np
import pytest
import torch
from helpers import random_clusters, random_state_dict

import igpt_fast.model
from igpt_fast import ImageGPT, ImageGPTConfig, demo_model_path, save_pretrained

CARD_CONFIG = ImageGPTConfig(vocab_size=65, n_positions=36, n_embd=32, n_layer=2, n_head=2)  # 6x6 images


def test_model_card_snippet(tmp_path):
    save_pretrained(tmp_path, CARD_CONFIG, random_state_dict(CARD_CONFIG, seed=1),
                    clusters=random_clusters(CARD_CONFIG.n_clusters), image_size=6)
    CHECKPOINT = str(tmp_path)

    # ---- the model card, verbatim but for the import line and the checkpoint ----
    from igpt_fast import ImageGPTFeatureExtractor, ImageGPTForCausalImageModeling
    feature_extractor = ImageGPTFeatureExtractor.from_pretrained(CHECKPOINT)
    model = ImageGPTForCausalImageModeling.from_pretrained(CHECKPOINT)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    batch_size = 8
    context = torch.full((batch_size, 1), model.config.vocab_size - 1)
    context = torch.tensor(context).to(device)
    output = model.generate(pixel_values=context, max_length=model.config.n_positions + 1,
                            temperature=1.0, do_sample=True, top_k=40)
    clusters = feature_extractor.clusters
    n_px = feature_extractor.size
    samples = output[:, 1:].cpu().detach().numpy()
    samples_img = [np.reshape(np.rint(127.5 * (clusters[s] + 1.0)), [n_px, n_px, 3]).astype(np.uint8)
                   for s in samples]
    # ---- end of the card ----

    assert len(samples_img) == 8 and samples_img[0].shape == (6, 6, 3)
    assert feature_extractor.size["height"] == 6 and feature_extractor.size["width"] == 6
    # the card's numpy decoding equals the processor's
    np.testing.assert_array_equal(np.stack(samples_img), feature_extractor.decode(output[:, 1:].cpu()))


def test_model_card_call_on_the_shipped_demo_model():
    """The card's top_k=40 on the demo model's 16 colors keeps them all, as transformers clamps it (not an error)."""
    from igpt_fast import ImageGPTFeatureExtractor, ImageGPTForCausalImageModeling
    feature_extractor = ImageGPTFeatureExtractor.from_pretrained(demo_model_path())
    model = ImageGPTForCausalImageModeling.from_pretrained(demo_model_path())
    assert model.config.n_clusters < 40
    context = torch.full((2, 1), model.config.vocab_size - 1)
    output = model.generate(input_ids=context, max_length=model.config.n_positions + 1, temperature=1.0,
                            do_sample=True, top_k=40, seed=0)
    assert output.shape == (2, model.config.n_positions + 1)
    assert feature_extractor.decode(output[:, 1:]).shape == (2, *[int(feature_extractor.size)] * 2, 3)


def test_from_pretrained_takes_transformers_dtype_names(tmp_path):
    save_pretrained(tmp_path, CARD_CONFIG, random_state_dict(CARD_CONFIG, seed=2))
    assert ImageGPT.from_pretrained(tmp_path, torch_dtype=torch.float16).dtype == torch.float16
    assert ImageGPT.from_pretrained(tmp_path, dtype=torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="disagree"):
        ImageGPT.from_pretrained(tmp_path, dtype=torch.float16, torch_dtype=torch.float32)
    # transformers also names dtypes, and "auto" is the dtype the weights are stored in (float32 here)
    assert ImageGPT.from_pretrained(tmp_path, torch_dtype="float16").dtype == torch.float16
    assert ImageGPT.from_pretrained(tmp_path, dtype="torch.bfloat16").dtype == torch.bfloat16
    assert ImageGPT.from_pretrained(tmp_path, torch_dtype="auto").dtype == torch.float32
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "dtype": "bfloat16"}))  # as transformers 5 writes it
    assert ImageGPT.from_pretrained(tmp_path, dtype="auto").dtype == torch.bfloat16  # config.json's first
    with pytest.raises(ValueError, match="dtype must be one of .* got 'fp16'"):
        ImageGPT.from_pretrained(tmp_path, dtype="fp16")


def test_from_pretrained_takes_a_one_device_map_and_checks_arguments_before_loading(tmp_path, monkeypatch):
    save_pretrained(tmp_path, CARD_CONFIG, random_state_dict(CARD_CONFIG, seed=3))
    for device_map in ("cpu", {"": "cpu"}, torch.device("cpu")):
        assert ImageGPT.from_pretrained(tmp_path, device_map=device_map).device == torch.device("cpu")
    expected = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    assert ImageGPT.from_pretrained(tmp_path, device_map="auto").device.type == expected.type

    def no_loading(path):
        raise AssertionError("the weights were read before the arguments were checked")

    monkeypatch.setattr(igpt_fast.model, "load_checkpoint", no_loading)
    cases = [(dict(device_map={"transformer": 0, "lm_head": "cpu"}), "one device"),
             (dict(device_map="balanced"), "one device"),
             (dict(device="cpu", device_map="cuda"), "disagree"),
             (dict(low_cpu_mem_usage=True), r"does not use: \['low_cpu_mem_usage'\]"),
             (dict(dtype=torch.float64), "dtype must be one of"),
             (dict(max_batch=3), "max_batch must be one of"),
             (dict(backend="cuda"), "backend must be"),
             (dict(device="mps"), "CPU or CUDA device"),
             (dict(device="cpu", backend="triton", dtype="bfloat16"), "bfloat16|TRITON_INTERPRET")]
    if not torch.cuda.is_available():
        cases.append((dict(device="cuda"), "CUDA is not available"))
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            ImageGPT.from_pretrained(tmp_path, **kwargs)


def test_module_shorthands_for_to(tmp_path):
    save_pretrained(tmp_path, CARD_CONFIG, random_state_dict(CARD_CONFIG, seed=4))
    model = ImageGPT.from_pretrained(tmp_path)
    ids = torch.randint(0, CARD_CONFIG.vocab_size, (1, 5))
    logits = model(ids).logits
    assert model.half() is model and model.dtype == torch.float16
    assert model.bfloat16().dtype == torch.bfloat16
    assert model.float().dtype == torch.float32 and model.cpu().device == torch.device("cpu")
    torch.testing.assert_close(model(ids).logits, logits)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            model.cuda()


def test_outputs_index_like_transformers_model_outputs():
    model = ImageGPT.from_pretrained(demo_model_path())
    ids = torch.full((2, 3), model.config.sos_token_id)
    out = model(ids)
    assert out[0] is out["logits"] is out.logits and len(out[:]) == 1
    generated = model.generate(ids[:, :1], max_new_tokens=2, return_dict_in_generate=True)
    assert generated["sequences"] is generated[0] is generated.sequences and len(generated[:]) == 1  # logits None
    with pytest.raises(KeyError, match="logits"):
        generated["logits"]  # not asked for (output_logits=False), as transformers leaves it out
    with pytest.raises(KeyError, match="loss"):
        out["loss"]
