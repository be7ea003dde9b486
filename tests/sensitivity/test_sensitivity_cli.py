"""`qtool sensitivity` end to end on a tiny model: the plan it writes is what convert-gguf takes unchanged, the
file has exactly the predicted bytes and stays within the budget, more budget buys less predicted cost, and
budgets outside the feasible range are refused with the range stated."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from qtool.cli.app import app

runner = CliRunner()
CAL = ["--samples", "4", "--seq-len", "32", "--no-cache"]


def sens(model, out, *args):
    return runner.invoke(app, ["sensitivity", str(model), "--out", str(out), "--candidates", "q3_k,q4_k,q6_k,q8_0",
                               *CAL, "--json", str(out) + ".json", *args])


@pytest.fixture(scope="module")
def sized(tiny_llama, tmp_path_factory):
    """Two budgets' plans (and reports) of the shared tiny model."""
    d = tmp_path_factory.mktemp("sens")
    res = {}
    for name, size in (("small", "0.8MB"), ("large", "1.1MB")):
        r = sens(tiny_llama, d / f"{name}.yaml", "--target-size", size)
        assert r.exit_code == 0, r.output
        res[name] = (d / f"{name}.yaml", json.loads((d / f"{name}.yaml.json").read_text()))
    return res


def test_plan_converts_to_exactly_the_predicted_bytes(sized, tiny_llama, tmp_path):
    plan, rep = sized["small"]
    assert rep["predicted_bytes"] <= 800_000
    body = yaml.safe_load(plan.read_text())
    assert len(body["rules"]) == len(rep["picks"]) and body["output"]["format"] == "gguf"
    assert all(r["match"].startswith("^") and r["codec"] in ("q3_k", "q4_k", "q6_k", "q8_0") for r in body["rules"])
    out = tmp_path / "m.gguf"
    r = runner.invoke(app, ["convert-gguf", str(tiny_llama), "--plan", str(plan), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert out.stat().st_size == rep["predicted_bytes"]


def test_more_budget_less_cost_and_deterministic(sized, tiny_llama, tmp_path):
    (small, s), (large, big) = sized["small"], sized["large"]
    assert big["predicted_bytes"] > s["predicted_bytes"] and big["cost"] < s["cost"]
    again = tmp_path / "again.yaml"
    assert sens(tiny_llama, again, "--target-size", "0.8MB").exit_code == 0
    assert again.read_text() == small.read_text()


def test_bpw_budget_counts_every_weight(sized, tiny_llama, tmp_path):
    out = tmp_path / "bpw.yaml"
    r = sens(tiny_llama, out, "--target-bpw", "5.0", "--report", str(tmp_path / "rep"))
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "bpw.yaml.json").read_text())
    assert "bits/weight" in rep["budget"]
    assert 4.8 < 8 * rep["tensor_data_bytes"] / rep["weights"] <= 5.0 and rep["bits_per_weight"] <= 5.0
    # the report: two PNGs; the frontier falls as bytes grow; llama.cpp's mixes priced by the same costs
    for png in ("frontier.png", "costs.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pts = rep["report"]["frontier_points"]
    assert len(pts) >= 3 and all(a[1] >= b[1] for a, b in zip(pts, pts[1:]))
    assert {"Q4_K_M", "Q3_K_S"} <= set(rep["report"]["named_mixes"])  # (Q3_K_M also uses Q5_K: not a candidate)


@pytest.mark.parametrize("args, msg", [
    (["--target-size", "200kB"], "feasible: "),
    (["--target-size", "2MB", "--target-bpw", "4"], "give one budget"),
    (["--target-size", "2MB", "--candidates", "q4_k,q9_k"], "unknown codec 'q9_k'"),
    (["--target-size", "2MB", "--candidates", "q4_k,int4_g64_asym"], "mix GGUF types and HF codecs"),
    (["--target-size", "2MB", "--candidates", "int4_g64_asym", "--format", "gptq"], "stores zero-1"),
    (["--target-memory", "2GB", "--candidates", "int4_g64_asym"], "HF formats take --target-size"),
    (["--target-size", "lots"], "expected a size"),
    (["--target-size", "2MB", "--mode", "exact"], "allowed proxy, measured"),
])
def test_bad_input(tiny_llama, tmp_path, args, msg):
    r = runner.invoke(app, ["sensitivity", str(tiny_llama), "--out", str(tmp_path / "p.yaml"), *CAL, *args])
    assert r.exit_code == 2, r.output
    assert msg in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "p.yaml").exists()


def test_memory_target_leaves_room_for_the_kv_cache(tiny_llama, tmp_path):
    """--target-memory: file + KV cache at --ctx + compute buffers <= the budget, with the arithmetic stated."""
    from qtool.io.source import open_model
    from qtool.sensitivity.memory import memory_model

    cfg = open_model(tiny_llama).config
    mm = memory_model(cfg, 4096)
    # 2 (K, V) x layers x KV heads x head dim x ctx x 2 bytes (f16)
    assert mm.kv_bytes == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4096 * 2
    assert memory_model(cfg, 4096, kv_type="q8_0").kv_bytes == int(mm.kv_bytes / 2 * 34 / 32)
    budget = mm.overhead + 900_000
    r = sens(tiny_llama, tmp_path / "m.yaml", "--target-memory", str(budget), "--ctx", "4096")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "m.yaml.json").read_text())
    assert rep["predicted_bytes"] <= 900_000 and rep["memory"]["predicted_bytes"] <= budget
    assert rep["memory"]["kv_cache_bytes"] == mm.kv_bytes and "KV cache" in rep["memory"]["arithmetic"]
    assert "KV cache" in (tmp_path / "m.yaml").read_text().splitlines()[1]
    r = sens(tiny_llama, tmp_path / "x.yaml", "--target-memory", "1MB", "--ctx", "65536")
    assert r.exit_code == 2 and "KV cache and compute buffers alone" in r.stderr


