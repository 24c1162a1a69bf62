"""oneDNN's matmul, called directly, for products of many rows (prefill, encoder batches).

``nn.Linear`` on a CPU runs fp32 through MKL's sgemm. MKL picks its code path by CPU vendor, and on AMD
CPUs it takes the AVX2 one even where AVX-512 is there: on the 2-core AMD Zen 5 VM (avx512f/bf16/vnni)
it ran SmolLM2's and all-MiniLM-L6-v2's fp32 products of 512-4864 rows at 186-221 GFLOP/s, where oneDNN,
which picks by instruction set, ran the same products at 490-509 (docs/BENCHMARKS.md, session 10).
``torch.ops.mkldnn._linear_pointwise`` is the op PyTorch's own compiler emits for a frozen CPU linear:
it takes a plain [out, in] weight (reordered inside, per call: 2-3 % slower than a pre-packed copy at
500 rows, the price of keeping one copy of the weights) and fuses an activation into the epilogue.
Whether it is faster than the module's forward is measured per shape (``kernels/linear.py``): MKL on an
Intel CPU may well win.
"""

from __future__ import annotations

import functools

import torch

# activations (transformers' hidden_act names) → oneDNN post-op and algorithm: BERT's "gelu" is the exact
# erf form, oneDNN's "none" algorithm; the tanh approximations are its "tanh"
EPILOGUES = {"gelu": ("gelu", "none"), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
             "relu": ("relu", "")}


@functools.cache
def available() -> bool:
    """Whether this PyTorch build has the op and it computes a linear correctly (checked once)."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=g) for s in ((5, 24), (7, 24), (7,)))
    try:
        with torch.inference_mode():
            for dtype in (torch.float32, torch.bfloat16):
                y = linear(x.to(dtype), w.to(dtype), b.to(dtype)).double()
                ref = torch.nn.functional.linear(x.to(dtype).double(), w.to(dtype).double(), b.to(dtype).double())
                if not torch.allclose(y, ref, atol=0.05, rtol=0.02):
                    return False
    except RuntimeError:  # a build without oneDNN's CPU kernels
        return False
    return True


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """x · weightᵀ + bias (then ``activation``, one of ``EPILOGUES``) for x of any leading shape; x, weight
    and bias of one dtype (fp32 or bf16). No autograd."""
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    attr, algorithm = EPILOGUES[activation] if activation else ("none", "")
    y = torch.ops.mkldnn._linear_pointwise(rows, weight, bias, attr, [], algorithm)
    return y.reshape(*x.shape[:-1], weight.shape[0])
