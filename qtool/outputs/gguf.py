"""GGUF (llama.cpp, Ollama, LM Studio): every tensor names its own ggml type; written whole by the GGUF sink
(`engine/sinks.py`, `io/gguf_writer.py`), read back by the GGUF source (`io/gguf_source.py`)."""

from __future__ import annotations

import torch

from qtool.errors import UsageError
from qtool.formats.base import QTensor
from qtool.outputs.base import OutputFormat


class Gguf(OutputFormat):
    name = "gguf"
    quant_method = None  # no quantization_config: the container names every tensor's type

    @property
    def codecs(self) -> dict[str, tuple[int, ...]]:
        from qtool.plan import GGUF_TYPES, MIX

        return {t: () for t in GGUF_TYPES + (MIX,)}

    def pack(self, q: QTensor, dtype: torch.dtype, spec=None) -> dict[str, torch.Tensor]:
        raise TypeError("GGUF tensors are written whole by the GGUF sink (engine/sinks.py), not packed per key")

    def config(self, specs: dict, unquantized: list[str], dtype: torch.dtype) -> dict:
        """Checks the plan resolved to GGUF codecs only (the plan's validation already refuses others)."""
        for name, spec in sorted(specs.items()):
            if spec.codec.grid_kind != "block":
                raise UsageError(f"{name}: codec {spec.codec.name} is not a GGUF type; GGUF plans name ggml types "
                                 "(q4_k, q6_k, ...) or `codec: mix`")
        return {}

    def tensor_bytes(self, codec, shape: tuple[int, int], dtype: torch.dtype = torch.float16) -> int:
        return codec.nbytes(shape)  # the block layout is the whole story (formats/gguf_*.py)


FORMAT = Gguf()
