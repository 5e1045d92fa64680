"""The `igpt-fast` command: generate, complete, features, likelihood, bench, convert, info.

Without --checkpoint every command uses the demo model that ships with the package. User errors (a missing
file, an unreadable image, a bad argument) print one line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from igpt_fast.sampling import check_sampling_args

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
IMAGES_HELP = "image files (any format PIL reads) and .npy files of uint8 [N, H, W, 3] pixels (a dataset)"


class UserError(Exception):
    """A problem with what the user asked for: reported as one line."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error (argparse prints the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", default=None,
                   help="Hugging Face folder or cached hub id (default: the shipped demo model)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights and activations (default: float16 on CUDA, float32 on the CPU)")


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=16, help="images generated together (default 16; rounded up "
                   "to a batch bucket: 1, 2, 4, ..., 256)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0): same seed, same images, whatever "
                   "the batch size")
    p.add_argument("--top-k", type=int, default=40, help="keep the k most likely colors (default 40; all colors "
                   "if the model has fewer, or with 0)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1]")
    p.add_argument("--temperature", type=float, default=1.0, help="softmax temperature > 0 (default 1.0)")
    p.add_argument("--greedy", action="store_true", help="argmax instead of sampling")


def _add_forward_args(p: argparse.ArgumentParser) -> None:
    """The inputs and options of the commands that run whole images through the model (features, likelihood)."""
    p.add_argument("images", nargs="+", help=IMAGES_HELP)
    _add_model_args(p)
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")


def build_parser() -> argparse.ArgumentParser:
    from igpt_fast import __version__

    parser = _Parser(prog="igpt-fast", description="Fast ImageGPT image generation.")  # subparsers: _Parser too
    parser.add_argument("--version", action="version", version=f"igpt-fast {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = commands.add_parser("generate", help="sample images and write a PNG grid",
                            description="Sample unconditional images and write them as a PNG grid.")
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("-n", "--num-images", type=int, default=16, help="how many images (default 16)")
    p.add_argument("-o", "--out", default="samples.png", help="PNG grid to write (default samples.png)")
    p.add_argument("--save-ids", default=None, metavar="PATH.npy", help="also save the cluster ids [N, pixels]")
    p.add_argument("--columns", type=int, default=8, help="images per grid row (default 8)")

    p = commands.add_parser("complete", help="complete the bottom of images from their top rows",
                            description="Keep the top rows of each image, sample completions of the rest, and "
                                        "write one PNG: each row is original, the kept part, then completions.")
    p.add_argument("images", nargs="+", help=IMAGES_HELP)
    _add_model_args(p)
    _add_sampling_args(p)
    p.add_argument("--rows", type=int, default=None, help="image rows to keep (default: the top half)")
    p.add_argument("--samples", type=int, default=4, help="completions per image (default 4)")
    p.add_argument("-o", "--out", default="completions.png", help="PNG to write (default completions.png)")

    p = commands.add_parser("features", help="linear-probe features of images, to a .npy file",
                            description="Mean-pooled hidden states of one block for each image (what a linear "
                                        "probe trains on), as float32 [N, n_embd] in a .npy file, in input order. "
                                        "The model reads each image's color-cluster ids as the image processor "
                                        "gives them (no SOS token), as a transformers ImageGPT model does.")
    _add_forward_args(p)
    p.add_argument("--layer", type=int, default=None,
                   help="hidden state after this block: 0 the embeddings, n_layer the final output after ln_f "
                        "(default: the middle block, where the paper's best probes sit)")
    p.add_argument("-o", "--out", default="features.npy", help="file to write (default features.npy)")

    p = commands.add_parser("likelihood", help="bits per pixel token of each image",
                            description="Score each image under the model: the mean negative log-likelihood of "
                                        "its color-cluster tokens given the SOS and the tokens before them, in "
                                        "bits per token. Prints one line per image (bits, then the image), and "
                                        "the mean last.")
    _add_forward_args(p)

    commands.add_parser("bench", help="run the benchmark summary (see `igpt-fast bench --help`)", add_help=False,
                        prefix_chars="\0")  # every argument goes to the benchmark's own parser

    p = commands.add_parser("convert", help="convert a pytorch_model.bin folder to safetensors",
                            description="Read a Hugging Face ImageGPT folder (any weight format, pickles loaded "
                                        "with weights_only=True) and write config.json + model.safetensors "
                                        "(+ preprocessor_config.json) to a new folder.")
    p.add_argument("source", help="checkpoint folder or cached hub id")
    p.add_argument("destination", help="folder to write")

    p = commands.add_parser("info", help="describe a checkpoint and what would run it",
                            description="Print the config, parameter count, dtype, device and kernels.")
    _add_model_args(p)
    return parser


