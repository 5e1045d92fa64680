"""The benchmark: igpt-fast against its anchors (igpt_fast.anchors), in one process, on the same random weights
and prompts, reported as tables, a JSON file and a plot of images/s against batch.

What is measured, per model size, dtype and batch:
  generate    unconditional 1024-pixel images (top_k=40): ms per decode step, images/s, first call (compile and
              graph capture, timed apart), achieved bandwidth over the bytes a step must move, peak GPU memory
  complete    the same for the second half of an image given its first half (a prefix of n_positions / 2 pixels)
  features    model.features over whole images (anchor: the reference forward), images/s
  likelihood  model.log_likelihood over whole images (anchor: the reference forward), images/s
  kernels     each Triton kernel of a decode step against its unfused PyTorch equivalent: ms, GB/s, ratio
A decode step at position p must move the weights (embeddings but for the rows it reads) and the K, V of p + 1
cached tokens per image; "% of floor" compares the time with those bytes over this device's measured
device-to-device copy bandwidth. Anchors that would take too long time `--anchor-steps` decode steps from the
middle of the task's positions (a '*' marks those numbers; images/s is then extrapolated from ms/step).
Compiled anchors compile per (dtype, batch), 15-30 s each on a GPU: presets limit where they run.

Run `python -m igpt_fast.benchmark --help`; `main(argv)` is the entry the CLI calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import functools
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from igpt_fast.anchors import (
    ANCHORS,
    COMPILED_ANCHORS,
    Clock,
    StaticCacheAnchor,
    TimedRun,
    TransformersAnchor,
)
from igpt_fast.backend import use_triton
from igpt_fast.checkpoint import expected_shapes
from igpt_fast.config import ImageGPTConfig
from igpt_fast.decoder import BATCH_BUCKETS
from igpt_fast.model import ImageGPT
from igpt_fast.reference import ReferenceImageGPT

ENGINE = "igpt-fast"
SYSTEMS = (ENGINE, *ANCHORS)
TASKS = ("generate", "complete", "features", "likelihood", "kernels")
SYSTEM_TASKS = {
    ENGINE: ("generate", "complete", "features", "likelihood"),
    "reference-eager": ("generate", "complete", "features", "likelihood"),
    "reference-compiled": ("generate", "complete"),
    "transformers": ("generate",),
    "transformers-static": ("generate",),
}
# Cheapest and most important first, so a time limit cuts the compiled anchors, not the engine's numbers.
STAGES = (ENGINE, "reference-eager", "transformers", "kernels", "reference-compiled", "transformers-static")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOP_K = 40

MODELS = {
    # The smoke preset's model: a whole image is 32 tokens, so every path runs in seconds on a CPU.
    "tiny": ImageGPTConfig(vocab_size=18, n_positions=32, n_embd=32, n_layer=2, n_head=2),
    "small": ImageGPTConfig.small(),
    "medium": ImageGPTConfig.medium(),
    "large": ImageGPTConfig.large(),
}

# shared/docs/performance.md: fp16 on an H100, imagegpt-small, whole images, top_k=40.
TARGET_MS_PER_STEP = {1: 0.20, 8: 0.25, 64: 0.90, 256: 3.0}
TARGET_FP32_SPEEDUP = (8, 20.0)  # at batch 8 in float32, >= 20x transformers' float32 generate


@dataclass(frozen=True)
class Preset:
    models: tuple[str, ...]
    dtypes: tuple[str, ...]
    batches: tuple[int, ...]
    systems: tuple[str, ...]
    tasks: tuple[str, ...]
    anchor_steps: int  # decode steps an anchor times (0: whole images)
    compiled_at: dict  # compiled anchor -> "dtype:batch" pairs it runs at ("dtype:*" = every batch), or "all"


PRESETS = {
    "smoke": Preset(("tiny",), ("float32",), (1, 2), (ENGINE, "reference-eager", "transformers",
                                                       "transformers-static"), TASKS, 8, {}),
    "core": Preset(("small",), ("float16", "float32"), (1, 8, 64), SYSTEMS, TASKS, 128,
                   {"reference-compiled": ("float16:*",), "transformers-static": ("float16:8",)}),
    "full": Preset(("small", "medium", "large"), ("float16", "bfloat16", "float32"), (1, 8, 64, 256), SYSTEMS,
                   TASKS, 128, {"reference-compiled": "all", "transformers-static": ("float16:8", "float16:64")}),
}


@dataclass
class Result:
    task: str  # generate | complete | features | likelihood | kernel
    system: str  # igpt-fast or an anchor; for task "kernel" the kernel's name
    model: str
    dtype: str
    batch: int
    status: str = "ok"  # ok | skipped | failed
    note: str = ""
    ms: float | None = None  # generate/complete: per decode step; features/likelihood: per call; kernel: per launch
    images_per_s: float | None = None
    first_call_s: float | None = None  # compile, capture and warm-up, apart from ms
    extrapolated: bool = False  # ms from a window of steps_timed steps; images/s = batch / (tokens x ms)
    steps_timed: int | None = None
    bytes_per_step: int | None = None  # bytes a step (a kernel launch) must move
    gb_per_s: float | None = None
    floor_ms: float | None = None  # bytes_per_step at the measured copy bandwidth
    baseline: str | None = None  # kernels: the unfused PyTorch equivalent and its time
    baseline_ms: float | None = None
    peak_memory_bytes: int | None = None  # the system's own peak GPU memory (weights, caches, graphs)
    environment: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Environment, weights, the byte budget, timers.


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _command(args: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=20, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def git_commit() -> str:
    repo = Path(__file__).resolve().parent.parent
    commit = _command(["git", "rev-parse", "HEAD"], cwd=repo)
    if not commit:
        return "unknown"
    dirty = _command(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo)
    return commit + ("+uncommitted" if dirty else "")


def environment(device: torch.device) -> dict:
    """The card, driver and versions every result records."""
    cuda = device.type == "cuda"
    driver = None
    if cuda:
        driver = _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", "-i",
                           str(device.index or 0)])
    return {
        "card": torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
        "triton": _package_version("triton"),
        "transformers": _package_version("transformers"),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gb_per_s": round(copy_bandwidth(device) / 1e9, 1),
    }


def random_weights(config: ImageGPTConfig, seed: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Every parameter random at a scale that keeps activations O(1), drawn on `device` (fast) and kept on the
    CPU in float32: each system copies what it needs, so GPU memory holds only the system being measured."""
    g = torch.Generator(device).manual_seed(seed)
    state = {}
    for name, shape in expected_shapes(config).items():
        t = torch.randn(shape, generator=g, device=device)
        if name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
            t = 1.0 + 0.2 * t
        elif name.endswith("bias"):
            t = 0.1 * t
        elif "wte" in name or "wpe" in name:
            t = 0.5 * t
        else:
            t = t / shape[0] ** 0.5
        state[name] = t.cpu()
    return state


