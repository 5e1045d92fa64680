"""Compile, for an H100 (sm_90), every Triton kernel variant the engine launches, without a GPU.

The interpreter proves the kernels' math on the CPU but not that they compile. This script runs the real engine
(prefill, decode steps, sampling) at imagegpt-small shapes (with and without programmatic dependent launch), a
96-wide-head config, the shipped demo model and the one-launch decode step (decoder.PERSISTENT_DECODE), with
every launch recorded instead of run (JITFunction.run patched), then compiles each distinct launch (same
constexprs, argument types, 16-byte alignment and unit ints as the launch would specialize on) with triton.compile
for sm_90, and checks shared memory and, from ptxas's log (a fresh Triton cache, so ptxas runs for every variant),
that no variant spills registers to local memory.
Run by tests/test_sm90_compile.py in a subprocess, because kernels must be imported with TRITON_INTERPRET=0.

    python tests/sm90_compile_check.py            # prints one line per variant, exits 1 on any failure
    python tests/sm90_compile_check.py --sweeps   # and every variant the benchmark's sweep would launch
"""

import argparse
import concurrent.futures
import io
import math
import os
import re
import sys
import tempfile
import threading

os.environ["TRITON_INTERPRET"] = "0"  # real JITFunctions at import time
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton prints ptxas -v's report (registers, spills) when it compiles
CACHE = tempfile.TemporaryDirectory(prefix="igpt-sm90-")  # removed at exit (about 50 MB)
os.environ["TRITON_CACHE_DIR"] = CACHE.name  # fresh: a cache hit would skip ptxas and its report

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from igpt_fast import ImageGPT, ImageGPTConfig, backend  # noqa: E402
from igpt_fast.bench_kernels import SWEEPS, heuristic  # noqa: E402
from igpt_fast.checkpoint import expected_shapes  # noqa: E402
from igpt_fast.decoder import PackedWeights, StaticDecoder  # noqa: E402
from igpt_fast.demo import demo_model_path  # noqa: E402
from igpt_fast.kernels import clusters, persistent  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_MEMORY = 227 * 1024
# A few spilled registers are tolerated (ptxas spills 4-16 B in two prefill tiles); the check is for tiles too big
# for their warps, like the 128 x 64 QKV tile whose three pointer tiles spilled 2 KB before its epilogue was fixed.
TOLERATED_SPILL_BYTES = 64
COMPILE_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion", "launch_pdl")
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
                 torch.int32: "*i32", torch.int16: "*i16", torch.uint8: "*u8", torch.bool: "*i1"}


def describe(fn, args, kwargs):
    """The compile-relevant facts of one launch: signature types, constexpr values, alignment, options."""
    values = dict(zip(fn.arg_names, args, strict=False))
    values.update({k: v for k, v in kwargs.items() if k not in COMPILE_OPTIONS})
    options = {k: v for k, v in kwargs.items() if k in COMPILE_OPTIONS}
    signature, constexprs, aligned = {}, {}, []
    for i, (name, param) in enumerate(zip(fn.arg_names, fn.params, strict=True)):
        value = values[name]
        if param.is_constexpr or value is None:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
            if value.data_ptr() % 16 == 0:
                aligned.append(i)
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int) and value == 1:  # the JIT specializes ints equal to 1 (unit strides)
            signature[name], constexprs[name] = "constexpr", 1
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                aligned.append(i)
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot type argument {name}={value!r}")
    key = (fn.__name__, tuple(sorted(signature.items())), tuple(sorted(map(str, constexprs.items()))),
           tuple(aligned), tuple(sorted(options.items())))
    return key, (fn, signature, constexprs, aligned, options)


