"""The whole decode step under combinations of launch heuristics, where the sweep (`benchmark --tasks sweep`) varies
one at a time: each --setting is a list of module constants to set together, timed at each batch as the sweep's
decode-step rows are (a fresh engine whose graphs are captured under it, SWEEP_STEPS steps from the middle of an
image), over --rounds rounds that visit the settings in turn, so drift shows as spread rather than as a winner.
Needs a CUDA GPU; random weights of the named model size.

    python benchmarks/step_settings.py --batches 1,8 \\
        --setting "" \\
        --setting "igpt_fast.kernels.attention._DECODE_WHOLE_ROW_BLOCK_N=16" \\
        --setting "igpt_fast.decoder.ATTENTION_KV_BEFORE_WAIT_MAX_BATCH=8 igpt_fast.kernels.linear._GEMV_TILE=16384"

The empty setting is the code's defaults. Prints, per dtype and batch, each setting's median ms/step (and its
spread over the rounds) and its change against the first setting.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import statistics
import sys

import torch

from igpt_fast.bench_kernels import heuristic
from igpt_fast.bench_measure import DTYPES, MODELS, batch_list, random_weights
from igpt_fast.benchmark import SWEEP_STEPS, measure_decode_step


def parse_setting(text: str) -> list[tuple[str, str, object]]:
    """'pkg.module.CONSTANT=value ...' -> [(module, constant, value)], each constant checked to exist."""
    assignments = []
    for item in text.split():
        target, sep, literal = item.partition("=")
        module, _, constant = target.rpartition(".")
        if not sep or not module or not constant:
            raise ValueError(f"a setting is 'package.module.CONSTANT=value ...', got {item!r}")
        try:
            value = ast.literal_eval(literal)
        except (ValueError, SyntaxError) as e:
            raise ValueError(f"{item!r}: the value must be a Python literal, got {literal!r}") from e
        if not hasattr(importlib.import_module(module), constant):
            raise ValueError(f"{item!r}: module {module} has no {constant}")
        assignments.append((module, constant, value))
    return assignments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=[m for m in MODELS if m != "tiny"])
    parser.add_argument("--dtypes", default="float16", help="comma-separated dtypes (default float16)")
    parser.add_argument("--batches", type=batch_list, default="1,8,64",
                        help="comma-separated batch sizes (default 1,8,64)")
    parser.add_argument("--setting", action="append", required=True, dest="settings",
                        help="space-separated package.module.CONSTANT=value assignments; repeat for each setting "
                             "('' for the defaults)")
    parser.add_argument("--rounds", type=int, default=2, help="times each setting is timed at each batch (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.dtypes = args.dtypes.split(",")
    if unknown := [d for d in args.dtypes if d not in DTYPES]:
        parser.error(f"--dtypes must be among {','.join(DTYPES)}, got {','.join(unknown)}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    try:
        args.assignments = [parse_setting(s) for s in args.settings]
    except (ValueError, ImportError) as e:
        parser.error(f"--setting: {e}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("step_settings.py needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    config = MODELS[args.model]
    weights = random_weights(config, args.seed, device)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model}, {SWEEP_STEPS} steps from the "
          f"middle of an image, median of {args.rounds} rounds", flush=True)
    for i, setting in enumerate(args.settings):
        print(f"  setting {i}: {setting or '(defaults)'}")
    for dtype_name in args.dtypes:
        for batch in args.batches:
            times: list[list[float]] = [[] for _ in args.settings]
            for _ in range(args.rounds):
                for i, assignments in enumerate(args.assignments):
                    with contextlib.ExitStack() as stack:
                        for module, constant, value in assignments:
                            stack.enter_context(heuristic(module, constant, value))
                        times[i].append(measure_decode_step(config, weights, dtype_name, batch, device=device,
                                                            seed=args.seed)["ms"])
                    torch.cuda.empty_cache()
            base = statistics.median(times[0])
            for i, ms in enumerate(times):
                median = statistics.median(ms)
                print(f"{dtype_name:8} b{batch:<4} setting {i}: {median:.4f} ms/step (spread {max(ms) - min(ms):.4f})"
                      f" {100 * (median / base - 1):+.1f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