def kv_bytes_per_token(config: ImageGPTConfig, dtype: torch.dtype) -> int:
    """K and V of one cached token of one image, every layer."""
    return config.n_layer * 2 * config.n_embd * dtype.itemsize


def decode_step_bytes(config: ImageGPTConfig, dtype: torch.dtype, batch: int, prompt_len: int) -> int:
    """Average bytes one decode step must move over a run that feeds positions prompt_len..n_positions-1: all
    weights but the embedding tables, one wte and one wpe row per image, and the K, V of p + 1 tokens per image
    at position p (mean (prompt_len + 1 + n_positions) / 2)."""
    c = config
    weights = (c.num_parameters() - (c.vocab_size + c.n_positions) * c.n_embd) * dtype.itemsize
    embeddings = batch * 2 * c.n_embd * dtype.itemsize
    mean_tokens = (prompt_len + 1 + c.n_positions) / 2
    return round(weights + embeddings + batch * kv_bytes_per_token(c, dtype) * mean_tokens)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def wall_ms(fn: Callable, device: torch.device, reps: int) -> float:
    """Median wall time of fn over reps calls, synchronized (for calls long enough not to need events)."""
    times = []
    for _ in range(reps):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def kernel_ms(fn: Callable, device: torch.device) -> float:
    """Median time of one call: triton's do_bench on CUDA (CUDA events, L2 flushed between calls), else a
    warm-up call and one timed (the CPU interpreter is slow; CPU numbers only show the code runs)."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=40, return_mode="median")
    fn()
    return wall_ms(fn, device, reps=1)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes/s of a device-to-device copy (read + write), the floor's yardstick."""
    n = (256 if device.type == "cuda" else 32) * 2**20
    src = torch.ones(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = kernel_ms(lambda: dst.copy_(src), device)
    return 2 * n / (ms / 1e3)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _peak_since(device: torch.device, baseline: int) -> int | None:
    return torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------------------
# Systems and measurements.


class EngineSystem:
    """igpt-fast through its per-step primitives: decoder.start (prefill + first token; captures the bucket's
    graph on its first call) and decoder.step (a graph replay on CUDA)."""

    warmup_tokens = 2  # start + one step: Triton compile and graph capture

    def __init__(self, model: ImageGPT, seed: int):
        self.model, self.seed = model, seed
        self.top_k = min(TOP_K, model.config.n_clusters)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> TimedRun:
        decoder = self.model.decoder
        state = decoder.state(prompt.shape[0])  # batches are buckets: no padding
        state.temperature.fill_(1.0)
        state.top_k.fill_(self.top_k)
        state.top_p.fill_(1.0)
        state.seed.fill_(self.seed)
        clock = Clock(decoder.device)
        clock.mark()
        decoder.start(state, prompt, greedy=False)
        clock.mark()
        for _ in range(new_tokens - 1):
            decoder.step(state, greedy=False)
        clock.mark()
        return clock.run(state.sequences[:, :prompt.shape[1] + new_tokens].clone(), new_tokens - 1)


def task_prompt_length(config: ImageGPTConfig, task: str) -> int:
    """The SOS alone for generate; SOS + n_positions / 2 pixels for complete."""
    return 1 if task == "generate" else 1 + config.n_positions // 2


def random_pixels(config: ImageGPTConfig, batch: int, length: int, seed: int, device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.n_clusters, (batch, length), generator=g).to(device)


def prompt_of(config: ImageGPTConfig, batch: int, length: int, seed: int, device) -> torch.Tensor:
    """SOS, then random pixels: [batch, length]."""
    sos = torch.full((batch, 1), config.sos_token_id, device=device)
    return torch.cat([sos, random_pixels(config, batch, length - 1, seed, device)], dim=1)


def measure_generation(system, config: ImageGPTConfig, task: str, dtype: torch.dtype, batch: int, *,
                       steps: int, seed: int, device: torch.device, peak_base: int, copy_bytes_per_s: float
                       ) -> dict:
    """One warm-up call (the first call), then one timed run: the whole task, or `steps` decode steps from the
    middle of its positions when steps > 0 and fewer than the task has."""
    prompt_len = task_prompt_length(config, task)
    new_tokens = config.n_positions + 1 - prompt_len
    window = 0 < steps < new_tokens - 1
    if window:  # decode steps feed positions prompt_len..n_positions-1: time `steps` of them around the middle
        start = prompt_len + (config.n_positions - prompt_len - steps) // 2
        prompt, run_tokens = prompt_of(config, batch, start, seed, device), steps + 1
    else:
        prompt, run_tokens = prompt_of(config, batch, prompt_len, seed, device), new_tokens
    _reset_peak(device)
    first_call_s = system.generate(prompt, min(system.warmup_tokens or run_tokens, run_tokens)).total_s
    run = system.generate(prompt, run_tokens)
    ms = run.ms_per_step
    image_s = new_tokens * ms / 1e3 if window else run.total_s
    step_bytes = decode_step_bytes(config, dtype, batch, prompt_len)
    return {"ms": ms, "images_per_s": batch / image_s, "first_call_s": first_call_s, "extrapolated": window,
            "steps_timed": run.decode_steps, "bytes_per_step": step_bytes, "gb_per_s": step_bytes / ms / 1e6,
            "floor_ms": 1e3 * step_bytes / copy_bytes_per_s,
            "peak_memory_bytes": _peak_since(device, peak_base)}


def reference_features(reference: ReferenceImageGPT, ids: torch.Tensor) -> torch.Tensor:
    """What one does with transformers: every hidden state, then the middle one mean-pooled."""
    hidden = reference(ids, output_hidden_states=True).hidden_states
    return hidden[reference.config.n_layer // 2].float().mean(dim=1)


def reference_log_likelihood(reference: ReferenceImageGPT, pixels: torch.Tensor) -> torch.Tensor:
    sos = torch.full_like(pixels[:, :1], reference.config.sos_token_id)
    logits = reference(torch.cat([sos, pixels[:, :-1]], dim=1)).logits.float()
    return -torch.log_softmax(logits, dim=-1).gather(-1, pixels[..., None])[..., 0].mean(dim=1)


def measure_forward(fn: Callable, batch: int, device: torch.device, peak_base: int) -> dict:
    """A whole-image forward: first call apart, then the median of three (one on a CPU)."""
    _reset_peak(device)
    first_call_s = wall_ms(fn, device, reps=1) / 1e3
    ms = wall_ms(fn, device, reps=3 if device.type == "cuda" else 1)
    return {"ms": ms, "images_per_s": batch / (ms / 1e3), "first_call_s": first_call_s,
            "peak_memory_bytes": _peak_since(device, peak_base)}


@dataclass
class KernelCase:
    name: str
    baseline: str
    bytes_moved: int
    fused: Callable
    unfused: Callable
    dtype: str


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """iGPT's norm as the reference computes it: separate ops in the storage dtype."""
    return x / torch.sqrt(x.square().mean(-1, keepdim=True) + eps) * weight


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def kernel_cases(config: ImageGPTConfig, dtype: torch.dtype, batch: int, device: torch.device, seed: int,
                 with_dtype_free: bool) -> list[KernelCase]:
    """The decode step's kernels at batch rows, attention at the middle position of an image, each with its
    unfused PyTorch equivalent. Sampling and quantization do not depend on the model dtype (with_dtype_free
    includes them)."""
    from igpt_fast.kernels import attention, clusters, linear, sampling

    c = config
    d, inner, H, D, T, V = c.n_embd, c.inner_dim, c.n_head, c.head_dim, c.n_positions, c.n_clusters
    size, eps, name = dtype.itemsize, c.layer_norm_epsilon, str(dtype).removeprefix("torch.")
    g = torch.Generator(device).manual_seed(seed)

    def rand(*shape, scale=1.0, dt=dtype):
        return (scale * torch.randn(*shape, generator=g, device=device)).to(dt)

    t = T // 2
    pos = torch.tensor([t], dtype=torch.int32, device=device)
    x, norm_w = rand(batch, d), 1.0 + rand(d, scale=0.1)
    cases = []

    q, k_cache, v_cache = rand(batch, H, D), rand(batch, H, T, D), rand(batch, H, T, D)
    attn_out, scale = torch.empty_like(q), 1.0 / math.sqrt(D)
    workspace = attention.decode_workspace(batch, H, D, T, device)
    cases.append(KernelCase(
        "decode_attention", "SDPA", (2 * batch * H * (t + 1) * D + 2 * batch * d) * size,
        lambda: attention.decode_attention(q, k_cache, v_cache, pos, scale=scale, out=attn_out,
                                           workspace=workspace),
        lambda: F.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, :t + 1], v_cache[:, :, :t + 1],
                                               scale=scale), name))

    w_qkv, b_qkv, q_out = rand(d, 3 * d, scale=d ** -0.5), rand(3 * d, scale=0.1), torch.empty_like(x)

    def qkv_unfused():
        qkv = torch.addmm(b_qkv, _rms_norm(x, norm_w, eps), w_qkv)
        q_out.copy_(qkv[:, :d])
        k_cache[:, :, t] = qkv[:, d:2 * d].view(batch, H, D)
        v_cache[:, :, t] = qkv[:, 2 * d:].view(batch, H, D)

    cases.append(KernelCase(
        "norm_qkv", "norm + addmm + cache writes", (d * 3 * d + 4 * d + batch * 4 * d) * size,
        lambda: linear.norm_qkv(x, norm_w, w_qkv, b_qkv, eps=eps, q_out=q_out, k_cache=k_cache,
                                v_cache=v_cache, pos=pos, seq_len=1),
        qkv_unfused, name))

    w_fc, b_fc, hidden = rand(d, inner, scale=d ** -0.5), rand(inner, scale=0.1), rand(batch, inner)
    cases.append(KernelCase(
        "norm_linear (ln_2, c_fc, gelu)", "norm + addmm + gelu",
        (d * inner + inner + d + batch * (d + inner)) * size,
        lambda: linear.norm_linear(x, norm_w, w_fc, b_fc, eps=eps, activation="quick_gelu", out=hidden),
        lambda: _quick_gelu(torch.addmm(b_fc, _rms_norm(x, norm_w, eps), w_fc)), name))

    w_proj, b_proj, residual = rand(inner, d, scale=inner ** -0.5), rand(d, scale=0.1), rand(batch, d)
    cases.append(KernelCase(
        "linear_residual (mlp c_proj)", "addmm + add_", (inner * d + d + batch * (inner + 2 * d)) * size,
        lambda: linear.linear_residual(hidden, w_proj, b_proj, residual),
        lambda: residual.add_(torch.addmm(b_proj, hidden, w_proj)), name))

    w_head = rand(d, V, scale=d ** -0.5)
    logits_out = torch.empty(batch, V, dtype=torch.float32, device=device)
    cases.append(KernelCase(
        "norm_linear (ln_f, lm_head)", "norm + mm + float", (d * V + d + batch * d) * size + batch * V * 4,
        lambda: linear.norm_linear(x, norm_w, w_head, None, eps=eps, out=logits_out),
        lambda: (_rms_norm(x, norm_w, eps) @ w_head).float(), name))

    if with_dtype_free:
        logits = 3.0 * torch.randn(batch, V, generator=g, device=device)
        params = {"temperature": torch.ones(batch, device=device),
                  "top_k": torch.full((batch,), min(TOP_K, V), dtype=torch.int32, device=device),
                  "top_p": torch.ones(batch, device=device), "seed": torch.zeros(1, dtype=torch.int64, device=device),
                  "pos": pos, "out_ids": torch.empty(batch, dtype=torch.int64, device=device)}

        def sample_unfused():
            top = torch.topk(logits, min(TOP_K, V), dim=-1)
            probs = torch.softmax(top.values, dim=-1)
            return top.indices.gather(1, torch.multinomial(probs, 1))

        cases.append(KernelCase("sample_tokens (top_k=40)", "topk + softmax + multinomial",
                                batch * V * 4 + batch * 20, lambda: sampling.sample_tokens(logits, **params),
                                sample_unfused, "float32"))

        side = math.isqrt(T)  # an image of T pixels, cut square
        pixels = torch.randint(0, 256, (batch, side, side, 3), generator=g, device=device, dtype=torch.uint8)
        centers = torch.rand(V, 3, generator=g, device=device) * 2 - 1

        def quantize_unfused():
            scaled = pixels.float() / 127.5 - 1.0
            return (scaled[..., None, :] - centers).square().sum(-1).argmin(-1).view(batch, -1)

        cases.append(KernelCase("quantize (pixels to clusters)", "broadcast distances + argmin",
                                batch * side * side * (3 + 8) + V * 12, lambda: clusters.quantize(pixels, centers),
                                quantize_unfused, "uint8"))
    return cases


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
    compiled_at: dict
    device: torch.device
    backend: str | None
    seed: int
    time_limit_s: float | None

    def runs(self, system: str, dtype: str, batch: int) -> bool:
        if system not in COMPILED_ANCHORS:
            return True
        allowed = self.compiled_at.get(system, "all")
        return allowed == "all" or f"{dtype}:{batch}" in allowed or f"{dtype}:*" in allowed


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
            try:
                for key, value in fn().items():
                    setattr(row, key, value)
            except (torch.cuda.OutOfMemoryError, MemoryError) as e:
                row.status, row.note = "skipped", f"out of memory: {str(e).splitlines()[0][:160]}"
                self.release()
            except Exception as e:  # noqa: BLE001 (keep going: one broken system must not cost the other numbers)
                traceback.print_exc()
                row.status, row.note = "failed", f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
                self.release()
        self.record(row)

    def built(self, key: tuple, build: Callable):
        """The object for key (built on first use, after dropping any other), and the memory allocated before
        it was built (the baseline of its peak)."""
        if key not in self._built:
            self.release(keep=lambda k: k == key[:3])  # a per-batch part keeps its (system, model, dtype) parent
            baseline = _allocated(self.plan.device)
            self._built[key] = (build(), baseline)
        return self._built[key]

    def release(self, keep: Callable[[tuple], bool] = lambda key: False) -> None:
        self._built = {k: v for k, v in self._built.items() if keep(k)}
        if self.plan.device.type == "cuda":  # hand the memory back, so the next system's peak starts clean
            gc.collect()
            torch.cuda.empty_cache()

    # ---- the stages ----
    def run(self) -> list[Result]:
        for model_name in self.plan.models:
            config = MODELS[model_name]
            weights = random_weights(config, self.plan.seed, self.plan.device)
            for stage in STAGES:
                if stage == "kernels":
                    if "kernels" in self.plan.tasks:
                        self.run_kernels(config, model_name)
                elif stage in self.plan.systems:
                    self.run_system(stage, config, model_name, weights)
                self.release()
        return self.results

    def run_system(self, system: str, config: ImageGPTConfig, model_name: str, weights: dict) -> None:
        tasks = [t for t in SYSTEM_TASKS[system] if t in self.plan.tasks]
        if system.startswith("transformers") and _package_version("transformers") is None:
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
                if system == ENGINE and (system, model_name, dtype) in self._built:
                    self._built[(system, model_name, dtype)][0].model.release_caches()

    def measure_task(self, system: str, task: str, config: ImageGPTConfig, model_name: str, weights: dict,
                     dtype_name: str, batch: int) -> dict:
        plan, dtype, device = self.plan, DTYPES[dtype_name], self.plan.device

        def on_device():
            return {k: v.to(device=device, dtype=dtype) for k, v in weights.items()}

        per_dtype = (system, model_name, dtype_name)
        if system == ENGINE:
            engine, base = self.built(per_dtype, lambda: EngineSystem(
                ImageGPT(config, weights, dtype=dtype, device=device, backend=plan.backend,
                         max_batch=max(plan.batches)), plan.seed))
            model = engine.model
        elif system.startswith("reference"):
            reference, base = self.built(per_dtype, lambda: ReferenceImageGPT.from_state_dict(config, on_device()))
            if task in ("generate", "complete"):
                options = StaticCacheAnchor.compiled_options() if system == "reference-compiled" else None
                engine, _ = self.built(per_dtype + (batch,), lambda: StaticCacheAnchor(
                    reference, batch, top_k=min(TOP_K, config.n_clusters), compile_options=options))
        else:
            static = system == "transformers-static"
            key = per_dtype + ((batch,) if static else ())  # the static variant compiles per batch
            engine, base = self.built(key, lambda: TransformersAnchor(
                config, weights, dtype=dtype, device=device, top_k=min(TOP_K, config.n_clusters),
                cache_implementation="static" if static else None))
        steps = 0 if system == ENGINE else plan.anchor_steps

        if task in ("generate", "complete"):
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

    def run_kernels(self, config: ImageGPTConfig, model_name: str) -> None:
        device = self.plan.device
        if not use_triton(device):
            self.record(Result("kernel", "all kernels", model_name, "-", 0, status="skipped",
                               note="Triton kernels need CUDA (or TRITON_INTERPRET=1 set before the import)"))
            return
        for i, dtype_name in enumerate(self.plan.dtypes):
            dtype = DTYPES[dtype_name]
            if dtype == torch.bfloat16 and device.type == "cpu":
                continue  # the Triton interpreter has no bfloat16
            for batch in self.plan.batches:
                try:
                    cases = kernel_cases(config, dtype, batch, device, self.plan.seed, with_dtype_free=i == 0)
                except Exception as e:  # noqa: BLE001 (as in measure: record it and go on)
                    traceback.print_exc()
                    self.record(Result("kernel", "all kernels", model_name, dtype_name, batch, status="failed",
                                       note=f"{type(e).__name__}: {e}"[:200]))
                    continue
                for case in cases:
                    self.measure("kernel", case.name, model_name, case.dtype, batch,
                                 functools.partial(measure_kernel, case, device, self.copy_bytes_per_s))
                del cases
                self.release()