# (config, batches, dtypes, PDL) the engine runs at: imagegpt-small in every dtype (and once without PDL), a config
# with imagegpt-large's 96-wide heads, the shipped demo model, imagegpt-medium and -large, and 256-wide heads.
ENGINE_CASES = [(ImageGPTConfig.small(), (1, 8, 64), (torch.float16, torch.float32, torch.bfloat16), True),
                (ImageGPTConfig.small(), (1, 8, 64), (torch.float16,), False),
                (ImageGPTConfig(n_embd=192, n_head=2, n_layer=1), (1, 64), (torch.float16,), True),
                (ImageGPTConfig.from_json_file(demo_model_path() / "config.json"), (16,), (torch.float16,), True),
                # imagegpt-medium and -large: their widths (1024, 1536), MLPs and heads of 128 and 96, in one layer
                # (every layer launches the same variants); and the widest heads the kernels take (256)
                (ImageGPTConfig.medium(n_layer=1), (1, 8, 64), (torch.float16, torch.float32), True),
                (ImageGPTConfig.large(n_layer=1), (1, 8, 64), (torch.float16, torch.float32), True),
                (ImageGPTConfig(n_embd=512, n_head=2, n_layer=1), (1, 8), (torch.float16, torch.float32), True)]
# The one-launch decode step (decoder.PERSISTENT_DECODE, off by default) at the batches it takes: imagegpt-small in
# every dtype, and one layer of imagegpt-medium and -large.
PERSISTENT_CASES = [(ImageGPTConfig.small(), (1, 8, 16), (torch.float16,), True),
                    (ImageGPTConfig.small(), (1,), (torch.float32, torch.bfloat16), True),
                    (ImageGPTConfig.medium(n_layer=1), (1,), (torch.float16,), True),
                    (ImageGPTConfig.large(n_layer=1), (8,), (torch.float16,), True)]
PHASE_TIMING_CASES = [(ImageGPTConfig.small(), (1,), (torch.float16,), True)]  # profile_step.py --one-launch's
H100_SMS = 132  # the persistent step's grid: one program per SM
# Where the sweep times its alternatives (bench_kernels.SWEEPS): imagegpt-small, fp16, with PDL.
SWEEP_CASES = [(ImageGPTConfig.small(), (1, 8, 64), (torch.float16,), True)]


def record_engine_launches(cases, phase_timing: bool = False) -> dict:
    """Every distinct launch of the engine on `cases`; with phase_timing, the one-launch step's timing variant."""
    launches: dict = {}

    def record(fn, *args, grid, warmup, **kwargs):  # stands in for JITFunction.run: `kernel[grid](...)`
        key, variant = describe(fn, args, kwargs)
        launches.setdefault(key, variant)

    triton.runtime.JITFunction.run = record
    persistent.default_programs = lambda device: H100_SMS
    persistent.grid_sync_mode = lambda device: persistent.sync.ACQUIRE_LOAD  # a GPU's, not the interpreter's
    # The launchers accept CPU tensors only under the interpreter; nothing runs here, so let them through.
    for module in [m for name, m in sys.modules.items() if name.startswith("igpt_fast")]:
        for check in ("use_triton", "triton_interpreter_on"):
            if hasattr(module, check):
                setattr(module, check, lambda *args: True)
    # An H100 launches the decode kernels with programmatic dependent launch (backend.use_pdl); older GPUs and
    # IGPT_FAST_PDL=0 without it: both variants, the latter at one dtype (the kernels differ by two instructions).
    for config, batches, dtypes, pdl in cases:
        backend.use_pdl = lambda device, pdl=pdl: pdl
        state = {k: torch.zeros(shape) for k, shape in expected_shapes(config).items()}
        for dtype in dtypes:
            model = ImageGPT(config, state, backend="triton")
            # Built by hand: ImageGPT refuses bfloat16 on the CPU, where the interpreter would have to run it.
            model.decoder = StaticDecoder(config, PackedWeights.pack(config, state, dtype, torch.device("cpu")),
                                          backend="triton", use_cuda_graphs=False)
            if phase_timing:  # the stamps of benchmarks/profile_step.py --one-launch
                model.decoder.phase_timing = torch.zeros(H100_SMS, persistent.timing_slots(config.n_layer),
                                                         dtype=torch.int64)
            for batch in batches:
                context = torch.full((batch, 1), config.sos_token_id)
                model.generate(context, max_new_tokens=2, do_sample=True, top_k=min(40, config.n_clusters), top_p=0.9)
                model.generate(context, max_new_tokens=2)  # greedy
                model(torch.zeros(batch, 40, dtype=torch.long))  # prefill of a longer prompt
            model(torch.zeros(4, config.n_positions, dtype=torch.long))  # whole images: the largest dot tiles
            side = math.isqrt(config.n_positions)
            pixels, centers = torch.zeros(2, side, side, 3, dtype=torch.uint8), torch.zeros(config.n_clusters, 3)
            clusters.quantize(pixels, centers)
            clusters.quantize(pixels.float(), centers)
            clusters.dequantize(torch.zeros(2, side * side, dtype=torch.long), centers)
    return launches


