"""The oracle: ImageGPT in plain PyTorch, computing exactly what transformers' ImageGPTForCausalImageModeling
computes (see shared/docs/imagegpt.md). Parameter names and layouts are Hugging Face's, so an HF state dict
loads with no renaming. Clear, not fast: never optimise this file.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from igpt_fast.config import ImageGPTConfig

DEFAULT_TOP_K = 50  # transformers' GenerationConfig default, applied when sampling with top_k unset

# One layer's cache: (key, value), each [B, n_head, tokens so far, head_dim].
LayerCache = tuple[torch.Tensor, torch.Tensor]


class ImageGPTLayerNorm(nn.Module):
    """iGPT's norm: no mean subtraction, no bias; computed in the input dtype like HF."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x / torch.sqrt(torch.mean(torch.square(x), dim=-1, keepdim=True) + self.eps)
        return x * self.weight


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight stored [in, out], y = x @ W + b (the same addmm HF uses)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))
        nn.init.normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_shape = x.shape[:-1] + (self.weight.shape[1],)
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(out_shape)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class ImageGPTAttention(nn.Module):
    def __init__(self, config: ImageGPTConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.scale = attention_scale(config, layer_idx)
        # HF divides raw scores by sqrt(head_dim), then by (layer_idx + 1): two roundings, kept as two steps.
        self.scale_divisors = ((float(self.head_dim) ** 0.5,) if config.scale_attn_weights else ()) + (
            (float(layer_idx + 1),) if config.scale_attn_by_inverse_layer_idx else ())
        self.upcast = config.reorder_and_upcast_attn

    def forward(self, x: torch.Tensor, layer_cache: LayerCache | None) -> tuple[torch.Tensor, LayerCache]:
        B, S, d = x.shape
        q, k, v = self.c_attn(x).split(d, dim=2)
        q, k, v = (t.view(B, S, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, nh, S, hd)
        if layer_cache is not None:
            k = torch.cat((layer_cache[0], k), dim=2)
            v = torch.cat((layer_cache[1], v), dim=2)
        T = k.shape[2]
        if self.upcast:
            # HF's reorder_and_upcast_attn: scores and softmax in float32, one scale factor.
            scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * self.scale
        else:
            scores = torch.matmul(q, k.transpose(-1, -2))
            for divisor in self.scale_divisors:
                scores = scores / divisor
        # Query i (absolute position T - S + i) sees keys 0..T - S + i.
        causal = torch.ones(S, T, dtype=torch.bool, device=x.device).tril(diagonal=T - S)
        scores = torch.where(causal, scores, torch.tensor(torch.finfo(scores.dtype).min, dtype=scores.dtype,
                                                          device=x.device))
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v)  # (B, nh, S, hd)
        out = out.transpose(1, 2).contiguous().view(B, S, d)
        return self.c_proj(out), (k, v)


def attention_scale(config: ImageGPTConfig, layer_idx: int) -> float:
    """The factor attention scores are multiplied by (what the kernels use)."""
    scale = 1.0 / math.sqrt(config.head_dim) if config.scale_attn_weights else 1.0
    if config.scale_attn_by_inverse_layer_idx:
        scale /= float(layer_idx + 1)
    return scale


class ImageGPTMLP(nn.Module):
    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, config.inner_dim)
        self.c_proj = Conv1D(config.inner_dim, config.n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(quick_gelu(self.c_fc(x)))


class ImageGPTBlock(nn.Module):
    def __init__(self, config: ImageGPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = ImageGPTLayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.attn = ImageGPTAttention(config, layer_idx)
        self.ln_2 = ImageGPTLayerNorm(config.n_embd, config.layer_norm_epsilon)
        self.mlp = ImageGPTMLP(config)

    def forward(self, x: torch.Tensor, layer_cache: LayerCache | None) -> tuple[torch.Tensor, LayerCache]:
        attn_out, layer_cache = self.attn(self.ln_1(x), layer_cache)
        x = attn_out + x
        x = self.mlp(self.ln_2(x)) + x
        return x, layer_cache


class ImageGPTModel(nn.Module):
    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.n_positions, config.n_embd)
        self.h = nn.ModuleList(ImageGPTBlock(config, i) for i in range(config.n_layer))
        self.ln_f = ImageGPTLayerNorm(config.n_embd, config.layer_norm_epsilon)


@dataclass
class ReferenceOutput:
    logits: torch.Tensor  # [B, S, vocab_size - 1]
    past_key_values: list[LayerCache] | None = None
    # HF's convention: (embeddings, block 1 out, ..., block n_layer-1 out, ln_f(block n_layer out)).
    hidden_states: tuple[torch.Tensor, ...] | None = None


class ReferenceImageGPT(nn.Module):
    """ImageGPTForCausalImageModeling in plain PyTorch (eval mode: no dropout)."""

    def __init__(self, config: ImageGPTConfig):
        super().__init__()
        self.config = config
        self.transformer = ImageGPTModel(config)
        self.lm_head = nn.Linear(config.n_embd, config.n_clusters, bias=False)
        self.eval()

    def forward(self, input_ids: torch.Tensor, past_key_values: list[LayerCache] | None = None,
                use_cache: bool = False, output_hidden_states: bool = False) -> ReferenceOutput:
        """input_ids [B, S]; with past_key_values (from a previous call with use_cache=True) the ids continue
        the cached sequence, as in a generation loop."""
        check_input_ids(input_ids, self.config)
        past = past_key_values[0][0].shape[2] if past_key_values else 0
        if past + input_ids.shape[1] > self.config.n_positions:
            raise ValueError(f"sequence of {past} cached + {input_ids.shape[1]} new tokens exceeds "
                             f"n_positions={self.config.n_positions}")
        positions = torch.arange(past, past + input_ids.shape[1], device=input_ids.device)
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)[None]
        hidden_states = [x] if output_hidden_states else None
        new_cache = []
        for i, block in enumerate(self.transformer.h):
            x, layer_cache = block(x, past_key_values[i] if past_key_values else None)
            new_cache.append(layer_cache)
            if output_hidden_states:
                hidden_states.append(x)
        x = self.transformer.ln_f(x)
        if output_hidden_states:
            hidden_states[-1] = x
        return ReferenceOutput(
            logits=self.lm_head(x),
            past_key_values=new_cache if use_cache else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
        )

    @classmethod
    def from_pretrained(cls, path: str, dtype: torch.dtype | None = None) -> ReferenceImageGPT:
        """From a local Hugging Face folder or a hub id already in the local cache."""
        from igpt_fast.checkpoint import load_checkpoint

        checkpoint = load_checkpoint(path)
        return cls.from_state_dict(checkpoint.config, checkpoint.state_dict, dtype=dtype)

    @classmethod
    def from_state_dict(cls, config: ImageGPTConfig, state_dict: dict, dtype: torch.dtype | None = None):
        from igpt_fast.checkpoint import check_state_dict

        check_state_dict(config, state_dict)
        with torch.device("meta"):
            model = cls(config)
        model.load_state_dict(state_dict, assign=True, strict=True)
        return model.to(dtype) if dtype is not None else model

    @classmethod
    def from_hf(cls, hf_model) -> ReferenceImageGPT:
        """From an in-memory transformers ImageGPTForCausalImageModeling (weights copied, not shared)."""
        config = ImageGPTConfig.from_hf(hf_model.config)
        state = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
        return cls.from_state_dict(config, _drop_legacy_buffers(state))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, *, max_length: int | None = None,
                 max_new_tokens: int | None = None, do_sample: bool = False, temperature=1.0, top_k=None,
                 top_p=None, generator: torch.Generator | None = None, uniforms=None) -> torch.Tensor:
        """The reference generation loop: [B, prefix] -> [B, prefix + new], one token per forward pass with a
        KV cache. Sampling defaults to top_k=50 like transformers. Randomness: `uniforms(step, batch, vocab)` ->
        float32 [B, V] in [0, 1) if given (the engine's Philox stream, for parity), else torch.rand with
        `generator`. step is the position of the token fed in.
        """
        from igpt_fast.sampling import check_sampling_args, sample_reference

        check_input_ids(input_ids, self.config)
        B, prefix = input_ids.shape
        new_tokens = resolve_length(prefix, max_length, max_new_tokens, self.config)
        if do_sample and top_k is None:
            top_k = min(DEFAULT_TOP_K, self.config.n_clusters)
        check_sampling_args(do_sample, temperature, top_k, top_p, self.config.n_clusters)
        vocab = self.config.n_clusters
        out = self(input_ids, use_cache=True)
        sequences = input_ids
        for i in range(new_tokens):
            step = prefix - 1 + i
            logits = out.logits[:, -1].float()
            if uniforms is not None:
                u = uniforms(step, B, vocab).to(logits.device)
            else:
                u = torch.rand(B, vocab, generator=generator, device=logits.device if generator is None
                               else generator.device).to(logits.device)
            next_ids = sample_reference(logits, uniforms=u, temperature=temperature, top_k=top_k, top_p=top_p,
                                        greedy=not do_sample)
            sequences = torch.cat((sequences, next_ids[:, None].to(sequences.dtype)), dim=1)
            if i + 1 < new_tokens:
                out = self(next_ids[:, None], past_key_values=out.past_key_values, use_cache=True)
        return sequences


