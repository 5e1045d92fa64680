"""The launchers' integer helpers give what Triton's own cdiv and next_power_of_2 give."""

import triton

from igpt_fast.kernels import host_math


def test_cdiv_and_next_power_of_2_equal_tritons():
    for n in [*range(1, 1100), 4095, 4096, 4097, 65535, 2**31 - 1, 2**31, 2**40 + 3]:
        assert host_math.next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (1, 2, 3, 16, 17, 264):
            assert host_math.cdiv(n, d) == triton.cdiv(n, d), (n, d)