def _checkpoint(args):
    """--checkpoint, or the shipped demo model when the option is left out."""
    from igpt_fast.demo import demo_model_path

    if args.checkpoint == "":  # an unset shell variable, most likely: not the demo model in disguise
        raise UserError("--checkpoint is empty; give a checkpoint folder or hub id, or leave the option out for the "
                        "shipped demo model")
    return demo_model_path() if args.checkpoint is None else args.checkpoint


def _checkpoint_folder(args) -> Path:
    """--checkpoint's folder (a hub id resolved), refused unless it holds config.json: a folder that is no checkpoint
    at all was reported as missing its preprocessor_config.json, the first file read."""
    from igpt_fast.checkpoint import CONFIG_NAME, resolve_folder

    checkpoint = _checkpoint(args)
    folder = resolve_folder(checkpoint)
    if not (folder / CONFIG_NAME).is_file():
        raise UserError(f"{checkpoint} is not a checkpoint folder: it has no {CONFIG_NAME}")
    return folder


def _load_processor(args):
    from igpt_fast.processor import ImageProcessor

    return ImageProcessor.from_pretrained(_checkpoint_folder(args))


def _load_model(args, max_batch: int | None = None):
    """The model on --device in --dtype, generating up to max_batch rows at a time (None: the largest bucket)."""
    from igpt_fast import ImageGPT

    checkpoint = _checkpoint_folder(args)
    device = _default_device() if args.device is None else args.device  # --device '' is refused, not the default
    if re.fullmatch(r"cpu|cuda(:\d+)?", device) is None:
        raise UserError(f"--device must be cpu, cuda or cuda:N, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device} given but CUDA is not available")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise UserError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
    return ImageGPT.from_pretrained(checkpoint, dtype=dtype, device=device,
                                    **({} if max_batch is None else {"max_batch": max_batch}))


def _load(args, processor=None, max_batch: int | None = None):
    """The model (_load_model) and its image processor (the one given, if it was loaded already), checked to fit."""
    model = _load_model(args, max_batch)
    checkpoint = _checkpoint(args)
    processor = processor or _load_processor(args)
    side = int(processor.size)
    if side * side != model.config.n_positions:
        raise UserError(f"{checkpoint}: image size {side}x{side} does not match n_positions "
                        f"{model.config.n_positions}")
    if processor.n_clusters != model.config.n_clusters:  # the sampling values were checked against the processor's
        raise UserError(f"{checkpoint}: the image processor has {processor.n_clusters} color clusters, the model "
                        f"{model.config.n_clusters}")
    return model, processor


def _check_output(path: str, suffix: str, option: str, inputs: list[str] = ()) -> None:
    """Refuse an output file that could not be written, or would be another file than the one named, before any
    work: np.save appends .npy to other names (x.txt became x.txt.npy), PIL wrote PNG bytes into x.jpg, and a
    missing folder failed only after every image had been generated."""
    out = Path(path)
    if path.endswith(("/", os.sep)):  # Path drops the separator; the file would then be named as a folder
        raise UserError(f"{option} {path} names a folder; expected a {suffix} file")
    if out.is_symlink() and not out.exists():
        raise UserError(f"{option} {path} is a link to nothing ({os.readlink(out)}); expected a {suffix} file")
    # np.save appends ".npy" unless the name ends in exactly that; PIL is given format="PNG", any case will do
    if not path or not (out.name.endswith(suffix) if suffix == ".npy" else out.suffix.lower() == suffix):
        raise UserError(f"{option} must be a {suffix} file, got {path!r}")
    if out.is_dir():
        raise UserError(f"{option} {path} is a folder; expected a {suffix} file")
    if not out.parent.is_dir():
        raise UserError(f"{option} {path}: no folder {out.parent}")
    if not os.access(out.parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"{option} {path}: permission denied")
    if any(Path(name).resolve() == out.resolve() for name in inputs):
        raise UserError(f"{option} {path} is also an input; writing it would overwrite that input")


