"""qtool.eval.llamacpp against llama.cpp's own tools, on conftest's tiny random Llama written as an F32 GGUF.

The tools come from tests/tools/build_llama_quantize.sh (`make llama-tools`), cached per CPU ISA under
~/.cache/qtool/llama.cpp/<version>-<isa>/bin, or $QTOOL_LLAMA_CPP_BIN; without them the tool tests skip, saying so.
"""

from __future__ import annotations

import math
import stat
import subprocess
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "calib"))
from gguf_tiny import hf_to_gguf  # noqa: E402

from qtool.errors import ModelError  # noqa: E402
from qtool.eval import llamacpp as L  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
PERPLEXITY, TOKENIZE, BENCH, QUANTIZE = (L.tool(n) for n in ("llama-perplexity", "llama-tokenize", "llama-bench",
                                                              "llama-quantize"))


def needs(exe, name):
    return pytest.mark.skipif(exe is None, reason=f"{name} not found: {L.BUILD_HINT}")


CTX = 64
EXACT = dict(kv_type="f32", flash_attn="off")  # llama.cpp's CPU flash attention works in F16
# max |llama.cpp - transformers float32| over the log-probs within 16 nats of each row's top, tiny model, ctx 64,
# 4 chunks, measured on the Xeon AVX-512 build: 1.5e-4 nats with EXACT (up to 1.23e-4 of it is the uint16 rounding
# of llama.cpp's logits file), 9.0e-3 with llama.cpp's defaults (flash attention on, F16 KV cache). Asserted 2-3x above.
TOL_EXACT, TOL_DEFAULT = 5e-4, 2e-2


@pytest.fixture(scope="module")
def tiny_gguf(tiny_llama, tmp_path_factory) -> Path:
    return hf_to_gguf(tiny_llama, tmp_path_factory.mktemp("llamacpp") / "tiny-f32.gguf")


@pytest.fixture(scope="module")
def hf_model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def ids(hf_model) -> torch.Tensor:
    """4 chunks of CTX ids sampled from the model itself (so targets are plausible tokens, not 40 nats down)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, hf_model.config.vocab_size, (4, 1), generator=g)
    with torch.no_grad():
        for _ in range(CTX - 1):
            p = torch.softmax(hf_model(input_ids=x).logits[:, -1].double(), -1)
            x = torch.cat([x, torch.multinomial(p, 1, generator=g)], 1)
    return x


def hf_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """transformers' float32 log-softmax at llama-perplexity's scored positions ctx//2 .. ctx-2, as float64."""
    ctx = ids.shape[1]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    return torch.log_softmax(logits[:, ctx // 2:ctx - 1].double(), dim=-1)


def in_range(lp: torch.Tensor) -> torch.Tensor:
    """Entries llama.cpp's file keeps to within rounding: within 16 nats of the row's top."""
    return lp > lp.max(-1, keepdim=True).values - L.LOGP_SPAN + 1e-3


# ---------------------------------------------------------------------------------------------- no tools needed

def test_isa_tag_matches_build_script():
    out = subprocess.run(["bash", str(ROOT / L.BUILD_SCRIPT), "--print-isa"], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out[0] == L.isa_tag()
    if out[0].startswith("avx"):
        assert "-DGGML_AMX_TILE=OFF" in out and "-DGGML_AVX2=ON" in out
    assert not any(f.startswith("-DGGML_AMX") and f.endswith("=ON") for f in out)


def test_isa_tag_rule():
    avx2 = {"sse4_2", "avx", "avx2", "fma", "f16c", "bmi2"}
    avx512 = avx2 | {"avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"}
    assert L.isa_tag(set(), "x86_64") == "base"
    assert L.isa_tag(avx2 - {"bmi2"}, "x86_64") == "base"
    assert L.isa_tag(avx2 | {"avx512f", "amx_tile"}, "x86_64") == "avx2"
    assert L.isa_tag(avx512, "x86_64") == "avx512"
    assert L.isa_tag(avx512 | {"avx512_vnni", "avx512_bf16", "amx_tile"}, "x86_64") == "avx512-vnni-bf16"
    assert L.isa_tag(avx512 | {"avx512_vbmi", "avx512_vnni", "avx512_bf16"}, "x86_64") == "avx512-vbmi-vnni-bf16"
    assert L.isa_tag(avx512, "aarch64") == "aarch64"


def test_tool_lookup(tmp_path, monkeypatch):
    exe = tmp_path / "llama-perplexity"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("QTOOL_LLAMA_CPP_BIN", str(tmp_path))
    assert L.tool("llama-perplexity") == exe
    assert L.tool("llama-bench") is None  # an explicit directory is the only place looked at
    with pytest.raises(L.LlamaCppError, match="make llama-tools"):
        L.require("llama-bench")
    monkeypatch.delenv("QTOOL_LLAMA_CPP_BIN")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert L.cache_bin_dir() == tmp_path / "cache/qtool/llama.cpp" / f"{L.LLAMA_CPP_VERSION}-{L.isa_tag()}/bin"


def test_run_reports_silent_failures_and_timeouts(tmp_path):
    fake = tmp_path / "llama-fake"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = sleep ]; then sleep 30; fi\necho out; exit 3\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    with pytest.raises(L.LlamaCppError, match=r"(?s)failed \(exit status 3\).*command: .*llama-fake x.*no error message"):
        L._run([fake, "x"], timeout=10, what="fake")
    with pytest.raises(L.LlamaCppError, match="timed out after 1s"):
        L._run([fake, "sleep"], timeout=1, what="fake")


@pytest.mark.parametrize("n_vocab", [2, 384, 32000, 49152, 151936, 262144])
def test_test_vocab_codes_hash_to_ids(n_vocab):
    """The 5-byte codes hash (llama-vocab.cpp, LLAMA_VOCAB_TYPE_TEST) to every id, with no escape/newline bytes."""
    codes = L._codes(n_vocab)
    h = np.zeros(n_vocab, dtype=np.uint64)
    for i in range(5):
        h = h * 31 + codes[:, i].astype(np.uint64)
    assert np.array_equal(h % n_vocab, np.arange(n_vocab))
    assert codes.min() >= 0x5D and codes.max() <= 0x7B  # never '\\', '\n', '<'
    assert len(L.ids_to_test_text(torch.tensor([[1, 0], [1, 1]]), n_vocab)) == 20


def test_logits_file_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 385, (3, 10), generator=g)
    lp = torch.log_softmax(torch.randn(3, L.n_scored(10), 385, generator=g, dtype=torch.float64) * 5, -1)
    path = L.write_kld_base(tmp_path / "base.bin", ids, lp)
    assert path.stat().st_size == 20 + 4 * 30 + 2 * 3 * 4 * (2 * 193 + 4)  # odd n_vocab: one pad word per row
    got = L.read_kld_base(path)
    assert (got.ctx, got.n_vocab) == (10, 385) and torch.equal(got.tokens, ids)
    err = (got.logprobs.double() - lp).abs()
    keep = in_range(lp)
    assert err[keep].max() < 1.25e-4  # scale/2 = 16/65535/2 = 1.22e-4, plus float32 rounding
    floor = lp.max(-1, keepdim=True).values - L.LOGP_SPAN
    assert torch.allclose(got.logprobs.double()[~keep], floor.expand_as(lp)[~keep], atol=1e-3)  # clamped up
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 2)
    with pytest.raises(L.LlamaCppError, match="expected"):
        L.read_kld_base(path)