class PerThreadStdout(io.TextIOBase):
    """sys.stdout for compiling in threads: Triton prints each ptxas report, and each thread keeps its own."""

    def __init__(self):
        self.local = threading.local()

    def write(self, text: str) -> int:
        return (getattr(self.local, "buffer", None) or sys.__stdout__).write(text)


def compile_variant(variant) -> tuple[str, str]:
    """(status, the line to print) of one launch compiled for sm_90."""
    fn, signature, constexprs, aligned, options = variant
    shown = {k: v for k, v in constexprs.items() if v is not None}
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    ptxas_log, registers, spills = io.StringIO(), None, None
    sys.stdout.local.buffer = ptxas_log
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=H100,
                                  options=options)
        shared = compiled.metadata.shared
        spills = sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", ptxas_log.getvalue()))
        registers = max(map(int, re.findall(r"Used (\d+) registers", ptxas_log.getvalue())), default=None)
        status = ("ok" if shared <= H100_SHARED_MEMORY and spills <= TOLERATED_SPILL_BYTES
                  and "spill stores" in ptxas_log.getvalue()
                  else f"TOO MUCH SHARED MEMORY ({shared} B)" if shared > H100_SHARED_MEMORY
                  else f"SPILLS {spills} B of registers" if spills else "NO PTXAS LOG (spills unchecked)")
    except Exception as e:  # noqa: BLE001 - report every variant, then fail
        status = f"FAILED: {type(e).__name__}: {' '.join(str(e).split())[:500]}"
    finally:
        sys.stdout.local.buffer = None
    pointers = ",".join(t for t in signature.values() if t.startswith("*"))
    return status, f"{fn.__name__:24s} {status:4s} {registers} regs {spills} B spilled {shown} {options} [{pointers}]"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", action="store_true", help="also every variant the benchmark's sweep launches "
                        "(each value of bench_kernels.SWEEPS, imagegpt-small fp16): none may fail or spill")
    args = parser.parse_args(argv)
    launches = record_engine_launches(ENGINE_CASES)
    with heuristic("igpt_fast.decoder", "PERSISTENT_DECODE", True):
        for key, variant in [*record_engine_launches(PERSISTENT_CASES).items(),
                             *record_engine_launches(PHASE_TIMING_CASES, phase_timing=True).items()]:
            launches.setdefault(key, variant)
    if args.sweeps:
        for sweep in SWEEPS:
            for value in sweep.values:
                with heuristic(sweep.module, sweep.constant, value):
                    for key, variant in record_engine_launches(SWEEP_CASES).items():
                        launches.setdefault(key, variant)
    # Compiling releases the GIL for most of its time (MLIR passes, ptxas in a subprocess): one thread per core
    # takes CI's two cores about half the serial time.
    sys.stdout = PerThreadStdout()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(compile_variant, launches.values()))
    finally:
        sys.stdout = sys.__stdout__
    for _, line in results:
        print(line, flush=True)
    failures = sum(status != "ok" for status, _ in results)
    print(f"{len(launches)} kernel variants compiled for sm_90 with triton {triton.__version__}: "
          f"{len(launches) - failures} ok, {failures} failed")
    return 1 if failures or not launches else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
