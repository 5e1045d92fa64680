"""The engine at imagegpt-medium's and -large's widths on a GPU, against the float32 reference.

tests/test_engine.py holds the engine to the reference at imagegpt-small's shapes on a GPU and at small ones on the
CPU; test_linear.py and test_attention.py test each kernel at these widths on its own. This runs them together in
the engine: 1024 and 1536 wide, heads of 128 and 96, in both 16-bit dtypes (bfloat16 has no interpreter, so only a
GPU runs it), through the prefill's forward and the graphed decode steps at batch 8 (the GEMV linears, split-K
attention) and 64 (the tiled linears). Two layers each: every layer launches the same kernels, and the benchmark's
full preset times the whole depth.
"""

import pytest
import torch
from helpers import mean_kl, random_state_dict

from igpt_fast import ImageGPT, ImageGPTConfig, ReferenceImageGPT

SIZES = {"medium": ImageGPTConfig.medium(n_layer=2), "large": ImageGPTConfig.large(n_layer=2)}
DECODE_STEPS = 32
# test_engine.py's bounds for imagegpt-small. On these inputs the engine with its PyTorch stand-ins on a CPU (16-bit
# storage, float32 math) gives at most 1.0e-6 in float16 and 6.3e-5 in bfloat16 (large; medium 6.8e-7 and 4.4e-5):
# the bounds leave 100x and 30x for the kernels' other summation orders, and catch a real error (KL ~ 0.1).
KL_BOUNDS = {torch.float16: 1e-4, torch.bfloat16: 2e-3}


def engine_kls(config: ImageGPTConfig, dtype: torch.dtype, device: str) -> dict:
    """KL of the engine's next-token distributions against the float32 reference's: a prefill's forward over
    2 x 256 random tokens, then DECODE_STEPS sampled decode steps at batch 8 and at 64 (each step's logits against
    the reference's forward over the sampled sequence). On "cpu" outside pytest (no interpreter) the engine runs its
    PyTorch stand-ins: the numbers the bounds above cite."""
    weights = random_state_dict(config, seed=5)
    reference = ReferenceImageGPT.from_state_dict(config, weights).to(device)
    model = ImageGPT(config, weights, device=device, dtype=dtype)
    ids = torch.randint(0, config.n_clusters, (2, 256), generator=torch.Generator().manual_seed(6)).to(device)
    with torch.no_grad():
        kls = {"forward": mean_kl(reference(ids).logits, model(ids).logits)}
    for batch in (8, 64):
        out = model.generate(torch.full((batch, 1), config.sos_token_id, device=device),
                             max_new_tokens=DECODE_STEPS, do_sample=True, top_k=40, seed=7,
                             return_dict_in_generate=True, output_logits=True)
        with torch.no_grad():
            expected = reference(out.sequences[:, :-1]).logits[:, -DECODE_STEPS:]
        kls[f"decode b{batch}"] = mean_kl(expected, torch.stack(out.logits, dim=1))
    return kls


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("size", SIZES)
def test_gpu_medium_and_large_widths_give_the_reference_next_token_distributions(size, dtype):
    kls = engine_kls(SIZES[size], dtype, "cuda")
    print(f"imagegpt-{size} widths, {dtype}: mean KL(reference fp32 || engine) "
          + ", ".join(f"{name} {kl:.2e}" for name, kl in kls.items()))
    assert all(kl < KL_BOUNDS[dtype] for kl in kls.values()), kls