def measure_kernel(case: KernelCase, device: torch.device, copy_bytes_per_s: float) -> dict:
    with torch.no_grad():
        ms, baseline_ms = kernel_ms(case.fused, device), kernel_ms(case.unfused, device)
    return {"ms": ms, "bytes_per_step": case.bytes_moved, "gb_per_s": case.bytes_moved / ms / 1e6,
            "floor_ms": 1e3 * case.bytes_moved / copy_bytes_per_s, "baseline": case.baseline,
            "baseline_ms": baseline_ms}


# ---------------------------------------------------------------------------------------------------------
# Reports: the tables (the generation table last), targets, JSON, plot.


def write_json(path: Path, results: list, plan: Plan | None = None) -> None:
    rows = [dataclasses.asdict(r) if isinstance(r, Result) else r for r in results]
    settings = None
    if plan is not None:
        settings = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in dataclasses.asdict(plan).items()}
        settings["top_k"] = TOP_K
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "results": rows}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)  # a reader (or a killed run) never sees half a file


def _key(row: dict) -> tuple:
    return row["task"], row["model"], row["dtype"], row["batch"]


def best_anchor_ms(rows: list[dict]) -> dict[tuple, tuple[str, float]]:
    """(task, model, dtype, batch) -> the fastest anchor's (system, ms)."""
    best = {}
    for r in rows:
        if r["system"] in ANCHORS and r["status"] == "ok" and (_key(r) not in best or r["ms"] < best[_key(r)][1]):
            best[_key(r)] = (r["system"], r["ms"])
    return best


