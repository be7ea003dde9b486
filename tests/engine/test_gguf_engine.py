"""GGUF output end to end: the engine writes files llama.cpp (the real client) loads and runs, for every
architecture row, every named mix and every ggml type qtool encodes; llama.cpp's log-probs equal those of
qtool's own dequantized model; the container round-trips through gguf-py's reader; runs are deterministic."""

from __future__ import annotations

import sys
from pathlib import Path

import gguf
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calib"))
from conftest import train_tokenizer  # noqa: E402
from gguf_tiny import BUILD_HINT  # noqa: E402

from qtool.engine.run import run
from qtool.eval import llamacpp
from qtool.io.source import open_model
from qtool.plan import GGUF_TYPES, parse_plan
from qtool.runtime.load import load_model

PERPLEXITY = llamacpp.tool("llama-perplexity")
needs_llama = pytest.mark.skipif(PERPLEXITY is None, reason=f"llama-perplexity not found: {BUILD_HINT}")
CTX = 64
# llama.cpp vs qtool's model (`reference_model`: the same codes, decoded by qtool, in HF layout): mean KL(qtool ||
# llama.cpp) over the scored positions. llama.cpp rounds activations to 8 bits for quantized dot products
# (Q8_K/Q8_0) and runs F16 flash attention by default, so the two differ a little for identical weights: measured
# on these tiny peaked-attention models F32 1.4e-5, F16 6.6e-5, Q8_0 0.015, k-quants up to 0.034. A layout
# mistake (no q/k permutation, F32 file) measured 4.6: asserted TOL is ~3x above the noise, ~45x below that.
TOL = 0.1


