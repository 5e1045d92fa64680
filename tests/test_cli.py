"""The igpt-fast command on the shipped demo model: files written and readable, exit codes, one-line errors."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import make_checkpoint
from PIL import Image

from igpt_fast import ImageGPT, ImageProcessor, demo_model_path, load_checkpoint
from igpt_fast.cli import main


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_with_no_checkpoint_uses_the_demo_model(tmp_path, capsys):
    grid, ids_path = tmp_path / "grid.png", tmp_path / "ids.npy"
    code, out, err = run(["generate", "-n", "3", "--batch-size", "2", "-o", str(grid), "--save-ids",
                          str(ids_path), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "wrote 3 images" in out and "images/s" in out
    processor = ImageProcessor.from_pretrained(demo_model_path())
    side = int(processor.size)
    assert "generating: 100%" in err and f"{3 * side * side}/{3 * side * side} [" in err  # a bar over the pixels
    ids = np.load(ids_path)
    assert ids.shape == (3, side * side) and ids.max() < processor.n_clusters
    with Image.open(grid) as picture:
        assert picture.format == "PNG" and picture.mode == "RGB"
        assert picture.width > 3 * side
    # the same seed gives the same images, whatever the batch size
    again = tmp_path / "again.npy"
    assert main(["generate", "-n", "3", "--batch-size", "3", "-o", str(tmp_path / "g2.png"), "--save-ids",
                 str(again), "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.load(again), ids)
    # another seed, other images: none of seed 1's is one of seed 0's (its first was seed 0's second when each batch
    # took --seed + its first image's index, and a row's stream was its seed + the row)
    other = tmp_path / "other.npy"
    assert main(["generate", "-n", "3", "--seed", "1", "-o", str(tmp_path / "g4.png"), "--save-ids", str(other),
                 "--device", "cpu"]) == 0
    assert not any((row == ids).all(axis=1).any() for row in np.load(other))
    # --top-k 0 is off, like 40 on the demo model's 16 colors: every color kept, the same images
    assert main(["generate", "-n", "3", "--top-k", "0", "-o", str(tmp_path / "g3.png"), "--save-ids", str(again),
                 "--device", "cpu"]) == 0
    np.testing.assert_array_equal(np.load(again), ids)


def test_complete_keeps_the_top_rows_exactly(tmp_path, capsys):
    processor = ImageProcessor.from_pretrained(demo_model_path())
    side = int(processor.size)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        path = tmp_path / f"in{i}.png"
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    out_png = tmp_path / "completions.png"
    code, out, err = run(["complete", *paths, "--rows", "5", "--samples", "3", "-o", str(out_png),
                          "--device", "cpu"], capsys)
    assert code == 0, err
    assert "top 5 of" in out
    new_pixels = 2 * 3 * (side * side - 5 * side)  # 2 images x 3 samples
    assert "completing: 100%" in err and f"{new_pixels / 1000:.2f}k/{new_pixels / 1000:.2f}k [" in err
    with Image.open(out_png) as picture:
        grid = np.asarray(picture)
    scale = max(1, 64 // side)
    tile = side * scale
    originals = processor.decode(processor([Image.open(p).convert("RGB") for p in paths])["input_ids"])
    for row in range(2):
        top = 2 + row * (tile + 2)
        for column in range(2, 5):  # the completions
            left = 2 + column * (tile + 2)
            completion = grid[top:top + tile:scale, left:left + tile:scale]
            np.testing.assert_array_equal(completion[:5], originals[row, :5])


def _pixel_files(tmp_path, side):
    """Two PNG files and a .npy dataset of three images (other sizes than the model's: the processor resizes)."""
    rng = np.random.default_rng(1)
    paths = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (side + i, side, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    dataset = rng.integers(0, 256, (3, side, side + 2, 3), dtype=np.uint8)
    np.save(tmp_path / "set.npy", dataset)
    images = [Image.open(path).convert("RGB") for path in paths] + list(dataset)
    return [*paths, str(tmp_path / "set.npy")], images


def test_features_are_the_models_in_input_order(tmp_path, capsys):
    model = ImageGPT.from_pretrained(demo_model_path())
    processor = ImageProcessor.from_pretrained(demo_model_path())
    paths, images = _pixel_files(tmp_path, int(processor.size))
    out = tmp_path / "features.npy"
    code, stdout, err = run(["features", *paths, "--layer", "2", "--batch-size", "2", "-o", str(out),
                             "--device", "cpu"], capsys)
    assert code == 0, err
    assert f"wrote features [5, {model.config.n_embd}] of layer 2" in stdout
    expected = model.features(processor(images)["input_ids"], layer=2)
    np.testing.assert_allclose(np.load(out), expected.numpy(), rtol=1e-5, atol=1e-5)


def test_image_files_are_held_at_the_models_size_not_at_full_resolution(tmp_path):
    from igpt_fast.cli import _read_images

    processor = ImageProcessor.from_pretrained(demo_model_path())
    side = int(processor.size)
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 200, 3), dtype=np.uint8)).save(path)
    # every file was held as a full-size RGB image until the end: a folder of photos could exhaust the memory
    _, images = _read_images([str(path)], processor)
    assert images[0].shape == (side, side, 3) and images[0].dtype == np.uint8
    with Image.open(path) as photo:  # the same ids as from the full-size image
        torch.testing.assert_close(processor(images)["input_ids"], processor(photo)["input_ids"], rtol=0, atol=0)


