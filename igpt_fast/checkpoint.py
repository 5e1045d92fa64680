"""Reading and writing Hugging Face ImageGPT checkpoint folders.

A folder holds config.json, weights (model.safetensors, a sharded model.safetensors.index.json, or the
pickle pytorch_model.bin, read only with weights_only=True) and, for the image processor,
preprocessor_config.json with the color clusters. Every key and shape is checked against the config before a
model is built, so a bad checkpoint fails with one error that lists what is wrong.
"""

from __future__ import annotations

import json
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from igpt_fast.config import ImageGPTConfig

CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
PICKLE_NAME = "pytorch_model.bin"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"  # older transformers' shards: pytorch_model-00001-of-00002.bin, ...
GENERATION_CONFIG_NAME = "generation_config.json"
HUB_FILES = [CONFIG_NAME, PREPROCESSOR_NAME, GENERATION_CONFIG_NAME, "*.safetensors", SAFETENSORS_INDEX_NAME,
             PICKLE_NAME, PICKLE_INDEX_NAME, "pytorch_model-*.bin"]

# Non-parameter buffers older .bin files carry (the causal mask and its fill value). Exactly these are
# skipped; `attn.c_attn.bias` is a real parameter and does not match.
_LEGACY_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")


@dataclass
class Checkpoint:
    config: ImageGPTConfig
    state_dict: dict[str, torch.Tensor]
    clusters: np.ndarray | None  # [n_clusters, 3] float64 in [-1, 1], from preprocessor_config.json
    folder: Path


def is_legacy_buffer(key: str) -> bool:
    return _LEGACY_BUFFER.match(key) is not None


