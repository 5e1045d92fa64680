"""Compile into Triton's cache, ahead of time, the kernels the GPU check's benchmark, profiles and sweep will launch.

benchmarks/gpu_check.sh runs this in the background at the lowest priority while its GPU tests run, and stops it
before the benchmark starts: the test processes keep a few of the machine's cores busy compiling their own kernels,
this uses the idle ones, and the timed stages then find their kernel variants compiled instead of compiling them
inside their time limits (the sweep builds a fresh engine for every value it times). It records the engine's
launches on the CPU (igpt_fast.kernel_launches), as the later stages run it, and hands each distinct one to the JIT
with warmup=True: compiled for this GPU exactly as that launch would be, and not run. The most needed first (the
benchmark's rows, then the wider stage's, batch 256, the sweep's values); what is compiled before it is stopped
stays in the cache. Needs a CUDA GPU.

    python benchmarks/warm_triton_cache.py [--threads N] [--no-sweeps] [--dry-run]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import sys
import time

import torch

from igpt_fast import ImageGPTConfig, backend
from igpt_fast.bench_kernels import SWEEPS, heuristic
from igpt_fast.kernel_launches import (
    Case,
    Launch,
    distinct,
    engine_launches,
    exercise,
    pdl_as,
    recordable_model,
    recording,
)

SMALL = ImageGPTConfig.small()
# One layer launches what every layer does, so the separate launches are recorded on one (24 times less memory
# and time; the same variants, checked when this was written).
ONE_LAYER = ImageGPTConfig.small(n_layer=1)
# The prompts the benchmark prefills besides the SOS: SOS + half an image (complete), and the sweep's window of steps
# from the middle of an image (benchmark.SWEEP_STEPS = 128 of them from position 448). Whole images (features,
# likelihood) at batch 1 and 8 only: at 64 the recording alone holds GBs of activations on the CPU.
COMPLETE, SWEEP_WINDOW = 1 + SMALL.n_positions // 2, 1 + (SMALL.n_positions - 1 - 128) // 2
SWEEP_BATCHES = (1, 2, 4, 8, 64)  # gpu_sweep.sh's
# gpu_check.sh's wider stage: bfloat16 at imagegpt-small, -medium and -large, batch 8 and 64, whole images too.
WIDER = (ONE_LAYER, ImageGPTConfig.medium(n_layer=1), ImageGPTConfig.large(n_layer=1))


def launches_to_warm(pdl: bool, sweeps: bool = True) -> list[Launch]:
    """The distinct launches of the GPU check's timed stages, most needed first: the benchmark's engine rows (fp16 and
    fp32 at batch 1, 8, 64, with PDL as this machine runs it; fp16 at 1 and 8 without it), the wider stage's
    (bfloat16, three model widths), batch 256, then each sweep value's decode steps where it applies."""
    stages = [engine_launches([Case(ONE_LAYER, (1, 8, 64), (torch.float16, torch.float32), pdl,
                                    (COMPLETE, SWEEP_WINDOW), False),
                               Case(ONE_LAYER, (1, 8), (torch.float16, torch.float32), pdl, (SMALL.n_positions,),
                                    False, False),
                               Case(ONE_LAYER, (1, 8), (torch.float16,), False, (), False, False)]),
              engine_launches([Case(config, (8, 64), (torch.bfloat16,), pdl, (), True, False) for config in WIDER]),
              engine_launches([Case(ONE_LAYER, (256,), (torch.float16,), pdl, (), False, False)])]
    if sweeps:  # one model for every value: each value's launches read it at launch (the caches are rebuilt under it)
        with recording() as launches, pdl_as(pdl):
            model = recordable_model(ONE_LAYER, torch.float16)
            for sweep in SWEEPS:
                for value in sweep.values:
                    with heuristic(sweep.module, sweep.constant, value):
                        model.release_caches()
                        exercise(model, tuple(b for b in SWEEP_BATCHES if b in sweep.batches), (SWEEP_WINDOW,),
                                 greedy=False)
        stages.append(launches)
    return list(distinct([launch for stage in stages for launch in stage]).values())


def compile_for_this_gpu(launch: Launch) -> str:
    started = time.perf_counter()
    try:
        launch.fn.run(*launch.args, grid=launch.grid, warmup=True, **launch.kwargs)
        status = "ok"
    except Exception as e:  # noqa: BLE001 - a variant that fails here is compiled (or fails) where it is launched
        status = f"FAILED {type(e).__name__}: {' '.join(str(e).split())[:300]}"
    return f"{time.perf_counter() - started:6.1f} s {launch.fn.__name__:22s} {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1),
                        help="variants compiled at once (default: the cores, at most 8)")
    parser.add_argument("--no-sweeps", action="store_true", help="leave out the sweep's values")
    parser.add_argument("--dry-run", action="store_true", help="only list the variants (kernel and constexprs), "
                        "recorded for an H100 with PDL; no GPU needed")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads must be at least 1, got {args.threads}")
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("warm_triton_cache.py: TRITON_INTERPRET=1 is set; the kernels must be compiled, not interpreted",
              file=sys.stderr)
        return 2
    if not args.dry_run and not torch.cuda.is_available():
        print("warm_triton_cache.py: needs a CUDA GPU (it compiles for the GPU here); --dry-run lists without one",
              file=sys.stderr)
        return 2
    started = time.perf_counter()
    if args.dry_run:
        pdl = True
    else:
        device = torch.device("cuda")
        pdl = backend.use_pdl(device)
    launches = launches_to_warm(pdl, sweeps=not args.no_sweeps)
    print(f"{len(launches)} kernel variants to compile, recorded in {time.perf_counter() - started:.1f} s", flush=True)
    if args.dry_run:
        for launch in launches:
            _, (fn, _, constexprs, _, options) = launch.variant()
            print(fn.__name__, {k: v for k, v in constexprs.items() if v is not None}, options)
        return 0
    failed = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.threads) as pool:
        for line in pool.map(compile_for_this_gpu, launches):
            failed += " FAILED " in line
            print(line, flush=True)
    print(f"{len(launches)} variants compiled for {torch.cuda.get_device_name(device)} in "
          f"{time.perf_counter() - started:.1f} s, {failed} failed", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
