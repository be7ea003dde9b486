"""RTN: round to nearest on the codec's grid, no calibration data.

The whole method is the codec's own fit (min-max, or MSE clipping when the codec asks for it, optionally
weighted by per-input-channel importance) followed by rounding.
"""

from __future__ import annotations

import torch

from qtool.formats.base import Codec, QTensor

NEEDS: tuple[str, ...] = ()  # statistics this method needs from calibration
SEQUENTIAL = False  # statistics of the float block (collected once per block) are enough


def quantize(w: torch.Tensor, codec: Codec, importance: torch.Tensor | None = None) -> QTensor:
    return codec.encode(w.float(), importance)
