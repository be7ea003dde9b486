"""Build a model skeleton with no memory and bring one decoder block at a time to life from a source."""

from __future__ import annotations

import torch
from torch import nn

from qtool.io.source import ModelSource


def skeleton(config) -> nn.Module:
    """The causal-LM module tree on the meta device (no weights allocated), sdpa attention."""
    from transformers import AutoModelForCausalLM

    config._attn_implementation = "sdpa"
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def materialize(module: nn.Module, prefix: str, source: ModelSource) -> nn.Module:
    """Allocate `module` on CPU in float32 and fill every parameter from `source` (names under `prefix`)."""
    module.to_empty(device="cpu")
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(source.get(prefix + name).to(torch.float32))
    return module


def release(module: nn.Module) -> None:
    """Give a block's memory back (move it to meta) and return freed heap pages to the OS.

    glibc raises its mmap threshold after large frees, so block-sized buffers end up on the heap and a
    long run's RSS creeps up by tens of MB per block unless the heap is trimmed.
    """
    module.to_empty(device="meta")
    malloc_trim()


def malloc_trim() -> None:
    """Return the heap's free pages to the OS (glibc), e.g. between the stages of a block walk."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def rotary(skel: nn.Module, config) -> nn.Module:
    """The model's rotary embedding module, rebuilt on CPU (its buffers are computed, not loaded)."""
    return type(skel.model.rotary_emb)(config=config)


class BlockRunner:
    """Runs hidden states through one decoder block exactly as the full model does."""

    def __init__(self, skel: nn.Module, config, seq_len: int):
        self.position_ids = torch.arange(seq_len).unsqueeze(0)
        self.rope = rotary(skel, config)

    @torch.inference_mode()
    def __call__(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        pos = self.position_ids[:, : x.shape[1]]
        cos, sin = self.rope(x, pos)
        out = block(x, attention_mask=None, position_ids=pos, position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out
