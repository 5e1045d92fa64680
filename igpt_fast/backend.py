"""Which implementation of an op runs (the Triton kernel or its PyTorch stand-in), and how kernels are launched.

Triton kernels run on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 (the interpreter the tests use
so CI exercises the kernels). Everywhere else (a plain CPU install) PyTorch ops computing the same math stand in.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

PDL_ENV = "IGPT_FAST_PDL"  # "0" turns programmatic dependent launch off (to measure it, or to rule it out)
# Floating-point contraction (a * b + c as one FMA) in the kernels, pinned instead of left to Triton's default, which
# triton 3.9 warns turns off in 3.10: numerics and speed stay what was tested (with 3.6 and 3.9, where it is on),
# whatever the Triton version. The cluster kernels pin it off, to round exactly as numpy does.
FP_FUSION = True


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" or triton_interpreter_on()


@functools.cache
def _capability_major(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


def capability_major(device: torch.device) -> int:
    """The CUDA device's compute capability major version (8: Ampere, 9: Hopper)."""
    return _capability_major(device.index if device.index is not None else torch.cuda.current_device())


def use_pdl(device: torch.device) -> bool:
    """Launch the decode step's kernels with programmatic dependent launch (Hopper, sm_90, and later).

    A decode step is over a hundred small kernels, and at small batch the gaps between them cost more than their bytes
    (../shared/docs/performance.md). With PDL a kernel's programs are scheduled while its predecessor still runs;
    each waits (griddepcontrol.wait) for the predecessor's writes before reading any activation, after fetching
    the first block of its weights, which no kernel writes. Read when a kernel is launched: a captured CUDA graph
    keeps the setting it was captured with.
    """
    if device.type != "cuda" or triton_interpreter_on() or os.environ.get(PDL_ENV, "1") == "0":
        return False
    return capability_major(device) >= 9


def on_device(device: torch.device):
    """A context in which `device` is the current CUDA device (nothing to do elsewhere). Triton launches on the current
    device's current stream, not on the device of its tensors, and a CUDA graph captures on the current device: a model
    on cuda:1 must make cuda:1 current around its launches and captures."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
