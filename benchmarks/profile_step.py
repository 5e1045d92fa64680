"""Where a decode step's GPU time goes: generate() under torch.profiler at each batch, then, per kernel, its
launches and GPU microseconds per decode step, and the step's wall time beside the kernels' busy time (the rest
is gaps between launches). Needs a CUDA GPU; random weights of the named model size.

    python benchmarks/profile_step.py --model small --dtype float16 --batches 1,8,64 --steps 128

With programmatic dependent launch (on by default from sm_90) a kernel starts while its predecessor drains and
its profiled duration includes that wait, so the kernels' sum can exceed the wall (seen on an H100: 133-165%).
IGPT_FAST_PDL=0 gives each kernel's own time, as the GPU check runs it.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from igpt_fast.backend import use_pdl
from igpt_fast.bench_measure import DTYPES, MODELS, TOP_K, random_weights
from igpt_fast.model import ImageGPT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=[m for m in MODELS if m != "tiny"])
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES))
    parser.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    parser.add_argument("--steps", type=int, default=128, help="decode steps profiled per batch (default 128)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        args.batches = [int(b) for b in args.batches.split(",")]
    except ValueError:
        parser.error(f"--batches must be comma-separated integers, got {args.batches!r}")
    if any(b < 1 for b in args.batches):
        parser.error(f"--batches must be positive, got {args.batches}")
    if not 1 <= args.steps < MODELS[args.model].n_positions:
        parser.error(f"--steps must be in [1, {MODELS[args.model].n_positions - 1}], got {args.steps}")
    return args


def kernel_time_us(event) -> float:
    # torch >= 2.4 names it device_time_total; older releases cuda_time_total
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)


def profile_batch(model: ImageGPT, batch: int, steps: int, seed: int) -> None:
    config = model.config
    prompt = torch.full((batch, 1), config.sos_token_id, device="cuda")

    def run():
        return model.generate(prompt, max_new_tokens=steps, do_sample=True, top_k=TOP_K, seed=seed)

    run()  # compile the kernels, capture the graphs
    torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    torch.cuda.synchronize()
    wall_us = 1e6 * (time.perf_counter() - start) / steps
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.key_averages():
        us = kernel_time_us(event)
        if us > 0:
            per_kernel[event.key][0] += event.count
            per_kernel[event.key][1] += us
    busy = sum(us for _, us in per_kernel.values()) / steps
    launches = sum(count for count, _ in per_kernel.values()) / steps
    print(f"\n== {config.n_layer} layers, batch {batch}, {steps} steps: {wall_us:.1f} us/step wall, kernels busy "
          f"{busy:.1f} us/step over {launches:.1f} launches/step ({100 * busy / wall_us:.0f}% of the wall)")
    print(f"{'us/step':>8} {'launches/step':>14} {'us/launch':>10}  kernel")
    for name, (count, us) in sorted(per_kernel.items(), key=lambda item: -item[1][1])[:20]:
        print(f"{us / steps:8.1f} {count / steps:14.2f} {us / max(count, 1):10.2f}  {name[:100]}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("profile_step.py: needs a CUDA GPU (torch sees none)", file=sys.stderr)
        return 2
    config, dtype = MODELS[args.model], DTYPES[args.dtype]
    weights = random_weights(config, args.seed, torch.device("cuda"))
    model = ImageGPT(config, weights, dtype=dtype, device="cuda", max_batch=max(args.batches))
    pdl = "on" if use_pdl(torch.device("cuda")) else "off"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model} {args.dtype}, PDL {pdl}")
    for batch in args.batches:
        profile_batch(model, batch, args.steps, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
