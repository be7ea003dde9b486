"""W8A8 at run time: int8 weights times dynamically quantized int8 activations, as the real clients compute it.

Two activation schemes, each the one its artifact's real client runs (read from compressed-tensors 0.20 and
bitsandbytes 0.50 sources; the tests compare against both libraries):

``ct`` — compressed-tensors dynamic per-token symmetric int8 (``input_activations: {type: int, num_bits: 8,
symmetric: true, dynamic: true, strategy: token}``; ``compute_dynamic_scales_and_zp`` + ``calculate_qparams``
+ ``fake_quantize``), all in the input's dtype:

    absmax = max(|min(x_t, 0)|, max(x_t, 0))      per token t (one row of the input)
    s_t    = absmax / 127.5                        (= absmax / ((qmax - qmin) / 2) with [qmin, qmax] = [-128, 127])
    s_t    = eps(dtype) where s_t == 0
    q      = round(clamp(x / s_t, -128, 127))      (torch.round: half to even; clamp *before* rounding)

  so the largest positive value maps to 127 (127.5 clamps to 127) and the largest negative one to -128
  (-127.5 rounds half-to-even to -128). compressed-tensors reduces over every dimension but the first two:
  a [batch, seq, hidden] input (what transformers' Llama feeds a Linear) gets one scale per token; a 2-D
  input gets *one scale for the whole tensor* there. Here rows of the flattened input are always tokens
  (per-token for 2-D inputs too, as vLLM does).
  Weights: codes with one scale (and integer zero point) per (output channel, group), ``w = (q - z) * s``.

``bnb`` — bitsandbytes LLM.int8() (``MatMul8bitLt`` with the default/CPU backend ops, the path
``Linear8bitLt`` takes in eval mode; in training mode on CPU bitsandbytes runs ``MatMul8bitFp`` instead, a
float matmul with the dequantized weight and no activation quantization):

    A      = x.reshape(-1, in).to(float16)          (quantization always sees float16 values)
    out    = |A| >= threshold   (threshold > 0)       elementwise; outlier columns = columns with any outlier
    A[out] = 0                                        (only the outlier *elements*)
    r_t    = max |A_t|  (float32)                     per row, after zeroing
    q      = round(A * (127 / r_t)) as int8           (float32 math), then q[:, outlier columns] = 0 (rows > 1)
    y      = (q @ CB^T) * (r_t * SCB_o) * 6.200124e-05   in float32, + bias, cast to x's dtype
    y     += x[:, outlier columns] @ (CB[:, cols] * SCB * 7.874015718698502e-3).to(x.dtype)^T   (addmm)

  ``6.200124e-05`` is bitsandbytes' literal for 1/127² (= 6.2000124e-05): its int8 outputs are 1.8e-5
  (relative) larger than the exact product; it is kept here so results match bitsandbytes. The outlier
  columns use the *original* input (not the float16 copy, not zeroed) against the dequantized weight.

The integer product ``q_x @ q_w^T`` is exact: `int_matmul` uses ``torch._int_mm`` (int32 accumulation,
works on CPU in torch 2.13 for any shape) when it runs, else an exact emulation in float32 BLAS over slices
of at most 1024 input columns (every partial sum is an integer of magnitude <= 1024 * 128 * 128 = 2^24, so
float32 represents it exactly whatever the summation order), summed in int32. Both are tested against a
float64 reference. compressed-tensors itself runs a float ``F.linear`` on the fake-quantized values, so
against it one layer's outputs agree to float rounding (~1e-7 relative in float32) with identical activation
codes. Through a whole model that rounding difference moves some later activations across a rounding
boundary (one code step), so logits differ by more than float noise (~1e-2 relative on the tests' random
tiny Llama); ``matmul="float"`` (`ct_linear_float`) runs compressed-tensors' own arithmetic instead and
reproduces transformers + compressed-tensors bit for bit on the same machine. The default stays the integer
product: it is what int8 GEMM kernels (vLLM's W8A8) compute. bitsandbytes' path *is* the integer product
(``torch._int_mm`` on AVX-512 CPUs; elsewhere its default op multiplies in float32, exact while partial
sums stay below 2^24, i.e. always for up to 1024 input columns), so ``bnb`` matches bitsandbytes bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

SCHEMES = ("ct", "bnb")
BNB_MM_DEQUANT = 6.200124e-05  # bitsandbytes int8_mm_dequant's literal (1/127^2 would be 6.2000124e-05)
BNB_DEQUANT = 7.874015718698502e-3  # bitsandbytes int8_vectorwise_dequant's 1/127
EXACT_CHUNK = 1024  # float32 holds every partial sum of <= 1024 int8 x int8 products exactly (<= 2^24)


# ---- integer matmul ----------------------------------------------------------------------------------------
def int_matmul_emulated(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` of int8 [m, k] and int8 [n, k] as int32 [m, n], through float32 BLAS in k-slices.

    Off the CPU it multiplies in float64 instead (exact for any k < 2^39), so a TF32 setting cannot round."""
    m, k = a.shape
    if a.device.type != "cpu":
        return (a.double() @ b.double().T).to(torch.int32)
    out = torch.zeros(m, b.shape[0], dtype=torch.int32, device=a.device)
    for i in range(0, k, EXACT_CHUNK):
        part = a[:, i:i + EXACT_CHUNK].float() @ b[:, i:i + EXACT_CHUNK].float().T
        out += part.to(torch.int32)
    return out


