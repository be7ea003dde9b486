"""Output flavours: how QTensors become on-disk tensors and what `quantization_config` says about them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


def _one_int_scheme(specs: dict[str, LayerSpec], fmt: str):
    """The single integer scheme (bits, group size, symmetry) GPTQ/AWQ artifacts hold, else UsageError."""
    from qtool.errors import UsageError

    schemes = {tuple(getattr(s.codec, k, None) for k in ("bits", "group_size", "symmetric", "float_zero"))
               + (type(s.codec).__name__,) for s in specs.values()}
    if len(schemes) != 1:
        names = sorted({s.codec.name for s in specs.values()})
        raise UsageError(f"{fmt} artifacts hold one scheme (bits, group size, symmetry); the plan resolves to "
                         f"{', '.join(names)}: use compressed-tensors for mixed schemes")
    return next(iter(sorted(specs.items())))[1].codec


def _gptq_output(fmt: str) -> Output:
    def pack(q: QTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        from qtool.formats import gptq_format

        return gptq_format.pack(q, fmt)

    def config(specs: dict[str, LayerSpec], unquantized: list[str], dtype: torch.dtype) -> dict:
        from qtool.formats import gptq_format

        codec = _one_int_scheme(specs, fmt)
        rules = [s.rule for _, s in sorted(specs.items()) if s.rule is not None and s.method == "gptq"]
        damp = rules[0].damp if rules and 0 < rules[0].damp < 1 else 0.01
        static = any(r.static_groups or r.act_order for r in rules)
        return gptq_format.quantization_config(codec, fmt, unquantized, damp_percent=damp, static_groups=static,
                                               quantized=sorted(specs))

    def warning(qconfig: dict) -> str | None:
        notes = []
        if fmt == "gptq_v2":
            notes.append("gptq_v2 stores true zero points: GPTQModel (and transformers through it) reads it; "
                         "readers of v1 only (AutoGPTQ, exllama-style kernels) would misread every zero point by one")
        if qconfig.get("group_size") == -1 and qconfig.get("bits") == 4:
            notes.append("per-channel 4-bit GPTQ: gptqmodel 7.6's default CPU kernel (TorchFusedLinear) fails on "
                         "layers wider than 256 inputs; load with GPTQConfig(bits=4, backend='torch')")
        return "; ".join(notes) or None

    return Output(fmt, pack, config, warning)


def _awq_pack(q: QTensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from qtool.formats import awq_format

    return awq_format.pack(q)


def _awq_config(specs: dict[str, LayerSpec], unquantized: list[str], dtype: torch.dtype) -> dict:
    from qtool.formats import awq_format

    return awq_format.quantization_config(_one_int_scheme(specs, "awq"), unquantized)


OUTPUTS = {
    "compressed-tensors": Output("compressed-tensors", _ct_pack, _ct_config, _ct_warning),
    "bnb": Output("bnb", _bnb_pack, _bnb_config),
    "gptq": _gptq_output("gptq"),
    "gptq_v2": _gptq_output("gptq_v2"),
    "awq": Output("awq", _awq_pack, _awq_config),
}
