"""The floor of a chain of dependent launches on this GPU: what one kernel of a decode step costs when it does
(almost) nothing but wait for its predecessor, read what that one wrote and write for the next.

A decode step is a chain of about five launches per layer (124 at imagegpt-small when an H100 timed it, 123 since the
sampler advances the position), each reading what the one before wrote; at batch 1 a step took about 2.9 us per
launch there (2026-11-27). This times the same shape of chain
with no weights at all: CHAIN launches of a kernel that adds one to a buffer another copy of it wrote, captured in a
CUDA graph, with and without programmatic dependent launch (PDL), for grids of 1, one per SM and two per SM programs.
us/launch is then the least a launch of the engine can cost here; the engine's per-launch time minus it is what its
kernels' own work (weight reads, reductions, merges) costs. Then the same chain as phases of one persistent launch
separated by grid barriers (an arrival counter): what a one-kernel decode step would pay per phase instead. And
what a graph boundary costs (two replays of half the chain against one of all of it): what capturing several
decode steps per graph would save per step.
Last, both chains again with weights: each launch (or phase) streams its own share of a step's weights (about
imagegpt-small's 150 MB of fp16 a step, read before the wait as the engine's kernels read theirs, the persistent
kernel reading the next phase's share while it waits at each barrier), so the two ways of running a decode step
are compared moving the bytes a step moves: the decision for or against a one-kernel decode step.

    python benchmarks/launch_floor.py [--chain 124] [--rep-ms 50]
"""

from __future__ import annotations

import argparse
import sys

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from igpt_fast.backend import FP_FUSION

BLOCK = 512  # values each program reads and writes: a 1 KB fp16 row of imagegpt-small's residual stream (fp32 here)
# fp16 weights each of two programs per SM reads a launch (or phase) in the weighted rows: 4 KB, on an H100 (264
# programs) 1.1 MB a launch and 134 MB over 124 of them, about imagegpt-small's 150 MB of fp16 weights a decode step.
W_BLOCK = 2048


@triton.jit
def _weight_share(w_ptr, HAS_WEIGHTS: tl.constexpr, W_BLOCK: tl.constexpr):
    """This program's W_BLOCK weights of a launch or phase (all zero), loaded: summed only once needed, so the
    load is in flight across what follows (the wait for the previous kernel, or a grid barrier)."""
    if HAS_WEIGHTS:
        return tl.load(w_ptr + tl.program_id(0) * W_BLOCK + tl.arange(0, W_BLOCK))
    else:
        return tl.zeros([1], tl.float16)


@triton.jit
def _add_one_kernel(src_ptr, dst_ptr, w_ptr, USE_PDL: tl.constexpr, BLOCK: tl.constexpr,
                    HAS_WEIGHTS: tl.constexpr, W_BLOCK: tl.constexpr):
    w = _weight_share(w_ptr, HAS_WEIGHTS, W_BLOCK)  # weights are never written: read before the wait
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(dst_ptr + offs, tl.load(src_ptr + offs) + 1.0 + tl.sum(w.to(tl.float32), axis=0))