def _generation_batch(args) -> int:
    """The model's max_batch for --batch-size: the bucket it runs in anyway (a batch is padded up to one). One
    generate() call then takes every image, and image i depends only on (--seed, i), whatever the batch size."""
    from igpt_fast.decoder import BATCH_BUCKETS, bucket_for

    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not -2**63 <= args.seed < 2**63:
        raise UserError(f"--seed must be in [-2**63, 2**63 - 1], got {args.seed}")
    return bucket_for(args.batch_size, BATCH_BUCKETS[-1])


def _sampling_kwargs(args, processor) -> dict:
    """generate's sampling arguments, checked against the processor's colors (the model's: _load), before the model
    is read."""
    colors = processor.n_clusters
    top_k = colors if args.top_k == 0 else min(args.top_k, colors)  # 0: off, as generate() reads it
    kwargs = {"do_sample": True, "top_k": top_k, "top_p": args.top_p, "temperature": args.temperature}
    check_sampling_args(vocab=colors, **kwargs)  # before any progress bar starts; with --greedy too, as generate()
    return {"do_sample": False} if args.greedy else kwargs


def _pixel_bar(total: int, desc: str):
    """A progress bar over the pixels a command generates, moved by generate(progress=...) as they finish: a batch
    of images takes minutes on a CPU, where a bar per batch would not move."""
    from tqdm import tqdm

    return tqdm(total=total, unit="px", unit_scale=True, desc=desc, file=sys.stderr)


def _moves(bar):
    """generate's progress callback: the bar at the pixels done."""
    return lambda done, total: bar.update(done - bar.n)


def cmd_generate(args) -> int:
    from igpt_fast.grid import default_scale, image_grid, save_png

    if args.num_images < 1:
        raise UserError(f"--num-images must be >= 1, got {args.num_images}")
    if args.columns < 1:  # before generating: image_grid refuses it only after the work
        raise UserError(f"--columns must be >= 1, got {args.columns}")
    _check_output(args.out, ".png", "-o")
    if args.save_ids is not None:
        _check_output(args.save_ids, ".npy", "--save-ids")
    max_batch = _generation_batch(args)
    processor = _load_processor(args)
    sampling = _sampling_kwargs(args, processor)
    model, processor = _load(args, processor, max_batch)
    sos, pixels = model.config.sos_token_id, model.config.n_positions
    start = time.perf_counter()
    with _pixel_bar(args.num_images * pixels, "generating") as bar:
        context = torch.full((args.num_images, 1), sos, dtype=torch.long)
        ids = model.generate(context, max_length=pixels + 1, seed=args.seed, progress=_moves(bar), **sampling)[:, 1:]
    elapsed = time.perf_counter() - start
    images = processor.decode(ids)
    side = int(processor.size)
    save_png(image_grid(images, columns=min(args.columns, len(images)), scale=default_scale(side)), args.out)
    if args.save_ids:
        np.save(args.save_ids, ids.numpy())
    print(f"wrote {len(images)} images to {args.out} in {elapsed:.2f} s "
          f"({len(images) / elapsed:.2f} images/s, {model.device}, {model.dtype}, backend {model.backend})")
    return 0