def int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact ``a @ b.T`` of int8 [m, k] and int8 [n, k] as int32 [m, n] (int32 accumulation: k < 131072)."""
    if a.dtype != torch.int8 or b.dtype != torch.int8 or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"int_matmul: expected int8 [m, k] and int8 [n, k], got {a.dtype} {tuple(a.shape)} "
                         f"and {b.dtype} {tuple(b.shape)}")
    if a.shape[0] == 0 or b.shape[0] == 0 or a.shape[1] == 0:
        return torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32, device=a.device)
    try:
        return torch._int_mm(a, b.T)
    except (RuntimeError, NotImplementedError):  # e.g. CUDA's shape rules (m > 16, k and n multiples of 8)
        return int_matmul_emulated(a, b)


# ---- compressed-tensors: dynamic per-token symmetric int8 --------------------------------------------------
def ct_token_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 [..., k], scale [..., 1] in x.dtype): compressed-tensors' dynamic per-token int8, per row."""
    lo = x.amin(dim=-1, keepdim=True).clamp(max=0)
    hi = x.amax(dim=-1, keepdim=True).clamp(min=0)
    scale = torch.maximum(lo.abs(), hi) / 127.5
    scale = torch.where(scale == 0, torch.full_like(scale, torch.finfo(x.dtype).eps), scale)
    codes = torch.round(torch.clamp(x / scale, -128, 127))
    return codes.to(torch.int8), scale


def ct_fake_quantize(x: torch.Tensor) -> torch.Tensor:
    """The float values compressed-tensors feeds its Linear: ``codes * scale`` in x.dtype."""
    codes, scale = ct_token_quantize(x)
    return codes.to(scale.dtype) * scale


def ct_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None) -> torch.Tensor:
    """compressed-tensors' weight dequantization ``(codes - zero) * scale`` in the scale's dtype."""
    width = codes.shape[1] // scale.shape[1]
    d = codes.to(scale.dtype)
    if zero is not None:
        d = d - zero.to(scale.dtype).repeat_interleave(width, dim=1)
    return d * scale.repeat_interleave(width, dim=1)


