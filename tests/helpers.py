"""Small builders shared by tests: configs, random weights, HF twins and checkpoint folders."""

from __future__ import annotations

import numpy as np
import torch

from igpt_fast.checkpoint import expected_shapes, save_pretrained
from igpt_fast.config import ImageGPTConfig
from igpt_fast.philox import generation_key, philox_uniforms
from igpt_fast.reference import ReferenceImageGPT

# A tiny config for engine and generation tests: 2 layers, 2 heads of 16, 17 clusters, 24 positions.
TINY = ImageGPTConfig(vocab_size=18, n_positions=24, n_embd=32, n_layer=2, n_head=2)


def random_state_dict(config: ImageGPTConfig, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Every parameter random (biases and norm weights too, so a dropped bias or an ignored norm shows)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            t = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif name.endswith("bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif "wte" in name or "wpe" in name:
            t = 0.5 * torch.randn(shape, generator=g)
        else:
            t = torch.randn(shape, generator=g) / shape[0] ** 0.5
        state[name] = t.to(dtype)
    return state


def mean_kl(reference_logits: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean KL(reference || engine) over the next-token distributions along the last dim, in float64."""
    p = torch.log_softmax(reference_logits.double(), -1)
    q = torch.log_softmax(logits.double(), -1)
    return (p.exp() * (p - q)).sum(-1).mean().item()


def philox(seed: int):
    """The random numbers of generate(seed=seed), in the form ReferenceImageGPT.generate(uniforms=...) takes them."""
    key = generation_key(seed)
    return lambda step, batch, vocab: philox_uniforms(key, step, batch, vocab)


def random_reference(config: ImageGPTConfig, seed: int = 0) -> ReferenceImageGPT:
    return ReferenceImageGPT.from_state_dict(config, random_state_dict(config, seed))


def hf_twin(config: ImageGPTConfig, state_dict: dict[str, torch.Tensor]):
    """transformers' ImageGPTForCausalImageModeling with the same config and weights, in eval mode."""
    import transformers

    hf = transformers.ImageGPTForCausalImageModeling(transformers.ImageGPTConfig(**config.to_dict()))
    missing, unexpected = hf.load_state_dict(state_dict, strict=False)
    assert not unexpected and all(k.endswith(("attn.bias", "attn.masked_bias")) for k in missing), (missing,
                                                                                                  unexpected)
    return hf.eval()


def random_clusters(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 3)).astype(np.float32)


def make_checkpoint(folder, config: ImageGPTConfig = TINY, seed: int = 0):
    """A checkpoint folder in the real Hugging Face format, with random weights and clusters."""
    state = random_state_dict(config, seed)
    save_pretrained(folder, config, state, clusters=random_clusters(config.n_clusters, seed))
    return state


def decode_step_kernels(model, batch: int, monkeypatch) -> list[str]:
    """The Triton kernels one captured-shape decode step of `model` (backend "triton", under the interpreter) launches,
    in order, at `batch` sequences."""
    from triton.runtime.interpreter import InterpretedFunction

    context = torch.full((batch, 1), model.config.sos_token_id)
    model.generate(context, max_new_tokens=2, do_sample=True, seed=1)
    launched = []
    run = InterpretedFunction.run
    monkeypatch.setattr(InterpretedFunction, "run",
                        lambda self, *args, **kwargs: launched.append(self.fn.__name__) or run(self, *args, **kwargs))
    model.decoder.step(model.decoder.states[batch], greedy=False)
    return launched
