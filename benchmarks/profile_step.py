"""Where a decode step's GPU time goes: generate() under torch.profiler at each batch, then, per kernel, its
launches and GPU microseconds per decode step, and the step's wall time beside the kernels' busy time (the rest
is gaps between launches); then the step's critical path by role (norm_qkv, attention, ...): each launch charged
with the time from its predecessor's end to its own end, so the roles add up to the step and a kernel's share
counts only what it adds to the chain. Needs a CUDA GPU; random weights of the named model size.

    python benchmarks/profile_step.py --model small --dtype float16 --batches 1,8,64 --steps 128

The steps follow a prompt of --prompt-length tokens (the SOS, then random pixels): the default 1 profiles an image
from its start; a long prompt profiles its end, where attention reads the most keys.

With programmatic dependent launch (on by default from sm_90) a kernel starts while its predecessor drains and
its profiled duration includes that wait, so the kernels' sum can exceed the wall (seen on an H100: 133-165%);
the critical path is the measure that holds either way. IGPT_FAST_PDL=0 gives each kernel's own time.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from igpt_fast.backend import use_pdl
from igpt_fast.bench_measure import DTYPES, MODELS, EngineSystem, batch_list, prompt_of, random_weights
from igpt_fast.model import ImageGPT


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=[m for m in MODELS if m != "tiny"])
    parser.add_argument("--dtype", default="float16", choices=list(DTYPES))
    parser.add_argument("--batches", type=batch_list, default="1,8,64",
                        help="comma-separated batch sizes (default 1,8,64)")
    parser.add_argument("--steps", type=int, default=128, help="decode steps profiled per batch (default 128)")
    parser.add_argument("--prompt-length", type=int, default=1,
                        help="tokens before the profiled steps: the SOS, then random pixels (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    n_positions = MODELS[args.model].n_positions
    if not 1 <= args.prompt_length < n_positions:
        parser.error(f"--prompt-length must be in [1, {n_positions - 1}], got {args.prompt_length}")
    if not 1 <= args.steps <= n_positions - args.prompt_length:
        parser.error(f"--steps must be in [1, {n_positions - args.prompt_length}] after a prompt of "
                     f"{args.prompt_length}, got {args.steps}")
    return args


def kernel_time_us(event) -> float:
    # torch >= 2.4 names it device_time_total; older releases cuda_time_total
    return getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0.0)


# The launches of one decode step in order (igpt_fast.decoder.StaticDecoder._decode_step), by role, and the Triton
# kernel each role runs (the linears run the GEMV or the dot kernel, chosen by batch).
LAYER_ROLES = ("norm_qkv", "attention", "attn c_proj", "ln_2 c_fc gelu", "mlp c_proj")
_LINEAR_KERNELS = ("_gemv_kernel", "_dot_kernel")
_ROLE_KERNELS = {"embed": ("_embed_kernel",), "attention": ("_decode_kernel",), "sample": ("_sample_kernel",)}


def step_roles(n_layer: int) -> list[str]:
    return ["embed", *LAYER_ROLES * n_layer, "ln_f lm_head", "sample"]


def critical_path(kernels: list[tuple[str, float, float]], n_layer: int) -> tuple[dict[str, float], int]:
    """Per role, the microseconds that its launches add to the chain, summed over every decode step found.

    kernels: (name, start, end) of every GPU kernel, in any order. A decode step is a run of consecutive launches
    whose kernels are exactly step_roles' (a prefill is not); each of its launches is charged end - the end of the
    launch before it, so the embed row also holds the gap between one step's graph and the next. Returns the sums
    (roles in step order) and the number of steps.
    """
    kernels = sorted(kernels, key=lambda kernel: kernel[1])  # launch order: one stream, starts in order under PDL
    roles = step_roles(n_layer)
    totals = dict.fromkeys(roles, 0.0)
    steps = 0
    for first in range(1, len(kernels) - len(roles) + 1):
        window = kernels[first:first + len(roles)]
        if any(name not in _ROLE_KERNELS.get(role, _LINEAR_KERNELS)
               for role, (name, _, _) in zip(roles, window, strict=True)):
            continue
        ends = [kernels[first - 1][2]] + [end for _, _, end in window]
        for role, before, after in zip(roles, ends[:-1], ends[1:], strict=True):
            totals[role] += after - before
        steps += 1
    return totals, steps


def print_critical_path(kernels: list[tuple[str, float, float]], n_layer: int) -> None:
    totals, steps = critical_path(kernels, n_layer)
    if steps == 0:
        print("critical path: no decode step found among the profiled kernels")
        return
    print_roles(totals, steps, n_layer, "critical path, {steps} steps of {step_us:.1f} us (a launch's end minus its "
                "predecessor's end; embed includes the gap between graph replays)")


def print_roles(totals: dict[str, float], steps: int, n_layer: int, title: str) -> None:
    """Per role: us a step, its share of the step, us a launch; title may use {steps} and {step_us}."""
    step_us = sum(totals.values()) / steps
    print(title.format(steps=steps, step_us=step_us))
    print(f"{'us/step':>8} {'% of step':>10} {'us/launch':>10}  role")
    for role, us in totals.items():
        launches = n_layer if role in LAYER_ROLES else 1
        print(f"{us / steps:8.1f} {100 * us / steps / step_us:9.0f}% {us / steps / launches:10.2f}  {role}")


def profile_batch(model: ImageGPT, batch: int, steps: int, prompt_length: int, seed: int) -> None:
    """`steps` decode steps after a prompt, timed and then profiled apart from its prefill (EngineSystem's calls)."""
    config = model.config
    prompt = prompt_of(config, batch, prompt_length, seed, torch.device("cuda"))
    engine = EngineSystem(model, seed)
    engine.generate(prompt, steps + 1)  # compile the kernels, capture the graphs
    timed = engine.generate(prompt, steps + 1)
    wall_us = 1e6 * timed.decode_s / timed.decode_steps
    decoder = model.decoder
    state = decoder.state(batch)  # the sampling settings engine.generate left in it
    decoder.start(state, prompt, greedy=False)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        decoder.decode(state, steps, greedy=False)
        torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.key_averages():
        us = kernel_time_us(event)
        if us > 0:
            per_kernel[event.key][0] += event.count
            per_kernel[event.key][1] += us
    busy = sum(us for _, us in per_kernel.values()) / steps
    launches = sum(count for count, _ in per_kernel.values()) / steps
    print(f"\n== {config.n_layer} layers, batch {batch}, {steps} steps after a prompt of {prompt_length}: "
          f"{wall_us:.1f} us/step wall, kernels busy "
          f"{busy:.1f} us/step over {launches:.1f} launches/step ({100 * busy / wall_us:.0f}% of the wall)")
    print(f"{'us/step':>8} {'launches/step':>14} {'us/launch':>10}  kernel")
    for name, (count, us) in sorted(per_kernel.items(), key=lambda item: -item[1][1])[:20]:
        print(f"{us / steps:8.1f} {count / steps:14.2f} {us / max(count, 1):10.2f}  {name[:100]}")
    kernels = [(event.name, event.time_range.start, event.time_range.end) for event in prof.events()
               if event.device_type == DeviceType.CUDA]
    print_critical_path(kernels, config.n_layer)


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
        profile_batch(model, batch, args.steps, args.prompt_length, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
