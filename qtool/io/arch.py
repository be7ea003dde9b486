"""Architecture table: model facts as data, keyed by the Hugging Face architecture name.

Supporting a new decoder family is adding a row here (where blocks live, which linears they hold and in
which sequential groups, which norm feeds which linears).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Arch:
    blocks: str  # prefix of decoder block i, with {i}
    embed: str
    final_norm: str
    lm_head: str
    # linears of a block in true-sequential order: each inner tuple sees the same input
    linear_groups: tuple[tuple[str, ...], ...]
    # (norm or linear) -> linears it feeds directly: the smoothing pairs for AWQ/SmoothQuant
    smooth_pairs: tuple[tuple[str, tuple[str, ...]], ...]
    # pre-norm residual layout (engine/staged.py): h = x + attn(norm(x)); out = h + mlp(mlp_norm(h))
    mlp_norm: str = "post_attention_layernorm"
    mlp: str = "mlp"
    # GGUF facts (formats.md §1.3-1.5): llama.cpp's architecture name (tensor names come from gguf-py's
    # TensorNameMap for it); whether q/k rows are reordered for ggml's NORM rope (llama only; qwen2/qwen3
    # use NEOX rope and are written unpermuted)
    gguf_arch: str = "llama"
    permute_qk: bool = True

    def block_prefix(self, i: int) -> str:
        return self.blocks.format(i=i)

    @property
    def linears(self) -> tuple[str, ...]:
        return tuple(n for g in self.linear_groups for n in g)


_LLAMA = Arch(
    blocks="model.layers.{i}.",
    embed="model.embed_tokens.weight",
    final_norm="model.norm.weight",
    lm_head="lm_head.weight",
    linear_groups=(
        ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
        ("self_attn.o_proj",),
        ("mlp.gate_proj", "mlp.up_proj"),
        ("mlp.down_proj",),
    ),
    smooth_pairs=(
        ("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("self_attn.v_proj", ("self_attn.o_proj",)),
        ("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
        ("mlp.up_proj", ("mlp.down_proj",)),
    ),
)

_QWEN2 = replace(_LLAMA, gguf_arch="qwen2", permute_qk=False)  # q/k/v biases: block parameters like the norms
_QWEN3 = replace(_LLAMA, gguf_arch="qwen3", permute_qk=False)  # q/k norms inside attention: block parameters

ARCHS: dict[str, Arch] = {
    "LlamaForCausalLM": _LLAMA,
    "MistralForCausalLM": _LLAMA,  # llama.cpp's converter writes Mistral as arch llama
    "Qwen2ForCausalLM": _QWEN2,
    "Qwen3ForCausalLM": _QWEN3,
}
# configs built from GGUF metadata carry only a model_type
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}


def arch_of(config) -> Arch:
    from qtool.errors import ModelError

    names = getattr(config, "architectures", None) or [MODEL_TYPES.get(config.model_type, config.model_type)]
    if not getattr(config, "architectures", None) and names[0] in ARCHS:
        config.architectures = names  # so the artifact's config.json names its class
    for n in names:
        if n in ARCHS:
            return ARCHS[n]
    raise ModelError(f"unsupported architecture {names or config.model_type!r}; supported: {', '.join(ARCHS)}")