def test_parse_kld_chunk_lines_only():
    """Fewer than 100 scored positions: llama.cpp prints no summary, the last chunk line is the result."""
    text = ("chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS"
            "            Same top p\n"
            "   1     412.1234 ±   21.4321      0.01234 ±    0.00321      0.02345 ±    0.00123     1.234 ±  0.100 %"
            "    93.548 ±  4.412 %\n"
            "   2     400.0000 ±   15.0000      0.01000 ±    0.00200      0.02000 ±    0.00100     1.000 ±  0.050 %"
            "    95.161 ±  2.741 %\n")
    r = L.parse_kld_output(text, ctx=64, n_chunks=2)
    assert (r.ppl, r.kld_mean, r.same_top_pct, r.rms_dp_pct, r.n_chunks) == (400.0, 0.02, 95.161, 1.0, 2)
    assert r.kld_p99 is None and r.n_tokens_scored == 62


def test_truncated_gguf_is_refused_before_any_tool(tiny_gguf, tmp_path):
    data = tiny_gguf.read_bytes()
    for cut in (len(data) - 1000, 3000, 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(ModelError, match="truncated|not a GGUF"):
            L._gguf_meta(bad)
    assert L._n_vocab(tiny_gguf) == 384


# ---------------------------------------------------------------------------------------------- with llama.cpp

@needs(PERPLEXITY, "llama-perplexity")
def test_logprobs_match_transformers(tiny_gguf, hf_model, ids):
    ref = hf_logprobs(hf_model, ids)
    keep = in_range(ref)
    for opts, tol in ((EXACT, TOL_EXACT), ({}, TOL_DEFAULT)):
        got = L.logprobs(tiny_gguf, ids, threads=2, **opts)
        assert got.dtype == torch.float32 and got.shape == (4, L.n_scored(CTX), 384)
        err = (got.double() - ref)[keep].abs().max().item()
        print(f"{opts or 'llama.cpp defaults'}: max |llama.cpp - transformers| = {err:.2e}")
        assert err < tol, f"{opts}: {err}"
        assert (got.argmax(-1) == ref.argmax(-1)).double().mean() > 0.98  # near-ties may flip
    one = L.logprobs(tiny_gguf, ids[1:2], threads=2, **EXACT)  # a single chunk (padded for llama.cpp)
    assert one.shape == (1, L.n_scored(CTX), 384)
    assert (one[0].double() - ref[1])[keep[1]].abs().max() < TOL_EXACT
    rand = torch.randint(0, 384, (2, 16), generator=torch.Generator().manual_seed(3))  # any ids, not only likely ones
    ref = hf_logprobs(hf_model, rand)
    assert (L.logprobs(tiny_gguf, rand, **EXACT).double() - ref)[in_range(ref)].abs().max() < TOL_EXACT


@needs(TOKENIZE, "llama-tokenize")
def test_tokenize_matches_hf(tiny_gguf, tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    text = resources.files("qtool").joinpath("data/check.txt").read_text()
    for sample in (text[:1500], "Hello world, 12 apples!\n  Tabs\tand  spaces.", "x"):
        assert L.tokenize(tiny_gguf, sample) == tok(sample, add_special_tokens=False).input_ids, sample[:40]
    assert L.tokenize(tiny_gguf, "") == []
    assert L.tokenize(tiny_gguf, "Hello", add_bos=True) == tok("Hello", add_special_tokens=False).input_ids  # no add_bos


@needs(BENCH, "llama-bench")
def test_bench_reports_rates(tiny_gguf):
    r = L.bench(tiny_gguf, n_prompt=64, n_gen=16, reps=1, threads=2)
    assert r.prompt_tps > 0 and r.gen_tps > 0
    assert (r.n_prompt, r.n_gen, r.threads) == (64, 16, 2)


@needs(PERPLEXITY, "llama-perplexity")
def test_truncated_gguf_fails_fast_in_llama_cpp(tiny_gguf, tmp_path):
    """Past our own check: llama.cpp itself must exit with an error on a truncated file, not hang."""
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(tiny_gguf.read_bytes()[:-4096])
    text = tmp_path / "t.txt"
    text.write_text("hello " * 100)
    with pytest.raises(L.LlamaCppError, match="failed|model"):
        L._run([PERPLEXITY, "-m", bad, "-f", text, "-c", 16, "-b", 16], timeout=120, what="truncated")
    with pytest.raises(ModelError, match="truncated"):
        L.logprobs(bad, torch.zeros(2, 8, dtype=torch.long))


@needs(PERPLEXITY, "llama-perplexity")
@needs(QUANTIZE, "llama-quantize")
def test_perplexity_kld_matches_python(tiny_gguf, hf_model, ids, tmp_path):
    """Base = transformers' log-probs in llama.cpp's file format; model = a Q4_K_M of the same weights.

    llama.cpp's KLD uses the model's float log-softmax, ours `logprobs` (uint16-rounded, +-1.23e-4 nats): measured
    |difference| 1.2e-5 on a KLD of 0.52 (asserted < 5e-5).
    """
    q = tmp_path / "q4km.gguf"
    L._run([QUANTIZE, tiny_gguf, q, "Q4_K_M", 2], timeout=300, what="quantize")
    base = L.write_kld_base(tmp_path / "base.bin", ids, hf_logprobs(hf_model, ids))
    r = L.perplexity_kld(q, base, threads=2)

    lpb = L.read_kld_base(base).logprobs.double()  # what llama.cpp reads back
    lq = L.logprobs(q, ids, threads=2).double()  # same (default) settings as perplexity_kld
    targets = ids[:, CTX // 2 + 1:, None]
    assert (lq.gather(-1, targets) > lq.max(-1, keepdim=True).values - 15).all()  # targets are not clamped
    pb = torch.where(lpb > -16, lpb.exp(), torch.zeros_like(lpb))
    kld = (pb * (lpb - lq)).sum(-1).mean().item()
    ppl = math.exp(-lq.gather(-1, targets).mean().item())
    base_ppl = math.exp(-lpb.gather(-1, targets).mean().item())
    same_top = 100 * (lq.argmax(-1) == lpb.argmax(-1)).double().mean().item()
    print(f"llama.cpp: {r}\npython: kld {kld:.6f} ppl {ppl:.4f} base {base_ppl:.4f} same-top {same_top:.3f}")
    assert r.n_tokens_scored == ids.shape[0] * L.n_scored(CTX) == 124 and r.kld_p99 is not None  # summary printed
    assert r.kld_mean > 1e-2  # a real difference to agree on
    assert abs(r.kld_mean - kld) < 5e-5
    assert abs(r.ppl / ppl - 1) < 1e-4 and abs(r.base_ppl / base_ppl - 1) < 1e-6
    assert abs(r.same_top_pct - same_top) <= 100 * 1 / 124 + 1e-3  # a near-tie may flip between the roundings

    same = L.perplexity_kld(tiny_gguf, base, threads=2, **EXACT)  # the F32 GGUF is the base model itself
    assert abs(same.kld_mean) < 1e-5 and same.same_top_pct == 100.0
