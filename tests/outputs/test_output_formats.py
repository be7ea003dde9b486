"""Output-format objects (`qtool/outputs`): one per format, registered by name; what each holds is written once
and asked by the plan (file, line, field), the flags (naming flags) and the loader; exact per-tensor byte sizes."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from qtool.cli.app import app
from qtool.errors import PlanError
from qtool.flags import PRESETS, formats_of
from qtool.outputs import HF_FORMATS, OUTPUT_FORMATS, output_format, reader
from qtool.plan import FORMATS, Rule, parse_plan

runner = CliRunner()


def test_registry():
    assert tuple(OUTPUT_FORMATS) == FORMATS == ("compressed-tensors", "gptq", "gptq_v2", "awq", "bnb", "gguf")
    assert HF_FORMATS == FORMATS[:-1]
    assert reader("gptq") is output_format("gptq") and reader("awq").name == "awq"
    assert reader("bitsandbytes").name == "bnb" and reader("compressed-tensors").name == "compressed-tensors"
    assert reader("marlin") is None and output_format("gguf").quant_method is None


def test_which_formats_hold_each_method():
    """The table the flags used to keep by hand, now derived from the format objects."""
    assert {m: set(formats_of(m)) for m in PRESETS} == {
        "rtn": {"compressed-tensors", "gptq", "gptq_v2", "awq"}, "int8": {"compressed-tensors", "gptq", "gptq_v2"},
        "nf4": {"bnb"}, "fp4": {"bnb"}, "gptq": {"compressed-tensors", "gptq", "gptq_v2", "awq"},
        "awq": {"compressed-tensors", "gptq", "gptq_v2", "awq"},
        "awq-gptq": {"compressed-tensors", "gptq", "gptq_v2", "awq"}, "hqq": {"compressed-tensors"},
        "smoothquant": {"compressed-tensors"}, "llm-int8": {"bnb"}}


def test_gptq_v1_symmetry_is_one_rule_asked_by_plan_and_flags(tmp_path, tiny_llama):
    asym = Rule(match=".*", method="gptq", bits=4, group_size=64, symmetric=False)
    field, why = output_format("gptq").refuse(asym)
    assert field == "symmetric" and "stores zero-1" in why
    assert output_format("gptq_v2").refuse(asym) is None
    p = tmp_path / "p.yaml"
    p.write_text("rules:\n  - match: '.*'\n    bits: 4\n    group_size: 64\n    symmetric: false\noutput: {format: gptq}\n")
    with pytest.raises(PlanError, match=rf"{p}:6: output.format: .*stores zero-1"):
        parse_plan(p.read_text(), where=str(p))
    r = runner.invoke(app, ["quantize", str(tiny_llama), "--method", "rtn", "--asym", "--format", "gptq", "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "--format gptq with --method rtn --asym: " in r.stderr and "stores zero-1" in r.stderr


def _rule_text(**kw) -> str:
    body = ", ".join(f"{k}: {v}" for k, v in kw.items())
    return f"rules:\n  - {{match: '.*', {body}}}\n"


@pytest.mark.parametrize("fmt, rule, dtype", [
    ("compressed-tensors", dict(bits=4, group_size=64, symmetric="false"), torch.bfloat16),
    ("compressed-tensors", dict(bits=3, group_size=32, symmetric="true"), torch.float32),
    ("compressed-tensors", dict(bits=8, group_size="channel", symmetric="true"), torch.float16),
    ("gptq", dict(bits=4, group_size=128, symmetric="true"), torch.float16),
    ("gptq_v2", dict(bits=3, group_size=64, symmetric="false"), torch.float16),
    ("awq", dict(bits=4, group_size=64, symmetric="false"), torch.float16),
    ("bnb", dict(codec="nf4", block_size=64, double_quant="true"), torch.bfloat16),
    ("bnb", dict(codec="fp4", block_size=128), torch.float16),
])
def test_tensor_bytes_are_the_packed_bytes(fmt, rule, dtype):
    plan = parse_plan(_rule_text(**rule) + f"output: {{format: {fmt}}}\n")
    shape = (192, 256)
    codec = plan.resolve({"m": shape}, dtype)["m"].codec
    q = codec.encode(torch.randn(shape, generator=torch.Generator().manual_seed(0)))
    packed = output_format(fmt).pack(q, dtype)
    predicted, written = output_format(fmt).tensor_bytes(codec, shape, dtype), sum(t.numel() * t.element_size()
                                                                                  for t in packed.values())
    if fmt == "bnb" and codec.double_quant:  # the nested offset is JSON text: an upper bound within 24 bytes
        assert written <= predicted <= written + 24
    else:
        assert predicted == written


@pytest.mark.parametrize("gtype", ["q4_k", "q6_k", "q5_0", "iq4_nl", "f16"])
def test_gguf_tensor_bytes_are_the_block_sizes(gtype):
    import gguf

    from qtool.formats.gguf_base import gguf_codec

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[gtype.upper()]]
    assert output_format("gguf").tensor_bytes(gguf_codec(gtype), (96, 512)) == 96 * 512 // block * size


def test_written_artifact_matches_tensor_bytes(tiny_llama, tmp_path):
    """The bytes the format object predicts per module are the bytes the engine writes for it."""
    from qtool.engine.run import run
    from qtool.io.source import open_model

    plan = parse_plan(_rule_text(bits=4, group_size=64, symmetric="false") + "output: {format: gptq_v2}\n"
                      "check: {sequences: 0}\n")
    out = tmp_path / "a"
    m = run(open_model(tiny_llama), plan, out)
    fmt = output_format("gptq_v2")
    shapes = {n.removesuffix(".weight"): tuple(open_model(tiny_llama).shape(n)) for n in open_model(tiny_llama).names()
              if n.endswith("_proj.weight")}
    specs = plan.resolve(shapes, torch.float16)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        written: dict[str, int] = {}
        for k in f.keys():
            mod = k.rsplit(".", 1)[0]
            if mod in specs:
                t = f.get_tensor(k)
                written[mod] = written.get(mod, 0) + t.numel() * t.element_size()
    assert written and all(written[n] == fmt.tensor_bytes(specs[n].codec, shapes[n]) for n in specs)
    assert sum(written.values()) == m.quantized_bytes
