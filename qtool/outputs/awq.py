"""AWQ checkpoints (version gemm, AutoAWQ / transformers): 4-bit asymmetric group-wise codes, fp16 scales
(`formats/awq_format.py` holds the byte layout)."""

from __future__ import annotations

import torch

from qtool.errors import ModelError
from qtool.formats.base import QTensor
from qtool.outputs.base import OutputFormat
from qtool.outputs.gptq import one_int_scheme


class Awq(OutputFormat):
    name = "awq"
    quant_method = "awq"
    codecs = {"int": (4,)}
    fp16_scales = True
    needs_groups = True

    def pack(self, q: QTensor, dtype: torch.dtype, spec=None) -> dict[str, torch.Tensor]:
        from qtool.formats import awq_format

        return awq_format.pack(q)

    def config(self, specs: dict, unquantized: list[str], dtype: torch.dtype) -> dict:
        from qtool.formats import awq_format

        return awq_format.quantization_config(one_int_scheme(specs, "awq"), unquantized)

    def read_keys(self, qconfig: dict) -> tuple[str, ...]:
        if str(qconfig.get("version", qconfig.get("format", "gemm"))).lower() != "gemm" or not qconfig.get(
                "zero_point", True):
            raise ModelError("only AWQ version gemm with zero points is loaded by qtool")
        return ("qweight", "qzeros", "scales")

    def quantized_modules(self, names: list[str], qconfig: dict) -> set[str]:
        return {n.removesuffix(".qweight") for n in names if n.endswith(".qweight")}

    def read(self, module: str, tensors: dict[str, torch.Tensor], qconfig: dict, dtype: torch.dtype, bias,
             where: str):
        from qtool.formats import awq_format

        try:
            q = awq_format.unpack(tensors, qconfig["group_size"])
        except (KeyError, ValueError) as e:
            raise ModelError(f"{where}: cannot read awq tensors: {e}") from None
        return q.dequantize(), None


FORMAT = Awq()
