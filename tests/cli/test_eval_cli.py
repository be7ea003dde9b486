"""`qtool eval` end to end: numbers a reference can check, the base cache, generated text, bad input."""

import json
from importlib import resources

import pytest
import torch
from typer.testing import CliRunner

from qtool.cli.app import app
from qtool.engine.run import run
from qtool.io.source import open_model
from qtool.plan import parse_plan

runner = CliRunner()


@pytest.fixture(scope="module")
def int8_artifact(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "int8"
    run(open_model(tiny_llama), parse_plan("rules:\n  - {match: '.*', bits: 8, group_size: channel}\n"), out,
        check=False)
    return out


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("text") / "eval.txt"
    p.write_text(resources.files("qtool").joinpath("data/check.txt").read_text() * 2)
    return p


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QTOOL_CACHE_DIR", str(tmp_path / "cache"))


def _eval(*args):
    r = runner.invoke(app, ["eval", *map(str, args)])
    return r, (json.loads(r.stdout) if r.exit_code == 0 and "--json" in args else None)


def test_eval_against_base_reports_ppl_kld_same_top(int8_artifact, tiny_llama, text_file):
    r, res = _eval(int8_artifact, "--base", tiny_llama, "--text", text_file, "--ctx", 64, "--chunks", 6,
                   "--json", "-")
    assert r.exit_code == 0, r.output
    assert res["n_chunks"] == 6 and res["ctx"] == 64 and res["n_tokens_scored"] == 6 * 31
    assert 0 < res["kld_mean"] < 0.05 and res["same_top_pct"] > 85
    assert res["ppl"] == pytest.approx(res["base_ppl"], rel=0.1)
    assert res["bits_per_weight"] > 8 and res["size_bytes"] > 0


def test_ppl_matches_an_independent_reference(tiny_llama, text_file):
    """PPL from the CLI equals exp(mean NLL) of the second half of each chunk computed directly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    r, res = _eval(tiny_llama, "--text", text_file, "--ctx", 64, "--chunks", 3, "--json", "-")
    assert r.exit_code == 0, r.output
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    ids = tok(text_file.read_text(), add_special_tokens=False, return_tensors="pt").input_ids[0]
    nll = []
    with torch.no_grad():
        for c in range(3):
            chunk = ids[c * 64:(c + 1) * 64]
            logits = model(chunk[None]).logits[0]
            lp = torch.log_softmax(logits.double(), -1)
            nll += [-lp[i, chunk[i + 1]].item() for i in range(32, 63)]
    assert res["ppl"] == pytest.approx(torch.tensor(nll).mean().exp().item(), rel=1e-4)


def test_model_against_itself_has_zero_kld(tiny_llama, text_file):
    r, res = _eval(tiny_llama, "--base", tiny_llama, "--text", text_file, "--ctx", 64, "--chunks", 2,
                   "--json", "-")
    assert r.exit_code == 0, r.output
    assert res["kld_mean"] == pytest.approx(0, abs=1e-4) and res["same_top_pct"] == 100


def test_without_text_scores_seeded_generated_text(int8_artifact, tiny_llama):
    a, ra = _eval(int8_artifact, "--base", tiny_llama, "--ctx", 32, "--chunks", 2, "--json", "-")
    b, rb = _eval(int8_artifact, "--base", tiny_llama, "--ctx", 32, "--chunks", 2, "--json", "-")
    assert a.exit_code == 0, a.output
    assert "no --text given" in a.stderr and "seed 0" in ra["text"]
    assert ra["ppl"] == rb["ppl"] and ra["kld_mean"] == rb["kld_mean"]  # same seed, same text, same numbers


@pytest.mark.parametrize("args, code, needle", [
    (["MODEL", "--text", "/nonexistent/t.txt"], 2, "evaluation text not found"),
    (["/nonexistent/model"], 3, "no such file or directory"),
    (["MODEL", "--base", "/nonexistent/base"], 3, "no such file or directory"),
    (["MODEL", "--json", "/nonexistent/dir/r.json"], 2, "does not exist"),
])
def test_bad_input_one_line_error(tiny_llama, args, code, needle):
    args = [str(tiny_llama) if a == "MODEL" else a for a in args]
    r = runner.invoke(app, ["eval", *args])
    assert r.exit_code == code, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


def test_text_shorter_than_one_chunk_is_a_clear_error(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    r = runner.invoke(app, ["eval", str(tiny_llama), "--text", str(short), "--ctx", 512])
    assert r.exit_code == 2, r.output
    assert "512" in r.stderr and "error:" in r.stderr
