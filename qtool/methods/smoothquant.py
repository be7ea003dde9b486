"""SmoothQuant (Xiao et al., 2023): migrate activation outliers into the weights before W8A8.

Per-token int8 activations lose the small channels of a token whenever a few input channels carry huge
values (the outlier channels of LLM activations). For a smoothing pair ``prev -> linears`` (an RMSNorm or a
linear that feeds the linears directly) per-input-channel scales

    s_j = max|x_j|^α / max_l max_i |W_l[i, j]|^(1-α)

divide the activations (folded into ``prev``) and multiply the weights' input columns (``W' = W·diag(s)``):
the float function is unchanged, the activation range is flattened and the weights, quantized per output
channel, absorb the difference. α (the migration strength, 0.5 by default) balances the two ranges.

A channel that never fired in calibration (max |x| = 0), or whose weights are all zero, keeps s = 1.
Pure functions over tensors; folding into a model is the engine's job (`engine/transforms.py`).
"""

from __future__ import annotations

import torch

NEEDS: tuple[str, ...] = ("absmax",)  # per-channel max |x| of the pair's input, from calibration


def smooth_scales(x_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5,
                  floor: float = 1e-5) -> torch.Tensor:
    """Scales s (in,) for a smoothing pair: `x_absmax` (in,) max |x_j| of the shared input, `weights` the
    (out_l, in) weights of the linears it feeds, `alpha` in [0, 1]."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"smoothquant: alpha must be in [0, 1], got {alpha}")
    x = x_absmax.float()
    w = torch.stack([wl.float().abs().amax(dim=0) for wl in weights]).amax(dim=0)
    if x.shape != w.shape:
        raise ValueError(f"smoothquant: activation stats have {x.shape[0]} channels, weights {w.shape[0]} inputs")
    s = x.clamp_min(floor).pow(alpha) / w.clamp_min(floor).pow(1.0 - alpha)
    keep = (x <= 0) | (w <= 0) | ~torch.isfinite(s)
    return torch.where(keep, torch.ones_like(s), s)
