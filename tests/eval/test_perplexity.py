"""qtool.eval.perplexity against straightforward references, on the tiny random Llama."""

from __future__ import annotations

import copy
import math
from importlib import resources

import numpy as np
import pytest
import torch

from qtool.errors import UsageError
from qtool.eval.perplexity import (
    BaseLogits,
    EvalResult,
    _decode_rows,
    _encode_rows,
    bos_token_for,
    default_cache_dir,
    evaluate,
    generate_text,
    tokenize_text,
)

CTX = 64


@pytest.fixture(scope="module")
def model(tiny_llama):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="module")
def tokens(model):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, model.config.vocab_size, (3 * CTX + 17,), generator=g)


def noisy(model, a=0.3):
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("proj.weight"):
                p += a * p.std() * torch.randn(p.shape, generator=g)
    return m


def full_logits(model, tokens, n, bos=None):
    """Reference: every chunk through the model on its own, all positions, float64."""
    x = tokens[: n * CTX].view(n, CTX).clone()
    if bos is not None:
        x[:, 0] = bos
    with torch.no_grad():
        return torch.stack([model(input_ids=x[i:i + 1]).logits[0] for i in range(n)]).double()


def reference_nll(model, tokens, n, bos=None):
    logits = full_logits(model, tokens, n, bos)
    y = tokens[: n * CTX].view(n, CTX)
    h = CTX // 2
    return torch.cat([torch.nn.functional.cross_entropy(logits[i, h:CTX - 1], y[i, h + 1:], reduction="none")
                      for i in range(n)])