def _read_images(paths: list[str], processor) -> tuple[list[str], list]:
    """Image files and .npy arrays of uint8 [N, H, W, 3] (or one [H, W, 3]) pixels -> names and images, in order.
    An array is memory-mapped: its rows are read when they are quantized, so a dataset need not fit in memory. An
    image file is resized as the processor would resize it as soon as it is read (the same ids: the processor
    leaves an image of its size alone), so a thousand photos are not all held at full resolution."""
    from PIL import Image, UnidentifiedImageError

    from igpt_fast.processor import pil_to_rgb, resize_images

    names, images = [], []
    for path in paths:
        if Path(path).is_dir():  # exists, so "no such image file" would mislead
            raise UserError(f"{path} is a folder; expected an image file or a .npy file")
        if not Path(path).is_file():
            raise UserError(f"no such image file: {path}" if not Path(path).exists() else
                            f"{path} is not a regular file; expected an image file or a .npy file")
        if path.lower().endswith(".npy"):  # DATA.NPY too: it was read as an image, "cannot identify image file"
            with open(path, "rb") as f:  # numpy reads a file without the header as a pickle, and its refusal
                header = f.read(6)          # suggests allow_pickle=True
            if header != b"\x93NUMPY":
                raise UserError(f"{path} is not a .npy file (no NumPy header); expected uint8 pixels [N, H, W, 3] "
                                f"written by numpy.save")
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as e:
                objects = "pickle" in str(e) or "Python objects" in str(e)  # np.load and mmap refuse them in turn
                why = "it holds Python objects, which are never unpickled here" if objects else e
                raise UserError(f"cannot read pixel array {path}: {why}") from None
            if array.dtype != np.uint8 or array.ndim not in (3, 4) or array.shape[-1] != 3 or 0 in array.shape:
                raise UserError(f"{path}: expected uint8 pixels [N, H, W, 3] or [H, W, 3], got {array.dtype} "
                                f"{list(array.shape)}")
            array = array[None] if array.ndim == 3 else array
            names.extend(f"{path}[{i}]" for i in range(len(array)))
            images.extend(array)
            continue
        try:
            with Image.open(path) as image:
                rgb = pil_to_rgb(image, path)  # refuses 16-bit and float images, which RGB would clip
                images.append(resize_images(rgb, int(processor.size), processor.resample)[0])  # [size, size, 3]
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:  # the bomb is no OSError
            raise UserError(f"cannot read image {path}: {e}") from None
        names.append(path)
    return names, images


def _in_batches(model, processor, images: list, batch_size: int, desc: str, compute) -> torch.Tensor:
    """compute(ids) over batches of images quantized on the model's device, concatenated on the CPU."""
    from tqdm import tqdm

    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    results = []
    with tqdm(total=len(images), unit="img", desc=desc, file=sys.stderr) as bar:
        for first in range(0, len(images), batch_size):
            batch = images[first:first + batch_size]
            results.append(compute(processor(batch, device=model.device)["input_ids"]).cpu())
            bar.update(len(batch))
    return torch.cat(results)


def cmd_complete(args) -> int:
    from igpt_fast.grid import default_scale, image_grid, save_png

    if args.samples < 1:
        raise UserError(f"--samples must be >= 1, got {args.samples}")
    _check_output(args.out, ".png", "-o", args.images)
    processor = _load_processor(args)
    _, images = _read_images(args.images, processor)
    max_batch = _generation_batch(args)
    side = int(processor.size)
    rows = side // 2 if args.rows is None else args.rows
    if not 0 <= rows < side:
        raise UserError(f"--rows must be in [0, {side}) for {side}x{side} images, got {rows}")
    sampling = _sampling_kwargs(args, processor)
    model, processor = _load(args, processor, max_batch)
    ids = processor(images)["input_ids"]  # [N, side*side]
    sos = torch.full((len(images), 1), model.config.sos_token_id, dtype=torch.long)
    prompts = torch.cat([sos, ids[:, :rows * side]], dim=1).repeat_interleave(args.samples, dim=0)
    with _pixel_bar(len(prompts) * (side * side - rows * side), "completing") as bar:
        out = model.generate(prompts, max_length=side * side + 1, seed=args.seed, progress=_moves(bar), **sampling)
    completions = processor.decode(out[:, 1:]).reshape(len(images), args.samples, side, side, 3)
    originals = processor.decode(ids)
    kept = originals.copy()
    kept[:, rows:] = 128  # what the model was shown: the top rows, the rest gray
    tiles = np.concatenate([originals[:, None], kept[:, None], completions], axis=1)
    save_png(image_grid(tiles.reshape(-1, side, side, 3), columns=args.samples + 2, scale=default_scale(side)),
             args.out)
    print(f"wrote {len(images)} x {args.samples} completions (top {rows} of {side} rows kept) to {args.out}")
    return 0


def cmd_features(args) -> int:
    _check_output(args.out, ".npy", "-o", args.images)
    processor = _load_processor(args)
    names, images = _read_images(args.images, processor)
    model, processor = _load(args, processor)
    n_layer = model.config.n_layer
    layer = n_layer // 2 if args.layer is None else args.layer
    if not 0 <= layer <= n_layer:
        raise UserError(f"--layer must be in [0, {n_layer}] for this {n_layer}-layer model, got {layer}")
    start = time.perf_counter()
    features = _in_batches(model, processor, images, args.batch_size, "features",
                           lambda ids: model.features(ids, layer=layer))
    elapsed = time.perf_counter() - start
    np.save(args.out, features.float().numpy())
    print(f"wrote features [{len(names)}, {features.shape[1]}] of layer {layer} to {args.out} in {elapsed:.2f} s "
          f"({len(names) / elapsed:.1f} images/s, {model.device}, {model.dtype})")
    return 0


