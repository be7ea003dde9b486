"""`qtool calibrate` and `quantize --stats` through the CLI: files written, reuse, and refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from conftest import make_tiny_llama
from typer.testing import CliRunner

from qtool.cli.app import app

ROOT = Path(__file__).resolve().parents[2]
CHECK_TEXT = ROOT / "qtool" / "data" / "check.txt"
AWQ = "rules:\n  - {match: '.*', method: awq, bits: 4, group_size: 64}\n"

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def _calibrate(model, out, *extra):
    return invoke("calibrate", model, "--data", CHECK_TEXT, "--samples", 8, "--seq-len", 64, "--out", out, *extra)


def test_calibrate_writes_stats_and_quantize_reuses_them(tiny_llama, tmp_path):
    r = _calibrate(tiny_llama, tmp_path / "stats", "--json", tmp_path / "cal.json")
    assert r.exit_code == 0, r.output
    summary = json.loads((tmp_path / "cal.json").read_text())
    # 2 blocks x 7 linears reading 4 inputs each, + the output head (its input: the final norm's output)
    assert summary["tokens"] == 8 * 64 and summary["linears"] == 15 and summary["inputs"] == 9
    man = json.loads((tmp_path / "stats" / "manifest.json").read_text())
    assert man["calibration"]["samples"] == 8 and len(man["calibration"]["data_digest"]) == 64
    from safetensors.torch import load_file

    flat = load_file(tmp_path / "stats" / "stats.safetensors")
    h = flat["model.layers.0.mlp.down_proj.hessian"]
    assert h.shape == (512, 512) and torch.allclose(h, h.T) and torch.linalg.eigvalsh(h.double()).min() > -1e-6
    assert torch.allclose(flat["model.layers.0.mlp.down_proj.sq_mean"], h.diagonal())
    assert (flat["model.layers.1.self_attn.q_proj.absmax"] >= flat["model.layers.1.self_attn.q_proj.abs_mean"]).all()
    # byte-identical on a rerun
    assert _calibrate(tiny_llama, tmp_path / "stats2").exit_code == 0
    assert (tmp_path / "stats" / "stats.safetensors").read_bytes() == (tmp_path / "stats2" / "stats.safetensors").read_bytes()

    plan = tmp_path / "awq.yaml"
    plan.write_text(AWQ)
    r = invoke("quantize", tiny_llama, "--plan", plan, "--stats", tmp_path / "stats", "--out", tmp_path / "q",
               "--json", tmp_path / "q.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "q.json").read_text())["transforms"]


def test_stats_of_another_model_are_refused(tiny_llama, tmp_path):
    other = make_tiny_llama(tmp_path / "other", seed=7)
    assert _calibrate(other, tmp_path / "stats").exit_code == 0
    plan = tmp_path / "awq.yaml"
    plan.write_text(AWQ)
    r = invoke("quantize", tiny_llama, "--plan", plan, "--stats", tmp_path / "stats", "--out", tmp_path / "q")
    assert r.exit_code == 2, r.output
    assert "another model" in r.stderr and "model digest" in r.stderr
    assert not (tmp_path / "q").exists()


def test_stats_of_another_calibration_spec_are_refused(tiny_llama, tmp_path):
    assert _calibrate(tiny_llama, tmp_path / "stats").exit_code == 0
    plan = tmp_path / "awq.yaml"
    plan.write_text(AWQ + f"calibration: {{source: '{CHECK_TEXT}', samples: 16, seq_len: 64}}\n")
    r = invoke("quantize", tiny_llama, "--plan", plan, "--stats", tmp_path / "stats", "--out", tmp_path / "q")
    assert r.exit_code == 2 and "samples: stats 8 vs plan 16" in r.stderr, r.output


def test_corrupt_or_missing_stats_are_refused_before_work(tiny_llama, tmp_path):
    plan = tmp_path / "awq.yaml"
    plan.write_text(AWQ)
    r = invoke("quantize", tiny_llama, "--plan", plan, "--stats", tmp_path / "nope", "--out", tmp_path / "q")
    assert r.exit_code == 2 and "not a qtool stats directory" in r.stderr
    assert _calibrate(tiny_llama, tmp_path / "stats").exit_code == 0
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "stats", bad)
    data = (bad / "stats.safetensors").read_bytes()
    (bad / "stats.safetensors").write_bytes(data[: len(data) // 2])
    r = invoke("quantize", tiny_llama, "--plan", plan, "--stats", bad, "--out", tmp_path / "q")
    assert r.exit_code == 3 and "stats.safetensors" in r.stderr, r.output
    assert not (tmp_path / "q").exists()


def test_calibrate_bad_input(tiny_llama, tmp_path):
    r = invoke("calibrate", tiny_llama, "--data", tmp_path / "missing.txt", "--out", tmp_path / "s")
    assert r.exit_code == 2 and "file not found" in r.stderr
    short = tmp_path / "short.txt"
    short.write_text("a few words")
    r = invoke("calibrate", tiny_llama, "--data", short, "--seq-len", 64, "--out", tmp_path / "s")
    assert r.exit_code == 2 and "fewer than one sample" in r.stderr
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "fine"}\nnot json\n')
    r = invoke("calibrate", tiny_llama, "--data", jl, "--out", tmp_path / "s")
    assert r.exit_code == 2 and "d.jsonl:2: not valid JSON" in r.stderr
    r = invoke("calibrate", tiny_llama, "--data", CHECK_TEXT, "--out", tmp_path / "s", "--imatrix", tmp_path / "x.bin")
    assert r.exit_code == 2 and "*.gguf" in r.stderr
    assert not (tmp_path / "s").exists()


def test_calibrate_reads_jsonl(tiny_llama, tmp_path):
    lines = CHECK_TEXT.read_text().split("\n\n")
    jl = tmp_path / "d.jsonl"
    jl.write_text("".join(json.dumps({"text": t}) + "\n" for t in lines if t.strip()))
    r = invoke("calibrate", tiny_llama, "--data", jl, "--samples", 4, "--seq-len", 64, "--out", tmp_path / "s")
    assert r.exit_code == 0, r.output


def test_calibrate_precision_is_recorded_and_changes_the_statistics(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    from qtool.calib.precision import bf16_supported

    assert _calibrate(tiny_llama, tmp_path / "s32", "--precision", "fp32").exit_code == 0
    assert _calibrate(tiny_llama, tmp_path / "s16").exit_code == 0  # default bf16
    man = lambda d: json.loads((tmp_path / d / "manifest.json").read_text())["calibration"]  # noqa: E731
    assert man("s32")["precision"] == "fp32" and man("s16")["precision"] == "bf16"
    a = load_file(tmp_path / "s32" / "stats.safetensors")
    b = load_file(tmp_path / "s16" / "stats.safetensors")
    key = "model.layers.1.mlp.down_proj.hessian"
    rel = ((a[key] - b[key]).norm() / a[key].norm()).item()
    assert rel < 2e-2 and (rel > 0 or not bf16_supported()), rel
    r = _calibrate(tiny_llama, tmp_path / "bad", "--precision", "fp16")
    assert r.exit_code != 0 and "allowed: fp32, bf16" in r.output and not (tmp_path / "bad").exists()
    r = invoke("quantize", tiny_llama, "--method", "gptq", "--stats", tmp_path / "s32", "--precision", "fp32",
               "--out", tmp_path / "q")
    assert r.exit_code != 0 and "--stats replaces" in " ".join(r.output.split()), r.output