@triton.jit
def _load_acquire(ptr):
    """ld.acquire.gpu: the loads after it see what was released before the value it reads."""
    return tl.inline_asm_elementwise("ld.acquire.gpu.global.b32 $0, [$1];", "=r,l", [ptr], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _barrier_chain_kernel(buf_ptr, counter_ptr, w_ptr, PHASES: tl.constexpr, BLOCK: tl.constexpr,
                          HAS_WEIGHTS: tl.constexpr, W_BLOCK: tl.constexpr):
    """One persistent launch doing the chain's work as PHASES phases with a grid barrier between them (an arrival
    counter: release-add, then spin on acquire-loads), what a one-kernel decode step would pay instead of launches.
    Program p reads what program p + 1 wrote the phase before. Every program must be resident at once. With
    HAS_WEIGHTS, phase i also reads its share of weights slice i, loaded during the barrier that ends phase i - 1."""
    pid = tl.program_id(0)
    n = tl.num_programs(0)
    offs = tl.arange(0, BLOCK)
    w = _weight_share(w_ptr, HAS_WEIGHTS, W_BLOCK)
    for phase in range(PHASES):
        src = buf_ptr + (phase % 2) * n * BLOCK + ((pid + 1) % n) * BLOCK
        dst = buf_ptr + ((phase + 1) % 2) * n * BLOCK + pid * BLOCK
        # .cg: from L2, not this SM's L1, which may hold what another program overwrote since
        tl.store(dst + offs, tl.load(src + offs, cache_modifier=".cg") + 1.0 + tl.sum(w.to(tl.float32), axis=0))
        tl.debug_barrier()  # every thread's store before the release
        tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
        # The next phase's weights (the first slice again after the last: a wasted read, 1 of PHASES), issued after
        # the release, which would wait for them, and before the spin, so that they are in flight across it.
        w = _weight_share(w_ptr + ((phase + 1) % PHASES) * n * W_BLOCK, HAS_WEIGHTS, W_BLOCK)
        while _load_acquire(counter_ptr) < (phase + 1) * n:
            pass
        tl.debug_barrier()


def replayed_once(fn, result: torch.Tensor, expected: float, what: str) -> torch.cuda.CUDAGraph:
    """fn run once on a side stream (compiling its kernels), captured, and replayed once; the graph, after checking
    that `result` (what two runs leave) is `expected`: a stale read would leave it short."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    got = result.item()
    if got != expected:
        raise RuntimeError(f"{what} computed {got}, expected {expected}: a step read before its predecessor wrote")
    return graph


def us_per_step(graph: torch.cuda.CUDAGraph, steps: int, rep_ms: int) -> float:
    """Median GPU time of a replay over rep_ms of them (events around each; a replay is far longer than its host
    launch), per step."""
    return 1e3 * do_bench(graph.replay, warmup=5, rep=rep_ms, return_mode="median") / steps


def step_weights(programs: int, chain: int, weighted: bool) -> torch.Tensor:
    """Zeros: W_BLOCK fp16 values per program for each of `chain` launches or phases (a placeholder without
    weights)."""
    return torch.zeros(chain * programs * W_BLOCK if weighted else 1, dtype=torch.float16, device="cuda")


def barrier_us_per_phase(programs: int, chain: int, rep_ms: int, weighted: bool = False) -> float:
    """One persistent launch of `chain` phases, per phase, in microseconds."""
    buf = torch.zeros(2 * programs * BLOCK, device="cuda")
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    weights = step_weights(programs, chain, weighted)

    def run():
        counter.zero_()
        _barrier_chain_kernel[(programs,)](buf, counter, weights, PHASES=chain, BLOCK=BLOCK, HAS_WEIGHTS=weighted,
                                           W_BLOCK=W_BLOCK, num_warps=4, enable_fp_fusion=FP_FUSION)

    graph = replayed_once(run, buf[0], 2.0 * chain, f"the barrier chain ({programs} programs, weights: {weighted})")
    return us_per_step(graph, chain, rep_ms)


def chain_graph(programs: int, chain: int, pdl: bool, weighted: bool = False) -> torch.cuda.CUDAGraph:
    """A checked graph of `chain` (even) dependent launches, launch i reading weights slice i if `weighted`."""
    buffers = [torch.zeros(programs * BLOCK, device="cuda") for _ in range(2)]
    weights = step_weights(programs, chain, weighted)

    def run_chain():
        for i in range(chain):
            share = weights[i * programs * W_BLOCK:] if weighted else weights
            _add_one_kernel[(programs,)](buffers[i % 2], buffers[(i + 1) % 2], share, USE_PDL=pdl, BLOCK=BLOCK,
                                         HAS_WEIGHTS=weighted, W_BLOCK=W_BLOCK, launch_pdl=pdl, num_warps=4,
                                         enable_fp_fusion=FP_FUSION)

    # Each run of the chain adds `chain`, ending in buffers[0] (chain is even).
    return replayed_once(run_chain, buffers[0][0], 2.0 * chain,
                         f"the launch chain (pdl={pdl}, {programs} programs, weights: {weighted})")


def chain_us_per_launch(programs: int, chain: int, rep_ms: int, pdl: bool, weighted: bool = False) -> float:
    """A graph of `chain` dependent launches, per launch, in microseconds."""
    return us_per_step(chain_graph(programs, chain, pdl, weighted), chain, rep_ms)


def graph_boundary_us(programs: int, chain: int, rep_ms: int, pdl: bool) -> float:
    """What ending one graph and replaying the next costs over the same launches in one graph: two replays of a
    chain/2-launch graph against one replay of a chain-launch graph (what capturing two decode steps per graph
    would save per step)."""
    half, whole = chain_graph(programs, chain // 2, pdl), chain_graph(programs, chain, pdl)
    two_halves = do_bench(lambda: (half.replay(), half.replay()), warmup=5, rep=rep_ms, return_mode="median")
    return 1e3 * (two_halves - do_bench(whole.replay, warmup=5, rep=rep_ms, return_mode="median"))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chain", type=int, default=124, help="dependent launches per graph, a multiple of 4 "
                        "(default 124: about one imagegpt-small decode step)")
    parser.add_argument("--rep-ms", type=int, default=50, help="milliseconds of graph replays timed per row "
                        "(do_bench's rep; default 50)")
    args = parser.parse_args(argv)
    if args.chain < 4 or args.chain % 4:  # halved for the graph-boundary row, each half even
        parser.error(f"--chain must be a multiple of 4, got {args.chain}")
    if args.rep_ms < 1:
        parser.error(f"--rep-ms must be >= 1, got {args.rep_ms}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("launch_floor.py: needs a CUDA GPU (torch sees none)", file=sys.stderr)
        return 2
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    pdl_options = (False, True) if torch.cuda.get_device_capability()[0] >= 9 else (False,)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}: a graph of "
          f"{args.chain} dependent launches, median replay")
    print(f"{'programs':>9}  {'chain of':<32} {'us each':>8} {'us per 124':>11}")
    for programs in (1, sms, 2 * sms):
        for pdl in pdl_options:
            us = chain_us_per_launch(programs, args.chain, args.rep_ms, pdl)
            print(f"{programs:9d}  {'launches, PDL ' + ('on' if pdl else 'off'):<32} {us:8.2f} {124 * us:11.1f}")
    for programs in (sms, 2 * sms):  # one or two per SM: all resident at once, as the spin barrier needs
        us = barrier_us_per_phase(programs, args.chain, args.rep_ms)
        print(f"{programs:9d}  {'grid barriers in one launch':<32} {us:8.2f} {124 * us:11.1f}")
    for pdl in pdl_options:
        us = graph_boundary_us(2 * sms, args.chain, args.rep_ms, pdl)
        print(f"{2 * sms:9d}  {'a graph boundary, PDL ' + ('on' if pdl else 'off'):<32} {us:8.2f}")
    mb = 2 * sms * W_BLOCK * 2 / 1e6
    print(f"each launch or phase reading {mb:.2f} MB of weights ({args.chain * mb:.0f} MB a chain):")
    for pdl in pdl_options:
        us = chain_us_per_launch(2 * sms, args.chain, args.rep_ms, pdl, weighted=True)
        print(f"{2 * sms:9d}  {'launches, PDL ' + ('on' if pdl else 'off'):<32} {us:8.2f} {124 * us:11.1f}")
    us = barrier_us_per_phase(2 * sms, args.chain, args.rep_ms, weighted=True)
    print(f"{2 * sms:9d}  {'grid barriers in one launch':<32} {us:8.2f} {124 * us:11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
