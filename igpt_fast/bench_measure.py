"""The benchmark's measurements: the systems, model sizes and dtypes it speaks of, the row each measurement
fills (Result), the run's environment, random weights and prompts, the bytes a decode step must move, the timers,
and the measurements of generation (igpt-fast through its decoder, the anchors through igpt_fast.anchors) and of
whole-image forwards. Each measure_* returns the Result fields it measured, as a dict.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from igpt_fast.anchors import ANCHORS, Clock, TimedRun
from igpt_fast.checkpoint import expected_shapes
from igpt_fast.config import ImageGPTConfig
from igpt_fast.model import ImageGPT
from igpt_fast.reference import ReferenceImageGPT

ENGINE = "igpt-fast"
ENGINE_NO_PDL = "igpt-fast-no-pdl"  # the same engine, kernels launched without PDL: what PDL buys (sm_90+)
SYSTEMS = (ENGINE, ENGINE_NO_PDL, *ANCHORS)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOP_K = 40  # every timed generation samples from the top 40 (shared/docs/performance.md)

MODELS = {
    # The smoke preset's model: a whole image is 32 tokens, so every path runs in seconds on a CPU.
    "tiny": ImageGPTConfig(vocab_size=18, n_positions=32, n_embd=32, n_layer=2, n_head=2),
    "small": ImageGPTConfig.small(),
    "medium": ImageGPTConfig.medium(),
    "large": ImageGPTConfig.large(),
}


@dataclass
class Result:
    task: str  # generate | complete | features | likelihood | startup | kernel | quantize
    system: str  # igpt-fast or an anchor; for task "kernel" the kernel's name
    model: str
    dtype: str
    batch: int
    status: str = "ok"  # ok | skipped | failed
    note: str = ""
    ms: float | None = None  # generate/complete: per decode step; features/likelihood: per call; kernel: per launch
    images_per_s: float | None = None
    first_call_s: float | None = None  # compile, capture and warm-up, apart from ms (startup: fresh process, cold)
    warm_first_call_s: float | None = None  # startup: the same with the Triton cache the cold run filled
    extrapolated: bool = False  # ms from a window of steps_timed steps; images/s = batch / (tokens x ms)
    steps_timed: int | None = None
    bytes_per_step: int | None = None  # bytes a step (a kernel launch) must move
    gb_per_s: float | None = None
    floor_ms: float | None = None  # bytes_per_step at the measured copy bandwidth
    baseline: str | None = None  # kernels: the unfused PyTorch equivalent and its time
    baseline_ms: float | None = None
    peak_memory_bytes: int | None = None  # the system's own peak GPU memory (weights, caches, graphs)
    wall_s: float | None = None  # what the row cost the run (building, compiling, timing): where a time limit goes
    environment: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------
# Environment, weights, the byte budget, timers.


def package_version(name: str) -> str | None:
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
        "triton": package_version("triton"),
        "transformers": package_version("transformers"),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "copy_gb_per_s": round(copy_bandwidth(device) / 1e9, 1),
    }


def batch_list(text: str) -> list[int]:
    """argparse type of the benchmark scripts' --batches: '1,8,64' -> [1, 8, 64]."""
    try:
        batches = [int(b) for b in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated integers, got {text!r}") from None
    if any(b < 1 for b in batches):
        raise argparse.ArgumentTypeError(f"must be positive, got {batches}")
    return batches


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


GRAPH_CALLS = 10  # calls per captured graph: enough GPU time per replay (~1 ms) that the host's launch is hidden
L2_FLUSH_BYTES = 128 * 2**20  # 2.5x the H100's and H200's 50 MiB L2 (do_bench flushes 256 MiB; half the noise)


def graph_kernel_ms(fn: Callable, device: torch.device) -> float:
    """GPU time of one call of a short kernel (or unfused op sequence), its host launch cost excluded: GRAPH_CALLS
    calls, each after an L2 flush (a decode step finds its weights outside L2), captured in one CUDA graph, minus
    a graph of the flushes alone, per call. do_bench's events around each call count the host's launch time
    whenever the host is slower than the kernel: on an H100 it timed the same decode kernels at either ~11 us or
    50-70 us. The flush reads a buffer rather than writing one (as do_bench does): written, it leaves L2 full of
    dirty lines that the kernel's first reads must write back, a cost a decode step, whose L2 holds mostly clean
    weights, does not pay. Falls back to kernel_ms (said on stderr) where fn cannot be captured, and off CUDA."""
    if device.type != "cuda":
        return kernel_ms(fn, device)
    from triton.testing import do_bench

    flush = torch.ones(L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device)
    flush_sum = torch.empty((), dtype=torch.float32, device=device)
    fn()  # compile and autotune outside the capture
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # a warm-up on a side stream, as capture asks
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    flushes, calls = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(flushes):
            for _ in range(GRAPH_CALLS):
                torch.sum(flush, dim=0, out=flush_sum)
        with torch.cuda.graph(calls):
            for _ in range(GRAPH_CALLS):
                torch.sum(flush, dim=0, out=flush_sum)
                fn()
    except RuntimeError as e:  # a host sync or an unsupported op inside fn
        torch.cuda.synchronize(device)
        print(f"graph_kernel_ms: cannot capture ({str(e).splitlines()[0][:120]}); timing with do_bench instead",
              file=sys.stderr)
        return kernel_ms(fn, device)
    with_calls = do_bench(calls.replay, warmup=10, rep=60, return_mode="median")
    flushes_only = do_bench(flushes.replay, warmup=10, rep=60, return_mode="median")
    return max(with_calls - flushes_only, 0.0) / GRAPH_CALLS


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


def allocated_memory(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def release_device_memory(device: torch.device, *, cublas_workspaces: bool = True) -> None:
    """Free what nothing references any more and, with cublas_workspaces, cuBLAS's workspaces, so that the next
    system's peak is measured from what the run itself still holds.

    cuBLAS keeps a workspace (tens of MiB on Hopper) for each stream a matmul ran on, allocated through PyTorch's
    allocator and so counted in memory_allocated; the kernel rows' torch baselines run on a side stream each.
    torch.compile's CUDA-graph trees ("reduce-overhead") free every workspace when they record, so a baseline that
    still counted them exceeds what the process holds afterwards. That fits what an H200 reported for
    reference-compiled (2026-12-04): at batch 1, 0.20 GiB for generate and -0.34 for the completion after it; at
    batch 8, 0.04 GiB where its weights and cache alone are 0.52: each about 0.53 GiB (some 17 workspaces) below
    its own tensors once the first recording had freed them. (Not yet seen on a GPU with this function in place:
    the GPU test of compiled anchors' peaks checks it.) Free the workspaces only while no CUDA graph that may use
    one is alive (graph trees excepted: they keep theirs in their own pool): a captured matmul keeps its
    workspace's address."""
    if device.type != "cuda":
        return
    gc.collect()
    clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)  # what CUDA-graph trees call
    if cublas_workspaces and clear_workspaces is not None:
        clear_workspaces()
    torch.cuda.empty_cache()


def _peak_since(device: torch.device, baseline: int) -> int | None:
    return torch.cuda.max_memory_allocated(device) - baseline if device.type == "cuda" else None


# ---------------------------------------------------------------------------------------------------------
# Systems and measurements.


class EngineSystem:
    """igpt-fast through its decoder's primitives: decoder.start (prefill + first token; captures the bucket's
    graphs on its first call) and decoder.decode (graph replays on CUDA)."""

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
        decoder.decode(state, new_tokens - 1, greedy=False)
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

