"""The benchmark: igpt-fast against its anchors (igpt_fast.anchors), in one process, on the same random weights
and prompts, reported as tables, a JSON file and a plot of images/s against batch.

What is measured, per model size, dtype and batch:
  generate    unconditional 1024-pixel images (top_k=40): ms per decode step, images/s, first call (compile and
              graph capture, timed apart), achieved bandwidth over the bytes a step must move, peak GPU memory
  complete    the same for the second half of an image given its first half (a prefix of n_positions / 2 pixels)
  features    model.features over whole images (anchor: the reference forward), images/s
  likelihood  model.log_likelihood over whole images (anchor: the reference forward), images/s
  startup     the engine's first generate() in a fresh process, with an empty Triton cache and again with the
              cache that filled (igpt_fast.bench_startup), at the plan's first dtype and batch 8 (else its first)
  kernels     each Triton kernel of a decode step against its unfused PyTorch equivalent: ms, GB/s, ratio
              (at batch 1, 8, 64 and 256 in the core preset; CUDA-graph replays, each call after an L2 flush);
              and quantizing 32x32 images to cluster ids in pixels/s: the kernel, the unfused equivalent and
              transformers' image processor (on the host CPU, its ids checked against the kernel's)
  sweep       (on request: --tasks sweep) the kernels again under other values of each launch heuristic not
              yet settled on a GPU (bench_kernels.SWEEPS), one at a time, at the batches where it is read:
              first the whole decode step under each value, "decode step [constant=v]", then the kernels it
              changes, "kernel [constant=v]"
The engine also runs as igpt-fast-no-pdl (generate only): its kernels launched without programmatic dependent
launch, which on sm_90+ is otherwise on, so the table shows what PDL buys at small batch.
A decode step at position p must move the weights (embeddings but for the rows it reads) and the K, V of p + 1
cached tokens per image; "% of floor" compares the time with those bytes over this device's measured
device-to-device copy bandwidth. Anchors that would take too long time `--anchor-steps` decode steps from the
middle of the task's positions (a '*' marks those numbers; images/s is then extrapolated from ms/step).
Compiled anchors compile per (dtype, batch), 15-30 s each on a GPU: presets limit where they run.

Run `python -m igpt_fast.benchmark --help`; `main(argv)` is the entry the CLI calls.
This module is the command line and the runner; the measurements are in igpt_fast.bench_measure (the decode
step's kernels in igpt_fast.bench_kernels), the tables, JSON and plot in igpt_fast.bench_report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from igpt_fast.anchors import COMPILED_ANCHORS, StaticCacheAnchor, TransformersAnchor
from igpt_fast.backend import PDL_ENV, use_triton
from igpt_fast.bench_kernels import (
    SWEEPS,
    current_value,
    heuristic,
    kernel_cases,
    measure_kernel,
    measure_quantize,
    quantize_cases,
)
from igpt_fast.bench_measure import (
    DTYPES,
    ENGINE,
    ENGINE_NO_PDL,
    MODELS,
    SYSTEMS,
    TOP_K,
    EngineSystem,
    Result,
    allocated_memory,
    environment,
    measure_forward,
    measure_generation,
    package_version,
    prompt_of,
    random_pixels,
    random_weights,
    reference_features,
    reference_log_likelihood,
    release_device_memory,
)
from igpt_fast.bench_report import markdown_summary, readme_parts, replace_readme_block, report, write_json
from igpt_fast.bench_startup import measure_startup
from igpt_fast.config import ImageGPTConfig
from igpt_fast.decoder import BATCH_BUCKETS
from igpt_fast.model import ImageGPT
from igpt_fast.reference import ReferenceImageGPT

SWEEP_STEPS = 128  # decode steps each sweep value's whole-step row times (a quarter of the image at most)
TASKS = ("generate", "complete", "features", "likelihood", "startup", "kernels", "sweep")
PRESET_TASKS = TASKS[:-1]  # the sweep runs on request only (--tasks sweep): minutes on a GPU (gpu_sweep.sh)
ENGINES = (ENGINE, ENGINE_NO_PDL)
SYSTEM_TASKS = {
    ENGINE: ("generate", "complete", "features", "likelihood"),
    ENGINE_NO_PDL: ("generate",),
    "reference-eager": ("generate", "complete", "features", "likelihood"),
    "reference-compiled": ("generate", "complete"),
    "transformers": ("generate",),
    "transformers-static": ("generate",),
}
NO_TRITON = "Triton kernels need CUDA (or TRITON_INTERPRET=1 set before the import)"
# Most important first, so a time limit cuts what matters least: the engine, transformers (the fp32 target's
# anchor), the engine without PDL (what PDL buys), the first call (a target: 15 s cold), the kernels, the compiled
# reference (performance.md's best anchor, gpt-fast style), then the rest. On an H100 the core preset's rows took
# about 56 s (engine), 20 s (startup), 45 s (reference-eager) and 13 s and more per compiled anchor. On an H200
# (2026-12-04, second run) the GPU check's 185 s reached transformers-static (igpt-fast 30 s, transformers 18,
# startup 18, kernels 33, quantize 4, reference-compiled 45, transformers-static 21); reference-eager was cut.
STAGES = (ENGINE, "transformers", ENGINE_NO_PDL, "startup", "kernels", "reference-compiled",
          "transformers-static", "reference-eager")
STARTUP_BATCH = 8  # the model card's


@dataclass(frozen=True)
class Preset:
    models: tuple[str, ...]
    dtypes: tuple[str, ...]
    batches: tuple[int, ...]
    systems: tuple[str, ...]
    tasks: tuple[str, ...]
    anchor_steps: int  # decode steps an anchor times (0: whole images)
    runs_at: dict  # system -> "dtype:batch" pairs it runs at ("dtype:*" = every batch); unnamed: everywhere
    kernel_batches: tuple[int, ...] = ()  # the kernel rows' batches (cheap, so up to 256); empty: `batches`


PRESETS = {
    # No igpt-fast-no-pdl on the CPU: there is no PDL to switch off.
    "smoke": Preset(("tiny",), ("float32",), (1, 2), (ENGINE, "reference-eager", "transformers",
                                                       "transformers-static"), PRESET_TASKS, 8, {}),
    # core: 64 anchor steps (1-2 s of 15-35 ms steps each), so its anchors fit the GPU check's 6 minutes.
    "core": Preset(("small",), ("float16", "float32"), (1, 8, 64), SYSTEMS, PRESET_TASKS, 64,
                   {"reference-compiled": ("float16:*",), "transformers-static": ("float16:8",),
                    ENGINE_NO_PDL: ("float16:1", "float16:8")},
                   kernel_batches=(1, 8, 64, 256)),
    "full": Preset(("small", "medium", "large"), ("float16", "bfloat16", "float32"), (1, 8, 64, 256), SYSTEMS,
                   PRESET_TASKS, 128,
                   {"transformers-static": ("float16:8", "float16:64"), ENGINE_NO_PDL: ("float16:*",)}),
}


# ---------------------------------------------------------------------------------------------------------
# The runner: builds one system at a time, measures every planned row, writes the JSON after each.


@dataclass
class Plan:
    models: tuple[str, ...]
    dtypes: tuple[str, ...]
    batches: tuple[int, ...]
    systems: tuple[str, ...]
    tasks: tuple[str, ...]
    anchor_steps: int
    runs_at: dict
    kernel_batches: tuple[int, ...]
    device: torch.device
    backend: str | None
    seed: int
    time_limit_s: float | None

    def runs(self, system: str, dtype: str, batch: int) -> bool:
        allowed = self.runs_at.get(system, "all")
        return allowed == "all" or f"{dtype}:{batch}" in allowed or f"{dtype}:*" in allowed


@contextlib.contextmanager
def pdl_switched_off():
    """Kernels launched (and graphs captured) inside launch without programmatic dependent launch."""
    before = os.environ.get(PDL_ENV)
    os.environ[PDL_ENV] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ[PDL_ENV]
        else:
            os.environ[PDL_ENV] = before


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0][:160] if str(error) else ""


class Runner:
    def __init__(self, plan: Plan, out_dir: Path):
        self.plan, self.out_dir = plan, out_dir
        self.started = time.perf_counter()
        self.results: list[Result] = []
        self.env = environment(plan.device)
        self.copy_bytes_per_s = self.env["copy_gb_per_s"] * 1e9
        self._built: dict = {}  # one system (and its per-batch parts) at a time, to bound memory

    # ---- bookkeeping ----
    def out_of_time(self) -> bool:
        limit = self.plan.time_limit_s
        return limit is not None and time.perf_counter() - self.started > limit

    def record(self, result: Result) -> None:
        result.environment = self.env
        self.results.append(result)
        shown = f"{result.ms:.4g} ms" if result.ms is not None else result.note
        print(f"[{time.perf_counter() - self.started:6.1f}s] {result.task:10s} {result.system:32s} {result.model} "
              f"{result.dtype:8s} b{result.batch:<4d} {result.status}: {shown}", file=sys.stderr, flush=True)
        write_json(self.out_dir / "results.json", self.results, self.plan)

    def measure(self, task: str, system: str, model: str, dtype: str, batch: int, fn: Callable[[], dict]) -> None:
        row = Result(task, system, model, dtype, batch)
        if self.out_of_time():
            row.status, row.note = "skipped", "time limit reached"
        else:
            started = time.perf_counter()
            try:
                for key, value in fn().items():
                    setattr(row, key, value)
            except (torch.cuda.OutOfMemoryError, MemoryError) as e:
                row.status, row.note = "skipped", f"out of memory: {_first_line(e)}"
                self.release()
            except Exception as e:  # noqa: BLE001 (keep going: one broken system must not cost the other numbers)
                traceback.print_exc()
                row.status, row.note = "failed", f"{type(e).__name__}: {_first_line(e)}"
                self.release()
            row.wall_s = time.perf_counter() - started
        self.record(row)

    def built(self, key: tuple, build: Callable):
        """The object for key (built on first use, after dropping any other), and the memory allocated before
        it was built (the baseline of its peak)."""
        if key not in self._built:
            self.release(keep=lambda k: k == key[:3])  # a per-batch part keeps its (system, model, dtype) parent
            baseline = allocated_memory(self.plan.device)
            self._built[key] = (build(), baseline)
        return self._built[key]

    def release(self, keep: Callable[[tuple], bool] = lambda key: False) -> None:
        self._built = {k: v for k, v in self._built.items() if keep(k)}
        # Hand the memory back, so the next system's peak starts clean; cuBLAS's workspaces only once nothing stays
        # built, as a kept engine's CUDA graphs may hold one (the torch backend's matmuls).
        release_device_memory(self.plan.device, cublas_workspaces=not self._built)

    # ---- the stages ----
    def run(self) -> list[Result]:
        for model_name in self.plan.models:
            config = MODELS[model_name]
            weights = random_weights(config, self.plan.seed, self.plan.device)
            for stage in STAGES:
                if stage == "startup":
                    if "startup" in self.plan.tasks:
                        self.run_startup(model_name)
                elif stage == "kernels":
                    if "kernels" in self.plan.tasks:
                        self.run_kernels(config, model_name)
                    if "sweep" in self.plan.tasks:
                        self.run_sweep(config, model_name, weights)
                elif stage in self.plan.systems:
                    self.run_system(stage, config, model_name, weights)
                self.release()
        return self.results

    def run_system(self, system: str, config: ImageGPTConfig, model_name: str, weights: dict) -> None:
        tasks = [t for t in SYSTEM_TASKS[system] if t in self.plan.tasks]
        if system.startswith("transformers") and package_version("transformers") is None:
            for task in tasks:
                for dtype in self.plan.dtypes:
                    for batch in self.plan.batches:
                        self.record(Result(task, system, model_name, dtype, batch, status="skipped",
                                           note="transformers is not installed"))
            return
        for dtype in self.plan.dtypes:
            for batch in self.plan.batches:
                if not self.plan.runs(system, dtype, batch):
                    continue
                for task in tasks:
                    self.measure(task, system, model_name, dtype, batch, functools.partial(
                        self.measure_task, system, task, config, model_name, weights, dtype, batch))
                # per-batch parts (KV caches, compiled anchors) go; the dtype's model stays for the next batch
                self.release(keep=lambda key: len(key) == 3)
                if system in ENGINES and (system, model_name, dtype) in self._built:
                    self._built[(system, model_name, dtype)][0].model.release_caches()

    def measure_task(self, system: str, task: str, config: ImageGPTConfig, model_name: str, weights: dict,
                     dtype_name: str, batch: int) -> dict:
        plan, dtype, device = self.plan, DTYPES[dtype_name], self.plan.device
        top_k = min(TOP_K, config.n_clusters)

        def on_device():
            return {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}

        per_dtype = (system, model_name, dtype_name)
        if system in ENGINES:
            engine, base = self.built(per_dtype, lambda: EngineSystem(
                ImageGPT(config, weights, dtype=dtype, device=device, backend=plan.backend,
                         max_batch=max(plan.batches)), plan.seed))
            model = engine.model
        elif system.startswith("reference"):
            reference, base = self.built(per_dtype, lambda: ReferenceImageGPT.from_state_dict(config, on_device()))
            if task in ("generate", "complete"):
                options = StaticCacheAnchor.compiled_options() if system == "reference-compiled" else None
                engine, _ = self.built(per_dtype + (batch,), lambda: StaticCacheAnchor(
                    reference, batch, top_k=top_k, compile_options=options))
        else:
            static = system == "transformers-static"
            key = per_dtype + ((batch,) if static else ())  # the static variant compiles per batch
            engine, base = self.built(key, lambda: TransformersAnchor(
                config, weights, dtype=dtype, device=device, top_k=top_k,
                cache_implementation="static" if static else None))
        steps = 0 if system in ENGINES else plan.anchor_steps

        if task in ("generate", "complete"):
            with pdl_switched_off() if system == ENGINE_NO_PDL else contextlib.nullcontext():
                return measure_generation(engine, config, task, dtype, batch, steps=steps, seed=plan.seed,
                                          device=device, peak_base=base, copy_bytes_per_s=self.copy_bytes_per_s)
        # Whole images; what generation left behind (KV caches, graphs) is freed first, out of the peak.
        self.release(keep=lambda key: key == per_dtype)
        if system == ENGINE:
            model.release_caches()
        if task == "features":
            ids = prompt_of(config, batch, config.n_positions, plan.seed, device)
            fn = (lambda: model.features(ids)) if system == ENGINE else (lambda: reference_features(reference, ids))
        else:
            pixels = random_pixels(config, batch, config.n_positions, plan.seed, device)  # no SOS
            fn = ((lambda: model.log_likelihood(pixels)) if system == ENGINE
                  else (lambda: reference_log_likelihood(reference, pixels)))
        with torch.no_grad():
            return measure_forward(fn, batch, device, base)

    def run_startup(self, model_name: str) -> None:
        plan = self.plan
        dtype = plan.dtypes[0]
        batch = STARTUP_BATCH if STARTUP_BATCH in plan.batches else plan.batches[0]
        self.measure("startup", ENGINE, model_name, dtype, batch, functools.partial(
            measure_startup, model_name, dtype, batch, plan.device, plan.backend, plan.seed))

    def cases_or_failure(self, task: str, system: str, model_name: str, dtype_name: str, batch: int,
                         build: Callable, *args, **kwargs):
        """build(*args, **kwargs), or, when it raises, a failed row recorded and None (as in measure: record it
        and go on)."""
        try:
            return build(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            self.record(Result(task, system, model_name, dtype_name, batch, status="failed",
                               note=f"{type(e).__name__}: {_first_line(e)}"))
            self.release()
            return None

    def run_kernels(self, config: ImageGPTConfig, model_name: str) -> None:
        device = self.plan.device
        if not use_triton(device):
            self.record(Result("kernel", "all kernels", model_name, "-", 0, status="skipped", note=NO_TRITON))
            return
        for i, dtype_name in enumerate(self.plan.dtypes):
            dtype = DTYPES[dtype_name]
            if dtype == torch.bfloat16 and device.type == "cpu":
                continue  # the Triton interpreter has no bfloat16
            for batch in self.plan.kernel_batches:
                cases = self.cases_or_failure("kernel", "all kernels", model_name, dtype_name, batch, kernel_cases,
                                              config, dtype, batch, device, self.plan.seed,
                                              with_dtype_free=i == 0) or []
                for case in cases:
                    self.measure("kernel", case.name, model_name, case.dtype, batch,
                                 functools.partial(measure_kernel, case, device, self.copy_bytes_per_s))
                del cases
                self.release()
        if model_name == self.plan.models[0]:  # quantizing images does not depend on the model: measured once
            cases = self.cases_or_failure("quantize", "quantize cases", model_name, "uint8", 0, quantize_cases,
                                          device, self.plan.seed) or {}
            for case in cases.values():
                self.measure("quantize", case.system, model_name, "uint8", case.images,
                             functools.partial(measure_quantize, case, device))

    def run_sweep(self, config: ImageGPTConfig, model_name: str, weights: dict) -> None:
        """Under each value of each launch heuristic in SWEEPS, at the plan's first dtype and those of its batches
        where the heuristic is read: first the whole decode step (a fresh engine, its graphs captured under that
        value), "decode step [constant=value]", what a kernel's gain is worth once it overlaps its neighbours under
        programmatic dependent launch; then, with the time left, the kernels it changes, "kernel [constant=value]"
        (a time limit cuts the slower kernel rows, not the steps that decide a default). Every sweep's default row
        at a batch is the same engine, so its decode step is measured once a batch and shared by those rows."""
        device, dtype_name = self.plan.device, self.plan.dtypes[0]
        if not use_triton(device):
            self.record(Result("kernel", "sweep", model_name, "-", 0, status="skipped", note=NO_TRITON))
            return
        defaults_step: dict[int, dict] = {}  # batch -> the decode step under every default

        def sweep_step(batch: int, is_default: bool) -> dict:
            if is_default and batch in defaults_step:
                return {**defaults_step[batch], "note": "every default: measured once a batch"}
            measured = measure_decode_step(config, weights, dtype_name, batch, device=device, seed=self.plan.seed,
                                           backend=self.plan.backend, copy_bytes_per_s=self.copy_bytes_per_s)
            if is_default:
                defaults_step[batch] = measured
            return measured

        for steps_pass in (True, False):
            for sweep in SWEEPS:
                label, default = sweep.constant.strip("_"), current_value(sweep)
                for value in sweep.values:
                    with heuristic(sweep.module, sweep.constant, value):
                        for batch in [b for b in self.plan.batches if b in sweep.batches]:
                            if steps_pass and sweep.steps:
                                self.measure("kernel", f"decode step [{label}={value}]", model_name, dtype_name,
                                             batch, functools.partial(sweep_step, batch, value == default))
                            elif not steps_pass and sweep.cases:
                                self.measure_sweep_kernels(config, model_name, dtype_name, batch, sweep.cases,
                                                           f"{label}={value}")
                            else:
                                continue  # nothing measured: nothing to release
                            self.release()

    def measure_sweep_kernels(self, config: ImageGPTConfig, model_name: str, dtype_name: str, batch: int,
                              case_names: tuple[str, ...], setting: str) -> None:
        """The kernel rows of the cases named case_names..., under the heuristics as they are now."""
        device = self.plan.device
        cases = self.cases_or_failure("kernel", f"sweep [{setting}]", model_name, dtype_name, batch, kernel_cases,
                                      config, DTYPES[dtype_name], batch, device, self.plan.seed,
                                      with_dtype_free=False) or []
        for case in [c for c in cases if c.name.startswith(case_names)]:
            self.measure("kernel", f"{case.name} [{setting}]", model_name, dtype_name, batch,
                         functools.partial(measure_kernel, case, device, self.copy_bytes_per_s, with_baseline=False))


def measure_decode_step(config: ImageGPTConfig, weights: dict, dtype_name: str, batch: int, *, device: torch.device,
                        seed: int, backend: str | None = None, copy_bytes_per_s: float = float("inf")) -> dict:
    """ms per decode step of a fresh engine (its kernels and graph under the heuristics as they are now), over
    SWEEP_STEPS steps from the middle of an image: the sweep's decode-step rows, and benchmarks/step_settings.py's."""
    model = ImageGPT(config, weights, dtype=DTYPES[dtype_name], device=device, backend=backend, max_batch=batch)
    return measure_generation(EngineSystem(model, seed), config, "generate", DTYPES[dtype_name], batch,
                              steps=min(SWEEP_STEPS, config.n_positions // 4), seed=seed, device=device,
                              peak_base=allocated_memory(device), copy_bytes_per_s=copy_bytes_per_s)


# ---------------------------------------------------------------------------------------------------------
# Command line.


def _list(kind: Callable, choices):
    def parse(text: str):
        values = tuple(kind(v) for v in text.split(",") if v)
        if not values or any(v not in choices for v in values):
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {sorted(choices)}, got {text!r}")
        return values
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m igpt_fast.benchmark",
        description="Benchmark igpt-fast against its anchors (reference eager and torch.compile'd, transformers "
                    "generate plain and static-cache) on random weights; print tables (generation last), write "
                    "results.json, summary.txt and images_per_s.png to --out.")
    p.add_argument("--sizes", choices=sorted(PRESETS),
                   help="preset: smoke (tiny model on the CPU, seconds), core (small; batch 1, 8, 64; fp16, fp32), "
                        "full (small, medium, large; batch 1..256; fp16, bf16, fp32); default: core with a CUDA "
                        "GPU, smoke without one (core on a CPU takes hours)")
    p.add_argument("--models", type=_list(str, MODELS), help="override the preset's models: " + ",".join(MODELS))
    p.add_argument("--dtypes", type=_list(str, DTYPES), help="override the preset's dtypes: " + ",".join(DTYPES))
    p.add_argument("--batches", type=_list(int, BATCH_BUCKETS), help="override the preset's batch sizes "
                   f"(batch buckets: {','.join(map(str, BATCH_BUCKETS))})")
    p.add_argument("--systems", type=_list(str, SYSTEMS), help="override the preset's systems: " + ",".join(SYSTEMS))
    p.add_argument("--without", type=_list(str, SYSTEMS), default=(),
                   help="leave these systems out (of the preset's or --systems')")
    p.add_argument("--tasks", type=_list(str, TASKS), help="override the preset's tasks: " + ",".join(TASKS))
    p.add_argument("--anchor-steps", type=int, help="decode steps an anchor times, from the middle of the image, "
                   "then extrapolates (0: whole images; presets: smoke 8, core 64, full 128)")
    p.add_argument("--compiled-at", help="where the compiled anchors run: 'all' or dtype:batch pairs such as "
                   "float16:8,float32:* (presets limit them: each compiles for 15-30 s)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available, but cpu for the smoke preset)")
    p.add_argument("--backend", choices=("triton", "torch"), help="igpt-fast's backend (default: by device)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, help="seconds; measurements that would start later are recorded "
                   "as skipped (results.json is rewritten after every measurement)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default bench-results)")
    p.add_argument("--from-json", type=Path, help="only re-render the tables and plot of an earlier results.json")
    p.add_argument("--readme", type=Path, help="also write the measured table into this README, between its "
                   "'<!-- measured:start -->' and '<!-- measured:end -->' lines")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    if args.sizes is None:
        args.sizes = "core" if torch.cuda.is_available() else "smoke"
        if args.sizes == "smoke":
            print("no CUDA GPU: running the smoke preset (a tiny model; --sizes core to insist)", file=sys.stderr)
    preset = PRESETS[args.sizes]
    if args.device:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: CUDA is not available here")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and args.sizes != "smoke" else "cpu")
    runs_at = dict(preset.runs_at)
    if args.compiled_at is not None:
        value = "all" if args.compiled_at == "all" else tuple(args.compiled_at.split(","))
        runs_at.update({system: value for system in COMPILED_ANCHORS})
    return Plan(
        models=args.models or preset.models, dtypes=args.dtypes or preset.dtypes,
        batches=tuple(sorted(args.batches or preset.batches)),
        systems=tuple(s for s in args.systems or preset.systems if s not in args.without),
        tasks=args.tasks or preset.tasks,
        anchor_steps=preset.anchor_steps if args.anchor_steps is None else args.anchor_steps,
        runs_at=runs_at, kernel_batches=tuple(sorted(args.batches or preset.kernel_batches or preset.batches)),
        device=device, backend=args.backend, seed=args.seed, time_limit_s=args.time_limit)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.readme is not None:
        try:
            readme_parts(args.readme)  # before a long run, not after it
        except (OSError, ValueError) as e:
            print(f"--readme: {e}", file=sys.stderr)
            return 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        if not args.from_json.is_file():
            print(f"no results at {args.from_json}: the benchmark recorded no measurement there", file=sys.stderr)
            return 1
        rows = json.loads(args.from_json.read_text())["results"]
    else:
        rows = [dataclasses.asdict(r) for r in Runner(make_plan(args), args.out).run()]
    print(report(rows, args.out))
    if args.readme is not None:
        replace_readme_block(args.readme, markdown_summary(rows))
        print(f"wrote the measured table into {args.readme}", file=sys.stderr)
    return 1 if args.from_json is None and any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
