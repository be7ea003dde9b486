"""bitsandbytes (transformers' `load_in_4bit` / `load_in_8bit`): NF4/FP4 blocks with double quantization, or
LLM.int8() (8-bit symmetric per-channel weights, int8 inputs with outlier columns at run time)."""

from __future__ import annotations

import torch

from qtool.errors import ModelError, UsageError
from qtool.formats.base import QTensor
from qtool.outputs.base import OutputFormat
from qtool.outputs.compressed_tensors import activations, threshold

INT8_KEYS = ("weight", "SCB", "weight_format")
NF4_KEYS = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
            "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4")


def _int8(qconfig: dict) -> bool:
    return bool(qconfig.get("load_in_8bit", qconfig.get("_load_in_8bit")))


class Bnb(OutputFormat):
    name = "bnb"
    quant_method = "bitsandbytes"
    codecs = {"nf4": (), "fp4": (), "int": (8,)}
    activations = True
    outliers = True

    def _refusals(self, rule):
        if "smoothquant" in rule.transforms:
            return [("method", "bitsandbytes 8-bit is LLM.int8(); SmoothQuant's W8A8 is written as compressed-tensors")]
        if rule.codec == "int" and (rule.group_size != 0 or not rule.symmetric or rule.activations != "int8"):
            return [("codec", "bitsandbytes int8 (LLM.int8) holds 8-bit symmetric per-channel weights and always runs "
                             "int8 activations: use `bits: 8`, `group_size: channel`, `symmetric: true`, "
                             "`activations: int8`")]
        return []

    def pack(self, q: QTensor, dtype: torch.dtype, spec=None) -> dict[str, torch.Tensor]:
        from qtool.formats import bnb, bnb_int8

        if q.codec.grid_kind == "affine":  # LLM.int8(): int8 per-channel weights (activations at run time)
            return bnb_int8.pack(q)
        return bnb.pack(q, dtype)

    def config(self, specs: dict, unquantized: list[str], dtype: torch.dtype) -> dict:
        from qtool.formats import bnb

        if any(s.codec.grid_kind == "affine" for s in specs.values()):
            return self._int8_config(specs, unquantized)
        codecs = sorted({s.codec for s in specs.values()}, key=lambda c: c.name)
        if len(codecs) != 1:
            raise UsageError(f"bitsandbytes artifacts hold one 4-bit scheme; the plan resolves to "
                             f"{', '.join(c.name for c in codecs)}")
        return bnb.quantization_config(codecs[0], skip_modules=unquantized,
                                       compute_dtype=str(dtype).removeprefix("torch."))

    def _int8_config(self, specs: dict, unquantized: list[str]) -> dict:
        from qtool.formats import bnb_int8

        for name, spec in sorted(specs.items()):
            try:
                bnb_int8.check_codec(spec.codec)
            except (TypeError, ValueError) as e:
                raise UsageError(f"{name}: {e}; a bitsandbytes artifact holds one scheme") from None
            if activations(spec) != "int8":
                raise UsageError(f"{name}: bitsandbytes 8-bit is LLM.int8(): its inputs are always quantized to "
                                 "int8 at run time; set `activations: int8` (or use compressed-tensors for W8A16)")
        thresholds = sorted({threshold(s) for s in specs.values()})
        if len(thresholds) != 1:
            raise UsageError(f"a bitsandbytes 8-bit artifact holds one llm_int8_threshold; the plan has {thresholds}")
        return bnb_int8.quantization_config(thresholds[0], skip_modules=unquantized)

    def int8_runtime(self, packed: dict[str, torch.Tensor], bias, spec):
        from qtool.runtime.w8a8 import Int8ActLinear

        return Int8ActLinear(packed["weight"], packed["SCB"], bias=bias, scheme="bnb",
                             threshold=spec.rule.outlier_threshold)

    # the double-quant offset is written as JSON text, whose length depends on the value ("0.0" ... 24 characters
    # for the longest float repr): sizes are predicted for the longest, an upper bound within 24 bytes per tensor
    LONGEST_FLOAT = len(repr(-2.2250738585072014e-308))

    def tensor_bytes(self, codec, shape: tuple[int, int], dtype: torch.dtype = torch.float16) -> int:
        n = super().tensor_bytes(codec, shape, dtype)
        return n + (self.LONGEST_FLOAT - len(repr(0.0)) if codec.grid_kind == "table" and codec.double_quant else 0)

    # ---- reading back
    def read_keys(self, qconfig: dict) -> tuple[str, ...]:
        if _int8(qconfig) and qconfig.get("llm_int8_has_fp16_weight"):
            raise ModelError("llm_int8_has_fp16_weight artifacts hold float weights; qtool loads pre-quantized "
                             "8-bit weights only")
        return INT8_KEYS if _int8(qconfig) else NF4_KEYS

    def quantized_modules(self, names: list[str], qconfig: dict) -> set[str]:
        if _int8(qconfig):
            return {n.removesuffix(".SCB") for n in names if n.endswith(".SCB")}
        return {n.split(".weight.quant_state.")[0] for n in names if ".weight.quant_state." in n}

    def read(self, module: str, tensors: dict[str, torch.Tensor], qconfig: dict, dtype: torch.dtype, bias,
             where: str):
        from qtool.formats import bnb, bnb_int8
        from qtool.runtime.w8a8 import Int8ActLinear

        if not _int8(qconfig):
            return bnb.unpack(tensors).dequantize(), None
        try:
            cb, scb = bnb_int8.check_tensors(tensors)
        except ValueError as e:
            raise ModelError(f"{where}: cannot read bitsandbytes 8-bit tensors: {e}") from None
        t = qconfig.get("llm_int8_threshold", 6.0)
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0:
            raise ModelError(f"{where.split(': ')[0]}: llm_int8_threshold {t!r} is not a number >= 0")
        return None, Int8ActLinear(cb, scb, None, None if bias is None else bias.to(dtype), scheme="bnb",
                                   threshold=float(t))


FORMAT = Bnb()
