"""Transforms: float rewrites of one decoder block that keep its function and make its linears easier to
quantize. AWQ and SmoothQuant scale the input channels of the linears of a smoothing pair and divide the op
before them (an RMSNorm's weight, or the rows of a linear) by the same scales.

The scale choices are `methods/awq.py` and `methods/smoothquant.py` (pure); this file picks the pairs
from the architecture table and the plan,
collects the statistics the search needs on the float block, and folds the result into the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from qtool.io.arch import Arch


@dataclass
class TransformReport:
    kind: str  # "awq" | "smoothquant"
    prev: str  # module the scales were folded into (full name)
    linears: list[str]  # modules whose input channels were scaled (full names)
    alpha: float | None  # grid point chosen; None = identity kept
    gain: float  # output error without / with the scales (>= 1)
    note: str = ""


def smoothing_pairs(arch: Arch, prefix: str, specs: dict, block: nn.Module, kind: str) -> tuple[list, list[str]]:
    """The smoothing pairs of this block whose linears all carry the `kind` transform, and notes on pairs
    that were skipped (partly covered by the plan, or shapes that do not line up, e.g. v -> o under GQA)."""
    pairs, notes = [], []
    for prev, lins in arch.smooth_pairs:
        flagged = [lin for lin in lins if prefix + lin in specs and kind in specs[prefix + lin].rule.transforms]
        if not flagged:
            continue
        if len(flagged) != len(lins):
            notes.append(f"{prefix}{prev}: {kind} skipped, the plan scales only {', '.join(flagged)} of {', '.join(lins)}")
            continue
        width = block.get_submodule(prev).weight.shape[0]
        if any(block.get_submodule(lin).weight.shape[1] != width for lin in lins):
            continue  # e.g. v_proj -> o_proj with grouped-query attention: nothing to fold into
        pairs.append((prev, lins))
    return pairs, notes


@torch.no_grad()
def fold_scales(block: nn.Module, prev: str, linears: tuple[str, ...], s: torch.Tensor) -> None:
    """W_l <- W_l·diag(s) for each linear, prev <- prev / s (a norm's weight, or a linear's output rows)."""
    p = block.get_submodule(prev)
    if p.weight.ndim == 1:
        p.weight.div_(s)
    else:
        p.weight.div_(s[:, None])
    if getattr(p, "bias", None) is not None:
        p.bias.div_(s)
    for lin in linears:
        block.get_submodule(lin).weight.mul_(s[None, :])


def block_stats(block: nn.Module, arch: Arch, names: list[str], forward, batches,
                hessian: bool = True, precision: str = "fp32") -> dict[str, tuple]:
    """{linear: (H = XᵀX/N or None, mean |x|, max |x|)} for the linears `names` of the float block (one
    shared entry per input). `hessian=False` skips XᵀX (SmoothQuant needs only the absolute statistics).
    `precision`: of the forward's linears and the XᵀX GEMMs (`calib/precision.py`)."""
    from qtool.calib.hessian import HessianCollector
    from qtool.calib.precision import bf16_stream

    firsts = [g[0] for g in arch.linear_groups if any(lin in names for lin in g)]
    collector = HessianCollector(block, firsts, hessian=hessian, precision=precision)
    with bf16_stream(block, precision):
        hessians = collector.run(forward, batches)
    stats = {}
    for g in arch.linear_groups:
        if g[0] in hessians:
            for lin in g:
                stats[lin] = (hessians[g[0]], collector.abs_mean[g[0]], collector.absmax[g[0]])
    return stats


def _rescaled(entry: tuple, s: torch.Tensor) -> tuple:
    """Statistics of an input divided by `s` per channel: H' = S⁻¹ H S⁻¹, mean |x| / s, max |x| / s."""
    h, x_abs, x_max = entry
    inv = 1.0 / s
    return (None if h is None else h * inv[:, None] * inv[None, :], x_abs * inv, x_max * inv)


def apply_transforms(block: nn.Module, prefix: str, arch: Arch, specs: dict,
                     stats: dict[str, tuple]) -> list[TransformReport]:
    """Every transform the block's rules name, in the order their chains list them (see `apply_awq`,
    `apply_smoothquant`); `stats` is updated so it keeps describing the rewritten block."""
    order: list[str] = []
    for lin in arch.linears:
        if prefix + lin in specs:
            order += [t for t in specs[prefix + lin].rule.transforms if t not in order]
    reports = []
    for kind in order:
        reports += (apply_awq if kind == "awq" else apply_smoothquant)(block, prefix, arch, specs, stats)
    return reports


def apply_smoothquant(block: nn.Module, prefix: str, arch: Arch, specs: dict,
                      stats: dict[str, tuple]) -> list[TransformReport]:
    """Fold SmoothQuant scales (`methods/smoothquant.py`, α from the rule) into every eligible pair; the
    reported gain is the input's max-over-channels / mean-over-channels of max |x| before / after."""
    from qtool.methods import smoothquant

    pairs, notes = smoothing_pairs(arch, prefix, specs, block, "smoothquant")
    reports = [TransformReport("smoothquant", n.split(":")[0], [], None, 1.0, n) for n in notes]
    for prev, lins in pairs:
        alpha = specs[prefix + lins[0]].rule.alpha
        x_max = stats[lins[0]][2]
        s = smoothquant.smooth_scales(x_max, [block.get_submodule(lin).weight.detach() for lin in lins], alpha)
        fold_scales(block, prev, lins, s)
        scaled = _rescaled(stats[lins[0]], s)
        for lin in lins:
            stats[lin] = scaled

        def spread(m):
            return (m.max() / m.mean().clamp_min(1e-12)).item()
        reports.append(TransformReport("smoothquant", prefix + prev, [prefix + lin for lin in lins], alpha,
                                       round(spread(x_max) / max(spread(scaled[2]), 1e-12), 4),
                                       note="gain = activation max/mean spread before / after"))
    return reports


def apply_awq(block: nn.Module, prefix: str, arch: Arch, specs: dict, stats: dict[str, tuple]) -> list[TransformReport]:
    """Search and fold AWQ scales for every eligible pair of `block`, given the float block's input `stats`
    (see `block_stats`); the Hessians of the scaled inputs are rescaled in `stats` (H' = S⁻¹ H S⁻¹), so
    they keep describing the block's linears after the fold. Returns one report per pair (and skipped pair)."""
    from qtool.methods import awq

    pairs, notes = smoothing_pairs(arch, prefix, specs, block, "awq")
    reports = [TransformReport("awq", n.split(":")[0], [], None, 1.0, n) for n in notes]
    for prev, lins in pairs:
        h, x_abs, _ = stats[lins[0]]
        weights = [block.get_submodule(lin).weight.detach() for lin in lins]
        codecs = [specs[prefix + lin].codec for lin in lins]
        res = awq.search_scale(weights, codecs, h, x_abs)
        fold_scales(block, prev, lins, res.scales)
        scaled = _rescaled(stats[lins[0]], res.scales)
        for lin in lins:
            stats[lin] = scaled
        reports.append(TransformReport("awq", prefix + prev, [prefix + lin for lin in lins], res.alpha,
                                       round(res.gain, 4)))
    return reports
