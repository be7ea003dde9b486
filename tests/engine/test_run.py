"""The streaming engine on the tiny model: real files, real transformers loader, bytes and error bounds."""

import filecmp
import json
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file, save_file

from qtool.engine.run import run
from qtool.errors import IndivisibleError, ModelError, UsageError
from qtool.io.source import open_model
from qtool.plan import parse_plan
from qtool.runtime.load import load_model

INT4 = "rules:\n  - {match: '.*', bits: 4, group_size: 64, symmetric: true}\n"
INT8 = "rules:\n  - {match: '.*', bits: 8, group_size: channel}\n"
INT2 = "rules:\n  - {match: '.*', bits: 2, group_size: 64, symmetric: false}\n"


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


def test_artifact_loads_in_transformers_and_matches_qtool_runtime(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "q"
    m = run(open_model(tiny_llama), parse_plan(INT4), out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    ours, _, _ = load_model(out)
    real = AutoModelForCausalLM.from_pretrained(out)
    a, b = _logits(ours, ids), _logits(real, ids)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama)
    c = _logits(base, ids)
    rel = ((a - c).norm() / c.norm()).item()
    assert 0.01 < rel < 0.5  # quantized: different from the base, but not garbage


def test_quantized_params_and_bits(tiny_llama, tmp_path):
    m = run(open_model(tiny_llama), parse_plan(INT4), tmp_path / "q", check=False)
    per_block = 256 * 256 * 2 + 2 * (256 * 128) + 3 * 256 * 512  # q,o + k,v (GQA 2/4) + gate,up,down
    assert m.quantized_params == 2 * per_block
    assert len(m.layers) == 14
    # int4 codes + one fp32 scale per 64 weights + the two int64 shape entries per layer
    assert 4.5 <= m.bits_per_weight < 4.51
    assert m.check is None


def test_same_inputs_give_byte_identical_artifacts(tiny_llama, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    run(open_model(tiny_llama), parse_plan(INT4), a)
    run(open_model(tiny_llama), parse_plan(INT4), b)
    files = sorted(p.name for p in a.iterdir())
    assert files == sorted(p.name for p in b.iterdir())
    match, mismatch, errors = filecmp.cmpfiles(a, b, files, shallow=False)
    assert mismatch == [] and errors == []


def test_self_check_ranks_bit_widths(tiny_llama, tmp_path):
    k8 = run(open_model(tiny_llama), parse_plan(INT8), tmp_path / "8").check
    k4 = run(open_model(tiny_llama), parse_plan(INT4), tmp_path / "4").check
    k2 = run(open_model(tiny_llama), parse_plan(INT2), tmp_path / "2").check
    assert k8.kld < k4.kld < k2.kld
    assert k8.kld < 0.01 and k8.same_top_pct > 90
    assert len(k4.block_rel_err) == 2 and all(e > 0 for e in k4.block_rel_err)
    assert not k2.ok  # 2-bit on this model is past the warning threshold


def test_self_check_kld_agrees_with_full_model_eval(tiny_llama, tmp_path):
    """The streamed check equals a KLD computed from two whole models on the same tokens."""
    from qtool.engine.check import check_tokens

    out = tmp_path / "q"
    m = run(open_model(tiny_llama), parse_plan(INT4), out)
    base, tok, _ = load_model(tiny_llama)
    q, _, _ = load_model(out)
    ids = check_tokens(tok, 4, 128)
    lp = torch.log_softmax(_logits(base, ids).double(), -1)
    lq = torch.log_softmax(_logits(q, ids).double(), -1)
    kld = (lp.exp() * (lp - lq)).sum(-1).mean().item()
    assert m.check.kld == pytest.approx(kld, rel=1e-3)


def test_streams_one_block_at_a_time(tiny_llama, tmp_path):
    """Each tensor is read once, block by block, in order: the model is never loaded whole."""
    src = open_model(tiny_llama)
    reads = []
    real_get = src.get
    src.get = lambda name: reads.append(name) or real_get(name)
    run(src, parse_plan(INT4), tmp_path / "q", check=False)
    layer_of = [int(n.split(".")[2]) for n in reads if n.startswith("model.layers.")]
    assert layer_of == sorted(layer_of)
    block_reads = [n for n in reads if n.startswith("model.layers.")]
    assert len(block_reads) == len(set(block_reads)) == 2 * 9


def test_existing_output_is_refused_then_replaced_with_force(tiny_llama, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(UsageError, match="already exists"):
        run(open_model(tiny_llama), parse_plan(INT4), out)
    assert (out / "keep.txt").read_text() == "user data"
    run(open_model(tiny_llama), parse_plan(INT4), out, force=True)
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_nan_weight_fails_naming_tensor_and_leaves_nothing(tiny_llama_copy, tmp_path):
    f = tiny_llama_copy / "model.safetensors"
    sd = load_file(f)
    sd["model.layers.1.mlp.up_proj.weight"][3, 7] = float("nan")
    save_file(sd, f, metadata={"format": "pt"})
    before = f.read_bytes()
    out = tmp_path / "q"
    with pytest.raises(ModelError, match=r"model\.layers\.1\.mlp\.up_proj\.weight holds 1 NaN/Inf"):
        run(open_model(tiny_llama_copy), parse_plan(INT4), out)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".q")] == []
    assert f.read_bytes() == before  # input untouched


def test_indivisible_width_errors_or_falls_back(tmp_path):
    model = make_tiny_llama(tmp_path / "m", hidden_size=320, intermediate_size=640, num_attention_heads=4,
                            num_key_value_heads=2)
    g128 = "rules:\n  - {match: '.*', bits: 4, group_size: 128}\n"
    with pytest.raises(IndivisibleError, match=r"model\.layers\.0\.\S+: group size 128 does not divide input width 320"):
        run(open_model(model), parse_plan(g128), tmp_path / "q")
    assert not (tmp_path / "q").exists()
    m = run(open_model(model), parse_plan(g128 + "on_indivisible: fallback-group-64\n"), tmp_path / "q")
    notes = {r.name.split(".")[-1]: r.codec for r in m.layers if r.name.startswith("model.layers.0.")}
    assert notes["q_proj"] == "int4_g64_sym" and notes["down_proj"] == "int4_g128_sym"  # 640 % 128 == 0
    load_model(tmp_path / "q")


def test_mixed_plan_writes_two_schemes_transformers_loads(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    plan = ("rules:\n  - {match: 'down_proj', bits: 8, group_size: channel}\n"
            "  - {match: '.*', bits: 4, group_size: 64, symmetric: true}\n")
    out = tmp_path / "q"
    m = run(open_model(tiny_llama), parse_plan(plan), out)
    assert {r.codec for r in m.layers} == {"int8_ch_sym", "int4_g64_sym"}
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    assert len(groups) == 2
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(1))
    ours, _, _ = load_model(out)
    real = AutoModelForCausalLM.from_pretrained(out)
    assert torch.allclose(_logits(ours, ids), _logits(real, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("sym", [True, False])
def test_bf16_model_and_asymmetric_load_bit_exact_in_transformers(tmp_path, sym):
    """Scales are stored in the model dtype, and a single asymmetric scheme loads with plain from_pretrained."""
    from transformers import AutoModelForCausalLM

    model = make_tiny_llama(tmp_path / "m", dtype=torch.bfloat16)
    out = tmp_path / "q"
    plan = f"rules:\n  - {{match: '.*', bits: 4, group_size: 64, symmetric: {str(sym).lower()}}}\n"
    run(open_model(model), parse_plan(plan), out, check=False)
    sd = load_file(out / "model.safetensors")
    assert sd["model.layers.0.mlp.up_proj.weight_scale"].dtype == torch.bfloat16
    assert ("model.layers.0.mlp.up_proj.weight_zero_point" in sd) is (not sym)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(2))
    ours, _, _ = load_model(out, dtype=torch.bfloat16)
    real = AutoModelForCausalLM.from_pretrained(out)
    assert torch.equal(_logits(ours, ids), _logits(real, ids))


def test_nf4_plan_loads_in_transformers_with_bitsandbytes(tiny_llama, tmp_path):
    """The shipped NF4 plan (double quant) through the engine; transformers + bitsandbytes load it on CPU."""
    from transformers import AutoModelForCausalLM

    from qtool.plan import load_plan

    out = tmp_path / "q"
    m = run(open_model(tiny_llama), load_plan(Path(__file__).parents[2] / "configs" / "nf4.yaml"), out,
            check=False)
    assert {r.codec for r in m.layers} == {"nf4_b64_dq"}
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "bitsandbytes" and cfg["bnb_4bit_use_double_quant"] is True
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(3))
    ours, _, _ = load_model(out)
    real = AutoModelForCausalLM.from_pretrained(out)
    a, b = _logits(ours, ids), _logits(real, ids)
    assert ((a - b).norm() / b.norm()).item() < 1.5e-2  # bnb's CPU kernel computes in bf16
