"""Every Triton launch the engine makes on given configs, recorded instead of run, with CPU tensors and no GPU.

Two tools compile what this records: tests/sm90_compile_check.py (each distinct variant for an H100 without a GPU:
that it compiles, fits shared memory and does not spill) and benchmarks/warm_triton_cache.py (each for this
machine's GPU, into Triton's cache, so that the GPU check's later stages find them compiled). Both need the kernels
imported with TRITON_INTERPRET unset or 0 (real JITFunctions).
"""

from __future__ import annotations

import contextlib
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import torch
import triton

from igpt_fast import backend
from igpt_fast.checkpoint import expected_shapes
from igpt_fast.config import ImageGPTConfig
from igpt_fast.decoder import PackedWeights, StaticDecoder
from igpt_fast.kernels import clusters
from igpt_fast.model import ImageGPT

COMPILE_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion", "launch_pdl")
POINTER_TYPES = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.int64: "*i64",
                 torch.int32: "*i32", torch.int16: "*i16", torch.uint8: "*u8", torch.bool: "*i1"}


@dataclass(frozen=True)
class Case:
    """What to run the engine at: a config, its decode batches and dtypes, with programmatic dependent launch or
    not, the prompt lengths prefilled at each batch (beside the SOS alone, which generates), and whole images."""

    config: ImageGPTConfig
    batches: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...]
    pdl: bool
    prompt_lengths: tuple[int, ...] = (40,)
    whole_images: bool = True
    clusters: bool = True  # also quantize and dequantize (their kernels do not depend on the model)


@dataclass(frozen=True)
class Launch:
    fn: triton.runtime.JITFunction
    args: tuple
    grid: object
    kwargs: dict

    def variant(self):
        """(key, (fn, signature, constexprs, aligned, options)): the compile-relevant facts of this launch, as the
        JIT specializes them (argument types, constexpr values, 16-byte alignment, ints equal to 1), and a key
        equal for launches that compile to the same kernel."""
        fn, kwargs = self.fn, self.kwargs
        values = dict(zip(fn.arg_names, self.args, strict=False))
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


def _stand_in(value):
    """A tensor argument as the JIT specializes it, without its memory (a recording holds thousands of launches): a
    tiny tensor of its dtype, 16-byte aligned where it is."""
    if not isinstance(value, torch.Tensor):
        return value
    aligned = value.data_ptr() % 16 == 0
    return torch.empty(17, dtype=value.dtype)[0 if aligned else 1:]  # CPU allocations are 64-byte aligned


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Inside, every Triton launch is appended to the list instead of run; the launchers take CPU tensors (as if
    CUDA or the interpreter were there). Everything patched is restored on the way out."""
    launches: list[Launch] = []

    def record(fn, *args, grid, warmup, **kwargs):  # stands in for JITFunction.run: `kernel[grid](...)`
        launches.append(Launch(fn, tuple(map(_stand_in, args)), grid, {k: _stand_in(v) for k, v in kwargs.items()}))

    with contextlib.ExitStack() as patches:
        patches.enter_context(mock.patch.object(triton.runtime.JITFunction, "run", record))
        for module in [m for name, m in sys.modules.items() if name.startswith("igpt_fast")]:
            for check in ("use_triton", "triton_interpreter_on"):
                if hasattr(module, check):
                    patches.enter_context(mock.patch.object(module, check, lambda *args: True))
        yield launches


@contextlib.contextmanager
def pdl_as(pdl: bool) -> Iterator[None]:
    """Inside, the launchers use programmatic dependent launch exactly when `pdl` (whatever the device)."""
    with mock.patch.object(backend, "use_pdl", lambda device: pdl):
        yield


def recordable_model(config: ImageGPTConfig, dtype: torch.dtype) -> ImageGPT:
    """The engine on zero weights in `dtype`, on the CPU (inside recording())."""
    state = {k: torch.zeros(shape) for k, shape in expected_shapes(config).items()}
    model = ImageGPT(config, state, backend="triton")
    # Built by hand: ImageGPT refuses bfloat16 on the CPU, where the interpreter would have to run it.
    model.decoder = StaticDecoder(config, PackedWeights.pack(config, state, dtype, torch.device("cpu")),
                                  backend="triton", use_cuda_graphs=False)
    return model


def exercise(model: ImageGPT, batches: tuple[int, ...], prompt_lengths: tuple[int, ...] = (), *,
             greedy: bool = True) -> None:
    """At each batch: two tokens sampled (top-k and top-p) from the SOS, two greedy ones, and a forward of each
    prompt length (a prefill)."""
    config = model.config
    for batch in batches:
        context = torch.full((batch, 1), config.sos_token_id)
        model.generate(context, max_new_tokens=2, do_sample=True, top_k=min(40, config.n_clusters), top_p=0.9)
        if greedy:
            model.generate(context, max_new_tokens=2)
        for length in prompt_lengths:
            model(torch.zeros(batch, length, dtype=torch.long))


def engine_launches(cases: list[Case]) -> list[Launch]:
    """Every launch of the engine on `cases` (generation sampled and greedy, prefills, whole images, cluster
    lookups)."""
    with recording() as launches:
        for case in cases:
            config = case.config
            with pdl_as(case.pdl):
                for dtype in case.dtypes:
                    model = recordable_model(config, dtype)
                    exercise(model, case.batches, case.prompt_lengths)
                    if case.whole_images:  # the largest dot tiles
                        model(torch.zeros(4, config.n_positions, dtype=torch.long))
                if case.clusters:
                    side = math.isqrt(config.n_positions)
                    pixels = torch.zeros(2, side, side, 3, dtype=torch.uint8)
                    centers = torch.zeros(config.n_clusters, 3)
                    clusters.quantize(pixels, centers)
                    clusters.quantize(pixels.float(), centers)
                    clusters.dequantize(torch.zeros(2, side * side, dtype=torch.long), centers)
    return launches


def distinct(launches: list[Launch]) -> dict:
    """The first launch of each distinct variant, by Launch.variant's key."""
    found: dict = {}
    for launch in launches:
        found.setdefault(launch.variant()[0], launch)
    return found