def test_likelihood_prints_each_images_bits_and_the_mean(tmp_path, capsys):
    model = ImageGPT.from_pretrained(demo_model_path())
    processor = ImageProcessor.from_pretrained(demo_model_path())
    paths, images = _pixel_files(tmp_path, int(processor.size))
    digits = processor.decode(model.generate(torch.full((2, 1), model.config.sos_token_id), do_sample=True,
                                             seed=0)[:, 1:])  # the model's own samples
    np.save(tmp_path / "digits.npy", digits)
    (tmp_path / "digits.npy").rename(tmp_path / "digits.NPY")  # the extension in any case
    code, stdout, err = run(["likelihood", *paths, str(tmp_path / "digits.NPY"), "--batch-size", "3",
                             "--device", "cpu"], capsys)
    assert code == 0, err
    lines = stdout.strip().splitlines()
    names = [*paths[:2], *(f"{paths[2]}[{i}]" for i in range(3)),
             *(f"{tmp_path / 'digits.NPY'}[{i}]" for i in range(2))]
    assert [line.split("  ", 1)[1] for line in lines[:-1]] == names
    bits = np.array([float(line.split()[0]) for line in lines[:-1]])
    expected = model.log_likelihood(processor([*images, *digits])["input_ids"]).bits_per_dim.numpy()
    np.testing.assert_allclose(bits, expected, atol=1e-4)
    assert lines[-1].startswith(f"mean {expected.mean():.4f} bits per pixel token over 7 images")
    assert bits[5:].max() < 1.5 < 3 < bits[:5].min()  # its own digits are likely, noise is not


def test_convert_bin_folder_to_safetensors(tmp_path, capsys):
    source = tmp_path / "bin"
    state = make_checkpoint(source)
    (source / "model.safetensors").unlink()
    torch.save(state, source / "pytorch_model.bin")
    (source / "generation_config.json").write_text('{"transformers_version": "4.10.0"}')
    code, out, err = run(["convert", str(source), str(tmp_path / "st")], capsys)
    assert code == 0, err
    converted = load_checkpoint(tmp_path / "st")
    assert (tmp_path / "st" / "model.safetensors").is_file()
    assert all(torch.equal(converted.state_dict[k], state[k]) for k in state)
    for name in ("preprocessor_config.json", "generation_config.json"):  # copied as they were
        assert (tmp_path / "st" / name).read_text() == (source / name).read_text()