def target_verdict(row: dict, rows: list[dict]) -> str:
    """met / NOT met for the rows the performance targets speak about (they are set for an H100), else ''."""
    if row["task"] != "generate" or row["system"] != ENGINE or row["model"] != "small" or row["status"] != "ok":
        return ""
    if row["dtype"] == "float16" and row["batch"] in TARGET_MS_PER_STEP:
        target = TARGET_MS_PER_STEP[row["batch"]]
        return f"{'met' if row['ms'] <= target else 'NOT met'} (<= {target:.2f} ms)"
    batch, speedup = TARGET_FP32_SPEEDUP
    if row["dtype"] == "float32" and row["batch"] == batch:
        hf = [r for r in rows if r["system"] == "transformers" and _key(r) == _key(row) and r["status"] == "ok"]
        if not hf:
            return f"unknown (needs transformers fp32 b{batch})"
        ratio = hf[0]["ms"] / row["ms"]
        return f"{'met' if ratio >= speedup else 'NOT met'} ({ratio:.1f}x vs >= {speedup:.0f}x transformers)"
    return ""


def _table(headers: list[str], lines: list[list[str]], numeric: range) -> str:
    """Columns aligned; those in `numeric` to the right."""
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(headers)]
    fmt = " | ".join(f"{{:{'>' if i in numeric else '<'}{w}}}" for i, w in enumerate(widths))
    out = [fmt.format(*headers), "-+-".join("-" * w for w in widths)]
    return "\n".join(out + [fmt.format(*line) for line in lines])