def cmd_likelihood(args) -> int:
    processor = _load_processor(args)
    names, images = _read_images(args.images, processor)
    model, processor = _load(args, processor)
    bits = _in_batches(model, processor, images, args.batch_size, "scoring",
                       lambda ids: model.log_likelihood(ids).bits_per_dim)
    for name, value in zip(names, bits.tolist(), strict=True):
        print(f"{value:.4f}  {name}")
    print(f"mean {bits.double().mean().item():.4f} bits per pixel token over {len(names)} images "
          f"({model.device}, {model.dtype})")
    return 0


def cmd_convert(args) -> int:
    from igpt_fast.checkpoint import GENERATION_CONFIG_NAME, PREPROCESSOR_NAME, load_checkpoint, save_pretrained

    destination = Path(args.destination)
    if not args.destination:  # Path("") is the current folder: an unset shell variable would write there
        raise UserError("destination must name a folder, got ''")
    if destination.exists() and not destination.is_dir():
        raise UserError(f"destination {args.destination} is a file; expected a folder to write")
    checkpoint = load_checkpoint(args.source)
    if destination.resolve() == checkpoint.folder.resolve():
        raise UserError("destination must differ from the source folder")
    # Written into a staging folder beside the destination, then moved in file by file: a failure midway (a full
    # disk) leaves no half-written checkpoint that would load as a broken one.
    destination.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=f".{destination.name}-partial-") as staging:
        save_pretrained(staging, checkpoint.config, checkpoint.state_dict)
        for name in (PREPROCESSOR_NAME, GENERATION_CONFIG_NAME):  # verbatim: every setting kept for transformers
            if (checkpoint.folder / name).is_file():
                shutil.copyfile(checkpoint.folder / name, Path(staging) / name)
        destination.mkdir(exist_ok=True)
        for written in Path(staging).iterdir():
            os.replace(written, destination / written.name)
    print(f"wrote {destination / 'config.json'} and model.safetensors "
          f"({checkpoint.config.num_parameters():,} parameters)")
    return 0


def cmd_info(args) -> int:
    from igpt_fast.checkpoint import PREPROCESSOR_NAME
    from igpt_fast.decoder import BATCH_BUCKETS

    # Describing a checkpoint needs no color table: a folder transformers' model.save_pretrained wrote has none.
    has_processor = (_checkpoint_folder(args) / PREPROCESSOR_NAME).is_file()
    model, processor = _load(args) if has_processor else (_load_model(args), None)
    c = model.config
    print(f"checkpoint      {args.checkpoint or 'the shipped demo model'}")
    print(f"architecture    {c.n_layer} layers, {c.n_head} heads of {c.head_dim}, n_embd {c.n_embd}, "
          f"n_inner {c.inner_dim}, {c.n_positions} positions, {c.n_clusters} clusters + SOS")
    print(f"parameters      {c.num_parameters():,}")
    if processor is None:
        print(f"image           no {PREPROCESSOR_NAME}: no color table (the other commands need one)")
    else:
        print(f"image           {int(processor.size)}x{int(processor.size)}, {processor.n_clusters} colors")
    print(f"device, dtype   {model.device}, {model.dtype}")
    if model.backend == "triton":
        graphs = "one CUDA graph per batch bucket " + str(BATCH_BUCKETS) if model.decoder.use_cuda_graphs \
            else "eager launches"
        print(f"kernels         Triton: embed, norm_qkv, decode/prefill attention, norm_linear (layernorm-GELU), "
              f"linear_residual, sample_tokens; {graphs}")
    else:
        print("kernels         PyTorch stand-ins (no CUDA here), eager")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from igpt_fast.benchmark import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    handler = {"generate": cmd_generate, "complete": cmd_complete, "features": cmd_features,
               "likelihood": cmd_likelihood, "convert": cmd_convert, "info": cmd_info}
    try:
        return handler[args.command](args)
    except (UserError, ValueError, FileNotFoundError, MemoryError, OSError) as e:
        print(f"igpt-fast {args.command}: error: {e}".splitlines()[0] if isinstance(e, UserError) else
              f"igpt-fast {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"igpt-fast {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