@pytest.mark.parametrize("bos", [None, 0])
def test_ppl_is_exp_mean_nll_of_second_halves(model, tokens, bos):
    r = evaluate(model, tokens, ctx=CTX, bos_token_id=bos)
    nll = reference_nll(model, tokens, 3, bos)
    assert (r.n_chunks, r.ctx, r.n_tokens_scored) == (3, CTX, 3 * (CTX // 2 - 1)) == (3, CTX, nll.numel())
    assert r.ppl == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    se = math.exp(nll.mean().item()) * nll.std().item() / math.sqrt(nll.numel())  # llama.cpp's estimate
    assert r.ppl_stderr == pytest.approx(se, rel=1e-3)
    assert r.kld_mean is None and r.same_top_pct is None and r.base_ppl is None


def test_batched_equals_unbatched_and_progress(model, tokens):
    steps = []
    one = evaluate(model, tokens, ctx=CTX, progress=steps.append)
    two = evaluate(model, tokens, ctx=CTX, batch_size=2)
    assert sum(steps) == 3
    assert two.ppl == pytest.approx(one.ppl, rel=1e-6)


def test_kld_against_itself_is_zero(model, tokens, tmp_path):
    base = BaseLogits.get_or_build(model, tokens, digest="tiny", ctx=CTX, cache_dir=tmp_path)
    r = evaluate(model, tokens, ctx=CTX, base=base)
    assert 0 <= r.kld_mean < 1e-6 and r.kld_p99 < 1e-6
    assert r.same_top_pct == 100.0
    assert r.base_ppl == pytest.approx(r.ppl, rel=1e-9)
    assert set(r.to_json()) == {f.name for f in EvalResult.__dataclass_fields__.values()}


def test_kld_against_perturbed_matches_float64(model, tokens, tmp_path):
    base = BaseLogits.get_or_build(model, tokens, digest="tiny", ctx=CTX, cache_dir=tmp_path)
    other = noisy(model)
    r = evaluate(other, tokens, ctx=CTX, base=base)
    h = CTX // 2
    lb, lo = full_logits(model, tokens, 3)[:, h:CTX - 1], full_logits(other, tokens, 3)[:, h:CTX - 1]
    lp, lq = torch.log_softmax(lb, -1), torch.log_softmax(lo, -1)
    kl = (lp.exp() * (lp - lq)).sum(-1).flatten()
    assert kl.mean() > 1e-3
    # uint16 codes, step <= 5e-4 nats: the cached KLD is exact to ~1e-5 relative
    assert r.kld_mean == pytest.approx(kl.mean().item(), rel=1e-4, abs=1e-7)
    assert r.kld_p99 == pytest.approx(np.quantile(kl.numpy(), 0.99), rel=1e-3)
    assert r.kld_stderr == pytest.approx(kl.std().item() / math.sqrt(kl.numel()), rel=1e-3)
    same = (lb.argmax(-1) == lo.argmax(-1)).double().mean().item() * 100
    assert r.same_top_pct == pytest.approx(same) and r.same_top_pct < 100
    assert r.base_ppl == pytest.approx(math.exp(reference_nll(model, tokens, 3).mean().item()), rel=1e-5)


def test_cache_is_reused_and_keyed(model, tokens, tmp_path):
    loads, calls = [], []

    def loader():
        loads.append(1)
        m = copy.deepcopy(model)
        m.register_forward_hook(lambda *a: calls.append(1))
        return m

    a = BaseLogits.get_or_build(loader, tokens, digest="tiny", ctx=CTX, cache_dir=tmp_path)
    assert (len(loads), len(calls)) == (1, 3)
    b = BaseLogits.get_or_build(loader, tokens, digest="tiny", ctx=CTX, cache_dir=tmp_path)
    assert (len(loads), len(calls)) == (1, 3) and b.key == a.key and b.ppl == a.ppl
    assert isinstance(b.data, np.memmap)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{a.key}.json", f"{a.key}.npy"]  # no tmp leftovers
    assert b.nbytes == b.data.nbytes + 128
    keys = {BaseLogits.make_key("tiny", tokens, CTX, 3),
            BaseLogits.make_key("tiny", tokens, CTX, 2),
            BaseLogits.make_key("tiny", tokens, CTX // 2, 3),
            BaseLogits.make_key("tiny", tokens[1:], CTX, 3),
            BaseLogits.make_key("other", tokens, CTX, 3),
            BaseLogits.make_key("tiny", tokens, CTX, 3, bos_token_id=0)}
    assert len(keys) == 6 and a.key in keys
    with pytest.raises(ValueError, match="built for"):
        evaluate(model, tokens, ctx=CTX, n_chunks=2, base=a)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QTOOL_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path / "eval"
    monkeypatch.delenv("QTOOL_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_cache_dir().parts[-3:] == (".cache", "qtool", "eval")


def test_row_codes_roundtrip():
    lp = torch.log_softmax(torch.randn(5, 1000, dtype=torch.float64) * 8, -1)
    lp[1] = -math.log(1000)  # uniform row: zero range
    dec, top = _decode_rows(_encode_rows(lp, lp.argmax(-1)))
    assert torch.equal(top, lp.argmax(-1))
    assert torch.isfinite(dec).all()
    kl = (dec.exp() * (dec - lp)).sum(-1)
    assert (kl.abs() < 1e-7).all()


def test_chunk_count_and_short_text(model, tokens):
    r = evaluate(model, tokens, ctx=CTX, n_chunks=100)
    assert r.n_chunks == 3
    assert evaluate(model, tokens, ctx=CTX, n_chunks=2).n_tokens_scored == 2 * (CTX // 2 - 1)
    with pytest.raises(UsageError, match=r"has 50 tokens.*ctx=64"):
        evaluate(model, tokens[:50], ctx=CTX)


def test_tokenize_text_has_no_special_tokens(tok):
    text = resources.files("qtool").joinpath("data/check.txt").read_text()[:2000]
    ids = tokenize_text(tok, text)
    assert ids.dtype == torch.long and ids.ndim == 1 and ids.numel() > 100
    assert tok.bos_token_id not in ids.tolist()
    assert ids.tolist() == tok.encode(text, add_special_tokens=False)
    assert bos_token_for(tok) is None  # this tokenizer adds no BOS by default


def test_generate_text_is_seeded(model, tok):
    a = generate_text(model, tok, 48, seed=1, seq_len=16, batch_size=2)
    b = generate_text(model, tok, 48, seed=1, seq_len=16, batch_size=2)
    c = generate_text(model, tok, 48, seed=2, seq_len=16, batch_size=2)
    assert a == b and a != c
    assert len(a.split("\n\n")) >= 3 and "<|endoftext|>" not in a