def ct_linear_float(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """compressed-tensors' own forward: ``F.linear(fake_quant(x), dequantized W in x.dtype, bias)``."""
    w = ct_dequantize(codes, scale, zero).to(x.dtype)
    return torch.nn.functional.linear(ct_fake_quantize(x), w, None if bias is None else bias.to(x.dtype))


def ct_linear(x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
              bias: torch.Tensor | None = None) -> torch.Tensor:
    """``fake_quant(x) @ ((codes - zero) * scale).T + bias``, with the integer products computed exactly.

    codes int8 [out, in]; scale [out, n_groups] (float); zero int8 [out, n_groups] or None (symmetric).
    The epilogue runs in float32: ``sum_g (acc_g - z_g * rowsum_g(q_x)) * s_w[g]`` then ``* s_x``.
    """
    shape = x.shape
    xq, sx = ct_token_quantize(x.reshape(-1, shape[-1]))
    n_groups = scale.shape[1]
    width = shape[-1] // n_groups
    out = None
    for g in range(n_groups):
        cols = slice(g * width, (g + 1) * width)
        acc = int_matmul(xq[:, cols].contiguous() if n_groups > 1 else xq,
                         codes[:, cols].contiguous() if n_groups > 1 else codes)
        if zero is not None:
            acc = acc - xq[:, cols].sum(dim=1, keepdim=True, dtype=torch.int32) * zero[:, g].to(torch.int32)
        part = acc.float() * scale[:, g].float()
        out = part if out is None else out + part
    out = out * sx.float()
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype).reshape(*shape[:-1], codes.shape[0])


# ---- bitsandbytes LLM.int8() ------------------------------------------------------------------------------
def bnb_row_quantize(a: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes int8 [m, k], row absmax float32 [m], outlier columns int64) of bitsandbytes'
    ``int8_vectorwise_quant`` on ``a.to(float16)`` (a: [m, k] in any float dtype; not modified)."""
    h = a.to(torch.float16, copy=True)
    cols = torch.empty(0, dtype=torch.int64, device=a.device)
    if threshold > 0:
        outliers = h.abs() >= threshold
        if outliers.any():
            cols = torch.argwhere(outliers.any(dim=0)).view(-1)
            h[outliers] = 0
    stats = h.abs().amax(dim=1).float()
    safe = torch.where(stats == 0, torch.ones_like(stats), stats)  # an all-zero row: codes 0 (bnb: 0 * inf)
    codes = torch.round(h * (127.0 / safe.unsqueeze(-1))).to(torch.int8)
    if a.shape[0] > 1 and cols.numel():
        codes[:, cols] = 0
    return codes, stats, cols


def bnb_dequantize(cb: torch.Tensor, scb: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' ``int8_vectorwise_dequant``: ``CB * SCB * (1/127)`` as float32."""
    return cb * scb.view(-1, 1) * BNB_DEQUANT


def bnb_linear(x: torch.Tensor, cb: torch.Tensor, scb: torch.Tensor, bias: torch.Tensor | None = None,
               threshold: float = 0.0) -> torch.Tensor:
    """bitsandbytes ``MatMul8bitLt.forward`` (inference) with ``Linear8bitLt``'s weights CB int8 [out, in],
    SCB float32 [out]; see the module docstring."""
    shape = x.shape
    a = x.reshape(-1, shape[-1])
    ca, sca, cols = bnb_row_quantize(a, threshold)
    acc = int_matmul(ca, cb)
    out = acc * (sca.view(-1, 1) * scb.view(1, -1)) * BNB_MM_DEQUANT
    if bias is not None:
        out += bias.to(x.dtype)
    out = out.to(x.dtype)
    if cols.numel():
        sub_b = bnb_dequantize(cb[:, cols].contiguous(), scb).to(x.dtype).t()
        out = out.addmm(a[:, cols].contiguous(), sub_b)
    return out.reshape(*shape[:-1], cb.shape[0])