def make_tiny(out: Path, arch: str, **kw) -> Path:
    """A tiny random model of architecture `arch` (llama, qwen2 with q/k/v biases, qwen3 with q/k norms)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    from conftest import TINY

    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out)
    cls_cfg, cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
                    "qwen3": (Qwen3Config, Qwen3ForCausalLM)}[arch]
    extra = {"head_dim": 64} if arch == "qwen3" else {}
    cfg = cls_cfg(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                  **{**TINY, **extra, **kw})
    torch.manual_seed(1)
    model = cls(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0.0, 0.2)  # peaked attention: the q/k layout (rope pairs) matters to the output
            elif name.endswith("proj.weight"):
                p.normal_(0.0, 0.06)
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                p.normal_(0.0, 0.15)  # logits of a few nats: llama.cpp's 8-bit activations stay a small effect
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("gguf-engine")
    return {a: make_tiny(d / a, a) for a in ("llama", "qwen2", "qwen3")}


def plan(text: str):
    return parse_plan(text, where="<test>")


def mix_plan(mix: str) -> str:
    return f"rules:\n  - {{match: '.*', codec: mix}}\noutput: {{format: gguf, type: {mix}}}\ncheck: {{sequences: 2, seq_len: 32}}\n"


def ids_for(model_dir: Path, n: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    vocab = open_model(model_dir).config.vocab_size
    return torch.randint(0, vocab, (n, CTX), generator=g)


def reference_model(hf_dir: Path, path: Path):
    """The HF model with every weight the file quantizes replaced by qtool's encode -> decode of the *HF-layout*
    weight, with the ggml type the file holds for it: independent of how the writer lays the file out (names,
    q/k permutation, packing), so a layout mistake shows up as a difference from llama.cpp."""
    from transformers import AutoModelForCausalLM

    from qtool.formats.gguf_base import gguf_codec
    from qtool.io.arch import arch_of
    from qtool.io.gguf_model import tensor_namer

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    types = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(path).tensors}
    namer = tensor_namer(arch_of(model.config), model.config.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            t = types[namer(name)]
            if p.ndim == 2 and t != "f32":
                p.copy_(gguf_codec(t).encode(p.detach()).dequantize())
    return model


def compare_with_llama(path: Path, ids: torch.Tensor, hf_dir: Path | None = None) -> float:
    """Mean KL(qtool || llama.cpp) of the next-token distributions at the scored positions; qtool's side is
    `reference_model` (RTN files of `hf_dir`), else the file as qtool reads it back (`runtime/load.py`)."""
    theirs = llamacpp.logprobs(path, ids, threads=2).double()
    model = reference_model(hf_dir, path) if hf_dir is not None else load_model(path)[0]
    with torch.no_grad():
        logits = model(input_ids=ids).logits[:, CTX // 2:CTX - 1].double()
    ours = torch.log_softmax(logits, -1)
    return float((ours.exp() * (ours - theirs)).sum(-1).mean())


@needs_llama
@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_every_architecture_runs_in_llama_cpp(models, tmp_path, arch):
    out = tmp_path / "m.gguf"
    m = run(open_model(models[arch]), plan(mix_plan("Q4_K_M")), out)
    assert m.check is not None and m.check.kld < 1.5  # a tiny random model at ~4.5 bits: sane, not garbage
    r = gguf.GGUFReader(out)
    keys = set(r.fields)
    garch = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[arch]
    assert str(r.fields["general.architecture"].contents()) == garch
    for k in ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "attention.layer_norm_rms_epsilon"):
        assert f"{garch}.{k}" in keys
    for k in ("general.file_type", "general.quantization_version", "tokenizer.ggml.model", "tokenizer.ggml.tokens",
              "tokenizer.ggml.merges", "qtool.version", "qtool.plan_digest", "qtool.plan", "qtool.mix"):
        assert k in keys, k
    assert int(r.fields["general.file_type"].contents()) == 15
    names = {t.name for t in r.tensors}
    assert {"token_embd.weight", "output.weight", "output_norm.weight", "blk.1.ffn_down.weight"} <= names
    if arch == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= names
    if arch == "qwen3":
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= names
    assert compare_with_llama(out, ids_for(models[arch]), models[arch]) < TOL


@needs_llama
@pytest.mark.parametrize("mix", ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q5_K_S", "Q5_K_M", "Q6_K", "Q8_0",
                                 "Q4_0"])
def test_every_named_mix_runs_in_llama_cpp(models, tmp_path, mix):
    out = tmp_path / "m.gguf"
    run(open_model(models["llama"]), plan(mix_plan(mix)), out, check=False)
    assert compare_with_llama(out, ids_for(models["llama"]), models["llama"]) < TOL


@needs_llama
@pytest.mark.parametrize("gtype", GGUF_TYPES)
def test_every_type_runs_in_llama_cpp(models, tmp_path, gtype):
    """One ggml type for every quantized tensor (embeddings and head included), 256-aligned rows."""
    out = tmp_path / "m.gguf"
    text = f"rules:\n  - {{match: '.*', codec: {gtype}}}\noutput: {{format: gguf}}\n"
    run(open_model(models["llama"]), plan(text), out, check=False)
    types = {t.name: t.tensor_type.name.lower() for t in gguf.GGUFReader(out).tensors}
    assert types["blk.0.attn_q.weight"] == gtype and types["token_embd.weight"] == gtype
    assert types["blk.0.attn_norm.weight"] == "f32"
    assert compare_with_llama(out, ids_for(models["llama"]), models["llama"]) < TOL


def test_deterministic_and_atomic(models, tmp_path):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    p = plan(mix_plan("Q3_K_M"))
    m = run(open_model(models["llama"]), p, a)
    run(open_model(models["llama"]), p, b)
    assert a.read_bytes() == b.read_bytes()
    # the size predicted from the layout (what `qtool sensitivity` budgets with) is the size written
    assert m.total_bytes == a.stat().st_size and not [w for w in m.warnings if "predicted" in w]
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.gguf", "b.gguf"]  # no temporaries left


@pytest.mark.parametrize("arch, mix", [("llama", "Q4_K_M"), ("qwen2", "Q2_K"), ("qwen3", "Q5_K_S")])
def test_predicted_bytes_are_the_file_bytes(models, tmp_path, arch, mix):
    """`predict_gguf_bytes` (what `qtool sensitivity` budgets with) gives the written file's size exactly, from the
    plan and the codec of every quantized tensor, before any tensor is quantized."""
    from qtool.engine.sinks import predict_gguf_bytes
    from qtool.formats.gguf_base import gguf_codec
    from qtool.io.arch import arch_of

    p = plan(mix_plan(mix))
    out = tmp_path / "m.gguf"
    src = open_model(models[arch])
    m = run(src, p, out)
    shapes = {r.name: tuple(src.shape(r.name + ".weight")) for r in m.layers}
    fixed, _, bytes_of = predict_gguf_bytes(src, arch_of(src.config), p, shapes, "f32")
    assert fixed + sum(bytes_of(gguf_codec(r.codec), shapes[r.name]) for r in m.layers) == out.stat().st_size


def test_fallback_rows_choose_least_error_within_llama_cpp_size(tmp_path):
    """320-wide rows do not fit 256-blocks: every fallback tensor takes a candidate no larger than llama.cpp's."""
    from qtool.formats.gguf_mixes import type_bpw

    hf = make_tiny(tmp_path / "w320", "llama", hidden_size=320, intermediate_size=640, num_attention_heads=5,
                         num_key_value_heads=1, head_dim=64)
    out = tmp_path / "m.gguf"
    m = run(open_model(hf), plan(mix_plan("Q3_K_M")), out, check=False)
    notes = [r for r in m.layers if "falls back" in r.note]
    assert notes and all("chose" in r.note for r in notes)
    for r in notes:
        llama_type = r.note.split("falls back to ")[1].split(";")[0].strip().lower()
        assert type_bpw(r.codec) <= type_bpw(llama_type)


