"""The engine's first call in a fresh process: kernel compilation, CUDA-graph capture and the first tokens, timed
with an empty Triton cache (cold, a new install) and again with the cache the cold run filled (warm, every later
run). shared/docs/performance.md's targets: <= 15 s cold, <= 3 s warm. In the benchmark's own process the first
call of a row finds whatever kernels earlier rows compiled, so only a fresh process says what users wait.

The parent (measure_startup) runs this module twice as a child process:

    python -m igpt_fast.bench_startup --model small --dtype float16 --batch 8 --device cuda

and the child prints one JSON line: the seconds of its first model.generate() call (prefill, the first sampled
token, one decode step: every kernel of generation compiled and the batch's graph captured). Everything before it
(Python and torch imports, CUDA start-up, random weights) is not part of the first call; the note gives the child's
whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

CHILD_TIMEOUT_S = 180


def measure_startup(model: str, dtype: str, batch: int, device: torch.device, backend: str | None,
                    seed: int) -> dict:
    """Result fields: first_call_s (cold) and warm_first_call_s, each from a fresh child process."""
    args = [sys.executable, "-m", "igpt_fast.bench_startup", "--model", model, "--dtype", dtype, "--batch",
            str(batch), "--device", str(device), "--seed", str(seed)] + (["--backend", backend] if backend else [])
    with tempfile.TemporaryDirectory(prefix="igpt-startup-triton-cache-") as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        cold, warm = (_child(args, env) for _ in range(2))
    return {"first_call_s": cold["first_call_s"], "warm_first_call_s": warm["first_call_s"],
            "note": f"whole child process: {cold['process_s']:.1f} s cold, {warm['process_s']:.1f} s warm"}


def _child(args: list[str], env: dict) -> dict:
    started = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise RuntimeError(f"the start-up child process failed (exit {done.returncode}): {last}")
    return {**json.loads(done.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    from igpt_fast.bench_measure import DTYPES, MODELS, TOP_K, random_weights
    from igpt_fast.model import ImageGPT

    p = argparse.ArgumentParser(prog="python -m igpt_fast.bench_startup",
                                description="Time igpt-fast's first generate() call in this fresh process (the "
                                            "benchmark's startup task runs it); prints one JSON line.")
    p.add_argument("--model", choices=sorted(MODELS), required=True)
    p.add_argument("--dtype", choices=sorted(DTYPES), required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--backend", choices=("triton", "torch"))
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    config, device = MODELS[args.model], torch.device(args.device)
    model = ImageGPT(config, random_weights(config, args.seed, device), dtype=DTYPES[args.dtype], device=device,
                     backend=args.backend)
    context = torch.full((args.batch, 1), config.sos_token_id, device=device)
    _sync(device)
    started = time.perf_counter()
    model.generate(context, max_new_tokens=2, do_sample=True, top_k=min(TOP_K, config.n_clusters), seed=args.seed)
    _sync(device)
    print(json.dumps({"first_call_s": time.perf_counter() - started}))
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


if __name__ == "__main__":
    sys.exit(main())
