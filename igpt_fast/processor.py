"""ImageGPT's image processor: images <-> cluster ids, compatible with transformers' ImageGPTImageProcessor.

Image -> ids: resize to size x size (PIL, bilinear by default, on uint8 like transformers' PIL backend), scale
to [-1, 1] as x / 127.5 - 1, then each pixel's id is the nearest of the color clusters (squared Euclidean
distance, first index on ties), raster order, HWC: ids [N, size * size]. No SOS is prepended.
Ids -> image: rint(127.5 * (clusters[id] + 1)) as uint8 [N, size, size, 3].

Quantizing runs the Triton kernels (igpt_fast.kernels.clusters) on CUDA or under the interpreter, and a
PyTorch stand-in computing the same math elsewhere (igpt_fast.backend.use_triton).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from igpt_fast import torch_ops
from igpt_fast.backend import on_device, use_triton
from igpt_fast.checkpoint import PREPROCESSOR_NAME, preprocessor_config, resolve_folder

PIL_BILINEAR = 2  # PIL.Image.Resampling.BILINEAR, the value transformers writes as "resample"


# What every ImageGPT preprocessor_config.json sets (or leaves to these defaults) for the steps this processor
# always runs; a file with other values would get other ids from transformers, so it is refused, not ignored.
TRANSFORMERS_DEFAULT_SIZE = 256  # ImageGPTImageProcessor's size when its config names none
FIXED_SETTINGS = {"do_resize": True, "do_normalize": True, "do_color_quantize": True, "do_rescale": True,
                  "rescale_factor": 1 / 255, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}


class ImageSize(int):
    """The side length as an int (`np.reshape(x, [size, size, 3])` works) that also reads like the
    `{"height": h, "width": w}` dict transformers 5 stores (`size["height"]`)."""

    def __getitem__(self, key: str) -> int:
        if key in ("height", "width"):
            return int(self)
        raise KeyError(f"image size has keys 'height' and 'width', not {key!r}")

    def keys(self):
        return ("height", "width")

    def __contains__(self, key) -> bool:  # `"height" in size`; without it Python would try size[0], size[1], ...
        return key in self.keys()

    @property
    def height(self) -> int:  # transformers 5's SizeDict reads as attributes too
        return int(self)

    @property
    def width(self) -> int:
        return int(self)

    def to_dict(self) -> dict:
        return {"height": int(self), "width": int(self)}

    def __repr__(self) -> str:
        return f"ImageSize({int(self)})"


class ProcessorOutput(dict):
    """{"input_ids": ...} that also reads as `.input_ids`, like transformers' BatchFeature."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"{name!r} (the processor's output holds {sorted(self)})") from None

    def to(self, *args, **kwargs) -> ProcessorOutput:
        """In place, like BatchFeature.to (`processor(images, return_tensors="pt").to(model.device)`): tensors move
        to the device named; a dtype is ignored, as transformers ignores it for integer tensors like the ids."""
        device = kwargs.get("device", next((a for a in args if not isinstance(a, torch.dtype)), None))
        if device is not None:
            for key in list(self):
                if isinstance(self[key], torch.Tensor):
                    self[key] = self[key].to(device)
        return self


