"""The one table of numerical tolerances every test uses: (atol, rtol) per dtype and per kind of check.

"exact": the float32 exact mode against a float64 or transformers float32 oracle.
"kernel": one kernel against a float64 composition of the same ops.
"model": a whole forward (many layers, errors compound) against the float64/float32 reference.
"""

import torch

TOLERANCES = {
    "exact": {torch.float32: (1e-5, 1e-5)},
    "kernel": {
        torch.float32: (1e-4, 1e-4),
        torch.float16: (2e-2, 2e-2),
        torch.bfloat16: (6e-2, 6e-2),
    },
    "model": {
        torch.float32: (2e-4, 2e-4),
        torch.float16: (1e-1, 5e-2),
        torch.bfloat16: (3e-1, 1e-1),
    },
}


def tol(kind: str, dtype: torch.dtype) -> dict:
    """Keyword arguments for torch.testing.assert_close."""
    atol, rtol = TOLERANCES[kind][dtype]
    return {"atol": atol, "rtol": rtol}
