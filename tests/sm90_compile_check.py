"""Compile, for an H100 (sm_90), every Triton kernel variant the engine launches, without a GPU.

The interpreter proves the kernels' math on the CPU but not that they compile. This script runs the real engine
(prefill, decode steps, sampling) at imagegpt-small shapes (with and without programmatic dependent launch), a
96-wide-head config and the shipped demo model, with every launch recorded instead of run
(igpt_fast.kernel_launches), then compiles each distinct launch (same constexprs, argument types, 16-byte alignment
and unit ints as the launch would specialize on) with triton.compile for sm_90, and checks shared memory and, from
ptxas's log (a fresh Triton cache, so ptxas runs for every variant), that no variant spills registers to local
memory.
Run by tests/test_sm90_compile.py in a subprocess, because kernels must be imported with TRITON_INTERPRET=0.

    python tests/sm90_compile_check.py            # prints one line per variant, exits 1 on any failure
    python tests/sm90_compile_check.py --sweeps   # and every variant the benchmark's sweep would launch
    python tests/sm90_compile_check.py --ptx-digests FILE   # and each variant's PTX digest, one JSON line each

The digests compare machine code across commits without a GPU: a change meant to leave the compiled kernels alone
(a refactor, code paths deleted behind constexprs a launch never takes) should leave every variant's digest as it
was. Source line numbers are left out of them.
"""

import argparse
import concurrent.futures
import hashlib
import io
import json
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

from igpt_fast import ImageGPTConfig  # noqa: E402
from igpt_fast.bench_kernels import SWEEPS, heuristic  # noqa: E402
from igpt_fast.demo import demo_model_path  # noqa: E402
from igpt_fast.kernel_launches import Case, distinct, engine_launches  # noqa: E402

H100 = GPUTarget("cuda", 90, 32)
H100_SHARED_MEMORY = 227 * 1024
# A few spilled registers are tolerated (ptxas spills 4-16 B in two prefill tiles); the check is for tiles too big
# for their warps, like the 128 x 64 QKV tile whose three pointer tiles spilled 2 KB before its epilogue was fixed.
TOLERATED_SPILL_BYTES = 64
# What the engine runs at: imagegpt-small in every dtype (and once without PDL), a config
# with imagegpt-large's 96-wide heads, the shipped demo model, imagegpt-medium and -large, and 256-wide heads.
ENGINE_CASES = [Case(ImageGPTConfig.small(), (1, 8, 64), (torch.float16, torch.float32, torch.bfloat16), True),
                Case(ImageGPTConfig.small(), (1, 8, 64), (torch.float16,), False),
                Case(ImageGPTConfig(n_embd=192, n_head=2, n_layer=1), (1, 64), (torch.float16,), True),
                Case(ImageGPTConfig.from_json_file(demo_model_path() / "config.json"), (16,), (torch.float16,), True),
                # imagegpt-medium and -large: their widths (1024, 1536), MLPs and heads of 128 and 96, in one layer
                # (every layer launches the same variants); and the widest heads the kernels take (256)
                Case(ImageGPTConfig.medium(n_layer=1), (1, 8, 64), (torch.float16, torch.float32), True),
                Case(ImageGPTConfig.large(n_layer=1), (1, 8, 64), (torch.float16, torch.float32), True),
                Case(ImageGPTConfig(n_embd=512, n_head=2, n_layer=1), (1, 8), (torch.float16, torch.float32), True)]
# Where the sweep times its alternatives (bench_kernels.SWEEPS): imagegpt-small, fp16, with PDL.
SWEEP_CASES = [Case(ImageGPTConfig.small(), (1, 2, 4, 8, 64), (torch.float16,), True)]


class PerThreadStdout(io.TextIOBase):
    """sys.stdout for compiling in threads: Triton prints each ptxas report, and each thread keeps its own."""

    def __init__(self):
        self.local = threading.local()

    def write(self, text: str) -> int:
        return (getattr(self.local, "buffer", None) or sys.__stdout__).write(text)


def ptx_digest(ptx: str) -> str:
    """sha256 of the PTX without what moves with the source (.file and .loc lines, the debug sections after the
    code)."""
    code = ptx.split("\t.section\t.debug", 1)[0]
    kept = [line for line in code.splitlines() if not line.lstrip().startswith((".loc", ".file"))]
    return hashlib.sha256("\n".join(kept).encode()).hexdigest()


def compile_variant(variant) -> tuple[str, str, str | None]:
    """(status, the line to print, PTX digest or None) of one launch compiled for sm_90."""
    fn, signature, constexprs, aligned, options = variant
    shown = {k: v for k, v in constexprs.items() if v is not None}
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    ptxas_log, registers, spills, digest = io.StringIO(), None, None, None
    sys.stdout.local.buffer = ptxas_log
    try:
        compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs), target=H100,
                                  options=options)
        shared = compiled.metadata.shared
        digest = ptx_digest(compiled.asm["ptx"])
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
    return (status, f"{fn.__name__:24s} {status:4s} {registers} regs {spills} B spilled {shown} {options} [{pointers}]",
            digest)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sweeps", action="store_true", help="also every variant the benchmark's sweep launches "
                        "(each value of bench_kernels.SWEEPS, imagegpt-small fp16): none may fail or spill")
    parser.add_argument("--ptx-digests", type=argparse.FileType("w"), metavar="FILE",
                        help="write each variant's kernel, constexprs, signature, options and PTX digest to FILE, "
                             "one JSON line each")
    args = parser.parse_args(argv)
    launches = distinct(engine_launches(ENGINE_CASES))
    if args.sweeps:
        for sweep in SWEEPS:
            for value in sweep.values:
                with heuristic(sweep.module, sweep.constant, value):
                    for key, launch in distinct(engine_launches(SWEEP_CASES)).items():
                        launches.setdefault(key, launch)
    # Compiling releases the GIL for most of its time (MLIR passes, ptxas in a subprocess): one thread per core
    # takes CI's two cores about half the serial time.
    sys.stdout = PerThreadStdout()
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = list(pool.map(compile_variant, [launch.variant()[1] for launch in launches.values()]))
    finally:
        sys.stdout = sys.__stdout__
    for _, line, _ in results:
        print(line, flush=True)
    if args.ptx_digests:
        for launch, (_, _, digest) in zip(launches.values(), results, strict=True):
            fn, signature, constexprs, aligned, options = launch.variant()[1]
            # aligned: which pointers were 16-byte aligned in the recorded launch, which changes the code
            args.ptx_digests.write(json.dumps(dict(kernel=fn.__name__, constexprs=constexprs, signature=signature,
                                                   aligned=aligned, options=options, ptx=digest), default=str) + "\n")
        args.ptx_digests.close()
    failures = sum(status != "ok" for status, _, _ in results)
    print(f"{len(launches)} kernel variants compiled for sm_90 with triton {triton.__version__}: "
          f"{len(launches) - failures} ok, {failures} failed")
    return 1 if failures or not launches else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
