"""How a kernel's programs wait for what earlier work wrote: programmatic dependent launch between launches, or
grid barriers between the phases of one persistent launch (igpt_fast.kernels.persistent).

The per-program bodies of the decode kernels (linear._gemv_program, attention._decode_program, ...) call
wait_for_inputs once they have issued the reads that do not depend on earlier work (weights), so the same code
serves a launch of its own and a phase of the one-launch decode step.

A persistent launch's sync buffer (int32, zero between launches but for SPIN_LIMIT):
    [ERROR]       set to 1 by a program that gave up waiting (a barrier some program never reached: the grid was not
                  all resident at once); every later wait of the launch then returns at once, so a broken launch
                  ends in about a second instead of hanging the GPU, and the host finds the flag
    [EXITS]       programs done with the launch; the last one resets the buffer for the next launch
    [SPIN_LIMIT]  polls of a barrier before a program gives up (set by the host: small under the interpreter)
    [PHASES + k]  programs that finished phase k
A program arrives at phase k's counter after its own phase-k work (release); a program that reads phase k's outputs
first waits until all programs arrived there (acquire). Program order makes that transitive: arriving at k means
having done every earlier phase, so one counter per phase needs no ordering between phases.
"""

import triton
import triton.language as tl

ERROR = tl.constexpr(0)
EXITS = tl.constexpr(1)
SPIN_LIMIT = tl.constexpr(2)
PHASES = tl.constexpr(3)

# How a persistent launch reads a barrier's counter: "atomic" (an acquire read-modify-write: what the Triton
# interpreter can run) or "ld.acquire" (a plain acquire load, as benchmarks/launch_floor.py times it: polling
# programs do not contend for the counter's cache line with read-modify-writes).
ACQUIRE_ATOMIC = tl.constexpr(1)
ACQUIRE_LOAD = tl.constexpr(2)


@triton.jit
def _ld_acquire(ptr):
    """ld.acquire.gpu: the loads after it see what was released before the value it reads."""
    return tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _arrivals(counter_ptr, GRID_SYNC: tl.constexpr):
    if GRID_SYNC == ACQUIRE_LOAD:
        return _ld_acquire(counter_ptr)
    else:
        return tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")


@triton.jit
def grid_wait(sync_ptr, phase, GRID_SYNC: tl.constexpr):
    """Wait until every program of this 1-D grid arrived at `phase`, or give up after the spin limit (flagged)."""
    counter_ptr = sync_ptr + PHASES + phase
    programs = tl.num_programs(0)
    # Three independent loads, in flight together: the barrier costs one round trip when it is already complete
    error = tl.load(sync_ptr + ERROR, volatile=True)
    limit = tl.load(sync_ptr + SPIN_LIMIT)
    arrived = _arrivals(counter_ptr, GRID_SYNC)
    spins = 0
    while (arrived < programs) & (error == 0) & (spins < limit):
        spins += 1
        arrived = _arrivals(counter_ptr, GRID_SYNC)
    if (arrived < programs) & (error == 0):
        tl.store(sync_ptr + ERROR, 1)


@triton.jit
def grid_arrive(sync_ptr, phase):
    """Count this program in at `phase`, after every one of its threads' stores (release)."""
    tl.debug_barrier()
    tl.atomic_add(sync_ptr + PHASES + phase, 1, sem="release", scope="gpu")


@triton.jit
def wait_for_inputs(USE_PDL: tl.constexpr, GRID_SYNC: tl.constexpr, sync_ptr, phase):
    """Before reading what earlier work wrote: under PDL, wait for the previous kernel (and let the next one
    launch); in a persistent launch (GRID_SYNC != 0), wait for every program to finish `phase` (none if < 0)."""
    if GRID_SYNC != 0:
        if phase >= 0:
            grid_wait(sync_ptr, phase, GRID_SYNC)
    elif USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