@needs_llama
def test_gptq_through_the_grids_runs_in_llama_cpp(models, tmp_path):
    """GPTQ through the k-quant grids (static act-order blocks) writes a file llama.cpp runs as qtool reads it
    (its error reduction is tested on correlated inputs in tests/methods/test_gptq_blocks.py)."""
    text = ("rules:\n  - {match: '.*', method: gptq, codec: mix, act_order: true}\noutput: {format: gguf, type: Q3_K_M}\n"
            "calibration: {source: generated, samples: 8, seq_len: 64}\ncheck: {sequences: 2, seq_len: 64}\n")
    out = tmp_path / "gptq.gguf"
    m = run(open_model(models["llama"]), plan(text), out)
    assert m.check.kld < 5  # a 2-layer random model with peaked attention at ~3.5 bits: finite, not NaN
    assert compare_with_llama(out, ids_for(models["llama"])) < TOL


@needs_llama
def test_awq_gptq_through_the_grids_runs_in_llama_cpp(models, tmp_path):
    """AWQ's scales (searched on the GGUF grids, folded into the norms and v/up rows) then GPTQ: the file llama.cpp
    runs is the model qtool reads back, so the folded float tensors were written with the quantized ones."""
    text = ("rules:\n  - {match: '.*', method: [awq, gptq], codec: mix, act_order: true}\n"
            "output: {format: gguf, type: Q4_K_M}\n"
            "calibration: {source: generated, samples: 8, seq_len: 64}\ncheck: {sequences: 2, seq_len: 64}\n")
    out = tmp_path / "awq.gguf"
    m = run(open_model(models["llama"]), plan(text), out)
    scaled = [t for t in m.transforms if t.kind == "awq" and t.linears]
    assert len(scaled) >= 4 and all(t.gain >= 1.0 for t in scaled)
    assert any(t.alpha is not None for t in scaled)  # some pair really was rescaled (else this proves nothing)
    assert m.check.kld < 5
    assert compare_with_llama(out, ids_for(models["llama"])) < TOL


def test_bad_input_leaves_nothing(models, tmp_path):
    from qtool.errors import ModelError, PlanError, UsageError

    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError, match="already exists"):
        run(open_model(models["llama"]), plan(mix_plan("Q4_K_M")), out)
    assert out.read_bytes() == b"keep me"
    with pytest.raises(PlanError, match="Q4_K_M"):
        plan("rules:\n  - {match: '.*', codec: mix}\noutput: {format: gguf, type: Q4_K_X}\n")
    with pytest.raises(PlanError, match="q4_k"):
        plan("rules:\n  - {match: '.*', codec: q4_kk}\noutput: {format: gguf}\n")
    bad = tmp_path / "trunc.gguf"
    good = tmp_path / "good.gguf"
    run(open_model(models["llama"]), plan(mix_plan("Q8_0")), good, check=False)
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ModelError, match="truncated"):
        open_model(bad)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["good.gguf", "m.gguf", "trunc.gguf"]


@needs_llama
def test_comparison_catches_a_layout_mistake(models, tmp_path, monkeypatch):
    """Negative control of the tolerance above: the same file without llama's q/k row permutation loads in
    llama.cpp but no longer matches qtool's (un-permuting) reading of it."""
    import qtool.io.gguf_model as gm

    p = plan("rules:\n  - {match: '.*', codec: f32}\noutput: {format: gguf}\n")
    good, bad = tmp_path / "good.gguf", tmp_path / "bad.gguf"
    run(open_model(models["llama"]), p, good, check=False)
    monkeypatch.setattr(gm, "permuted", lambda arch, cfg: {})
    run(open_model(models["llama"]), p, bad, check=False)
    ids = ids_for(models["llama"])
    assert compare_with_llama(good, ids, models["llama"]) < 1e-3
    assert compare_with_llama(bad, ids, models["llama"]) > 10 * TOL
