"""AWQ: activation-aware weight quantization (Lin et al., 2023), searched on the CPU in closed form.

Two steps, kept apart as in llm-awq (search and apply are separate; the search result is a reusable
artifact keyed by module name):

1. **Scale search** (a transform). For a smoothing pair ``prev -> linears`` (an RMSNorm or a linear that
   feeds the linears directly), per-input-channel scales ``s`` move quantization difficulty from salient
   input channels (large mean |x|) into the preceding op: ``W' = W·diag(s)``, ``prev' = prev / s``; in
   float the block computes exactly the same function. Candidates are ``s = mean|x|^α / mean|ŵ|^(1-α)``
   (ŵ = weights normalised per group) for α on a grid, normalised to a geometric mean range of 1, plus
   the identity; the loss of a candidate is the output error of the linears it scales,
   ``Σ_l tr(D_l H D_lᵀ)`` with ``D_l = W_l − Q_l(W_l·diag s)·diag(s)⁻¹`` and ``H = XᵀX/N`` of their input:
   exactly ``E‖X W_lᵀ − (X/s) Q_l(W_l s)ᵀ‖²``, evaluated with one matmul per candidate instead of a forward
   pass over the calibration set (why this runs in seconds per block on a CPU). ``Q_l`` is each linear's
   own codec, so the search optimises for the grid the layer is written in.
2. **Clip search** (the weight step of ``method: awq``). Per (row, group), the range is shrunk by factors
   ``1.0 … clip_min`` and the factor with the smallest output error ``d_g H_gg d_gᵀ`` is kept (H_gg: the
   group's diagonal block of H, so correlations between the group's input channels count).

Pure functions over tensors; folding the scales into a model is the engine's job (`engine/transforms.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qtool.formats.base import QTensor, evenly_spaced_rows

NEEDS: tuple[str, ...] = ("hessian",)  # the clip search weighs errors by the inputs' XᵀX
SEQUENTIAL = False  # statistics of the float block (collected once per block) are enough


@dataclass(frozen=True)
class AWQParams:
    grid: int = 20  # α = 0, 1/grid, ..., (grid-1)/grid
    duo_scaling: bool = True  # divide by mean |ŵ|^(1-α) as well (AutoAWQ's default)
    clip: bool = True  # weight step: search a per-group clip factor
    clip_grid: int = 20
    clip_min: float = 0.5  # smallest range factor tried
    # GGUF block types fit each block by a search ~50x costlier per element than an int grid's min/max: the scale
    # search scores them on this many evenly spaced rows of each linear (rows are encoded independently, so a
    # sample estimates the whole linear's error); int grids use every row
    block_search_rows: int = 256


@dataclass(frozen=True)
class ScaleResult:
    """The search result of one smoothing pair: reusable, keyed by the pair's `prev` module name."""

    scales: torch.Tensor  # (in,) float32; identity = ones
    alpha: float | None  # the grid point chosen; None = identity won
    loss_identity: float  # output error without scaling
    loss: float  # output error with the chosen scales

    @property
    def gain(self) -> float:
        return self.loss_identity / max(self.loss, 1e-30)


def params_of(spec) -> AWQParams:
    return AWQParams()