def test_convert_that_fails_midway_leaves_no_half_written_checkpoint(tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def disk_full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    code, _, err = run(["convert", str(demo_model_path()), str(tmp_path / "out")], capsys)
    assert code == 2 and "No space left on device" in err
    assert not any(tmp_path.iterdir())  # neither the destination nor the staging folder


def test_convert_refuses_an_empty_or_file_destination(tmp_path, capsys, monkeypatch):
    (tmp_path / "taken").write_text("keep")
    monkeypatch.chdir(tmp_path)
    code, _, err = run(["convert", str(demo_model_path()), ""], capsys)  # wrote config.json into the cwd
    assert code == 2 and "destination must name a folder, got ''" in err and sorted(tmp_path.iterdir()) == \
        [tmp_path / "taken"]
    code, _, err = run(["convert", str(demo_model_path()), "taken"], capsys)  # was "[Errno 17] File exists"
    assert code == 2 and "destination taken is a file; expected a folder to write" in err
    assert (tmp_path / "taken").read_text() == "keep"


def test_info_describes_the_demo_model(capsys):
    code, out, err = run(["info", "--device", "cpu"], capsys)
    assert code == 0, err
    config = ImageGPT.from_pretrained(demo_model_path()).config
    assert f"{config.num_parameters():,}" in out
    assert "PyTorch stand-ins" in out and "float32" in out


def test_info_needs_no_color_table_and_a_folder_without_config_is_no_checkpoint(tmp_path, capsys):
    make_checkpoint(tmp_path / "model")
    (tmp_path / "model" / "preprocessor_config.json").unlink()  # as transformers' model.save_pretrained leaves it
    code, out, err = run(["info", "--checkpoint", str(tmp_path / "model"), "--device", "cpu"], capsys)
    assert code == 0, err
    assert "no preprocessor_config.json: no color table" in out and "parameters" in out
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "preprocessor_config.json").write_text("{}")  # was reported as a processor without clusters
    code, _, err = run(["generate", "--checkpoint", str(tmp_path / "images"), "-n", "1", "-o",
                        str(tmp_path / "g.png"), "--device", "cpu"], capsys)
    assert code == 2 and f"{tmp_path / 'images'} is not a checkpoint folder: it has no config.json" in err


