"""Calibrated methods through the engine: GPTQ on the tiny model, fed by a quantized activation stream."""

from importlib import resources

import pytest
import torch

from qtool.engine.run import run
from qtool.errors import UsageError
from qtool.io.source import open_model
from qtool.plan import parse_plan
from qtool.runtime.load import load_model


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(resources.files("qtool").joinpath("data/check.txt").read_text())
    return p


def _plan(method, calib, extra=""):
    return parse_plan(f"rules:\n  - {{match: '.*', method: {method}, bits: 3, group_size: 64, symmetric: false{extra}}}\n"
                      f"calibration: {{source: '{calib}', samples: 16, seq_len: 64, seed: 0}}\n")


def test_gptq_beats_rtn_and_loads_in_transformers(tiny_llama, calib_text, tmp_path):
    from transformers import AutoModelForCausalLM

    rtn = run(open_model(tiny_llama), _plan("rtn", calib_text), tmp_path / "rtn")
    gq = run(open_model(tiny_llama), _plan("gptq", calib_text), tmp_path / "gptq")
    assert gq.check.kld < 0.8 * rtn.check.kld, (gq.check.kld, rtn.check.kld)
    mean = lambda m: sum(r.output_rel_err for r in m.layers) / len(m.layers)  # noqa: E731
    assert mean(gq) < mean(rtn)
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(4))
    ours, _, _ = load_model(tmp_path / "gptq")
    real = AutoModelForCausalLM.from_pretrained(tmp_path / "gptq")
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, real(ids).logits, atol=1e-4, rtol=1e-4)
    plan_yaml = (tmp_path / "gptq" / "qtool_plan.yaml").read_text()
    assert "method: gptq" in plan_yaml and "calibration:" in plan_yaml


def test_gptq_act_order_is_deterministic(tiny_llama, calib_text, tmp_path):
    plan = _plan("gptq", calib_text, ", act_order: true")
    run(open_model(tiny_llama), plan, tmp_path / "a", check=False)
    run(open_model(tiny_llama), plan, tmp_path / "b", check=False)
    for f in ("model.safetensors", "config.json", "qtool_manifest.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_calibration_text_shorter_than_one_sample_is_an_error(tiny_llama, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("only a handful of words here")
    with pytest.raises(UsageError, match="fewer than one sample"):
        run(open_model(tiny_llama), _plan("gptq", short), tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_short_calibration_text_warns_and_overlaps(tiny_llama, calib_text, tmp_path):
    plan = parse_plan(f"rules:\n  - {{match: '.*', method: gptq, bits: 4, group_size: 64}}\n"
                      f"calibration: {{source: '{calib_text}', samples: 64, seq_len: 128}}\n")
    with pytest.warns(UserWarning, match="overlap"):
        run(open_model(tiny_llama), plan, tmp_path / "q", check=False)


def test_awq_beats_rtn_folds_scales_and_loads_in_transformers(tiny_llama, calib_text, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    rtn = run(open_model(tiny_llama), _plan("rtn", calib_text), tmp_path / "rtn")
    aw = run(open_model(tiny_llama), _plan("awq", calib_text), tmp_path / "awq")
    assert aw.check.kld < 0.8 * rtn.check.kld, (aw.check.kld, rtn.check.kld)
    # 2 layers x (input norm -> q/k/v, post-attention norm -> gate/up, up -> down); v -> o skipped (GQA)
    pairs = sorted(t.prev for t in aw.transforms)
    assert len(pairs) == 6 and all(t.gain >= 1.0 for t in aw.transforms), aw.transforms
    assert "model.layers.0.self_attn.v_proj" not in pairs
    folded = [t for t in aw.transforms if t.alpha is not None]
    assert folded, "no pair chose non-identity scales"
    src, art = load_file(tiny_llama / "model.safetensors"), load_file(tmp_path / "awq" / "model.safetensors")
    t = folded[0]
    if t.prev.endswith("layernorm"):  # the scales live in the written norm weights
        assert not torch.equal(src[t.prev + ".weight"], art[t.prev + ".weight"])
    ids = torch.randint(0, 300, (1, 16), generator=torch.Generator().manual_seed(5))
    ours, _, _ = load_model(tmp_path / "awq")
    real = AutoModelForCausalLM.from_pretrained(tmp_path / "awq")
    with torch.no_grad():
        assert torch.allclose(ours(ids).logits, real(ids).logits, atol=1e-4, rtol=1e-4)


def test_awq_then_gptq_chain_runs_in_order(tiny_llama, calib_text, tmp_path):
    chain = run(open_model(tiny_llama), _plan("[awq, gptq]", calib_text, ", act_order: true"), tmp_path / "c")
    gq = run(open_model(tiny_llama), _plan("gptq", calib_text, ", act_order: true"), tmp_path / "g")
    assert chain.transforms and not gq.transforms
    assert chain.check.kld < 1.1 * gq.check.kld, (chain.check.kld, gq.check.kld)
    assert "- awq\n  - gptq" in (tmp_path / "c" / "qtool_plan.yaml").read_text()


def test_stats_file_replaces_the_calibration_pass(tiny_llama, calib_text, tmp_path):
    from qtool.calib import stats as st
    from qtool.plan import Calibration

    spec = Calibration(source=str(calib_text), samples=16, seq_len=64, seed=0)
    stats = st.collect(open_model(tiny_llama), spec)
    st.save(stats, tmp_path / "stats")
    back = st.load(tmp_path / "stats")
    assert back.tokens == 16 * 64 and len(back.inputs) == 15 and len(back.tensors) == 9  # 14 linears + the head
    for key, s in stats.tensors.items():
        assert torch.equal(back.tensors[key].hessian, s.hessian)
    a = run(open_model(tiny_llama), _plan("awq", calib_text), tmp_path / "a", stats=back)
    b = run(open_model(tiny_llama), _plan("awq", calib_text), tmp_path / "b", stats=back)
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    rtn = run(open_model(tiny_llama), _plan("rtn", calib_text), tmp_path / "r")
    assert a.check.kld < 0.8 * rtn.check.kld
    # block 0 sees the same float input either way: its first AWQ search matches the inline run's
    inline = run(open_model(tiny_llama), _plan("awq", calib_text), tmp_path / "i", check=False)
    assert inline.transforms[0].alpha == a.transforms[0].alpha
