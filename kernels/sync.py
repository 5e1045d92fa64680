"""How a decode kernel's programs wait for what the previous kernel wrote: programmatic dependent launch (PDL).

The decode kernels (linear's GEMV, attention's decode, embedding, sampling) call wait_for_inputs once they have
issued the reads that do not depend on earlier work (weights), so under PDL those reads overlap the previous
kernel's tail.
"""

import triton
import triton.language as tl


@triton.jit
def wait_for_inputs(USE_PDL: tl.constexpr):
    """Before reading what earlier work wrote: under PDL, wait for the previous kernel (and let the next launch)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
