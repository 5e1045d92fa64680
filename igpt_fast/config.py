"""ImageGPT configuration with Hugging Face's field names, presets and config.json I/O."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass

# Values this engine implements; anything else in a config.json is refused rather than silently ignored.
SUPPORTED_ACTIVATIONS = ("quick_gelu",)


@dataclass(frozen=True)
class ImageGPTConfig:
    vocab_size: int = 513  # 512 color clusters + the SOS token (id vocab_size - 1)
    n_positions: int = 1024  # 32 x 32 pixels
    n_embd: int = 512
    n_layer: int = 24
    n_head: int = 8
    n_inner: int | None = None  # None means 4 * n_embd
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "quick_gelu"
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    tie_word_embeddings: bool = False

    def __post_init__(self):
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ImageGPTConfig.{name} must be a positive integer, got {value!r}")
        if self.vocab_size < 2:
            raise ValueError(f"ImageGPTConfig.vocab_size must be >= 2 (clusters + SOS), got {self.vocab_size}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"ImageGPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or isinstance(self.n_inner, bool)
                                         or self.n_inner < 1):
            raise ValueError(f"ImageGPTConfig.n_inner must be None or a positive integer, got {self.n_inner!r}")
        if self.activation_function not in SUPPORTED_ACTIVATIONS:
            raise ValueError(
                f"ImageGPTConfig.activation_function={self.activation_function!r} is not implemented; "
                f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}"
            )
        eps = self.layer_norm_epsilon  # JSON's true reads as 1, and Infinity zeroes every normalized activation
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < math.inf):
            raise ValueError(f"ImageGPTConfig.layer_norm_epsilon must be a finite positive number, got {eps!r}")
        if self.tie_word_embeddings:
            # lm_head is [vocab_size - 1, n_embd] and wte is [vocab_size, n_embd]: they cannot be one tensor.
            raise ValueError(
                "ImageGPTConfig.tie_word_embeddings=True is not supported: ImageGPT's lm_head has "
                "vocab_size - 1 rows and cannot share wte's weights"
            )
        for name in ("scale_attn_weights", "scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ImageGPTConfig.{name} must be a bool, got {getattr(self, name)!r}")

    # Derived sizes, named as the kernels and the engine use them.
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner if self.n_inner is not None else 4 * self.n_embd

    @property
    def n_clusters(self) -> int:
        """Tokens the model predicts: every id but the SOS."""
        return self.vocab_size - 1

    @property
    def sos_token_id(self) -> int:
        return self.vocab_size - 1

    # Hugging Face attribute aliases (`config.hidden_size`, ...), so code written for transformers reads ours.
    @property
    def hidden_size(self) -> int:
        return self.n_embd

    @property
    def max_position_embeddings(self) -> int:
        return self.n_positions

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    def num_parameters(self) -> int:
        """Parameter count of ImageGPTForCausalImageModeling (what HF reports)."""
        d, inner, n_layer = self.n_embd, self.inner_dim, self.n_layer
        per_layer = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * inner + inner) + (inner * d + d)
        return self.vocab_size * d + self.n_positions * d + n_layer * per_layer + d + self.n_clusters * d

    @classmethod
    def small(cls, **overrides) -> ImageGPTConfig:
        return cls(**{"n_embd": 512, "n_head": 8, "n_layer": 24, **overrides})

    @classmethod
    def medium(cls, **overrides) -> ImageGPTConfig:
        return cls(**{"n_embd": 1024, "n_head": 8, "n_layer": 36, **overrides})

    @classmethod
    def large(cls, **overrides) -> ImageGPTConfig:
        return cls(**{"n_embd": 1536, "n_head": 16, "n_layer": 48, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides) -> ImageGPTConfig:
        presets = {"small": cls.small, "medium": cls.medium, "large": cls.large}
        if name not in presets:
            raise ValueError(f"unknown ImageGPT preset {name!r}; expected one of {sorted(presets)}")
        return presets[name](**overrides)

    def replace(self, **changes) -> ImageGPTConfig:
        return dataclasses.replace(self, **changes)

    # ---- config.json ----
    @classmethod
    def from_dict(cls, data: dict) -> ImageGPTConfig:
        model_type = data.get("model_type", "imagegpt")
        if model_type != "imagegpt":
            raise ValueError(f"config.json has model_type={model_type!r}; expected 'imagegpt'")
        if data.get("add_cross_attention"):
            raise ValueError("config.json sets add_cross_attention=true; igpt-fast has no cross-attention")
        fields = {f.name for f in dataclasses.fields(cls)}
        # Hugging Face also accepts the long attribute names as keys.
        aliases = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                   "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}
        kwargs = {}
        for key, value in data.items():
            key = aliases.get(key, key)
            if key in fields:
                kwargs[key] = value
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """What transformers' ImageGPTConfig writes for the fields the math depends on."""
        data = dataclasses.asdict(self)
        data.update(model_type="imagegpt", architectures=["ImageGPTForCausalImageModeling"],
                    add_cross_attention=False, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                    initializer_range=0.02, use_cache=True)
        return data

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> ImageGPTConfig:
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{os.fspath(path)} is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{os.fspath(path)} must hold a JSON object, got {type(data).__name__}")
        return cls.from_dict(data)

    def to_json_file(self, path: str | os.PathLike) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)
            f.write("\n")

    @classmethod
    def from_hf(cls, hf_config) -> ImageGPTConfig:
        """From a transformers ImageGPTConfig object."""
        return cls.from_dict(hf_config.to_dict())
