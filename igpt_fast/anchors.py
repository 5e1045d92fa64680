"""The systems igpt-fast is measured against, run in the same process on the same weights and prompts.

    reference-eager      gpt-fast's recipe over ReferenceImageGPT's weights: a module whose KV cache is a pair
                         of buffers [B, H, T, D] per layer written with index_copy_ at input_pos, attention by
                         SDPA under a causal mask over the whole cache, sampling with no host sync; run eagerly
    reference-compiled   the same decode step under torch.compile(mode="reduce-overhead", fullgraph=True)
    transformers         transformers' generate (dynamic cache): the model card's call
    transformers-static  the same with cache_implementation="static" (which transformers compiles on CUDA)

Each anchor has `generate(prompt [B, P], new_tokens) -> TimedRun`: the prompt is prefilled, new_tokens tokens are
sampled (top-k), and the clock marks the prefill + first token apart from the decode steps after it; and
`warmup_tokens`: how long a first generate() must be to leave compilation behind (None: as long as the timed one,
where the compiled shapes depend on the length).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from igpt_fast.config import ImageGPTConfig
from igpt_fast.reference import ReferenceImageGPT, attention_scale

ANCHORS = ("reference-eager", "reference-compiled", "transformers", "transformers-static")
COMPILED_ANCHORS = ("reference-compiled", "transformers-static")


@dataclass
class TimedRun:
    sequences: torch.Tensor  # [B, P + new_tokens]
    total_s: float  # the whole call: prefill, first token and every decode step
    first_token_s: float  # prefill + the first sampled token
    decode_s: float  # the decode steps after the first token
    decode_steps: int

    @property
    def ms_per_step(self) -> float:
        return 1e3 * self.decode_s / self.decode_steps


class Clock:
    """Wall-clock marks taken after the device has finished the work queued before them."""

    def __init__(self, device: torch.device):
        self.device = device
        self.marks: list[float] = []

    def mark(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.marks.append(time.perf_counter())

    def run(self, sequences: torch.Tensor, decode_steps: int) -> TimedRun:
        """From three marks: before the call, after the first token, after the last step."""
        begin, first, end = self.marks[0], self.marks[1], self.marks[-1]
        return TimedRun(sequences, end - begin, first - begin, end - first, decode_steps)


def sample_top_k(logits: torch.Tensor, top_k: int, greedy: bool) -> torch.Tensor:
    """gpt-fast's sampler: logits float32 [B, V] -> int64 [B]. argmax(p / E) with E ~ Exp(1) is a draw from p
    (the exponential race), so no host sync; top-k by the k-th largest logit as a threshold."""
    if greedy:
        return logits.argmax(dim=-1)
    pivot = torch.topk(logits, top_k, dim=-1).values[:, -1:]
    probs = torch.softmax(torch.where(logits < pivot, float("-inf"), logits), dim=-1)
    return torch.argmax(probs / torch.empty_like(probs).exponential_(1), dim=-1)


class KVCache(nn.Module):
    def __init__(self, batch: int, n_head: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_head, max_len, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        """Write k, v [B, H, S, D] at positions input_pos [S]; return the whole caches."""
        self.k_cache.index_copy_(2, input_pos, k)
        self.v_cache.index_copy_(2, input_pos, v)
        return self.k_cache, self.v_cache


class StaticCacheImageGPT(nn.Module):
    """ReferenceImageGPT's modules (shared, not copied) run over a static KV cache with SDPA attention."""

    def __init__(self, reference: ReferenceImageGPT, batch: int):
        super().__init__()
        c = reference.config
        weight = reference.lm_head.weight
        self.config, self.reference = c, reference
        self.kv_caches = nn.ModuleList(KVCache(batch, c.n_head, c.n_positions, c.head_dim, weight.dtype,
                                               weight.device) for _ in range(c.n_layer))
        causal = torch.ones(c.n_positions, c.n_positions, dtype=torch.bool, device=weight.device).tril()
        self.register_buffer("causal_mask", causal, persistent=False)
        self.scales = [attention_scale(c, i) for i in range(c.n_layer)]

    def forward(self, ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """ids [B, S] at positions input_pos [S] -> logits [B, S, n_clusters] (the weights' dtype)."""
        t = self.reference.transformer
        B, S = ids.shape
        d, H, D = self.config.n_embd, self.config.n_head, self.config.head_dim
        x = t.wte(ids) + t.wpe(input_pos)[None]
        mask = self.causal_mask[None, None, input_pos]  # (1, 1, S, T): the query at p sees keys 0..p
        for block, cache, scale in zip(t.h, self.kv_caches, self.scales, strict=True):
            q, k, v = block.attn.c_attn(block.ln_1(x)).split(d, dim=2)
            q, k, v = (z.view(B, S, H, D).transpose(1, 2) for z in (q, k, v))  # (B, H, S, D)
            k, v = cache.update(input_pos, k, v)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
            x = x + block.attn.c_proj(y.transpose(1, 2).reshape(B, S, d))
            x = x + block.mlp(block.ln_2(x))
        return self.reference.lm_head(t.ln_f(x))


class StaticCacheAnchor:
    """reference-eager (compile_options=None) or reference-compiled (the gpt-fast options, or any
    torch.compile keyword arguments: the tests trace with backend="eager"). The prefill always runs eagerly;
    only the decode step is compiled, once per anchor (its shapes never change)."""

    warmup_tokens = 4  # dynamo compiles on the first decode call, CUDA-graph trees record on the next ones

    def __init__(self, reference: ReferenceImageGPT, batch: int, *, top_k: int, greedy: bool = False,
                 compile_options: dict | None = None):
        self.model = StaticCacheImageGPT(reference, batch)
        self.device = reference.lm_head.weight.device
        self.top_k, self.greedy = top_k, greedy
        self.decode_one_token = self._decode_one_token
        if compile_options is not None:
            torch.compiler.reset()  # a fresh cache per anchor: no recompile limits across dtypes and batches
            self.decode_one_token = torch.compile(self._decode_one_token, **compile_options)

    @staticmethod
    def compiled_options() -> dict:
        return {"mode": "reduce-overhead", "fullgraph": True}

    def _decode_one_token(self, ids: torch.Tensor, input_pos: torch.Tensor) -> torch.Tensor:
        """ids [B, 1] at position input_pos [1] -> the next ids [B, 1]."""
        logits = self.model(ids, input_pos)[:, -1].float()
        return sample_top_k(logits, self.top_k, self.greedy)[:, None]

    @torch.no_grad()
    def prefill(self, prompt: torch.Tensor) -> torch.Tensor:
        """Fill the cache with prompt [B, P] (eagerly) and sample the token at P: [B, 1]."""
        logits = self.model(prompt, torch.arange(prompt.shape[1], device=self.device))[:, -1].float()
        return sample_top_k(logits, self.top_k, self.greedy)[:, None]

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, pos: int, steps: int) -> list[torch.Tensor]:
        """Feed ids [B, 1] at position pos and each sampled token after it: the `steps` next tokens."""
        input_pos = torch.tensor([pos], device=self.device)
        tokens = []
        for _ in range(steps):
            # clone: a CUDA graph overwrites its output on the next replay
            ids = self.decode_one_token(ids, input_pos).clone()
            input_pos += 1
            tokens.append(ids)
        return tokens

    def generate(self, prompt: torch.Tensor, new_tokens: int) -> TimedRun:
        clock = Clock(self.device)
        clock.mark()
        first = self.prefill(prompt)
        clock.mark()
        tokens = self.decode(first, prompt.shape[1], new_tokens - 1)
        clock.mark()
        return clock.run(torch.cat([prompt, first, *tokens], dim=1), new_tokens - 1)