@pytest.mark.parametrize("args, message", [
    (["generate", "--checkpoint", "/nonexistent/folder", "--device", "cpu"], "no checkpoint folder"),
    (["generate", "-n", "0", "--device", "cpu"], "--num-images must be >= 1"),
    (["generate", "--top-p", "1.5", "-n", "1", "--device", "cpu"], "top_p must be a number in (0, 1]"),
    (["generate", "--temperature", "0", "-n", "1", "--device", "cpu"], "temperature must be"),
    (["generate", "--top-k", "-1", "-n", "1", "--device", "cpu"], "top_k"),
    (["complete", "/nonexistent.png", "--device", "cpu"], "no such image file: /nonexistent.png"),
    (["convert", "/nonexistent", "/tmp/x"], "no checkpoint folder"),
    (["features", "/nonexistent.npy", "--device", "cpu"], "no such image file: /nonexistent.npy"),
    (["generate", "-n", "1", "--seed", str(2**63), "--device", "cpu"],
     f"--seed must be in [-2**63, 2**63 - 1], got {2**63}"),
    (["generate", "-n", "1", "--seed", str(-2**63 - 1), "--device", "cpu"],
     f"--seed must be in [-2**63, 2**63 - 1], got {-2**63 - 1}"),
    (["info", "--device", ""], "--device must be cpu, cuda or cuda:N, got ''"),  # was the default device
    (["info", "--checkpoint", ""], "--checkpoint is empty"),  # was the demo model
    (["generate", "-n", "1", "--checkpoint", "", "--device", "cpu"], "--checkpoint is empty"),
    (["info", "--device", "cuda:x"], "--device must be cpu, cuda or cuda:N, got 'cuda:x'"),
])
def test_errors_are_one_line_and_a_nonzero_exit(args, message, capsys):
    code, out, err = run(args, capsys)
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["generate", "-n", "abc"], "igpt-fast generate: error: argument -n/--num-images: invalid int value: 'abc' "
                                "(see igpt-fast generate --help)"),
    (["features"], "igpt-fast features: error: the following arguments are required: images"),
    (["paint"], "igpt-fast: error: argument COMMAND: invalid choice: 'paint'"),
])
def test_usage_errors_are_one_line_too(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse printed its whole usage (5 lines) before the error
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith(message) and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("args, message", [
    (["--layer", "4"], "--layer must be in [0, 3] for this 3-layer model, got 4"),
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
])
def test_bad_feature_arguments_are_one_line(tmp_path, capsys, args, message):
    np.save(tmp_path / "set.npy", np.zeros((2, 8, 8, 3), dtype=np.uint8))
    code, _, err = run(["features", str(tmp_path / "set.npy"), "-o", str(tmp_path / "f.npy"), "--device", "cpu",
                        *args], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "f.npy").exists()


@pytest.mark.parametrize("array, message", [
    (np.zeros((2, 8, 8, 3), dtype=np.float32),
     "expected uint8 pixels [N, H, W, 3] or [H, W, 3], got float32 [2, 8, 8, 3]"),
    (np.zeros((2, 8, 8), dtype=np.uint8), "got uint8 [2, 8, 8]"),
    (np.zeros((0, 8, 8, 3), dtype=np.uint8), "got uint8 [0, 8, 8, 3]"),
])
def test_a_pixel_array_that_is_not_uint8_images_is_one_line(tmp_path, capsys, array, message):
    np.save(tmp_path / "bad.npy", array)
    code, _, err = run(["likelihood", str(tmp_path / "bad.npy"), "--device", "cpu"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_npy_name_on_other_bytes_or_pickled_objects_is_refused_without_suggesting_to_unpickle(tmp_path, capsys):
    (tmp_path / "junk.npy").write_bytes(b"not an array at all")  # numpy took it for a pickle
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    for name, message in [("junk.npy", "is not a .npy file (no NumPy header)"),
                          ("objects.npy", "it holds Python objects, which are never unpickled here")]:
        code, _, err = run(["likelihood", str(tmp_path / name), "--device", "cpu"], capsys)
        assert code == 2 and message in err and "allow_pickle" not in err and len(err.strip().splitlines()) == 1


def test_a_16_bit_image_file_is_refused_not_clipped_to_white(tmp_path, capsys):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(path)  # PIL reads it as mode I;16
    code, _, err = run(["likelihood", str(path), "--device", "cpu"], capsys)
    assert code == 2 and f"{path} has PIL mode 'I;16'" in err and len(err.strip().splitlines()) == 1


def test_an_image_past_pils_decompression_bomb_limit_is_one_line(tmp_path, capsys, monkeypatch):
    Image.new("RGB", (8, 8)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # 64 pixels is over twice the limit: PIL raises, no OSError
    code, _, err = run(["likelihood", str(tmp_path / "big.png"), "--device", "cpu"], capsys)
    assert code == 2 and f"cannot read image {tmp_path / 'big.png'}: Image size (64 pixels) exceeds limit" in err
    assert len(err.strip().splitlines()) == 1


def test_a_folder_given_as_an_image_is_named_as_a_folder(tmp_path, capsys):
    (tmp_path / "shots.npy").mkdir()
    code, _, err = run(["features", str(tmp_path / "shots.npy"), "-o", str(tmp_path / "f.npy"), "--device", "cpu"],
                       capsys)
    assert code == 2 and f"{tmp_path / 'shots.npy'} is a folder; expected an image file or a .npy file" in err


def test_unreadable_image_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    code, _, err = run(["complete", str(bad), "--device", "cpu"], capsys)
    assert code == 2 and "cannot read image" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command", [[], ["generate"], ["complete"], ["features"], ["likelihood"], ["convert"],
                                     ["info"], ["bench"]])
def test_every_command_has_help(command):
    result = subprocess.run([sys.executable, "-m", "igpt_fast.cli", *command, "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "usage:" in result.stdout
    assert ("--sizes" if command == ["bench"] else "igpt-fast") in result.stdout


def test_python_dash_m_igpt_fast_is_the_command_and_says_its_version():
    import igpt_fast

    result = subprocess.run([sys.executable, "-m", "igpt_fast", "--version"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and result.stdout.strip() == f"igpt-fast {igpt_fast.__version__}"
    from importlib.metadata import version

    assert version("igpt-fast") == igpt_fast.__version__  # the installed metadata reads the same number


@pytest.mark.parametrize("args, message", [
    (["generate", "-o", "{tmp}/missing/grid.png"], "-o {tmp}/missing/grid.png: no folder {tmp}/missing"),
    (["generate", "-o", "{tmp}/grid.jpg"], "-o must be a .png file, got '{tmp}/grid.jpg'"),  # was PNG in .jpg
    (["generate", "-o", ""], "-o must be a .png file, got ''"),
    (["generate", "-o", "{tmp}/folder.png"], "-o {tmp}/folder.png is a folder; expected a .png file"),
    (["generate", "-o", "{tmp}/grid.png", "--save-ids", "{tmp}/ids.txt"],  # np.save wrote ids.txt.npy
     "--save-ids must be a .npy file, got '{tmp}/ids.txt'"),
    (["generate", "-o", "{tmp}/grid.png", "--save-ids", "{tmp}/missing/ids.npy"],  # after the PNG was written
     "--save-ids {tmp}/missing/ids.npy: no folder {tmp}/missing"),
    (["generate", "-o", "{tmp}/grid.png", "--columns", "0"], "--columns must be >= 1, got 0"),
    (["features", "{tmp}/set.npy", "-o", "{tmp}/features"], "-o must be a .npy file, got '{tmp}/features'"),
    (["features", "{tmp}/set.npy", "-o", "{tmp}/missing/f.npy"], "no folder {tmp}/missing"),
    (["features", "{tmp}/set.npy", "-o", "{tmp}/./set.npy"], "is also an input; writing it would overwrite"),
    (["complete", "{tmp}/in.png", "-o", "{tmp}/in.png"], "-o {tmp}/in.png is also an input"),
    (["complete", "{tmp}/in.png", "-o", "{tmp}/in.gif"], "-o must be a .png file, got '{tmp}/in.gif'"),
    # a trailing separator, which Path drops (both failed after the work, the PNG already written)
    (["generate", "-o", "{tmp}/grid.png/"], "-o {tmp}/grid.png/ names a folder; expected a .png file"),
    (["generate", "-o", "{tmp}/grid.png", "--save-ids", "{tmp}/ids.npy/"],
     "--save-ids {tmp}/ids.npy/ names a folder; expected a .npy file"),
    (["generate", "-o", "{tmp}/dangling.png"], "-o {tmp}/dangling.png is a link to nothing ({tmp}/gone/x.png)"),
])
def test_bad_output_paths_are_refused_before_any_work(tmp_path, capsys, monkeypatch, args, message):
    np.save(tmp_path / "set.npy", np.zeros((2, 8, 8, 3), dtype=np.uint8))
    Image.new("RGB", (8, 8)).save(tmp_path / "in.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone" / "x.png")
    before = {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}

    def no_model(*_, **__):
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(ImageGPT, "from_pretrained", no_model)
    code, _, err = run([arg.format(tmp=tmp_path) for arg in args] + ["-n", "1"] * (args[0] == "generate") +
                       ["--device", "cpu"], capsys)
    assert code == 2 and message.format(tmp=tmp_path) in err and len(err.strip().splitlines()) == 1
    assert {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before  # nothing written


@pytest.mark.parametrize("args, message", [
    (["generate", "-n", "1", "--temperature", "0"], "temperature must be"),
    (["generate", "-n", "1", "--greedy", "--temperature", "-5"], "temperature must be"),  # checked, as by generate()
    (["generate", "-n", "1", "--top-p", "0"], "top_p must be a number in (0, 1]"),
    (["complete", "{tmp}/in.png", "--top-k", "-1"], "top_k"),
    (["complete", "{tmp}/in.png", "--rows", "16"], "--rows must be in [0, 16) for 16x16 images, got 16"),
])
def test_bad_sampling_values_and_rows_are_refused_before_the_model_is_read(tmp_path, capsys, monkeypatch, args,
                                                                           message):
    Image.new("RGB", (16, 16)).save(tmp_path / "in.png")

    def no_model(*_, **__):
        raise AssertionError("the model was read before the arguments were checked")

    monkeypatch.setattr(ImageGPT, "from_pretrained", no_model)
    code, _, err = run([arg.format(tmp=tmp_path) for arg in args] + ["-o", str(tmp_path / "out.png"), "--device",
                                                                     "cpu"], capsys)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_an_output_folder_without_write_permission_is_refused_first(tmp_path, capsys, monkeypatch):
    # os.access stands in for a read-only folder: the tests may run as root, which may write anywhere
    monkeypatch.setattr("igpt_fast.cli.os.access", lambda path, mode: False)
    code, _, err = run(["generate", "-n", "1", "-o", str(tmp_path / "grid.png"), "--device", "cpu"], capsys)
    assert code == 2 and f"-o {tmp_path / 'grid.png'}: permission denied" in err
