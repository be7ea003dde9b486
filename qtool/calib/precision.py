"""Precision of the calibration pass's matrix products (`calibration.precision` in a plan).

* ``fp32``: IEEE float32 products (MKL/oneDNN sgemm), as a float model runs.
* ``bf16``: the GEMMs of the block's linear layers (`bf16_stream`) and of the Hessians XᵀX run in oneDNN's
  bf16 math mode (torch's ``mkldnn.matmul.fp32_precision``, `matmul_precision`): tensors stay float32 in
  and out, oneDNN rounds the GEMM *inputs* to bfloat16 and accumulates in float32 (AMX / AVX512-BF16).
  Attention (`BF16_ATTENTION`, a transformers attention function swapped in by `bf16_stream`) casts
  q, k, v to bfloat16 *tensors* and runs torch's CPU flash-attention kernel natively in bf16 (softmax and
  accumulation in float32 inside it), the output cast back to float32: its output is o_proj's input, which
  that GEMM rounds to bf16 anyway. (oneDNN's math mode on float32 tensors makes that kernel slower, not
  faster.) Norms, rotary and the residual stream stay float32. Measured on this project's 2-core Sapphire
  Rapids machines (`bench/precision.py`): linears 2.3-2.7x, Hessians 1.25-1.85x and attention ~2x faster; a
  linear's output keeps relative error ~2.3e-3 (against ~1e-1 for the int4 weights the stream then passes
  through), a Hessian ~1e-3 (against the 1e-2 damping GPTQ adds). (For the linears, casting to bf16 tensors
  gains nothing over the math mode once the casts are paid, and rounds the outputs too.)

Only the calibration stream runs this way: its forwards (every block is fed the previous quantized block's
outputs) and the Hessians XᵀX collected from it. The quantization math itself (GPTQ's Cholesky and column
updates, scale fits and refits), the self-check stream and `qtool eval` always run in float32/float64.
On a CPU without bf16 support everything stays IEEE float32, and the run says so (`effective`).
"""

from __future__ import annotations

from contextlib import contextmanager
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

PRECISIONS = ("fp32", "bf16")
DEFAULT = "bf16"


@lru_cache(maxsize=None)  # a property of the CPU: asked on every linear call of the stream
def bf16_supported() -> bool:
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def effective(precision: str) -> str:
    """What `precision` runs as on this machine (bf16 without CPU support falls back to fp32)."""
    return "bf16" if precision == "bf16" and bf16_supported() else "fp32"


@contextmanager
def matmul_precision(precision: str):
    """Run the body's float32 matmuls at `precision` (one of PRECISIONS); restores the previous setting."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    knob = torch.backends.mkldnn.matmul
    old = knob.fp32_precision
    knob.fp32_precision = "bf16" if effective(precision) == "bf16" else "ieee"
    try:
        yield
    finally:
        knob.fp32_precision = old


@contextmanager
def bf16_stream(module: nn.Module, precision: str):
    """While the body runs, every `nn.Linear` inside `module` runs its GEMM in bf16 math mode and its sdpa
    attention runs on bf16 tensors (module doc) when `precision` is effectively bf16; otherwise nothing
    changes. Hooks keep working (the module is called as usual; only its `forward` is shadowed), and the
    weights are read at each call (GPTQ rewrites them in place between stages). Restores the original
    forwards and attention implementation on exit."""
    if effective(precision) != "bf16":
        yield
        return
    linears = [m for m in module.modules() if type(m) is nn.Linear]
    configs = {id(c): c for m in module.modules()
               if getattr(c := getattr(m, "config", None), "_attn_implementation", None) == "sdpa"}
    _register_bf16_attention()
    for lin in linears:
        lin.forward = _bf16_forward(lin)
    for c in configs.values():
        c._attn_implementation = BF16_ATTENTION
    try:
        yield
    finally:
        for lin in linears:
            del lin.forward
        for c in configs.values():
            c._attn_implementation = "sdpa"


BF16_ATTENTION = "qtool_bf16_sdpa"


@lru_cache(maxsize=None)
def _register_bf16_attention() -> None:
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def attention(module, query, key, value, attention_mask, **kwargs):
        if attention_mask is not None and attention_mask.is_floating_point():
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        out, weights = sdpa_attention_forward(module, query.bfloat16(), key.bfloat16(), value.bfloat16(),
                                              attention_mask, **kwargs)
        return out.float(), weights

    AttentionInterface.register(BF16_ATTENTION, attention)


def _bf16_forward(lin: nn.Linear):
    def forward(x: torch.Tensor) -> torch.Tensor:
        with matmul_precision("bf16"):
            return F.linear(x, lin.weight, lin.bias)

    return forward
