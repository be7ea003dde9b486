"""GPTQ checkpoints (GPTQModel, transformers through it): `gptq` (v1: stored zero points are zero - 1, so
symmetric codes only) and `gptq_v2` (true zero points); fp16 scales, act-order groups with a g_idx
(`formats/gptq_format.py` holds the byte layout)."""

from __future__ import annotations

import torch

from qtool.errors import ModelError
from qtool.formats.base import QTensor
from qtool.outputs.base import OutputFormat


def one_int_scheme(specs: dict, fmt: str):
    """The single integer scheme (bits, group size, symmetry) GPTQ/AWQ artifacts hold, else UsageError."""
    from qtool.errors import UsageError
    from qtool.outputs.compressed_tensors import activations

    act = sorted(n for n, s in specs.items() if activations(s) != "none")
    if act:
        raise UsageError(f"{fmt} artifacts hold weights only; {act[0]} has int8 activations: use "
                         "compressed-tensors (or bnb for LLM.int8())")
    schemes = {(s.codec.grid_kind, s.codec.bits, s.codec.group_size, s.codec.symmetric, s.codec.float_zero)
               if s.codec.grid_kind == "affine" else (s.codec.name,) for s in specs.values()}
    if len(schemes) != 1:
        names = sorted({s.codec.name for s in specs.values()})
        raise UsageError(f"{fmt} artifacts hold one scheme (bits, group size, symmetry); the plan resolves to "
                         f"{', '.join(names)}: use compressed-tensors for mixed schemes")
    return next(iter(sorted(specs.items())))[1].codec


class Gptq(OutputFormat):
    quant_method = "gptq"
    codecs = {"int": (2, 3, 4, 8)}
    fp16_scales = True
    g_idx = True
    needs_groups = True

    def __init__(self, name: str):
        self.name = name

    def _refusals(self, rule):
        if self.name == "gptq" and rule.codec == "int" and not rule.symmetric:
            return [("symmetric", "'gptq' (v1) stores zero-1 and cannot hold asymmetric zero points of 0; use format "
                                  "gptq_v2, or `symmetric: true` in the rules")]
        return []

    def pack(self, q: QTensor, dtype: torch.dtype, spec=None) -> dict[str, torch.Tensor]:
        from qtool.formats import gptq_format

        return gptq_format.pack(q, self.name)

    def config(self, specs: dict, unquantized: list[str], dtype: torch.dtype) -> dict:
        from qtool.formats import gptq_format

        codec = one_int_scheme(specs, self.name)
        rules = [s.rule for _, s in sorted(specs.items()) if s.rule is not None and s.method == "gptq"]
        damp = rules[0].damp if rules and 0 < rules[0].damp < 1 else 0.01
        desc_act = any(r.act_order == "dynamic" for r in rules)  # act-order groups: a real g_idx
        static = not desc_act and any(r.static_groups or r.act_order is True for r in rules)
        return gptq_format.quantization_config(codec, self.name, unquantized, damp_percent=damp,
                                               static_groups=static, quantized=sorted(specs), desc_act=desc_act)

    def warning(self, qconfig: dict) -> str | None:
        notes = []
        if self.name == "gptq_v2":
            notes.append("gptq_v2 stores true zero points: GPTQModel (and transformers through it) reads it; "
                         "readers of v1 only (AutoGPTQ, exllama-style kernels) would misread every zero point by one")
        if qconfig.get("group_size") == -1 and qconfig.get("bits") == 4:
            notes.append("per-channel 4-bit GPTQ: gptqmodel 7.6's default CPU kernel (TorchFusedLinear) fails on "
                         "layers wider than 256 inputs; load with GPTQConfig(bits=4, backend='torch')")
        return "; ".join(notes) or None

    # ---- reading back (one reader for both checkpoint formats: the config names which)
    def read_keys(self, qconfig: dict) -> tuple[str, ...]:
        fmt = qconfig.get("checkpoint_format") or qconfig.get("format") or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise ModelError(f"GPTQ checkpoint format {fmt!r} is not one qtool loads (gptq, gptq_v2)")
        return ("qweight", "qzeros", "scales", "g_idx")

    def quantized_modules(self, names: list[str], qconfig: dict) -> set[str]:
        return {n.removesuffix(".qweight") for n in names if n.endswith(".qweight")}

    def read(self, module: str, tensors: dict[str, torch.Tensor], qconfig: dict, dtype: torch.dtype, bias,
             where: str):
        from qtool.formats import gptq_format

        fmt = qconfig.get("checkpoint_format") or qconfig.get("format") or "gptq"
        try:
            q = gptq_format.unpack(tensors, qconfig["bits"], qconfig["group_size"], qconfig.get("sym", True), fmt)
        except (KeyError, ValueError) as e:
            raise ModelError(f"{where}: cannot read gptq tensors: {e}") from None
        return q.dequantize(), None


GPTQ = Gptq("gptq")
GPTQ_V2 = Gptq("gptq_v2")
