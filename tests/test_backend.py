"""Where the Triton kernels run, and when they are launched with programmatic dependent launch."""

import pytest
import torch

from igpt_fast import backend


@pytest.fixture
def cuda_capability(monkeypatch):
    """Pretend a CUDA device of a given compute capability, without one."""
    def set_major(major):
        monkeypatch.setattr(backend, "_capability_major", lambda index: major)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(backend.PDL_ENV, raising=False)
    return set_major


def test_pdl_from_sm90_and_never_off_cuda(cuda_capability, monkeypatch):
    cuda_capability(9)
    assert backend.use_pdl(torch.device("cuda", 0))
    assert not backend.use_pdl(torch.device("cpu"))
    cuda_capability(8)
    assert not backend.use_pdl(torch.device("cuda", 0))


def test_pdl_can_be_switched_off(cuda_capability, monkeypatch):
    cuda_capability(9)
    monkeypatch.setenv(backend.PDL_ENV, "0")
    assert not backend.use_pdl(torch.device("cuda", 0))


def test_no_pdl_under_the_interpreter(cuda_capability, monkeypatch):
    cuda_capability(9)
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the interpreter has no griddepcontrol
    assert not backend.use_pdl(torch.device("cuda", 0))
    assert backend.use_triton("cpu")
