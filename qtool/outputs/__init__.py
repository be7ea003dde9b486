"""Output formats: one object per format (`outputs/<format>.py`, see `outputs/base.py`), registered by name.

Adding a format = one file here with its `OutputFormat` subclass, and one line in `OUTPUT_FORMATS`.
"""

from __future__ import annotations

from qtool.outputs import awq, bnb, compressed_tensors, gguf, gptq
from qtool.outputs.base import OutputFormat

OUTPUT_FORMATS: dict[str, OutputFormat] = {f.name: f for f in (
    compressed_tensors.FORMAT, gptq.GPTQ, gptq.GPTQ_V2, awq.FORMAT, bnb.FORMAT, gguf.FORMAT)}
HF_FORMATS = tuple(n for n in OUTPUT_FORMATS if n != "gguf")  # written as HF safetensors directories


def output_format(name: str) -> OutputFormat:
    return OUTPUT_FORMATS[name]


def reader(quant_method: str) -> OutputFormat | None:
    """The format that reads artifacts whose ``quantization_config.quant_method`` is `quant_method`."""
    return next((f for f in OUTPUT_FORMATS.values() if f.quant_method == quant_method), None)
