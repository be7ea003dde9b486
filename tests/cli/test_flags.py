"""Flag plans (`quantize --method ...`): same Plan and artifact as their YAML twins, --print-plan round trip,
one-line errors for invalid combinations, and the quality gate's exit status."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from qtool.cli.app import app
from qtool.flags import Flags, auto_group_size, plan_from_flags
from qtool.plan import parse_plan

ROOT = Path(__file__).resolve().parents[2]
CHECK_TEXT = ROOT / "qtool" / "data" / "check.txt"
CAL = f"calibration: {{source: '{CHECK_TEXT}', samples: 8, seq_len: 64, seed: 0}}\n"
CAL_FLAGS = ["--calib", CHECK_TEXT, "--samples", 8, "--seq-len", 64]

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


# (method flags, YAML twin): the tiny model's widths are 256/512, so the default group 128 stays 128
TWINS = {
    "rtn": ([], "rules:\n  - {match: '.*', method: rtn, bits: 4, group_size: 128, symmetric: false}\n"),
    "int8": ([], "rules:\n  - {match: '.*', bits: 8, group_size: channel, symmetric: true}\n"),
    "nf4": ([], "rules:\n  - {match: '.*', codec: nf4, block_size: 64, double_quant: true}\n"),
    "fp4": ([], "rules:\n  - {match: '.*', codec: fp4, block_size: 64, double_quant: true}\n"
                "output: {format: bnb}\n"),
    "gptq": (CAL_FLAGS, "rules:\n  - {match: '.*', method: gptq, bits: 4, group_size: 128, symmetric: false,"
                        " act_order: true, damp: 0.01}\n" + CAL),
    "awq": (CAL_FLAGS, "rules:\n  - {match: '.*', method: awq, bits: 4, group_size: 128}\n" + CAL),
    "awq-gptq": (CAL_FLAGS, "rules:\n  - {match: '.*', method: [awq, gptq], bits: 4, group_size: 128, act_order: true}\n"
                 + CAL),
    "hqq": ([], "rules:\n  - {match: '.*', method: hqq, bits: 4, group_size: 64}\n"),
    "smoothquant": (CAL_FLAGS, "rules:\n  - {match: '.*', method: [smoothquant, rtn], bits: 8, group_size: channel,"
                               " activations: int8, alpha: 0.5}\n" + CAL),
    "llm-int8": ([], "rules:\n  - {match: '.*', bits: 8, group_size: channel, activations: int8,"
                     " outlier_threshold: 6.0}\n"),
}


@pytest.mark.parametrize("method", list(TWINS))
def test_flag_plan_equals_its_yaml_twin_and_writes_the_same_bytes(method, tiny_llama, tmp_path):
    extra, twin = TWINS[method]
    (tmp_path / "twin.yaml").write_text(twin)
    r = invoke("quantize", tiny_llama, "--method", method, *extra, "--print-plan")
    assert r.exit_code == 0, r.output
    flag_plan = parse_plan(r.stdout)
    assert flag_plan.digest() == parse_plan(twin).digest(), r.stdout
    r1 = invoke("quantize", tiny_llama, "--method", method, *extra, "--out", tmp_path / "flags", "--no-check")
    assert r1.exit_code == 0, r1.output
    r2 = invoke("quantize", tiny_llama, "--plan", tmp_path / "twin.yaml", "--out", tmp_path / "yaml", "--no-check")
    assert r2.exit_code == 0, r2.output
    files = sorted(p.name for p in (tmp_path / "flags").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "yaml").iterdir())
    for f in files:
        assert (tmp_path / "flags" / f).read_bytes() == (tmp_path / "yaml" / f).read_bytes(), f


def test_print_plan_round_trip(tiny_llama, tmp_path):
    r = invoke("quantize", tiny_llama, "--method", "gptq", "--bits", 3, "--group-size", 64, "--ignore", "layers\\.0\\.",
               "--calib", CHECK_TEXT, "--print-plan")
    assert r.exit_code == 0, r.output
    (tmp_path / "p.yaml").write_text(r.stdout)
    again = invoke("quantize", tiny_llama, "--plan", tmp_path / "p.yaml", "--print-plan")
    assert again.exit_code == 0 and again.stdout == r.stdout
    plan = parse_plan(r.stdout)
    assert plan.rules[0].bits == 3 and plan.rules[0].group_size == 64 and plan.ignore == ("layers\\.0\\.",)
    assert plan.calibration.source == str(CHECK_TEXT)


def test_flags_override_a_plan_and_say_so(tiny_llama, tmp_path):
    (tmp_path / "p.yaml").write_text("rules:\n  - {match: '.*', bits: 4, group_size: 64, symmetric: true}\n")
    r = invoke("quantize", tiny_llama, "--plan", tmp_path / "p.yaml", "--bits", 8, "--asym", "--out", tmp_path / "q",
               "--no-check", "--json", tmp_path / "q.json")
    assert r.exit_code == 0, r.output
    notes = json.loads((tmp_path / "q.json").read_text())["plan_notes"]
    assert any("--bits overrides" in n and "4 -> 8" in n for n in notes), notes
    assert any("--sym/--asym overrides" in n for n in notes), notes
    assert "bits: 8" in (tmp_path / "q" / "qtool_plan.yaml").read_text()


def test_gptq_v1_format_turns_the_default_symmetric():
    fp = plan_from_flags(Flags(method="awq", format="gptq"), widths=[256, 512])
    assert fp.plan.rules[0].symmetric is True and fp.plan.output_format == "gptq"
    assert any("--format gptq (v1) holds symmetric codes only" in n for n in fp.notes)
    fp = plan_from_flags(Flags(method="awq", format="gptq_v2"), widths=[256, 512])
    assert fp.plan.rules[0].symmetric is False


def test_default_group_size_follows_the_model_widths():
    assert auto_group_size(128, [576, 1536]) == 64
    assert auto_group_size(128, [512, 1024]) == 128
    assert auto_group_size(128, [96]) == 32
    assert auto_group_size(128, [100]) == 0
    fp = plan_from_flags(Flags(method="awq"), widths=[576, 1536])
    assert fp.plan.rules[0].group_size == 64
    assert any("does not divide" in n and "576" in n for n in fp.notes)
    assert any("sampling it from the model" in n and "--calib" in n for n in fp.notes)


@pytest.mark.parametrize("args, message", [
    (["--method", "nf4", "--bits", 3], "--bits 3 does not apply to --method nf4"),
    (["--method", "hqq", "--format", "awq"], "--format awq cannot hold --method hqq; allowed: compressed-tensors"),
    (["--method", "rtn", "--group-size", 0], "--group-size 0: not a group size; allowed: 32, 64, 128, 256 or channel"),
    (["--method", "rtn", "--bits", 3, "--format", "awq"], "--format awq with --method rtn --bits 3: 'awq' holds int codes of 4 bits"),
    (["--method", "gptq", "--format", "bnb"], "--format bnb cannot hold --method gptq"),
    (["--method", "nf4", "--format", "gptq"], "--format gptq cannot hold --method nf4; allowed: bnb"),
    (["--method", "hqq", "--sym"], "--sym with --method hqq"),
    (["--method", "rtn", "--asym", "--format", "gptq"], "--format gptq with --method rtn --asym: 'gptq' (v1) stores zero-1"),
    (["--method", "int8", "--format", "awq"], "--format awq cannot hold --method int8; allowed: compressed-tensors, gptq"),
    (["--method", "int8", "--format", "gptq"], "'gptq' needs a group size (per-channel is not written by qtool) (set --group-size)"),
    (["--method", "int8", "--bits", 4], "--bits 4 with --method int8"),
    (["--method", "llm-int8", "--bits", 4], "--method llm-int8: LLM.int8 (bitsandbytes) is 8-bit"),
    (["--method", "llm-int8", "--format", "compressed-tensors"], "--format compressed-tensors cannot hold --method llm-int8"),
    (["--method", "smoothquant", "--asym"], "--asym with --method smoothquant"),
    (["--method", "smoothquant", "--format", "gptq"], "--format gptq cannot hold --method smoothquant"),
    (["--method", "rtn", "--calib", CHECK_TEXT], "--calib with --method rtn"),
    (["--method", "bogus"], "--method bogus: unknown; allowed: rtn, int8"),
    (["--method", "rtn", "--bits", 5], "--bits 5: allowed 2, 3, 4, 8"),
    (["--method", "rtn", "--format", "ggml"], "--format ggml: unknown"),
    (["--method", "rtn", "--format", "gguf", "--bits", "3"], "do not apply to --format gguf"),
    (["--method", "rtn", "--device", "cuda"], "--device cuda"),
    (["--bits", 4], "give --method"),
    (["--method", "rtn"], "--out DIR is required"),
    (["--method", "rtn", "--max-kld", 0.1, "--no-check"], "cannot be used with --no-check"),
])
def test_invalid_flag_combinations_fail_on_one_line(args, message, tiny_llama, tmp_path):
    extra = [] if "--out DIR" in message else ["--out", tmp_path / "q"]
    r = invoke("quantize", tiny_llama, *args, *extra)
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.stderr
    assert not (tmp_path / "q").exists()


def test_quality_gate_fails_a_bad_run_with_status_4_and_keeps_the_artifact(tiny_llama, tmp_path):
    r = invoke("quantize", tiny_llama, "--method", "rtn", "--bits", 2, "--group-size", 128, "--out", tmp_path / "bad",
               "--max-kld", 0.05, "--json", tmp_path / "bad.json")
    assert r.exit_code == 4, r.output
    assert "quality gate failed: KL divergence" in r.stderr and "> --max-kld 0.05" in r.stderr
    assert (tmp_path / "bad" / "model.safetensors").is_file()
    gate = json.loads((tmp_path / "bad.json").read_text())["gate"]
    assert gate["passed"] is False and gate["kld"] > 0.05 and gate["max_kld"] == 0.05
    r = invoke("quantize", tiny_llama, "--method", "int8", "--out", tmp_path / "good", "--max-kld", 0.05,
               "--min-same-top", 80, "--json", tmp_path / "good.json")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "good.json").read_text())["gate"]["passed"] is True


def test_eval_gate(tiny_llama, tmp_path):
    assert invoke("quantize", tiny_llama, "--method", "rtn", "--bits", 2, "--out", tmp_path / "q", "--no-check").exit_code == 0
    common = ["eval", tmp_path / "q", "--base", tiny_llama, "--text", CHECK_TEXT, "--ctx", 64, "--chunks", 4]
    r = invoke(*common, "--max-kld", 0.01, "--json", tmp_path / "e.json")
    assert r.exit_code == 4 and "quality gate failed" in r.stderr, r.output
    assert json.loads((tmp_path / "e.json").read_text())["gate"]["passed"] is False
    assert invoke(*common, "--max-kld", 100).exit_code == 0
    r = invoke("eval", tmp_path / "q", "--text", CHECK_TEXT, "--max-kld", 1)
    assert r.exit_code == 2 and "add --base" in r.stderr


def test_calibrated_method_without_data_warns_and_generates(tiny_llama, tmp_path):
    r = invoke("quantize", tiny_llama, "--method", "gptq", "--samples", 2, "--seq-len", 32, "--out", tmp_path / "q",
               "--no-check")
    assert r.exit_code == 0, r.output
    assert "WARNING" in r.stderr and "no calibration text given" in r.stderr and "--calib FILE" in r.stderr
    assert "source: generated" in (tmp_path / "q" / "qtool_plan.yaml").read_text()


def test_precision_flag_sets_the_calibration_precision(tiny_llama, tmp_path):
    r = invoke("quantize", tiny_llama, "--method", "gptq", *CAL_FLAGS, "--precision", "fp32", "--print-plan")
    assert r.exit_code == 0, r.output
    assert parse_plan(r.output).calibration.precision == "fp32"
    r = invoke("quantize", tiny_llama, "--method", "gptq", *CAL_FLAGS, "--print-plan")
    assert parse_plan(r.output).calibration.precision == "bf16"  # the default
    (tmp_path / "p.yaml").write_text("rules:\n  - {match: '.*', method: gptq, bits: 4, group_size: 64}\n" + CAL)
    r = invoke("quantize", tiny_llama, "--plan", tmp_path / "p.yaml", "--precision", "fp32", "--print-plan")
    assert r.exit_code == 0 and parse_plan(r.output).calibration.precision == "fp32", r.output


@pytest.mark.parametrize("args,msg", [
    (["--method", "gptq", "--precision", "fp16"], "--precision fp16: unknown; allowed: fp32, bf16"),
    (["--method", "rtn", "--precision", "fp32"], "apply to calibrated methods"),
])
def test_precision_flag_errors(tiny_llama, tmp_path, args, msg):
    r = invoke("quantize", tiny_llama, *args, "--out", tmp_path / "q")
    assert r.exit_code != 0 and msg in " ".join(r.output.split()), r.output
    assert not (tmp_path / "q").exists()