def _num(value, spec: str, star: bool = False, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit + ("*" if star else "")


def _memory(row: dict) -> str:
    return "-" if row.get("peak_memory_bytes") is None else f"{row['peak_memory_bytes'] / 2**30:.2f} GiB"


def generation_table(rows: list[dict]) -> str:
    best = best_anchor_ms(rows)
    lines = []
    for r in rows:
        if r["task"] not in ("generate", "complete"):
            continue
        if r["status"] != "ok":
            lines.append([r["task"], r["system"], r["model"], r["dtype"], str(r["batch"]), r["status"], "", "", "",
                          "", "", r["note"][:60]])
            continue
        star = r["extrapolated"]
        anchor = best.get(_key(r))
        lines.append([
            r["task"], r["system"], r["model"], r["dtype"], str(r["batch"]), _num(r["ms"], ".3f", star),
            _num(r["images_per_s"], ".3g", star), _num(r["first_call_s"], ".2f", unit=" s"),
            f"{anchor[1] / r['ms']:.2f}x" if anchor else "-",
            f"{100 * r['floor_ms'] / r['ms']:.0f}%", _memory(r), target_verdict(r, rows),
        ])
    return _table(["task", "system", "model", "dtype", "batch", "ms/step", "images/s", "first call",
                   "vs best anchor", "% of floor", "peak mem", "target"], lines, range(5, 11))


def forward_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["task"] not in ("features", "likelihood"):
            continue
        if r["status"] != "ok":
            lines.append([r["task"], r["system"], r["model"], r["dtype"], str(r["batch"]), r["status"], "", "", "",
                          r["note"][:60]])
            continue
        reference = [a for a in rows if a["system"] == "reference-eager" and _key(a) == _key(r)
                     and a["status"] == "ok"]
        lines.append([r["task"], r["system"], r["model"], r["dtype"], str(r["batch"]), _num(r["ms"], ".2f"),
                      _num(r["images_per_s"], ".4g"), _num(r["first_call_s"], ".2f", unit=" s"),
                      f"{reference[0]['ms'] / r['ms']:.2f}x" if reference else "-", _memory(r)])
    return _table(["task", "system", "model", "dtype", "batch", "ms/call", "images/s", "first call",
                   "vs reference", "peak mem"], lines, range(5, 10))


def kernel_table(rows: list[dict]) -> str:
    lines = []
    for r in rows:
        if r["task"] != "kernel":
            continue
        if r["status"] != "ok":
            lines.append([r["system"], r["model"], r["dtype"], str(r["batch"]), r["status"], "", "", "", "",
                          r["note"][:60]])
            continue
        lines.append([r["system"], r["model"], r["dtype"], str(r["batch"]), f"{1e3 * r['ms']:.1f}",
                      _num(r["gb_per_s"], ".4g"), f"{100 * r['floor_ms'] / r['ms']:.0f}%",
                      f"{1e3 * r['baseline_ms']:.1f}", f"{r['baseline_ms'] / r['ms']:.2f}x", r["baseline"]])
    return _table(["kernel", "model", "dtype", "batch", "us", "GB/s", "% of floor", "torch us", "speedup",
                   "torch equivalent"], lines, range(4, 9))


def summary(rows: list[dict]) -> str:
    """Every table, the generation table last, with the run's card and versions."""
    env = next((r["environment"] for r in rows if r.get("environment")), {})
    header = (f"card: {env.get('card')} (driver {env.get('driver')}), copy bandwidth {env.get('copy_gb_per_s')} "
              f"GB/s; torch {env.get('torch')}, triton {env.get('triton')}, transformers {env.get('transformers')}; "
              f"commit {env.get('git_commit')}; {env.get('date')}")
    notes = ("ms/step: one decode step, compile and capture excluded (first call: apart); * timed over a window of "
             "steps in the middle of the image, images/s extrapolated; vs best anchor: the fastest anchor's "
             "ms/step over this row's; % of floor: the bytes a step must move at the copy bandwidth over the "
             "time; targets are set for an H100.")
    parts = [header]
    if any(r["task"] == "kernel" for r in rows):
        parts += ["", "Kernels (one decode step's launches; torch: the unfused PyTorch equivalent)",
                  kernel_table(rows)]
    if any(r["task"] in ("features", "likelihood") for r in rows):
        parts += ["", "Whole-image forwards (features, likelihood)", forward_table(rows)]
    parts += ["", "Generation (top_k=40 sampling; complete: the second half of each image)", generation_table(rows),
              notes]
    return "\n".join(parts)


def write_plot(rows: list[dict], path: Path) -> None:
    """images/s against batch, one line per (system, dtype), one panel per model; hollow markers are
    extrapolated."""
    from matplotlib.figure import Figure

    generate = [r for r in rows if r["task"] == "generate" and r["status"] == "ok"]
    models = sorted({r["model"] for r in generate}, key=list(MODELS).index) or ["(no results)"]
    fig = Figure(figsize=(6.5 * len(models), 5), layout="constrained")
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, model in zip(axes, models):
        lines = sorted({(r["system"], r["dtype"]) for r in generate if r["model"] == model},
                       key=lambda sd: (SYSTEMS.index(sd[0]), sd[1]))
        for system, dtype in lines:
            points = sorted((r["batch"], r["images_per_s"], r["extrapolated"]) for r in generate
                            if (r["model"], r["system"], r["dtype"]) == (model, system, dtype))
            (line,) = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=f"{system} {dtype}",
                              linestyle="-" if system == ENGINE else "--")
            hollow = [p for p in points if p[2]]
            ax.plot([p[0] for p in hollow], [p[1] for p in hollow], "o", markerfacecolor="white",
                    color=line.get_color())
        ax.set_xscale("log", base=2)
        batches = sorted({r["batch"] for r in generate if r["model"] == model})
        ax.set_xticks(batches, [str(b) for b in batches])
        ax.set_yscale("log")
        ax.set_xlabel("batch")
        ax.set_ylabel("images/s (whole images, top_k=40)")
        ax.set_title(f"imagegpt-{model} (hollow: extrapolated from a window of steps)")
        ax.grid(True, which="both", alpha=0.3)
        if lines:
            ax.legend(fontsize=8)
    card = next((r["environment"].get("card") for r in rows if r.get("environment")), "")
    fig.suptitle(f"igpt-fast and anchors, {card}")
    fig.savefig(path, dpi=120)