def expected_shapes(config: ImageGPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of ImageGPTForCausalImageModeling and its shape."""
    d, inner = config.n_embd, config.inner_dim
    shapes = {
        "transformer.wte.weight": (config.vocab_size, d),
        "transformer.wpe.weight": (config.n_positions, d),
    }
    for i in range(config.n_layer):
        p = f"transformer.h.{i}."
        shapes.update({
            p + "ln_1.weight": (d,),
            p + "attn.c_attn.weight": (d, 3 * d),
            p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d),
            p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,),
            p + "mlp.c_fc.weight": (d, inner),
            p + "mlp.c_fc.bias": (inner,),
            p + "mlp.c_proj.weight": (inner, d),
            p + "mlp.c_proj.bias": (d,),
        })
    shapes["transformer.ln_f.weight"] = (d,)
    shapes["lm_head.weight"] = (config.n_clusters, d)
    return shapes


def check_state_dict(config: ImageGPTConfig, state_dict: dict[str, torch.Tensor]) -> None:
    """Raise one ValueError listing missing, unexpected and mis-shaped keys, tensors not float and values not finite
    (legacy buffers must be dropped)."""
    expected = expected_shapes(config)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)}, config expects {expected[k]}"
                  for k in expected if k in state_dict and tuple(state_dict[k].shape) != expected[k]]
    not_float = [f"{k}: {v.dtype}" for k, v in state_dict.items() if k in expected and not v.is_floating_point()]
    # A NaN or inf weight (a corrupt file, a float16 overflow when it was saved) otherwise generates blank images and
    # NaN likelihoods without a word.
    not_finite = [f"{k}: {int((~torch.isfinite(v)).sum())} of {v.numel()}" for k, v in state_dict.items()
                  if k in expected and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if missing or unexpected or mismatched or not_float or not_finite:
        parts = []
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched), ("non-float tensors", not_float),
                             ("NaN or infinite values", not_finite)):
            if items:
                shown = items[:10] + ([f"... and {len(items) - 10} more"] if len(items) > 10 else [])
                parts.append(f"{title} ({len(items)}): " + "; ".join(shown))
        raise ValueError(f"checkpoint weights unusable with {config}:\n  " + "\n  ".join(parts))


def resolve_folder(path_or_hub_id: str | os.PathLike, *, revision: str | None = None,
                   cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
                   token: str | bool | None = None) -> Path:
    """A local folder as is; a hub id (`openai/imagegpt-small`) through huggingface_hub's cache, offline first.
    revision, cache_dir, local_files_only and token mean what they mean to transformers' from_pretrained."""
    path = Path(path_or_hub_id)
    if path.is_dir():
        return path
    name = os.fspath(path_or_hub_id)
    if path.exists():
        raise ValueError(f"{name} is a file; expected a checkpoint folder holding {CONFIG_NAME}")
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise FileNotFoundError(f"no checkpoint folder at {name!r} (and it is not a hub id like "
                                f"'openai/imagegpt-small')")
    try:
        import huggingface_hub
    except ImportError:
        raise FileNotFoundError(
            f"{name!r} is not a local folder, and huggingface_hub is not installed to resolve it as a hub id. "
            f"Install it (pip install 'igpt-fast[hf]') or download the folder (config.json, model.safetensors "
            f"or pytorch_model.bin, preprocessor_config.json) and pass its path."
        ) from None
    hub = dict(allow_patterns=HUB_FILES, revision=revision, cache_dir=cache_dir, token=token)
    try:  # the local cache first: works offline for a model downloaded before
        return Path(huggingface_hub.snapshot_download(name, local_files_only=True, **hub))
    except Exception as e:
        if local_files_only:
            from huggingface_hub.constants import HF_HUB_CACHE

            raise FileNotFoundError(f"{name!r} (revision {revision or 'main'}) is not in the Hugging Face cache "
                                    f"{cache_dir or HF_HUB_CACHE}, and local_files_only=True "
                                    f"({type(e).__name__})") from None
    try:
        return Path(huggingface_hub.snapshot_download(name, **hub))
    except Exception as e:
        raise FileNotFoundError(
            f"could not find {name!r} in the Hugging Face cache or download it ({type(e).__name__}: {e}). "
            f"On a machine with network run `huggingface-cli download {name}`, or pass a local folder."
        ) from None


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Weights from a folder, preferring safetensors; legacy mask buffers dropped."""
    if (folder / SAFETENSORS_NAME).is_file():
        state = _load_safetensors(folder / SAFETENSORS_NAME)
    elif (folder / SAFETENSORS_INDEX_NAME).is_file():
        state = _load_sharded(folder / SAFETENSORS_INDEX_NAME, _load_safetensors)
    elif (folder / PICKLE_NAME).is_file():
        state = _load_pickle(folder / PICKLE_NAME)
    elif (folder / PICKLE_INDEX_NAME).is_file():
        state = _load_sharded(folder / PICKLE_INDEX_NAME, _load_pickle)
    else:
        raise FileNotFoundError(f"no weights in {folder}: expected {SAFETENSORS_NAME}, {SAFETENSORS_INDEX_NAME}, "
                                f"{PICKLE_NAME} or {PICKLE_INDEX_NAME}")
    return {k: v for k, v in state.items() if not is_legacy_buffer(k)}


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"cannot read {path} (truncated or not a safetensors file?): {e}") from None


def _load_sharded(index_path: Path, load_shard) -> dict[str, torch.Tensor]:
    """The shards an index's weight_map names (safetensors or pickles: load_shard reads one), each key from its own."""
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{index_path} is not a shard index with a 'weight_map': {e}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ValueError(f"{index_path}: 'weight_map' must map each key to a shard's file name, got "
                         f"{json.dumps(weight_map)[:100]}")
    state = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise FileNotFoundError(f"{index_path} names shard {shard}, which is not in {index_path.parent}")
        tensors = load_shard(shard_path)
        state.update({k: v for k, v in tensors.items() if weight_map.get(k) == shard})
    unlisted = sorted(set(weight_map) - set(state))
    if unlisted:
        raise ValueError(f"{index_path} lists keys its shards do not hold: {unlisted[:10]}")
    return state


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        # weights_only=True: a pickle can run arbitrary code; this refuses anything but tensors and containers.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError) as e:
        # torch's message goes on to suggest weights_only=False, which would run whatever code the file holds: only
        # the unpickler's own reason is kept.
        reason = " ".join(str(e).split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].split())
        raise ValueError(f"refusing or unable to load {path} with torch.load(weights_only=True), which reads "
                         f"tensors and containers only and never runs code from a file: {reason[:300]}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    return state


def load_clusters(folder: Path) -> np.ndarray | None:
    """The [n_clusters, 3] color table from preprocessor_config.json, or None if the folder has none."""
    path = folder / PREPROCESSOR_NAME
    if not path.is_file():
        return None
    try:
        clusters = json.loads(path.read_text()).get("clusters")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    if clusters is None:
        return None
    try:
        clusters = np.asarray(clusters, dtype=np.float64)
    except (TypeError, ValueError) as e:  # strings, ragged rows: name the file, not just numpy's complaint
        raise ValueError(f"{path}: clusters must be [n_clusters, 3] numbers, got an unreadable table ({e})") from None
    if clusters.ndim != 2 or clusters.shape[1] != 3:
        raise ValueError(f"{path}: clusters must be [n_clusters, 3], got shape {clusters.shape}")
    return clusters


# generation_config.json's keys that set no generation behaviour here (token ids: no sequence ends early, prompts are
# never padded, and generate() always takes a prompt).
_GENERATION_METADATA = {"_from_model_config", "transformers_version", "bos_token_id", "eos_token_id", "pad_token_id",
                        "decoder_start_token_id"}


def generation_settings(folder: Path) -> dict:
    """What a folder's generation_config.json sets beyond metadata and token ids ({} without one)."""
    path = folder / GENERATION_CONFIG_NAME
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None
    return {k: v for k, v in settings.items() if k not in _GENERATION_METADATA} if isinstance(settings, dict) else {}


def load_checkpoint(path_or_hub_id: str | os.PathLike, **hub_options) -> Checkpoint:
    """Config, checked weights and clusters of a Hugging Face ImageGPT folder or cached hub id (hub_options: those of
    resolve_folder)."""
    folder = resolve_folder(path_or_hub_id, **hub_options)
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {folder}")
    config = ImageGPTConfig.from_json_file(folder / CONFIG_NAME)
    state_dict = load_state_dict(folder)
    check_state_dict(config, state_dict)
    clusters = load_clusters(folder)
    if clusters is not None and clusters.shape[0] != config.n_clusters:
        raise ValueError(f"{folder / PREPROCESSOR_NAME} has {clusters.shape[0]} clusters but the model predicts "
                         f"{config.n_clusters} tokens (vocab_size - 1)")
    return Checkpoint(config, state_dict, clusters, folder)


def preprocessor_config(clusters: np.ndarray, size: int = 32) -> dict:
    """preprocessor_config.json contents that transformers' ImageGPT image processors load."""
    return {
        "image_processor_type": "ImageGPTImageProcessor",
        "clusters": np.asarray(clusters, dtype=np.float32).tolist(),
        "do_color_quantize": True,
        "do_normalize": True,
        "do_resize": True,
        "resample": 2,  # PIL bilinear
        "size": {"height": size, "width": size},
    }


def save_pretrained(folder: str | os.PathLike, config: ImageGPTConfig, state_dict: dict[str, torch.Tensor],
                    clusters: np.ndarray | None = None, image_size: int = 32) -> Path:
    """Write config.json, model.safetensors (and preprocessor_config.json if clusters are given) in the layout
    transformers' ImageGPTForCausalImageModeling.from_pretrained reads."""
    from safetensors.torch import save_file

    state_dict = {k: v for k, v in state_dict.items() if not is_legacy_buffer(k)}
    check_state_dict(config, state_dict)
    if clusters is not None and np.asarray(clusters).shape != (config.n_clusters, 3):
        raise ValueError(f"clusters must be [{config.n_clusters}, 3], got {np.asarray(clusters).shape}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.to_json_file(folder / CONFIG_NAME)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    save_file(tensors, folder / SAFETENSORS_NAME, metadata={"format": "pt"})
    if clusters is not None:
        with open(folder / PREPROCESSOR_NAME, "w", encoding="utf-8") as f:
            json.dump(preprocessor_config(clusters, image_size), f)
    return folder