# ---- the module the loader installs -------------------------------------------------------------------------
class Int8ActLinear(nn.Module):
    """A Linear whose forward quantizes its input to int8 at run time and multiplies int8 x int8 exactly.

    scheme ``ct``: `codes` int8 [out, in], `scale` [out, n_groups], optional int8 `zero` [out, n_groups].
    scheme ``bnb``: `codes` = CB int8 [out, in], `scale` = SCB float32 [out]; `threshold` > 0 keeps outlier
    input columns in float (LLM.int8()).
    `matmul` (ct only; an attribute, may be changed after loading): ``"int"`` exact integer products
    (`ct_linear`), ``"float"`` compressed-tensors' fake-quant + float matmul (`ct_linear_float`).
    Tensors are non-persistent buffers: they never appear in a state dict, so a float architecture loads the
    rest of a checkpoint around them.
    """

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, *, scheme: str = "ct", threshold: float = 0.0,
                 matmul: str = "int"):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"Int8ActLinear: scheme must be one of {SCHEMES}, got {scheme!r}")
        if matmul not in ("int", "float") or (scheme == "bnb" and matmul != "int"):
            raise ValueError(f"Int8ActLinear: matmul must be 'int' or (ct only) 'float', got {matmul!r}")
        if codes.dtype != torch.int8 or codes.ndim != 2:
            raise ValueError(f"Int8ActLinear: codes must be 2-D int8, got {codes.dtype} {tuple(codes.shape)}")
        out, inp = codes.shape
        if scheme == "bnb":
            if scale.dtype != torch.float32 or tuple(scale.shape) != (out,):
                raise ValueError(f"Int8ActLinear(bnb): SCB must be float32 [{out}], got {scale.dtype} "
                                 f"{tuple(scale.shape)}")
            if zero is not None:
                raise ValueError("Int8ActLinear(bnb): LLM.int8() weights have no zero point")
        else:
            if scale.ndim != 2 or scale.shape[0] != out or scale.shape[1] < 1 or inp % scale.shape[1]:
                raise ValueError(f"Int8ActLinear(ct): scale must be [{out}, n_groups] with n_groups dividing {inp}, "
                                 f"got {tuple(scale.shape)}")
            if zero is not None and (zero.dtype != torch.int8 or zero.shape != scale.shape):
                raise ValueError(f"Int8ActLinear(ct): zero must be int8 {tuple(scale.shape)}, got {zero.dtype} "
                                 f"{tuple(zero.shape)}")
            if threshold:
                raise ValueError("Int8ActLinear(ct): compressed-tensors has no outlier threshold")
        if not threshold >= 0:
            raise ValueError(f"Int8ActLinear: threshold must be >= 0, got {threshold}")
        if bias is not None and tuple(bias.shape) != (out,):
            raise ValueError(f"Int8ActLinear: bias must be [{out}], got {tuple(bias.shape)}")
        self.in_features, self.out_features = inp, out
        self.scheme, self.threshold, self.matmul = scheme, float(threshold), matmul
        self.register_buffer("codes", codes.contiguous(), persistent=False)
        self.register_buffer("scale", scale.contiguous(), persistent=False)
        self.register_buffer("zero", None if zero is None else zero.contiguous(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme == "bnb":
            return bnb_linear(x, self.codes, self.scale, self.bias, self.threshold)
        if self.matmul == "float":
            return ct_linear_float(x, self.codes, self.scale, self.zero, self.bias)
        return ct_linear(x, self.codes, self.scale, self.zero, self.bias)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight the client's float path sees (compressed-tensors' dequantize; bitsandbytes'
        ``int8_vectorwise_dequant``): for comparisons and weight-only controls."""
        if self.scheme == "bnb":
            return bnb_dequantize(self.codes, self.scale)
        return ct_dequantize(self.codes, self.scale, self.zero).float()

    def extra_repr(self) -> str:
        extra = f", threshold={self.threshold}" if self.threshold else ""
        extra += ", matmul=float" if self.matmul == "float" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}{extra}"
