"""Output flavours: how QTensors become on-disk tensors and what `quantization_config` says about them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from qtool.formats.base import QTensor
from qtool.plan import LayerSpec


@dataclass(frozen=True)
class Output:
    name: str
    pack: Callable[[QTensor, torch.dtype], dict[str, torch.Tensor]]
    config: Callable[[dict[str, LayerSpec], list[str], torch.dtype], dict]
    warning: Callable[[dict], str | None] = lambda qconfig: None  # known loader incompatibilities


def _ct_pack(q: QTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from qtool.formats import compressed_tensors

    return compressed_tensors.pack(q)


def _ct_config(specs: dict[str, LayerSpec], unquantized: list[str], dtype: torch.dtype) -> dict:
    from qtool.formats import compressed_tensors

    by_codec: dict = {}
    for name, spec in sorted(specs.items()):
        by_codec.setdefault(spec.codec, []).append(name)
    return compressed_tensors.quantization_config(list(by_codec.items()), ignore=unquantized,
                                                  all_linear=sorted(specs) + unquantized)


def _ct_warning(qconfig: dict) -> str | None:
    from qtool.formats import compressed_tensors

    return compressed_tensors.transformers_load_warning(qconfig)


def _bnb_pack(q: QTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from qtool.formats import bnb

    return bnb.pack(q, dtype)


def _bnb_config(specs: dict[str, LayerSpec], unquantized: list[str], dtype: torch.dtype) -> dict:
    from qtool.errors import UsageError
    from qtool.formats import bnb

    codecs = sorted({s.codec for s in specs.values()}, key=lambda c: c.name)
    if len(codecs) != 1:
        raise UsageError(f"bitsandbytes artifacts hold one 4-bit scheme; the plan resolves to "
                         f"{', '.join(c.name for c in codecs)}")
    return bnb.quantization_config(codecs[0], skip_modules=unquantized, compute_dtype=str(dtype).removeprefix("torch."))


OUTPUTS = {
    "compressed-tensors": Output("compressed-tensors", _ct_pack, _ct_config, _ct_warning),
    "bnb": Output("bnb", _bnb_pack, _bnb_config),
}
