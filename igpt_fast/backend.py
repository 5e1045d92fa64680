"""Which implementation of an op runs: the Triton kernel or its PyTorch stand-in.

Triton kernels run on CUDA tensors, and on CPU tensors when TRITON_INTERPRET=1 (the interpreter the tests use
so CI exercises the kernels). Everywhere else (a plain CPU install) PyTorch ops computing the same math stand in.
"""

from __future__ import annotations

import os

import torch


def triton_interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda" or triton_interpreter_on()
