"""Sampling semantics in plain PyTorch: argument checks, the logits warpers, and the reference sampler.

This is the oracle for igpt_fast.kernels.sampling.sample_tokens and the engine's CPU path; it is written
to be obviously right (sorts, float64 probabilities), not fast. The rules, in transformers' order:
  scores = logits / temperature
  top-k:  keep scores >= the k-th largest score (ties kept)
  top-p:  probs = softmax of the top-k-kept scores; keep token i iff the probability mass of the tokens with
          a strictly larger score is < p (transformers' rule without its sort, so ties are kept together)
  choice: argmax over kept i of scores_i - log(-log(u_i)) (Gumbel-max), first index on ties.
Greedy is argmax of the raw logits, first index on ties (transformers ignores the warpers then too).
API-level parameters may be python scalars (one value for every row), or per-row sequences or tensors.
"""

import math
from numbers import Integral, Real

import torch


def as_list(value) -> list:
    """One value or per-row values (a sequence, numpy array or tensor) as a flat python list."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().flatten()
    if hasattr(value, "tolist"):  # tensors, numpy arrays and numpy scalars
        value = value.tolist()
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    # A list may hold one-value tensors ([torch.tensor(0.7), ...]): their numbers, not the tensors, which the checks
    # refused as "not a number" ("got tensor(0.7000)").
    return [v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for v in values]


MIN_TEMPERATURE = 1e-30  # float32 logits / temperature stays finite for |logits| <= 1e8
_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_MIN_SUBNORMAL = 2.0**-149


def _as_float32(values: list) -> list[float]:
    """Real numbers as the float32 values the sampler reads (rounded to nearest: 1e-50 -> 0.0, 1e39 -> inf)."""
    return torch.tensor([float(v) for v in values], dtype=torch.float64).to(torch.float32).tolist()


def check_sampling_args(do_sample, temperature, top_k, top_p, vocab: int) -> None:
    """Raise ValueError naming the first bad value (TypeError for a non-bool do_sample); None means the
    default (1.0, off, off).

    temperature must be finite and > 0, top_k an integer in [1, vocab], top_p in (0, 1], each as one value
    or one per row; temperature and top_p must also survive rounding to the sampler's float32 (temperature in
    [MIN_TEMPERATURE, float32 max], top_p not 0). The values are checked whether or not do_sample is set: a bad
    value is the caller's bug either way.
    """
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {do_sample!r}")
    temperatures = as_list(1.0 if temperature is None else temperature)
    for t in temperatures:
        if isinstance(t, bool) or not isinstance(t, Real) or not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
    for k in as_list(vocab if top_k is None else top_k):
        if isinstance(k, bool) or not isinstance(k, Integral) or not 1 <= k <= vocab:
            raise ValueError(f"top_k must be an integer in [1, {vocab}] (the vocabulary size), got {k!r}")
    top_ps = as_list(1.0 if top_p is None else top_p)
    for p in top_ps:
        if isinstance(p, bool) or not isinstance(p, Real) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
    # The sampler reads float32 copies: temperature 1e-50 and top_p 1e-50 are 0.0 there, temperature 1e39 is inf, and
    # a temperature of 1e-40 overflows the float32 scores. Refused here, before any cache is allocated.
    for t, t32 in zip(temperatures, _as_float32(temperatures), strict=True):
        if not MIN_TEMPERATURE <= t32 <= _FLOAT32_MAX:
            raise ValueError(f"temperature must lie in [{MIN_TEMPERATURE}, {_FLOAT32_MAX:.4g}] (the sampler divides "
                             f"float32 logits by it), got {t!r}; use do_sample=False for greedy decoding")
    for p, p32 in zip(top_ps, _as_float32(top_ps), strict=True):
        if p32 == 0:
            raise ValueError(f"top_p must be a number in (0, 1] that float32 (what the sampler reads) holds as "
                             f"nonzero, at least {_FLOAT32_MIN_SUBNORMAL:.4g}; got {p!r}")


def sampling_tensors(temperature, top_k, top_p, *, batch: int, vocab: int, device="cpu"):
    """Checked per-row parameters as the kernel reads them: float32 [B], int32 [B], float32 [B].

    Each argument is None (default: 1.0, vocab, 1.0), one value for all rows, or exactly `batch` values.
    """
    check_sampling_args(True, temperature, top_k, top_p, vocab)
    defaults = {"temperature": 1.0, "top_k": vocab, "top_p": 1.0}
    given = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    dtypes = {"temperature": torch.float32, "top_k": torch.int32, "top_p": torch.float32}
    rows = {}
    for name, value in given.items():
        values = as_list(defaults[name] if value is None else value)
        if len(values) == 1:
            values = values * batch
        if len(values) != batch:
            raise ValueError(f"{name} must be one value or {batch} (one per row), got {len(values)} values")
        rows[name] = torch.tensor(values, dtype=dtypes[name], device=device)
    return rows["temperature"], rows["top_k"], rows["top_p"]


def warp_logits(logits: torch.Tensor, *, temperature, top_k, top_p) -> torch.Tensor:
    """float32 [B, V] scores after temperature, top-k and top-p; removed tokens are -inf."""
    if not (isinstance(logits, torch.Tensor) and logits.dim() == 2 and logits.is_floating_point()):
        raise ValueError(f"warp_logits: logits must be a floating [B, V] tensor, got {logits!r:.80}")
    batch, vocab = logits.shape
    temperature, top_k, top_p = sampling_tensors(
        temperature, top_k, top_p, batch=batch, vocab=vocab, device=logits.device
    )
    scores = logits.float() / temperature[:, None]

    descending = scores.sort(dim=-1, descending=True).values
    kth_largest = descending.gather(1, (top_k.long() - 1)[:, None])
    scores = scores.masked_fill(scores < kth_largest, float("-inf"))

    # mass_above[b, i] = sum of probs[b, j] over scores[b, j] > scores[b, i]: sort ascending, take suffix
    # sums, and look up where the strictly larger scores start.
    probs = torch.softmax(scores.double(), dim=-1)
    ascending, order = scores.sort(dim=-1)
    suffix_mass = probs.gather(1, order).flip(-1).cumsum(-1).flip(-1)
    suffix_mass = torch.cat([suffix_mass, suffix_mass.new_zeros(batch, 1)], dim=-1)
    first_larger = torch.searchsorted(ascending, scores, right=True)
    mass_above = suffix_mass.gather(1, first_larger)
    top_p = top_p.double()[:, None]
    keep = (mass_above < top_p) | (top_p >= 1.0)  # p = 1 is "off", whatever the rounding of the sums
    return scores.masked_fill(~keep, float("-inf"))


def sample_reference(logits: torch.Tensor, *, uniforms, temperature, top_k, top_p, greedy: bool = False):
    """int64 [B]: the token sample_tokens picks for these logits and uniforms (float32 [B, V] in [0, 1)).

    With igpt_fast.philox.philox_uniforms(seed, pos, B, V) as the uniforms this is the kernel's choice, but where
    top_p lies within float32 rounding of the probability mass above a token: the kernel sums float32
    probabilities, this float64 ones, and either may keep a token the other drops (a review that set p on such
    boundaries saw 5 of 256 draws differ; a p drawn at random almost never lands there).
    With greedy=True the uniforms and warper parameters are not used.
    """
    if greedy:
        return logits.argmax(dim=-1)
    if not isinstance(uniforms, torch.Tensor) or uniforms.shape != logits.shape:
        got = list(uniforms.shape) if isinstance(uniforms, torch.Tensor) else type(uniforms).__name__
        raise ValueError(
            f"sample_reference: uniforms must be a tensor shaped like logits {list(logits.shape)}, got {got}"
        )
    scores = warp_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    gumbel = -torch.log(-torch.log(uniforms.to(device=scores.device, dtype=torch.float32)))
    return (scores + gumbel).argmax(dim=-1)
