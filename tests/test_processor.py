"""ImageProcessor against transformers' ImageGPTImageProcessorPil: same ids, same files, exact decode."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from helpers import random_clusters

import igpt_fast.processor as processor_module
from igpt_fast.checkpoint import PREPROCESSOR_NAME, load_clusters
from igpt_fast.processor import ImageProcessor

PIL = pytest.importorskip("PIL.Image")
transformers = pytest.importorskip("transformers")


@pytest.fixture(params=["kernel", "torch"])
def quantize_path(request, monkeypatch):
    """Run each test through the Triton kernels (interpreter / CUDA) and through the PyTorch stand-ins."""
    if request.param == "torch":
        monkeypatch.setattr(processor_module, "use_triton", lambda device: False)
    return request.param


def random_images(shapes, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8) for h, w in shapes]


def hf_processor(clusters, size):
    return transformers.ImageGPTImageProcessorPil(clusters=clusters, size={"height": size, "width": size})


def assert_ids_match_up_to_near_ties(ids, expected, pixels, clusters):
    """Equal ids, except where the two nearest clusters are within 1e-5 in squared distance (float rounding
    of the distance, which transformers computes as |x|^2 - 2 x.c + |c|^2, may pick either there)."""
    assert ids.shape == expected.shape, (ids.shape, expected.shape)
    x = pixels.reshape(-1, 3).astype(np.float64) / 127.5 - 1.0
    distances = ((x[:, None, :] - clusters.astype(np.float64)[None]) ** 2).sum(-1)
    two_nearest = np.sort(distances, axis=1)[:, :2]
    clear = (two_nearest[:, 1] - two_nearest[:, 0]) > 1e-5
    mismatched = ids.reshape(-1) != expected.reshape(-1)
    assert not (mismatched & clear).any(), (
        f"{(mismatched & clear).sum()} of {clear.sum()} pixels with a clear nearest cluster got another id; "
        f"first at flat index {np.flatnonzero(mismatched & clear)[:5]}"
    )
    assert clear.mean() > 0.99  # the comparison covers nearly every pixel


@pytest.mark.parametrize("n_clusters", [512, 17])
@pytest.mark.parametrize("shapes", [[(32, 32)], [(17, 45), (64, 48), (5, 2)]], ids=["32x32", "resized"])
def test_ids_match_transformers(quantize_path, n_clusters, shapes):
    clusters = random_clusters(n_clusters, seed=n_clusters + len(shapes))
    images = random_images(shapes, seed=len(shapes))
    ids = ImageProcessor(clusters, size=32)(images)["input_ids"]
    expected = hf_processor(clusters, 32)(images, return_tensors="pt")["input_ids"]
    assert ids.dtype == torch.int64 and ids.shape == (len(images), 32 * 32)
    resized = np.stack([np.asarray(PIL.fromarray(im).resize((32, 32), PIL.BILINEAR)) for im in images])
    assert_ids_match_up_to_near_ties(ids.numpy(), expected.numpy(), resized, clusters)


def test_input_kinds_give_the_same_ids(quantize_path):
    clusters = random_clusters(33, seed=3)
    image = random_images([(20, 12)], seed=4)[0]
    processor = ImageProcessor(clusters, size=8)
    from_numpy = processor(image)["input_ids"]
    assert from_numpy.shape == (1, 64)
    for other in (PIL.fromarray(image), torch.from_numpy(image), [image], (torch.from_numpy(image),)):
        torch.testing.assert_close(processor(other).input_ids, from_numpy, rtol=0, atol=0)
    gray = PIL.fromarray(image).convert("L")  # any PIL mode is read as RGB
    torch.testing.assert_close(
        processor(gray).input_ids, processor(gray.convert("RGB")).input_ids, rtol=0, atol=0
    )
    as_numpy = processor([image, image], return_tensors="np")["input_ids"]
    assert isinstance(as_numpy, np.ndarray) and as_numpy.dtype == np.int64
    np.testing.assert_array_equal(as_numpy, np.concatenate([from_numpy.numpy()] * 2))


def test_a_4d_batch_and_moving_the_output_as_transformers_does(quantize_path):
    clusters = random_clusters(17, seed=5)
    images = random_images([(20, 12)] * 3, seed=6)
    processor = ImageProcessor(clusters, size=8)
    one_by_one = processor(images)["input_ids"]
    for batch in (np.stack(images), torch.from_numpy(np.stack(images))):  # [N, H, W, 3], not "image 0"
        torch.testing.assert_close(processor(batch)["input_ids"], one_by_one, rtol=0, atol=0)
    expected = hf_processor(clusters, 8)(np.stack(images), return_tensors="pt")["input_ids"]
    resized = np.stack([np.asarray(PIL.fromarray(im).resize((8, 8), PIL.BILINEAR)) for im in images])
    assert_ids_match_up_to_near_ties(one_by_one.numpy(), expected.numpy(), resized, clusters)
    # BatchFeature.to: in place, returns the output; a dtype leaves the integer ids alone
    output = processor(images, return_tensors="pt")
    assert output.to("cpu") is output and output.to(torch.device("cpu"), torch.float16).input_ids.dtype == torch.int64
    assert output.to(device="cpu").input_ids.device == torch.device("cpu")
    with pytest.raises(AttributeError, match=r"'pixel_values' \(the processor's output holds \['input_ids'\]\)"):
        _ = output.pixel_values


def test_settings_it_does_not_implement_are_refused(tmp_path):
    ImageProcessor(random_clusters(5), size=4).save_pretrained(tmp_path)
    path = tmp_path / PREPROCESSOR_NAME
    saved = json.loads(path.read_text())
    # what transformers 5 writes for its defaults is read as the same processor
    path.write_text(json.dumps({**saved, "do_rescale": True, "rescale_factor": 1 / 255, "image_mean": [0.5] * 3,
                                "image_std": 0.5, "do_color_quantize": True}))
    assert ImageProcessor.from_pretrained(tmp_path).size == 4
    # no size: transformers' default of 256 x 256, as its processor reads the file (this one said 32)
    path.write_text(json.dumps({"clusters": saved["clusters"]}))
    assert ImageProcessor.from_pretrained(tmp_path).size == 256
    if importlib.util.find_spec("transformers") is not None:
        import transformers

        assert transformers.ImageGPTImageProcessorPil.from_pretrained(tmp_path).size["height"] == 256
    # what the file holds that the processor refuses names the file
    path.write_text(json.dumps({**saved, "clusters": [["abc", 0, 0]] * 5}))
    with pytest.raises(ValueError, match=f"{PREPROCESSOR_NAME}: could not convert string to float"):
        ImageProcessor.from_pretrained(tmp_path)
    for key, value in [("do_normalize", False), ("do_resize", False), ("do_color_quantize", False),
                       ("image_mean", [0.485, 0.456, 0.406]), ("rescale_factor", 1.0)]:
        path.write_text(json.dumps({**saved, key: value}))
        with pytest.raises(ValueError, match=f"sets {key}="):
            ImageProcessor.from_pretrained(tmp_path)


def test_size_is_an_int_and_a_dict():
    image = np.arange(16 * 16 * 3).reshape(16 * 16 * 3) % 256
    for size in (16, {"height": 16, "width": 16}):
        processor = ImageProcessor(random_clusters(4), size=size)
        n_px = processor.size
        assert n_px == 16 and isinstance(n_px, int)
        assert np.reshape(image, [n_px, n_px, 3]).shape == (16, 16, 3)
        assert processor.size["height"] == 16 and processor.size["width"] == 16
        assert dict(processor.size.to_dict()) == {"height": 16, "width": 16}
        assert processor.size.height == processor.size.width == 16  # transformers 5's SizeDict attributes
        assert "height" in processor.size and "shortest_edge" not in processor.size
    with pytest.raises(KeyError, match="shortest_edge"):
        processor.size["shortest_edge"]
    with pytest.raises(ValueError, match="square"):
        ImageProcessor(random_clusters(4), size={"height": 16, "width": 8})
    for bad in (0, -3, 2.5, True, {"shortest_edge": 16}):
        with pytest.raises(ValueError, match="size"):
            ImageProcessor(random_clusters(4), size=bad)


def test_save_and_load_round_trip(tmp_path, quantize_path):
    clusters = random_clusters(24, seed=7)
    processor = ImageProcessor(clusters, size=12, resample=3)
    processor.save_pretrained(tmp_path)
    loaded = ImageProcessor.from_pretrained(tmp_path)
    np.testing.assert_array_equal(loaded.clusters, clusters)
    assert loaded.clusters.dtype == np.float64 and loaded.size == 12 and loaded.resample == 3
    np.testing.assert_array_equal(load_clusters(tmp_path), clusters)  # what load_checkpoint reads
    saved = json.loads((tmp_path / PREPROCESSOR_NAME).read_text())
    assert saved["size"] == {"height": 12, "width": 12} and saved["resample"] == 3
    # transformers reads the same file and gets the same ids.
    hf = transformers.ImageGPTImageProcessorPil.from_pretrained(tmp_path)
    # The model card decodes with numpy from `.clusters`: the same table, to the bit and dtype, as transformers'.
    np.testing.assert_array_equal(np.asarray(hf.clusters), loaded.clusters)
    assert np.asarray(hf.clusters).dtype == loaded.clusters.dtype
    images = random_images([(30, 25), (12, 12)], seed=8)
    resized = np.stack([np.asarray(PIL.fromarray(im).resize((12, 12), PIL.BICUBIC)) for im in images])
    assert_ids_match_up_to_near_ties(
        loaded(images)["input_ids"].numpy(), hf(images, return_tensors="np")["input_ids"], resized, clusters
    )


def test_decode_is_the_exact_formula(quantize_path):
    clusters = random_clusters(40, seed=9)
    clusters[0], clusters[1] = [-1, -1, -1], [1, 1, 1]  # the extremes map to 0 and 255
    processor = ImageProcessor(clusters, size=5)
    ids = torch.from_numpy(np.random.default_rng(10).integers(0, 40, size=(3, 25)))
    ids[0, :2] = torch.tensor([0, 1])
    expected = np.rint(127.5 * (clusters[ids.numpy()] + 1)).astype(np.uint8).reshape(3, 5, 5, 3)
    decoded = processor.decode(ids)
    assert decoded.dtype == np.uint8 and decoded.shape == (3, 5, 5, 3)
    np.testing.assert_array_equal(decoded, expected)
    assert decoded[0, 0, 0].tolist() == [0, 0, 0] and decoded[0, 0, 1].tolist() == [255, 255, 255]
    np.testing.assert_array_equal(processor.decode(ids[1].numpy()), expected[1:2])  # one image, numpy ids


def test_decode_then_encode_returns_the_ids(quantize_path):
    clusters = random_clusters(16, seed=11)
    gaps = np.linalg.norm(clusters[:, None] - clusters[None], axis=-1) + np.eye(16) * 10
    assert gaps.min() > 0.05  # far apart next to the 0.5 / 127.5 rounding of decode
    processor = ImageProcessor(clusters, size=7)
    ids = torch.from_numpy(np.random.default_rng(12).integers(0, 16, size=(2, 49)))
    torch.testing.assert_close(processor(list(processor.decode(ids)))["input_ids"], ids, rtol=0, atol=0)


def test_bad_inputs_raise_clear_errors(quantize_path, tmp_path):
    processor = ImageProcessor(random_clusters(8), size=4)
    cases = [
        (np.zeros((4, 4, 3), dtype=np.float32), ValueError, "dtype float32"),
        (np.zeros((4, 4), dtype=np.uint8), ValueError, r"shape \(4, 4\)"),
        (torch.zeros(3, 4, 4, dtype=torch.uint8), ValueError, r"shape \(3, 4, 4\)"),
        (np.zeros((4, 4, 4), dtype=np.uint8), ValueError, "H, W, 3"),
        ("cat.png", TypeError, "str"),
        ([], ValueError, "empty"),
        ([np.zeros((4, 4, 3), dtype=np.uint8), 7], TypeError, "image 1 is a int"),
    ]
    for images, error, message in cases:
        with pytest.raises(error, match=message):
            processor(images)
    with pytest.raises(ValueError, match="return_tensors"):
        processor(np.zeros((4, 4, 3), dtype=np.uint8), return_tensors="tf")
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        processor.decode(torch.full((1, 16), 8))
    with pytest.raises(ValueError, match=r"\[0, 8\)"):
        processor.decode(torch.full((1, 16), -1))
    with pytest.raises(ValueError, match=r"\[N, 16\]"):
        processor.decode(torch.zeros(2, 15, dtype=torch.int64))
    with pytest.raises(ValueError, match="integer"):
        processor.decode(torch.zeros(1, 16))
    with pytest.raises(TypeError, match="list"):
        processor.decode([0] * 16)
    with pytest.raises(ValueError, match=r"\[n_clusters, 3\]"):
        ImageProcessor(np.zeros((8, 4)))
    with pytest.raises(ValueError, match=r"clusters hold values up to 255; expected RGB scaled to \[-1, 1\]"):
        ImageProcessor(np.linspace(0, 255, 24).reshape(8, 3))  # pixel values: every image was one color, silently
    with pytest.raises(ValueError, match="resample"):
        ImageProcessor(random_clusters(8), resample=9)
    with pytest.raises(FileNotFoundError, match=PREPROCESSOR_NAME):
        ImageProcessor.from_pretrained(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="device 'cuda' requested but CUDA is not available"):
        ImageProcessor(random_clusters(4), size=4)(np.zeros((4, 4, 3), dtype=np.uint8), device="cuda")


def test_a_device_that_holds_no_data_is_refused():
    with pytest.raises(ValueError, match="device must be a CPU or CUDA device, got 'meta'"):
        ImageProcessor(random_clusters(4), size=4)(np.zeros((4, 4, 3), dtype=np.uint8), device="meta")


def test_pil_images_of_wider_than_8_bit_pixels_or_no_pixels_are_refused(quantize_path):
    # convert("RGB") clips 16-bit, 32-bit and float pixels to [0, 255]: a 16-bit image read as all white, with
    # no error; a 0x0 image resized to black
    processor = ImageProcessor(random_clusters(8), size=4)
    fine = PIL.new("RGB", (4, 4))
    cases = [
        (PIL.fromarray(np.full((4, 4), 40000, dtype=np.uint16)), r"image 1 has PIL mode 'I;16' \(16-bit"),
        (PIL.fromarray(np.full((4, 4), 300, dtype=np.int32)), "image 1 has PIL mode 'I' "),
        (PIL.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), "image 1 has PIL mode 'F' "),
        (PIL.new("RGB", (0, 0)), "image 1 is 0x0 pixels; expected at least 1x1"),
        (PIL.new("L", (5, 0)), "image 1 is 5x0 pixels"),
    ]
    for image, message in cases:
        with pytest.raises(ValueError, match=message):
            processor([fine, image])
    for mode in ("1", "L", "LA", "P", "RGBA", "CMYK", "YCbCr"):  # 8-bit modes are read as RGB
        image = PIL.new(mode, (4, 4))
        torch.testing.assert_close(processor(image).input_ids, processor(image.convert("RGB")).input_ids)
    with pytest.raises(ValueError, match=r"empty batch of shape \(0, 4, 4, 3\)"):
        processor(np.zeros((0, 4, 4, 3), dtype=np.uint8))


def test_decode_reads_reversed_and_unsigned_numpy_ids(quantize_path):
    processor = ImageProcessor(random_clusters(8, seed=13), size=4)
    ids = np.random.default_rng(14).integers(0, 8, size=(2, 16))
    reversed_ids = ids[:, ::-1]  # a negative stride, which torch.from_numpy cannot view
    np.testing.assert_array_equal(processor.decode(reversed_ids), processor.decode(reversed_ids.copy()))
    np.testing.assert_array_equal(processor.decode(ids.astype(np.uint64)), processor.decode(ids))
    huge = np.full((1, 16), 2**64 - 1, dtype=np.uint64)  # -1 once cast to int64: name the id the user passed
    with pytest.raises(ValueError, match=r"cluster id 18446744073709551615; ids must lie in \[0, 8\)"):
        processor.decode(huge)
