"""A bit-exact CPU mirror (numpy arithmetic, torch tensors out) of Triton's `tl.rand` (Philox 4x32, 10 rounds).

The sampling kernel draws the uniform for (row b, decode step t, column v) as
`tl.rand(seed + b, t * V + v)`. `philox_uniforms` recomputes exactly those float32 values on the CPU, so
the reference sampler and the engine's CPU fallback pick the same tokens as the GPU kernel. generate(seed=s) passes
the kernel `generation_key(s)`, not s (see there).

What `tl.rand(seed, offset)` does (triton/language/random.py, read from triton 3.9; test_philox_uniforms_bit_exact
checks it against whatever triton is installed, on the GPU too):
- the key is the int64 seed as uint64, split into k0 = low 32 bits, k1 = high 32 bits;
- the counter is (c0, c1, c2, c3) = (offset low 32 bits, offset high 32 bits, 0, 0);
- 10 Philox rounds: c0' = umulhi(B, c2) ^ c1 ^ k0, c2' = umulhi(A, c0) ^ c3 ^ k1, c1' = B * c2, c3' = A * c0
  (mod 2^32), then k0 += 0x9E3779B9, k1 += 0xBB67AE85;
- the first output word c0, read as int32, becomes a float in [0, 1): x < 0 -> ~x, then
  float32(x) * float32(4.6566127342e-10).

The arithmetic is numpy uint64 on 32-bit words: a product of two words is below 2^64, so nothing overflows, and
each multiply gives both halves at once (a few numpy calls a round: the engine's CPU fallback draws every step).
"""

import numpy as np
import torch

_MASK32 = np.uint64(0xFFFFFFFF)
_SHIFT32 = np.uint64(32)
_ROUND_A = np.uint64(0xD2511F53)  # multiplies c0
_ROUND_B = np.uint64(0xCD9E8D57)  # multiplies c2
_KEY_A = np.uint64(0x9E3779B9)
_KEY_B = np.uint64(0xBB67AE85)
_N_ROUNDS = 10
# The largest float32 s with (2**31 - 1) * s < 1 after rounding: triton's uint_to_uniform_float scale.
_UNIFORM_SCALE = np.float32(4.6566127342e-10)


def philox_first_words(seeds: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """First output word of Philox4x32-10 (triton's `randint`) as uint64 in [0, 2^32).

    seeds: uint64 (an int64 seed's two's-complement bits, as triton casts it); offsets: uint64. The two broadcast.
    """
    seeds, offsets = np.broadcast_arrays(seeds.astype(np.uint64), offsets.astype(np.uint64))
    k0, k1 = seeds & _MASK32, seeds >> _SHIFT32
    c0, c1 = offsets & _MASK32, offsets >> _SHIFT32
    c2 = np.zeros_like(c0)
    c3 = np.zeros_like(c0)
    for _ in range(_N_ROUNDS):
        b_c2 = _ROUND_B * c2  # < 2^64: exact
        a_c0 = _ROUND_A * c0
        c0, c1, c2, c3 = (b_c2 >> _SHIFT32) ^ c1 ^ k0, b_c2 & _MASK32, (a_c0 >> _SHIFT32) ^ c3 ^ k1, a_c0 & _MASK32
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def uint32_to_uniform(words: np.ndarray) -> np.ndarray:
    """triton's uint_to_uniform_float for 32-bit words (uint64 in [0, 2^32)): float32 in [0, 1)."""
    signed = words.astype(np.uint32).view(np.int32)
    folded = np.where(signed < 0, ~signed, signed)  # ~x for negative int32 x
    return folded.astype(np.float32) * _UNIFORM_SCALE


def philox_uniforms(seed: int, step: int, batch: int, vocab: int) -> torch.Tensor:
    """The sampling kernel's uniforms: float32 [batch, vocab] on the CPU.

    Element (b, v) is tl.rand(seed + b, step * vocab + v), with seed + b wrapped to int64 like the
    kernel's int64 addition.
    """
    if batch < 0 or vocab < 1 or step < 0:
        raise ValueError(f"philox_uniforms needs batch >= 0, vocab >= 1, step >= 0; got {batch}, {vocab}, {step}")
    # seed + b as the kernel's int64 addition leaves it, as triton's cast to uint64 reads it: mod 2^64.
    seeds = np.array([(seed + b) % 2**64 for b in range(batch)], dtype=np.uint64)[:, None]
    offsets = np.arange(step * vocab, (step + 1) * vocab, dtype=np.uint64)[None, :]
    return torch.from_numpy(uint32_to_uniform(philox_first_words(seeds, offsets)))


def generation_key(seed: int) -> int:
    """The key of row 0 in generate(seed=seed): seed through SplitMix64 (a bijection of 64-bit words), as an int64.

    Row b of a generate() call draws with key + b (the kernel's seed + b). Were the key the seed itself, row b of seed s
    would be row 0 of seed s + b: consecutive seeds gave shifted copies of the same images (seed 1's first image was
    seed 0's second). Mixed, the rows of two seeds share a key only if their keys lie within the rows' count of each
    other in 2^64.
    """
    z = (seed + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % 2**64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % 2**64
    z ^= z >> 31
    return z - 2**64 if z >= 2**63 else z