def report(rows: list[dict], out_dir: Path) -> str:
    """Write summary.txt and images_per_s.png; return the summary text."""
    text = summary(rows)
    (out_dir / "summary.txt").write_text(text + "\n")
    try:
        write_plot(rows, out_dir / "images_per_s.png")
    except ImportError:
        text += "\n(plot not written: matplotlib is not installed)"
    return text


# ---------------------------------------------------------------------------------------------------------
# Command line.


def _list(kind: Callable, choices=None):
    def parse(text: str):
        values = tuple(kind(v) for v in text.split(",") if v)
        bad = [v for v in values if choices is not None and v not in choices]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list of {sorted(choices or [])}, "
                                             f"got {text!r}")
        return values
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m igpt_fast.benchmark",
        description="Benchmark igpt-fast against its anchors (reference eager and torch.compile'd, transformers "
                    "generate plain and static-cache) on random weights; print tables (generation last), write "
                    "results.json, summary.txt and images_per_s.png to --out.")
    p.add_argument("--sizes", choices=sorted(PRESETS), default="core",
                   help="preset: smoke (tiny model on the CPU, seconds), core (small; batch 1, 8, 64; fp16, fp32), "
                        "full (small, medium, large; batch 1..256; fp16, bf16, fp32)")
    p.add_argument("--models", type=_list(str, MODELS), help="override the preset's models: " + ",".join(MODELS))
    p.add_argument("--dtypes", type=_list(str, DTYPES), help="override the preset's dtypes: " + ",".join(DTYPES))
    p.add_argument("--batches", type=_list(int, BATCH_BUCKETS), help="override the preset's batch sizes "
                   f"(batch buckets: {','.join(map(str, BATCH_BUCKETS))})")
    p.add_argument("--systems", type=_list(str, SYSTEMS), help="override the preset's systems: " + ",".join(SYSTEMS))
    p.add_argument("--tasks", type=_list(str, TASKS), help="override the preset's tasks: " + ",".join(TASKS))
    p.add_argument("--anchor-steps", type=int, help="decode steps an anchor times, from the middle of the image, "
                   "then extrapolates (0: whole images; presets: smoke 8, core/full 128)")
    p.add_argument("--compiled-at", help="where the compiled anchors run: 'all' or dtype:batch pairs such as "
                   "float16:8,float32:* (presets limit them: each compiles for 15-30 s)")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available, but cpu for the smoke preset)")
    p.add_argument("--backend", choices=("triton", "torch"), help="igpt-fast's backend (default: by device)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--time-limit", type=float, help="seconds; measurements that would start later are recorded "
                   "as skipped (results.json is rewritten after every measurement)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default bench-results)")
    p.add_argument("--from-json", type=Path, help="only re-render the tables and plot of an earlier results.json")
    return p.parse_args(argv)