def output_error(d: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """tr(D H Dᵀ): the summed squared output error of weight error `d` (out, in) on inputs with XᵀX/N = `h`."""
    return ((d @ h) * d).sum()


def weight_magnitude(weights: list[torch.Tensor], group_width: int) -> torch.Tensor:
    """Mean over output rows of |w| normalised by its group's max |w|: (in,) — AWQ's per-channel weight size."""
    w = torch.cat([x.float() for x in weights])
    out, n = w.shape
    g = w.abs().reshape(out, n // group_width, group_width)
    g = g / g.amax(dim=-1, keepdim=True).clamp_min(1e-12)
    return g.reshape(out, n).mean(dim=0)


def candidate_scales(x_abs_mean: torch.Tensor, w_mag: torch.Tensor, alpha: float, duo: bool) -> torch.Tensor:
    s = x_abs_mean.float().clamp_min(1e-8).pow(alpha)
    if duo:
        s = s / w_mag.float().clamp_min(1e-8).pow(1 - alpha)
    s = s.clamp_min(1e-4)
    s = s / (s.max() * s.min()).sqrt()
    return s


def search_scale(weights: list[torch.Tensor], codecs: list, h: torch.Tensor, x_abs_mean: torch.Tensor,
                 params: AWQParams = AWQParams()) -> ScaleResult:
    """Best per-input-channel scales for the linears `weights` (each (out_l, in)) sharing one input.

    `codecs[l]` quantizes `weights[l]`; `h` (in, in) = XᵀX/N and `x_abs_mean` (in,) = mean |x| of the input.
    """
    h = h.float()
    ws = [w.float() for w in weights]
    gw = min(c.group_width(ws[0].shape[1]) for c in codecs)
    w_mag = weight_magnitude(ws, gw)
    ws = [evenly_spaced_rows(w, params.block_search_rows) if c.grid_kind == "block" else w for w, c in zip(ws, codecs)]

    def loss(s: torch.Tensor) -> float:
        total = 0.0
        for w, c in zip(ws, codecs):  # the scaled linear's inputs are x / s: its importance is diag(H) / s²
            wq = c.encode(w * s, _importance(c, h, s)).dequantize() / s
            total += output_error(w - wq, h).item()
        return total

    ident = torch.ones(ws[0].shape[1])
    best_loss = loss_identity = loss(ident)
    best, best_alpha = ident, None
    for k in range(params.grid):
        alpha = k / params.grid
        s = candidate_scales(x_abs_mean, w_mag, alpha, params.duo_scaling)
        val = loss(s)
        if val < best_loss:
            best_loss, best, best_alpha = val, s, alpha
    return ScaleResult(best, best_alpha, loss_identity, best_loss)


def _importance(codec, h: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor | None:
    """What `codec.fit` weighs its search by: diag(H) of its (scaled) inputs for GGUF block types, whose
    searches take llama.cpp's imatrix; None for the others (their data-free fits, as shipped)."""
    if codec.grid_kind != "block":
        return None
    d = torch.diagonal(h).float().clamp_min(0)
    return d if s is None else d / s.square()


def _group_blocks(h: torch.Tensor, gw: int) -> torch.Tensor:
    """The diagonal (gw x gw) blocks of `h`: (n_groups, gw, gw)."""
    n = h.shape[0]
    g = n // gw
    return h.reshape(g, gw, g, gw).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def search_clip(w: torch.Tensor, codec, h: torch.Tensor, params: AWQParams = AWQParams()) -> dict[str, torch.Tensor]:
    """Per-(row, group) range factors minimising the output error; returns the codec's params for `w`.

    Needs an affine codec (`params_from_range`); factor 1.0 (the plain fit) is tried first and kept unless a
    smaller factor is strictly better, so the result is never worse than plain rounding under this loss.
    """
    w = w.float()
    out, n = w.shape
    gw = codec.group_width(n)
    hb = _group_blocks(h.float(), gw)
    wg = w.reshape(out, n // gw, gw)
    lo, hi = wg.amin(-1).clamp(max=0.0), wg.amax(-1).clamp(min=0.0)
    best_err = best = None
    steps = max(params.clip_grid, 1)
    for k in range(steps):
        f = 1.0 - (1.0 - params.clip_min) * k / max(steps - 1, 1)
        scale, zero = codec.params_from_range(lo * f, hi * f)
        p = {"scale": scale, "zero": zero}
        d = wg - codec.dequantize(QTensor(codec, (out, n), codec.quantize(w, p), p)).reshape(out, n // gw, gw)
        err = torch.einsum("ogi,gij,ogj->og", d, hb, d)
        if best is None:
            best_err, best = err, p
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = {k2: torch.where(better, p[k2], best[k2]) for k2 in p}
    return best


def quantize(w: torch.Tensor, codec, hessian: torch.Tensor, params: AWQParams = AWQParams()) -> tuple[QTensor, "AWQReport"]:
    """AWQ's weight step on an (already scaled) weight: clip search under the output error, then rounding."""
    w = w.float()
    if params.clip and codec.grid_kind == "affine":
        p = search_clip(w, codec, hessian, params)
        qt = QTensor(codec, (int(w.shape[0]), int(w.shape[1])), codec.quantize(w, p), p)
    else:  # GGUF block types search their own ranges, weighted by the inputs' importance (formats/base.Codec)
        qt = codec.encode(w, _importance(codec, hessian))
    return qt, AWQReport()


@dataclass(frozen=True)
class AWQReport:
    note: str = ""