class ImageProcessor:
    """Turns images into ImageGPT token ids and ids back into images (see the module docstring)."""

    def __init__(self, clusters, size: int | dict = 32, resample: int = PIL_BILINEAR):
        # float64, as transformers keeps the table: the model card decodes with numpy from `.clusters`, and in
        # float32 about 1 value in 150,000 would round to another intensity. The kernels take a float32 copy.
        clusters = np.asarray(
            clusters.detach().cpu() if isinstance(clusters, torch.Tensor) else clusters, dtype=np.float64
        )
        if clusters.ndim != 2 or clusters.shape[1] != 3 or clusters.shape[0] < 1:
            raise ValueError(f"clusters must be [n_clusters, 3] (RGB in [-1, 1]), got shape {clusters.shape}")
        if not np.isfinite(clusters).all():
            raise ValueError("clusters hold NaN or infinite values")
        if np.abs(clusters).max() > 1.5:  # loose: a genuine table lies in [-1, 1]; a 0-255 one is a slip
            raise ValueError(f"clusters hold values up to {np.abs(clusters).max():g}; expected RGB scaled to [-1, 1] "
                             f"(a pixel value v is v / 127.5 - 1): every image would quantize to the same few ids")
        self.clusters = clusters
        self.size = ImageSize(_side_length(size))
        self.resample = _resample_code(resample)

    @property
    def n_clusters(self) -> int:
        return self.clusters.shape[0]

    def _kernel_clusters(self, device: torch.device) -> torch.Tensor:
        return torch.from_numpy(self.clusters).to(device, torch.float32)

    # ---- preprocessor_config.json ----
    @classmethod
    def from_pretrained(cls, path_or_hub_id: str | os.PathLike, **hub_options) -> ImageProcessor:
        """From a folder (or cached hub id) holding preprocessor_config.json with "clusters". hub_options: revision,
        cache_dir, local_files_only, token, as transformers takes them."""
        folder = resolve_folder(path_or_hub_id, **hub_options)
        path = folder / PREPROCESSOR_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {PREPROCESSOR_NAME} in {folder}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
        if not isinstance(data, dict) or data.get("clusters") is None:
            raise ValueError(f'{path} has no "clusters": an ImageGPT processor needs the color cluster table')
        unimplemented = _unimplemented_settings(data)
        if unimplemented:
            raise ValueError(f"{path} sets {', '.join(unimplemented)}; this processor always resizes, scales to "
                             f"[-1, 1] as x / 127.5 - 1 and quantizes (transformers would give other ids)")
        try:  # without "size", transformers' ImageGPTImageProcessor resizes to its default of 256 x 256: so does this
            return cls(data["clusters"], size=data.get("size", TRANSFORMERS_DEFAULT_SIZE),
                       resample=data.get("resample", PIL_BILINEAR))
        except (ValueError, TypeError) as e:  # the table or a setting: say which file holds it
            raise ValueError(f"{path}: {e}") from None

    def save_pretrained(self, folder: str | os.PathLike) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config = preprocessor_config(self.clusters, int(self.size))
        config["resample"] = self.resample
        with open(folder / PREPROCESSOR_NAME, "w", encoding="utf-8") as f:
            json.dump(config, f)
        return folder

    # ---- images -> ids ----
    def __call__(
        self, images, return_tensors: str | None = "pt", device: torch.device | str | None = None
    ) -> ProcessorOutput:
        """One image, a list (PIL images, or uint8 [H, W, 3] numpy arrays / tensors) or a uint8 [N, H, W, 3]
        batch -> {"input_ids": int64 [N, size * size]}. `device` is where ids are computed and returned (CPU by
        default); return_tensors "pt" gives a torch tensor, "np" a numpy array."""
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
        if device is not None and torch.device(device).type not in ("cpu", "cuda"):  # "meta" would hold no ids
            raise ValueError(f"device must be a CPU or CUDA device, got {device!r}")
        if device is not None and torch.device(device).type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        pixels = torch.from_numpy(resize_images(images, int(self.size), self.resample))
        if device is not None:
            pixels = pixels.to(device)
        with on_device(pixels.device):
            ids = cluster_ops(pixels.device).quantize(pixels, self._kernel_clusters(pixels.device))
        return ProcessorOutput(input_ids=ids.cpu().numpy() if return_tensors == "np" else ids)

    preprocess = __call__

    # ---- ids -> images ----
    def decode(self, ids) -> np.ndarray:
        """Cluster ids [N, size * size] (or one image's [size * size]) -> uint8 numpy [N, size, size, 3]."""
        if isinstance(ids, np.ndarray):
            if ids.dtype.kind == "u" and ids.size and ids.max() >= self.n_clusters:
                # here: uint64 ids of 2**63 and above would wrap to negative ids in int64 and be reported so
                raise ValueError(f"ids hold cluster id {ids.max()}; ids must lie in [0, {self.n_clusters})")
            ids = torch.from_numpy(np.ascontiguousarray(ids))  # torch cannot view negative strides (ids[:, ::-1])
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"ids must be a torch.Tensor or numpy array, got {type(ids).__name__}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"ids must hold integer cluster ids, got dtype {ids.dtype}")
        if ids.dim() == 1:
            ids = ids[None]
        side = int(self.size)
        if ids.dim() != 2 or ids.shape[1] != side * side:
            raise ValueError(
                f"ids must be [N, {side * side}] (size {side} x {side}), got shape {tuple(ids.shape)}"
            )
        with on_device(ids.device):
            pixels = cluster_ops(ids.device).dequantize(ids.long(), self._kernel_clusters(ids.device))
        return pixels.cpu().numpy().reshape(ids.shape[0], side, side, 3)

    def __repr__(self) -> str:
        return (
            f"ImageProcessor(n_clusters={self.n_clusters}, size={int(self.size)}, resample={self.resample})"
        )


