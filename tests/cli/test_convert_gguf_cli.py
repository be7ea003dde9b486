"""`qtool convert-gguf` through the CLI: its plans, one-line errors with exit status 2/3, nothing left behind,
a whole run to a file llama.cpp's reader accepts, and `qtool eval` of that file."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest
import yaml
from typer.testing import CliRunner

from qtool.cli.app import app

runner = CliRunner()


def _plan(*args) -> dict:
    r = runner.invoke(app, ["convert-gguf", "unused-model", "--print-plan", *args])
    assert r.exit_code == 0, r.output
    return yaml.safe_load(r.stdout)


def test_print_plan_is_the_mix():
    p = _plan("--type", "q3_k_m")
    assert p["output"] == {"format": "gguf", "dtype": "auto", "type": "Q3_K_M"}
    assert p["rules"] == [{"match": ".*", "method": "rtn", "codec": "mix"}]
    assert "calibration" not in p  # no data: unweighted, like llama-quantize without an imatrix
    g = _plan("--method", "gptq", "--samples", "16")
    assert g["rules"][0]["method"] == "gptq" and g["rules"][0]["act_order"] is True
    assert g["calibration"]["samples"] == 16
    a = _plan("--method", "awq-gptq")
    assert a["rules"][0]["method"] == ["awq", "gptq"] and a["rules"][0]["act_order"] is True
    assert a["calibration"]["source"] == "generated"


@pytest.mark.parametrize("args, msg", [
    (["--type", "Q4_K_X", "--out", "x.gguf"], "known: Q4_0"),
    (["--out", "x.safetensors"], "ends in .gguf"),
    (["--method", "hqq", "--out", "x.gguf"], "allowed: rtn, gptq, awq, awq-gptq"),
    (["--imatrix", "missing.gguf", "--out", "x.gguf"], "file not found"),
    (["--calib", "a.txt", "--stats", "s", "--out", "x.gguf"], "pass one of them"),
    ([], "--out FILE.gguf is required"),
])
def test_usage_errors(tmp_path, args, msg):
    r = runner.invoke(app, ["convert-gguf", str(tmp_path / "nothing"), *args])
    assert r.exit_code == 2, r.output
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert list(tmp_path.iterdir()) == []


def test_imatrix_cannot_feed_calibrated_methods(tmp_path):
    (tmp_path / "m.imatrix").write_bytes(b"x")
    r = runner.invoke(app, ["convert-gguf", "unused", "--method", "awq", "--imatrix", str(tmp_path / "m.imatrix"),
                            "--out", str(tmp_path / "x.gguf")])
    assert r.exit_code == 2 and "full XᵀX" in r.stderr and not (tmp_path / "x.gguf").exists()


def test_convert_then_eval(tiny_llama, tmp_path):
    out = tmp_path / "m.gguf"
    r = runner.invoke(app, ["convert-gguf", str(tiny_llama), "--type", "Q8_0", "--out", str(out), "--json",
                            str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["output_format"] == "gguf" and res["total_bytes"] == out.stat().st_size
    assert {t.tensor_type.name for t in gguf.GGUFReader(out).tensors} == {"Q8_0", "F32"}
    again = runner.invoke(app, ["convert-gguf", str(tiny_llama), "--type", "Q8_0", "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.stderr  # refused without --force
    e = runner.invoke(app, ["eval", str(out), "--base", str(tiny_llama), "--chunks", "1", "--ctx", "64",
                            "--runtime", "torch", "--json", "-"])
    assert e.exit_code == 0, e.output
    ev = json.loads(e.stdout)
    assert ev["runtime"] == "torch" and 0 <= ev["kld_mean"] < 0.05


def test_truncated_gguf_source_is_refused(tiny_llama, tmp_path):
    good = tmp_path / "good.gguf"
    assert runner.invoke(app, ["convert-gguf", str(tiny_llama), "--type", "Q8_0", "--out", str(good),
                               "--no-check"]).exit_code == 0
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(good.read_bytes()[:5000])
    r = runner.invoke(app, ["convert-gguf", str(bad), "--type", "Q4_K_M", "--out", str(tmp_path / "o.gguf")])
    assert r.exit_code == 3 and "truncated" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf", "good.gguf"]


def test_unsupported_architecture_lists_supported(tmp_path, tiny_llama):
    import shutil

    d = tmp_path / "gpt2ish"
    shutil.copytree(tiny_llama, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    r = runner.invoke(app, ["convert-gguf", str(d), "--out", str(tmp_path / "o.gguf")])
    assert r.exit_code == 3 and "LlamaForCausalLM" in r.stderr and "Qwen3ForCausalLM" in r.stderr
    assert not (tmp_path / "o.gguf").exists()
