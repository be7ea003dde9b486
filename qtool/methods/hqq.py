"""HQQ: Half-Quadratic Quantization (Badri & Shaji, 2023), calibration-free.

Per (row, group) the weight is ``W ≈ s·(Wq − z)`` with ``Wq = clamp(round(W/s + z), qmin, qmax)``. The scale
``s`` stays at the codec's min-max fit; the zero point ``z`` is a *float* chosen to minimise the sparsity-
promoting loss ``Σ|W − s·(Wq − z)|^p`` (p < 1: a few large errors are cheaper than many small ones). The
half-quadratic split adds an auxiliary error ``We`` and alternates two closed-form steps::

    Wq, Wr = clamp(round(W/s + z)), s·(Wq − z)                          (the current quantization)
    We     = sign(D)·max(|D| − |D|^(p−1)/β, 0),  D = W − Wr            (generalised soft threshold, lp prox)
    z      = mean over the group of (Wq − (W − We)/s)                  (least squares in z)
    β      = κ·β

Reference: hqq 0.2.8, ``Quantizer.quantize`` (axis=1: groups along the input dim, as here) with its default
solver ``optimize_weights_proximal_legacy``. This is an independent torch version written against the
codec's signed codes: hqq's unsigned codes ``u`` and zero ``z_u`` are ``q = u + qmin``, ``z = z_u + qmin``
here (an integer shift, so rounding and ``(q − z)·s`` are unchanged). What it reproduces, on purpose:

* the initial zero is the min-max one, rounded when hqq's default config rounds it (``round_zero=None``:
  ``hqq_base_quant_config`` sets ``round_zero`` for 4 bits only);
* early stop is global: the error is ``mean |W − Wr|`` over the whole tensor, and the first iteration that
  does not lower it ends the loop, keeping the zero that iteration had already updated (hqq's legacy loop);
* hqq's legacy solver never applies ``kappa`` (its opt_params carry 1.01, used only by its v2 solver), so
  the default here is ``kappa=1.0``; ``kappa=1.01`` gives the paper's growing β.

Deliberate differences: the scale is qtool's (``(max − min)/(2^b − 1)`` rounded to the codec's scale dtype,
1 for a constant group) instead of hqq's inverse scale with fp16 guards (range ≤ 1e-4 → 1, inverse ≤ 2e4);
the final zero is rounded to the scale dtype and the codes are recomputed by the codec from the stored
parameters, so ``dequantize`` equals what a loader reconstructs. On random weights the result agrees with
hqq's to ~1e-7 relative L2; ``w/s + z`` here vs hqq's ``w·(1/s) + z`` can flip a code at a rounding tie, which
sends that group's zero along a slightly different path (rarely up to ~2e-2 at 2 bits); see
``tests/methods/test_hqq.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.formats.affine import AffineCodec
from qtool.formats.base import QTensor

NEEDS: tuple[str, ...] = ()  # calibration-free
SEQUENTIAL = False

_SLICE_ELEMS = 1 << 22  # rows are processed in slices of about this many weights to bound temporaries


@dataclass(frozen=True)
class HQQParams:
    lp_norm: float = 0.7  # p of the sparsity-promoting loss, 0 < p <= 1
    beta: float = 10.0  # initial half-quadratic penalty
    kappa: float = 1.0  # beta growth per iteration (hqq's default legacy solver keeps beta fixed)
    iters: int = 20  # at most this many solver iterations
    early_stop: bool = True  # stop at the first iteration whose mean |W - Wr| does not improve
    round_zero: bool | None = None  # round the initial zero; None = hqq's default (only for 4 bits)

    def __post_init__(self):
        if not 0 < self.lp_norm <= 1:
            raise ValueError(f"hqq: lp_norm must be in (0, 1], got {self.lp_norm!r}")
        if not self.beta > 0 or not self.kappa >= 1:
            raise ValueError(f"hqq: need beta > 0 and kappa >= 1, got beta={self.beta!r}, kappa={self.kappa!r}")
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise ValueError(f"hqq: iters must be a positive integer, got {self.iters!r}")


def params_of(spec) -> HQQParams:
    """HQQ parameters of a resolved plan rule (the plan exposes no HQQ knobs yet: hqq's defaults)."""
    return HQQParams()


def shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Proximal step of ``|x|^p / beta``: ``sign(x)·max(|x| − |x|^(p−1)/beta, 0)`` (soft threshold for p=1).

    Computed as ``x·max(1 − |x|^(p−2)/beta, 0)`` (equal for x ≠ 0; |0|^(p−2) = inf gives 0, never NaN).
    """
    return x.abs().pow_(p - 2).mul_(-1.0 / beta).add_(1.0).clamp_min_(0.0).mul_(x)


def solve_zero(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
               params: HQQParams = HQQParams()) -> tuple[torch.Tensor, int]:
    """Optimise the float zero points of grouped weights `wg` [rows, groups, width] (float32).

    `scale` and `zero` are [rows, groups, 1]; returns (zero [rows, groups, 1] float32, iterations run).
    The zero update ``mean(Wq − (W − We)/s)`` is taken as ``mean(Wq) − (mean(W) − mean(We))/s``.
    """
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    rows = wg.shape[0]
    step = max(1, _SLICE_ELEMS // max(1, wg[0].numel()))
    slices = [slice(i, min(i + step, rows)) for i in range(0, rows, step)]
    mean_w = wg.mean(-1, keepdim=True)
    beta, best, zero = params.beta, float("inf"), zero.clone()
    it = 0
    for it in range(1, params.iters + 1):
        err, new = 0.0, torch.empty_like(zero)
        for sl in slices:
            w, s, z = wg[sl], scale[sl], zero[sl]
            q = torch.div(w, s).add_(z).round_().clamp_(qmin, qmax)
            mean_q = q.mean(-1, keepdim=True)
            d = q.sub_(z).mul_(s).neg_().add_(w)  # W - Wr, in q's buffer
            err += float(d.abs().sum())
            mean_e = shrink_lp(d, beta, params.lp_norm).mean(-1, keepdim=True)
            new[sl] = mean_q - (mean_w[sl] - mean_e) / s
        zero = new  # hqq updates the zero before looking at the error of the previous one
        beta *= params.kappa
        if params.early_stop:
            if err >= best:
                break
            best = err
    return zero, it


def quantize(w: torch.Tensor, codec: AffineCodec, params: HQQParams = HQQParams()) -> QTensor:
    """HQQ-quantize `w` (out, in) through a float-zero `AffineCodec` (any bits, group size, scale dtype)."""
    if not isinstance(codec, AffineCodec) or not codec.float_zero:
        name = getattr(codec, "name", type(codec).__name__)
        raise ValueError(f"hqq optimises a float zero point: it needs an affine codec with float_zero=True "
                         f"(e.g. int4_g64_asym_fz), got {name}")
    w = w.float()
    fitted = codec.fit(w)  # validates shape/finiteness; scale in scale_dtype, min-max float zero
    out, inp = w.shape
    wg = w.reshape(out, codec.n_groups(inp), codec.group_width(inp))
    scale = fitted["scale"].float().unsqueeze(-1)
    zero = fitted["zero"].float().unsqueeze(-1)
    round_zero = codec.bits == 4 if params.round_zero is None else params.round_zero
    if round_zero:
        zero = torch.round(zero)
    zero, _ = solve_zero(wg, scale, zero, codec.bits, params)
    zero = zero.squeeze(-1).to(codec.scale_dtype)
    if not torch.isfinite(zero).all():
        raise ValueError(f"hqq: zero point overflows {codec.scale_dtype}")
    out_params = {"scale": fitted["scale"], "zero": zero}
    return QTensor(codec=codec, shape=(out, inp), codes=codec.quantize(w, out_params), params=out_params)