class TransformersAnchor:
    """transformers' ImageGPTForCausalImageModeling.generate with top-k sampling; cache_implementation="static"
    for the static-cache variant. A logits processor marks the clock once per forward pass (generate already
    syncs the host every step, so the marks cost little)."""

    def __init__(self, config: ImageGPTConfig, state_dict: dict[str, torch.Tensor], *, dtype, device,
                 top_k: int, cache_implementation: str | None = None):
        import transformers

        if cache_implementation is not None:
            torch.compiler.reset()
        with torch.device(device):
            model = transformers.ImageGPTForCausalImageModeling(transformers.ImageGPTConfig(**config.to_dict()))
        missing, unexpected = model.load_state_dict(state_dict, strict=False)
        # The causal-mask buffers are not parameters; every parameter must come from the state dict.
        missing = [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias"))]
        if missing or unexpected:
            raise ValueError(f"state dict does not fit transformers' ImageGPT: missing {missing}, "
                             f"unexpected {unexpected}")
        # Moved explicitly: building under torch.device(device) is not enough, as ImageGPTLayerNorm (transformers
        # 5.17) makes its weight with the legacy torch.Tensor(size), which stays on the CPU (seen on an H100).
        self.model = model.to(device=device, dtype=dtype).eval()
        if cache_implementation == "static":
            # generate() turns the 2D attention mask into a 4D one for a static cache, and ImageGPT's forward
            # flattens any mask to [batch, -1]: transformers 5.17 then fails ("The size of tensor a (T) must match
            # the size of tensor b (S x T)"). Without a mask it runs on both 5.17 and 5.24, doing the same work.
            # Either way its tokens are not the reference's: ImageGPT slices its causal-mask buffer by the cache's
            # length, which a static cache makes the whole cache. This variant is a timing anchor only.
            self.model.create_masks_for_generate = lambda **kwargs: None
        self.device = torch.device(device)
        self.config = config
        self.top_k = top_k
        self.cache_implementation = cache_implementation
        # The static cache is sized by prompt + new tokens, and transformers compiles for that size.
        self.warmup_tokens = None if cache_implementation == "static" else 2

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> TimedRun:
        from transformers import LogitsProcessor, LogitsProcessorList

        clock = Clock(self.device)

        class MarkEachStep(LogitsProcessor):
            def __call__(self, input_ids, scores):
                clock.mark()
                return scores

        extra = {} if self.cache_implementation is None else {"cache_implementation": self.cache_implementation}
        clock.mark()
        # An explicit all-ones mask: otherwise generate() infers one from pad_token_id (the SOS, which every
        # prompt starts with) and hides the SOS as padding, which the model card's call does not.
        sequences = self.model.generate(
            input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
            min_new_tokens=new_tokens, do_sample=True,
            top_k=self.top_k, logits_processor=LogitsProcessorList([MarkEachStep()]),
            pad_token_id=self.config.sos_token_id, **extra)
        clock.mark()
        if sequences.shape[1] != prompt.shape[1] + new_tokens:
            raise RuntimeError(f"transformers generated {sequences.shape[1] - prompt.shape[1]} tokens, "
                               f"asked for {new_tokens}")
        # marks: begin, after the prefill's forward, after each of the new_tokens - 1 decode forwards, end
        return TimedRun(sequences, clock.marks[-1] - clock.marks[0], clock.marks[1] - clock.marks[0],
                        clock.marks[-2] - clock.marks[1], new_tokens - 1)