def test_options_for_rows_that_do_not_fit():
    """k-quants on 576-wide rows (SmolLM2) become the 32-element types llama.cpp falls back to (and those no
    larger): a GGUF file can hold nothing else there."""
    from qtool.sensitivity.costs import options_for

    ks = ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "q8_0"]
    assert options_for(ks, 1536) == ks
    assert options_for(ks, 576) == ["q4_0", "iq4_nl", "q4_1", "q5_0", "q5_1", "q8_0"]
    assert options_for(["q4_k", "q4_k"], 512) == ["q4_k"]


def test_hf_codecs_plan_a_compressed_tensors_mix(tiny_llama, tmp_path):
    """Int candidates plan a mixed-precision compressed-tensors artifact whose tensor bytes are the predicted ones
    (embeddings and head stay float there) and which qtool's own loader reads."""
    out = tmp_path / "hf.yaml"
    r = runner.invoke(app, ["sensitivity", str(tiny_llama), "--out", str(out), *CAL, "--candidates",
                            "int3_g64_asym,int4_g64_asym,int8_ch_sym", "--target-size", "1.5MB", "--json",
                            str(tmp_path / "hf.json")])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "hf.json").read_text())
    assert set(rep["picks"].values()) <= {"int3_g64_asym", "int4_g64_asym", "int8_ch_sym"}
    assert len(set(rep["picks"].values())) >= 2  # a real mix at this budget
    assert "model.embed_tokens" not in rep["picks"]
    body = yaml.safe_load(out.read_text())
    assert body["output"] == {"format": "compressed-tensors"}
    art = tmp_path / "art"
    r = runner.invoke(app, ["quantize", str(tiny_llama), "--plan", str(out), "--out", str(art), "--json",
                            str(tmp_path / "q.json")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "q.json").read_text())["total_bytes"] == rep["predicted_bytes"]
    assert rep["predicted_bytes"] <= 1_500_000


def test_measured_mode_prices_in_kl_units(tiny_llama, tmp_path):
    """Measured costs: each block's output error x its downstream sensitivity (KL per squared error, measured
    by a probe); the embeddings priced by their own KL. Cheaper types cost more, sensitivities are positive, and
    the plan converts to exactly the predicted bytes like a proxy plan."""
    out = tmp_path / "m.yaml"
    r = sens(tiny_llama, out, "--target-size", "0.9MB", "--mode", "measured", "--measure-tokens", "128")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "m.yaml.json").read_text())
    assert rep["mode"] == "measured" and len(rep["measured"]["block_sensitivity"]) == 2
    assert all(v > 0 for v in rep["measured"]["block_sensitivity"].values())
    for name, opts in rep["options"].items():
        by = {o["codec"]: o["cost"] for o in opts}
        assert by["q3_k"] > by["q8_0"] >= 0, name
    assert "model.embed_tokens" in rep["options"]
    gg = tmp_path / "m.gguf"
    r = runner.invoke(app, ["convert-gguf", str(tiny_llama), "--plan", str(out), "--out", str(gg)])
    assert r.exit_code == 0, r.output
    assert gg.stat().st_size == rep["predicted_bytes"]


def test_second_budget_reuses_the_costs(tiny_llama, tmp_path):
    """The costs of one model/statistics/candidates/method/mode are measured once; a second budget reuses them
    (and gives the plan a fresh measurement would)."""
    base = ["sensitivity", str(tiny_llama), "--candidates", "q3_k,q4_k,q6_k,q8_0", "--samples", "4", "--seq-len", "32",
            "--cache", str(tmp_path / "cache")]
    r1 = runner.invoke(app, base + ["--target-size", "0.9MB", "--out", str(tmp_path / "a.yaml")])
    assert r1.exit_code == 0 and "reused" not in r1.output
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    r2 = runner.invoke(app, base + ["--target-size", "1.0MB", "--out", str(tmp_path / "b.yaml")])
    assert r2.exit_code == 0 and "reused" in r2.output
    r3 = runner.invoke(app, base + ["--target-size", "1.0MB", "--out", str(tmp_path / "c.yaml"), "--no-cache"])
    assert r3.exit_code == 0 and (tmp_path / "b.yaml").read_text() == (tmp_path / "c.yaml").read_text()


def test_awq_gptq_plan_converts_to_the_predicted_bytes(tiny_llama, tmp_path):
    """--method awq-gptq: GPTQ-priced costs, rules `method: [awq, gptq]`; AWQ's folded scales change no size."""
    out = tmp_path / "a.yaml"
    r = sens(tiny_llama, out, "--target-size", "0.9MB", "--method", "awq-gptq")
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "a.yaml.json").read_text())
    rules = yaml.safe_load(out.read_text())["rules"]
    assert all(r["method"] == (["awq", "gptq"] if "layers" in r["match"] else "rtn") for r in rules)
    gg = tmp_path / "a.gguf"
    r = runner.invoke(app, ["convert-gguf", str(tiny_llama), "--plan", str(out), "--out", str(gg)])
    assert r.exit_code == 0, r.output
    assert gg.stat().st_size == rep["predicted_bytes"]
