"""Integer arithmetic of the launchers' host code (tile sizes, grids), in plain Python.

Not triton.cdiv and triton.next_power_of_2: Triton 3.9 makes them constexpr functions, whose calls from host code
cost about 9 us each against 0.1 for these (2-core CI machine), and the configs of a prefill's launches take
hundreds of them. The host side of imagegpt-small's features() at batch 1 (12 layers, 61 launches, Triton's own
launcher left out) took 9.5-9.9 ms there with Triton's helpers, 4.6-5.3 ms with these. On an H200 (2026-12-04)
features() took 8.6 ms at batch 1 and 6.3 at batch 8: host time, not the GPU, seems to bound a small-batch forward.
"""


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << (n - 1).bit_length() if n > 1 else 1