def cluster_ops(device: torch.device):
    """quantize/dequantize: the Triton kernels where they run (CUDA, interpreter), else the PyTorch stand-ins."""
    if use_triton(device):
        from igpt_fast.kernels import clusters

        return clusters
    return torch_ops


def resize_images(images, size: int, resample: int = PIL_BILINEAR) -> np.ndarray:
    """One image, a list or an [N, H, W, 3] batch -> uint8 [N, size, size, 3], resized with PIL as transformers'
    PIL backend does."""
    from PIL import Image
    if isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4:
        if images.shape[0] == 0:
            raise ValueError(f"images is an empty batch of shape {tuple(images.shape)}; pass at least one image")
        images = list(images)  # [N, H, W, 3]: a batch, as transformers reads a 4-d array
    if isinstance(images, (list, tuple)):
        if not images:
            raise ValueError("images is an empty list; pass at least one image")
        images = list(images)
    else:
        images = [images]
    resized = []
    for i, image in enumerate(images):
        if isinstance(image, Image.Image):
            image = pil_to_rgb(image, f"image {i}")
        else:
            image = Image.fromarray(_hwc_uint8(image, i))
        if image.size != (size, size):
            image = image.resize((size, size), resample=resample)
        resized.append(np.asarray(image, dtype=np.uint8))
    return np.stack(resized)


def pil_to_rgb(image, name: str):
    """A PIL image of 8-bit pixels in any mode (L, P, RGBA, CMYK, ...) -> RGB. Refused: an empty image (it would
    resize to black), and modes of wider pixels (16-bit I;16, 32-bit I, float F), which convert("RGB") clips to
    255 (a 16-bit photo turns white) and transformers does not read either."""
    if image.width < 1 or image.height < 1:
        raise ValueError(f"{name} is {image.width}x{image.height} pixels; expected at least 1x1")
    if image.mode in ("I", "F") or image.mode.startswith("I;"):
        raise ValueError(
            f"{name} has PIL mode {image.mode!r} (16-bit, 32-bit or float pixels); expected 8-bit pixels "
            f"(L, P, RGB, RGBA, ...): convert it to 8 bits first, e.g. scale a 16-bit image by 255 / 65535"
        )
    return image.convert("RGB") if image.mode != "RGB" else image


def _hwc_uint8(image, index: int) -> np.ndarray:
    """A numpy array or tensor that must already be uint8 [H, W, 3]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    if not isinstance(image, np.ndarray):
        raise TypeError(
            f"image {index} is a {type(image).__name__}; expected a PIL image, or a uint8 [H, W, 3] "
            f"numpy array or torch tensor"
        )
    if image.dtype != np.uint8:
        raise ValueError(
            f"image {index} has dtype {image.dtype}; expected uint8 pixels in [0, 255] "
            f"(convert floats in [0, 1] with (x * 255).round() to uint8)"
        )
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"image {index} has shape {image.shape}; expected [H, W, 3] (channels last, RGB)")
    return np.ascontiguousarray(image)


def _unimplemented_settings(data: dict) -> list[str]:
    """The FIXED_SETTINGS that a preprocessor_config.json sets to something else, as "key=value"."""
    unimplemented = []
    for key, expected in FIXED_SETTINGS.items():
        value = data.get(key)
        if value is None:
            continue
        if isinstance(expected, bool):
            same = value is expected
        else:
            try:
                same = bool(np.allclose(np.asarray(value, dtype=np.float64), expected, rtol=1e-6, atol=0))
            except (TypeError, ValueError):  # not numbers, or not 3 of them
                same = False
        if not same:
            unimplemented.append(f"{key}={value!r}")
    return unimplemented


def _side_length(size) -> int:
    if isinstance(size, dict):
        if set(size) != {"height", "width"}:
            raise ValueError(f"size must be an int or {{'height': h, 'width': w}}, got {size!r}")
        if size["height"] != size["width"]:
            raise ValueError(
                f"ImageGPT images are square; got size height={size['height']}, width={size['width']}"
            )
        size = size["height"]
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size < 1:
        raise ValueError(f"size must be a positive int side length, got {size!r}")
    return int(size)


def _resample_code(resample) -> int:
    # PIL's filters: NEAREST 0, LANCZOS 1, BILINEAR 2, BICUBIC 3, BOX 4, HAMMING 5 (Resampling enum or int).
    if (
        isinstance(resample, bool)
        or not isinstance(resample, (int, np.integer))
        or not 0 <= int(resample) <= 5
    ):
        raise ValueError(
            f"resample must be a PIL resampling filter (0-5, e.g. 2 for bilinear), got {resample!r}"
        )
    return int(resample)