def _drop_legacy_buffers(state_dict: dict) -> dict:
    from igpt_fast.checkpoint import is_legacy_buffer

    return {k: v for k, v in state_dict.items() if not is_legacy_buffer(k)}


ID_DTYPES = (torch.int64, torch.int32, torch.int16, torch.uint8)


def check_input_ids(input_ids, config: ImageGPTConfig) -> None:
    """Shape, dtype and range of token ids; raises before any work is done. (Range check syncs: API boundary.)"""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, sequence], got shape {tuple(input_ids.shape)}")
    if input_ids.dtype not in ID_DTYPES:  # int8 is refused: it cannot hold ids up to 512
        raise ValueError(f"input_ids must hold integer token ids of dtype {', '.join(map(str, ID_DTYPES))}, got "
                         f"dtype {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); pass at least the SOS token "
                         f"{config.sos_token_id}")
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= config.vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"input_ids holds token id {bad}; ids must lie in [0, {config.vocab_size})")


def resolve_length(prefix: int, max_length: int | None, max_new_tokens: int | None,
                   config: ImageGPTConfig) -> int:
    """New tokens to generate from transformers-style length arguments."""
    if prefix > config.n_positions:
        raise ValueError(f"a prompt of {prefix} tokens exceeds n_positions={config.n_positions}")
    if max_length is not None and max_new_tokens is not None:  # transformers' precedence, and its warning
        warnings.warn(f"Both max_new_tokens (={max_new_tokens}) and max_length (={max_length}) are set; "
                      f"max_new_tokens takes precedence, as in transformers", UserWarning, stacklevel=3)
        max_length = None
    if max_new_tokens is None and max_length is None:
        max_length = config.n_positions + 1  # a whole image after the SOS, the model card's call
    total = max_length if max_new_tokens is None else prefix + max_new_tokens
    limit = config.n_positions + 1  # the last generated token is never fed back, so it needs no position
    if total > limit:
        raise ValueError(f"max_length {total} exceeds n_positions + 1 = {limit}")
    if total <= prefix:
        raise ValueError(f"max_length {total} leaves nothing to generate after a prefix of {prefix} tokens")
    return total - prefix
