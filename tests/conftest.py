"""Shared fixtures: a tiny random Llama written to disk as a real Hugging Face directory.

Sizes follow the rules real clients impose (hidden and MLP widths multiples of 256 so GGUF k-quants and
every group size apply; out_features multiples of 8 for GPTQ/AWQ packing). The tokenizer is a byte-level
BPE trained here, on qtool's own check text, so nothing is downloaded.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

import pytest
import torch

TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def train_tokenizer(out_dir: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = resources.files("qtool").joinpath("data/check.txt").read_text()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.save_pretrained(out_dir)
    return fast


def make_tiny_llama(out_dir: Path, seed: int = 0, dtype=torch.float32, **overrides) -> Path:
    """Write a tiny random LlamaForCausalLM (config.json + model.safetensors + tokenizer) to `out_dir`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out_dir)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      **{**TINY, **overrides})
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(dtype)
    # random init of std 0.02 gives nearly uniform logits; widen it so quantization error is visible
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("proj.weight"):
                p.normal_(0.0, 0.06)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                p.normal_(0.0, 0.5)
    model.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A tiny random Llama directory shared (read-only!) by the whole session."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def tiny_llama_copy(tmp_path, tiny_llama) -> Path:
    """A private copy a test may damage."""
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(tiny_llama, dst)
    return dst


def read_config(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def dynamic_gptq(w: torch.Tensor, codec, seed: int):
    """GPTQ with act-order groups (`act_order: dynamic`, a real g_idx) on correlated inputs whose channel
    scales are in random order: a QTensor carrying ``g_idx`` (shared by the g_idx format and client tests)."""
    from qtool.methods import gptq

    g = torch.Generator().manual_seed(seed)
    n = w.shape[1]
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, n, generator=g) + 0.3 * torch.randn(512, n, generator=g)
    x = x * (0.2 + 3 * torch.rand(n, generator=g))
    q, _ = gptq.quantize(w, codec, x.T @ x / 512, gptq.GPTQParams(act_order="dynamic"))
    assert "g_idx" in q.params
    return q