def make_plan(args: argparse.Namespace) -> Plan:
    preset = PRESETS[args.sizes]
    if args.device:
        device = torch.device(args.device)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: CUDA is not available here")
    else:
        device = torch.device("cuda" if torch.cuda.is_available() and args.sizes != "smoke" else "cpu")
    compiled_at = preset.compiled_at
    if args.compiled_at is not None:
        value = "all" if args.compiled_at == "all" else tuple(args.compiled_at.split(","))
        compiled_at = {system: value for system in COMPILED_ANCHORS}
    return Plan(
        models=args.models or preset.models, dtypes=args.dtypes or preset.dtypes,
        batches=tuple(sorted(args.batches or preset.batches)), systems=args.systems or preset.systems,
        tasks=args.tasks or preset.tasks,
        anchor_steps=preset.anchor_steps if args.anchor_steps is None else args.anchor_steps,
        compiled_at=compiled_at, device=device, backend=args.backend, seed=args.seed,
        time_limit_s=args.time_limit)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.from_json is not None:
        rows = json.loads(args.from_json.read_text())["results"]
        print(report(rows, args.out))
        return 0
    plan = make_plan(args)
    results = Runner(plan, args.out).run()
    rows = [dataclasses.asdict(r) for r in results]
    print(report(rows, args.out))
    return 1 if any(r["status"] == "failed" for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
