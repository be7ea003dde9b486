"""What a GGUF model takes in llama.cpp's memory at a context length: weights + KV cache + compute buffers.

    memory = file bytes (llama.cpp maps the whole file)
           + KV cache: 2 (K and V) x layers x KV heads x head dim x ctx x batch x bytes per element of the cache type
           + compute buffers: logits (vocab x ubatch x 4) + attention scores (heads x ubatch x ctx x 4)
             + activations (ubatch x (hidden + 2 x ffn) x 4 x 4), the largest buffers of one forward pass

(KV cache types: F16 2 bytes per element, Q8_0 34 bytes per 32.) `ubatch` is llama.cpp's default micro-batch
(512). Every term is stated in the plan and the report, so a user can check the arithmetic against what
llama.cpp measures.
"""

from __future__ import annotations

from dataclasses import dataclass

from qtool.errors import UsageError

KV_BYTES = {"f16": 2.0, "q8_0": 34 / 32}  # bytes per cached element
UBATCH = 512


@dataclass(frozen=True)
class MemoryModel:
    kv_bytes: int
    compute_bytes: int
    terms: str  # the arithmetic, for the plan header and the report

    @property
    def overhead(self) -> int:
        return self.kv_bytes + self.compute_bytes


def _field(cfg, *names: str) -> int:
    for n in names:
        v = getattr(cfg, n, None)
        if v:
            return int(v)
    raise UsageError(f"the model config lacks `{names[0]}`: it is needed to size the KV cache for --target-memory")


def memory_model(cfg, ctx: int, batch: int = 1, kv_type: str = "f16") -> MemoryModel:
    if kv_type not in KV_BYTES:
        raise UsageError(f"--kv-type {kv_type}: allowed {', '.join(KV_BYTES)}")
    layers = _field(cfg, "num_hidden_layers")
    heads = _field(cfg, "num_attention_heads")
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    hidden = _field(cfg, "hidden_size")
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    vocab = _field(cfg, "vocab_size")
    ffn = _field(cfg, "intermediate_size")
    kv = int(2 * layers * kv_heads * head_dim * ctx * batch * KV_BYTES[kv_type])
    ub = min(UBATCH, ctx * batch)
    compute = 4 * (vocab * ub + heads * ub * ctx + 4 * ub * (hidden + 2 * ffn))
    terms = (f"KV cache {kv:,} B = 2 x {layers} layers x {kv_heads} KV heads x {head_dim} head dim x ctx {ctx} x "
             f"batch {batch} x {KV_BYTES[kv_type]:g} B ({kv_type}); compute buffers {compute:,} B = 4 x (vocab "
             f"{vocab} x ubatch {ub} + {heads} heads x ubatch x ctx + 4 x ubatch x (hidden {hidden} + 2 x ffn {ffn}))")
    return MemoryModel(kv, compute, terms)
