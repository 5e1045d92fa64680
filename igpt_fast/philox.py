"""A pure-PyTorch, bit-exact mirror of Triton's `tl.rand` (Philox 4x32, 10 rounds).

The sampling kernel draws the uniform for (row b, decode step t, column v) as
`tl.rand(seed + b, t * V + v)`. `philox_uniforms` recomputes exactly those float32 values on the CPU, so
the reference sampler and the engine's CPU fallback pick the same tokens as the GPU kernel.

What `tl.rand(seed, offset)` does (triton/language/random.py, read from triton 3.9; test_philox_uniforms_bit_exact
checks it against whatever triton is installed, on the GPU too):
- the key is the int64 seed as uint64, split into k0 = low 32 bits, k1 = high 32 bits;
- the counter is (c0, c1, c2, c3) = (offset low 32 bits, offset high 32 bits, 0, 0);
- 10 Philox rounds: c0' = umulhi(B, c2) ^ c1 ^ k0, c2' = umulhi(A, c0) ^ c3 ^ k1, c1' = B * c2, c3' = A * c0
  (mod 2^32), then k0 += 0x9E3779B9, k1 += 0xBB67AE85;
- the first output word c0, read as int32, becomes a float in [0, 1): x < 0 -> ~x, then
  float32(x) * float32(4.6566127342e-10).

All arithmetic here is int64 on values below 2^33, so nothing overflows and nothing depends on
wrap-around behaviour.
"""

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A = 0xD2511F53  # multiplies c0
_ROUND_B = 0xCD9E8D57  # multiplies c2
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85
_N_ROUNDS = 10
# The largest float32 s with (2**31 - 1) * s < 1 after rounding: triton's uint_to_uniform_float scale.
_UNIFORM_SCALE = torch.tensor(4.6566127342e-10, dtype=torch.float32)


def _mul_hi_lo(constant: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of constant * x for a 32-bit constant and int64 x in [0, 2^32).

    Split both factors in 16-bit halves so every partial product fits comfortably in int64.
    """
    c_hi, c_lo = constant >> 16, constant & 0xFFFF
    x_hi, x_lo = x >> 16, x & 0xFFFF
    middle = c_hi * x_lo + c_lo * x_hi  # < 2^33
    low = c_lo * x_lo + ((middle & 0xFFFF) << 16)  # < 2^33
    high = c_hi * x_hi + (middle >> 16) + (low >> 32)
    return high & _MASK32, low & _MASK32


def philox_first_words(seeds: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """First output word of Philox4x32-10 (triton's `randint`) as int64 in [0, 2^32).

    seeds: int64, any values (taken mod 2^64 like triton's cast to uint64); offsets: int64 >= 0.
    The two broadcast against each other.
    """
    seeds, offsets = torch.broadcast_tensors(seeds.to(torch.int64), offsets.to(torch.int64))
    k0 = seeds & _MASK32
    k1 = (seeds >> 32) & _MASK32  # arithmetic shift, then mask: the two's-complement high word
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_N_ROUNDS):
        b_c2_hi, b_c2_lo = _mul_hi_lo(_ROUND_B, c2)
        a_c0_hi, a_c0_lo = _mul_hi_lo(_ROUND_A, c0)
        c0, c1, c2, c3 = b_c2_hi ^ c1 ^ k0, b_c2_lo, a_c0_hi ^ c3 ^ k1, a_c0_lo
        k0 = (k0 + _KEY_A) & _MASK32
        k1 = (k1 + _KEY_B) & _MASK32
    return c0


def uint32_to_uniform(words: torch.Tensor) -> torch.Tensor:
    """triton's uint_to_uniform_float for 32-bit words (int64 in [0, 2^32)): float32 in [0, 1)."""
    signed = torch.where(words >= 2**31, words - 2**32, words)
    folded = torch.where(signed < 0, -signed - 1, signed)  # ~x for negative int32 x
    return folded.to(torch.float32) * _UNIFORM_SCALE


def philox_uniforms(seed: int, step: int, batch: int, vocab: int) -> torch.Tensor:
    """The sampling kernel's uniforms: float32 [batch, vocab] on the CPU.

    Element (b, v) is tl.rand(seed + b, step * vocab + v), with seed + b wrapped to int64 like the
    kernel's int64 addition.
    """
    if batch < 0 or vocab < 1 or step < 0:
        raise ValueError(f"philox_uniforms needs batch >= 0, vocab >= 1, step >= 0; got {batch}, {vocab}, {step}")
    # seed + b as the kernel's int64 addition leaves it (two's complement, wrapped).
    seeds = torch.tensor([(seed + b + 2**63) % 2**64 - 2**63 for b in range(batch)], dtype=torch.int64)[:, None]
    offsets = step * vocab + torch.arange(vocab, dtype=torch.int64)[None, :]
    return uint32_to_uniform(philox_first_words(seeds, offsets))
