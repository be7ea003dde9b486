"""Output flavours: how QTensors become on-disk tensors and what `quantization_config` says about them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from qtool.formats.base import QTensor
from qtool.plan import LayerSpec


@dataclass(frozen=True)
class Output:
    """`pack(qtensor, dtype, spec)`: one linear's on-disk tensors (`spec`, the linear's LayerSpec, says e.g.
    whether its inputs are quantized at run time: compressed-tensors picks the W8A8 layout from it; None
    means a weight-only rule). `config(specs, unquantized, dtype)`: the ``quantization_config``."""

    name: str
    pack: Callable[..., dict[str, torch.Tensor]]
    config: Callable[[dict[str, LayerSpec], list[str], torch.dtype], dict]
    warning: Callable[[dict], str | None] = lambda qconfig: None  # known loader incompatibilities


def _activations(spec: LayerSpec | None) -> str:
    return spec.rule.activations if spec is not None and spec.rule is not None else "none"


def _threshold(spec: LayerSpec | None) -> float:
    return spec.rule.outlier_threshold if spec is not None and spec.rule is not None else 0.0


def _ct_pack(q: QTensor, dtype: torch.dtype, spec: LayerSpec | None = None) -> dict[str, torch.Tensor]:
    from qtool.formats import compressed_tensors

    return compressed_tensors.pack(q, _activations(spec))


def _ct_config(specs: dict[str, LayerSpec], unquantized: list[str], dtype: torch.dtype) -> dict:
    """One config group per (codec, activation scheme); compressed-tensors has no outlier decomposition."""
    from qtool.errors import UsageError
    from qtool.formats import compressed_tensors

    outliers = sorted(n for n, s in specs.items() if _threshold(s) > 0)
    if outliers:
        raise UsageError(f"compressed-tensors has no LLM.int8() outlier threshold (rule of {outliers[0]}): "
                         "use output format bnb, or outlier_threshold 0")
    by_scheme: dict = {}
    for name, spec in sorted(specs.items()):
        by_scheme.setdefault((spec.codec, _activations(spec)), []).append(name)
    try:
        return compressed_tensors.quantization_config([(c, names, act) for (c, act), names in by_scheme.items()],
                                                      ignore=unquantized, all_linear=sorted(specs) + unquantized)
    except ValueError as e:
        raise UsageError(f"compressed-tensors cannot hold this plan: {e}") from None


def _ct_warning(qconfig: dict) -> str | None:
    from qtool.formats import compressed_tensors

    return compressed_tensors.transformers_load_warning(qconfig)


def _bnb_pack(q: QTensor, dtype: torch.dtype, spec: LayerSpec | None = None) -> dict[str, torch.Tensor]:
    from qtool.formats import bnb, bnb_int8
    from qtool.formats.affine import AffineCodec

    if isinstance(q.codec, AffineCodec):  # LLM.int8(): int8 per-channel weights (activations at run time)
        return bnb_int8.pack(q)
    return bnb.pack(q, dtype)


def _bnb_int8_config(specs: dict[str, LayerSpec], unquantized: list[str]) -> dict:
    from qtool.errors import UsageError
    from qtool.formats import bnb_int8

    for name, spec in sorted(specs.items()):
        try:
            bnb_int8.check_codec(spec.codec)
        except (TypeError, ValueError) as e:
            raise UsageError(f"{name}: {e}; a bitsandbytes artifact holds one scheme") from None
        if _activations(spec) != "int8":
            raise UsageError(f"{name}: bitsandbytes 8-bit is LLM.int8(): its inputs are always quantized to int8 "
                             "at run time; set `activations: int8` (or use compressed-tensors for W8A16)")
    thresholds = sorted({_threshold(s) for s in specs.values()})
    if len(thresholds) != 1:
        raise UsageError(f"a bitsandbytes 8-bit artifact holds one llm_int8_threshold; the plan has {thresholds}")
    return bnb_int8.quantization_config(thresholds[0], skip_modules=unquantized)


def _bnb_config(specs: dict[str, LayerSpec], unquantized: list[str], dtype: torch.dtype) -> dict:
    from qtool.errors import UsageError
    from qtool.formats import bnb
    from qtool.formats.affine import AffineCodec

    if any(isinstance(s.codec, AffineCodec) for s in specs.values()):
        return _bnb_int8_config(specs, unquantized)
    codecs = sorted({s.codec for s in specs.values()}, key=lambda c: c.name)
    if len(codecs) != 1:
        raise UsageError(f"bitsandbytes artifacts hold one 4-bit scheme; the plan resolves to "
                         f"{', '.join(c.name for c in codecs)}")
    return bnb.quantization_config(codecs[0], skip_modules=unquantized, compute_dtype=str(dtype).removeprefix("torch."))


def _one_int_scheme(specs: dict[str, LayerSpec], fmt: str):
    """The single integer scheme (bits, group size, symmetry) GPTQ/AWQ artifacts hold, else UsageError."""
    from qtool.errors import UsageError

    act = sorted(n for n, s in specs.items() if _activations(s) != "none")
    if act:
        raise UsageError(f"{fmt} artifacts hold weights only; {act[0]} has int8 activations: use "
                         "compressed-tensors (or bnb for LLM.int8())")
    schemes = {tuple(getattr(s.codec, k, None) for k in ("bits", "group_size", "symmetric", "float_zero"))
               + (type(s.codec).__name__,) for s in specs.values()}
    if len(schemes) != 1:
        names = sorted({s.codec.name for s in specs.values()})
        raise UsageError(f"{fmt} artifacts hold one scheme (bits, group size, symmetry); the plan resolves to "
                         f"{', '.join(names)}: use compressed-tensors for mixed schemes")
    return next(iter(sorted(specs.items())))[1].codec


def _gptq_output(fmt: str) -> Output:
    def pack(q: QTensor, dtype: torch.dtype, spec: LayerSpec | None = None) -> dict[str, torch.Tensor]:
        from qtool.formats import gptq_format

        return gptq_format.pack(q, fmt)

    def config(specs: dict[str, LayerSpec], unquantized: list[str], dtype: torch.dtype) -> dict:
        from qtool.formats import gptq_format

        codec = _one_int_scheme(specs, fmt)
        rules = [s.rule for _, s in sorted(specs.items()) if s.rule is not None and s.method == "gptq"]
        damp = rules[0].damp if rules and 0 < rules[0].damp < 1 else 0.01
        desc_act = any(r.act_order == "dynamic" for r in rules)  # act-order groups: a real g_idx
        static = not desc_act and any(r.static_groups or r.act_order is True for r in rules)
        return gptq_format.quantization_config(codec, fmt, unquantized, damp_percent=damp, static_groups=static,
                                               quantized=sorted(specs), desc_act=desc_act)

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


def _awq_pack(q: QTensor, dtype: torch.dtype, spec: LayerSpec | None = None) -> dict[str, torch.Tensor]:
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


def _gguf_pack(q: QTensor, dtype: torch.dtype, spec: LayerSpec | None = None) -> dict[str, torch.Tensor]:
    raise TypeError("GGUF tensors are written whole by the GGUF sink (engine/sinks.py), not packed per key")


def _gguf_config(specs: dict[str, LayerSpec], unquantized: list[str], dtype: torch.dtype) -> dict:
    """GGUF has no quantization_config: every tensor names its own ggml type. Checks the plan resolved to
    GGUF codecs only (the plan's validation already refuses others)."""
    from qtool.errors import UsageError

    for name, spec in sorted(specs.items()):
        if not hasattr(spec.codec, "ggml_type"):
            raise UsageError(f"{name}: codec {spec.codec.name} is not a GGUF type; GGUF plans name ggml types "
                             "(q4_k, q6_k, ...) or `codec: mix`")
    return {}


OUTPUTS["gguf"] = Output("gguf", _gguf_pack, _gguf_config)
