"""W8A8 through the engine: SmoothQuant and LLM.int8() on a tiny Llama whose activations carry outlier
channels (as real LLMs' do), measured with the int8 activations the artifacts run with."""

from importlib import resources

import pytest
from safetensors.torch import load_file, save_file

from qtool.engine.run import run
from qtool.io.source import open_model
from qtool.plan import parse_plan
from qtool.runtime.load import load_model
from qtool.runtime.w8a8 import Int8ActLinear

OUTLIERS = (3, 77, 130)  # hidden channels amplified in every norm: their activations dwarf the rest


@pytest.fixture(scope="module")
def outlier_llama(tmp_path_factory, tiny_llama):
    import shutil

    dst = tmp_path_factory.mktemp("outliers") / "model"
    shutil.copytree(tiny_llama, dst)
    sd = load_file(dst / "model.safetensors")
    for name, t in sd.items():
        if name.endswith("layernorm.weight"):
            t[list(OUTLIERS)] *= 40.0
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def calib_text(tmp_path_factory):
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(resources.files("qtool").joinpath("data/check.txt").read_text())
    return p


def _plan(calib, method="rtn", extra="", out=""):
    cal = f"calibration: {{source: '{calib}', samples: 16, seq_len: 64, seed: 0}}\n" if "smoothquant" in method else ""
    return parse_plan(f"rules:\n  - {{match: '.*', method: {method}, bits: 8, group_size: channel, symmetric: true, "
                      f"activations: int8{extra}}}\n{cal}{out}")


def test_smoothquant_beats_plain_w8a8_and_folds_into_norms(outlier_llama, calib_text, tmp_path):
    plain = run(open_model(outlier_llama), _plan(calib_text), tmp_path / "plain")
    sq = run(open_model(outlier_llama), _plan(calib_text, "[smoothquant, rtn]", ", alpha: 0.5"), tmp_path / "sq")
    w8 = run(open_model(outlier_llama), parse_plan(
        "rules:\n  - {match: '.*', bits: 8, group_size: channel, symmetric: true}\n"), tmp_path / "w8")
    # the weight-only artifact has no activation error: W8A8 is worse, SmoothQuant recovers most of it
    assert w8.check.kld < sq.check.kld < 0.5 * plain.check.kld, (w8.check.kld, sq.check.kld, plain.check.kld)
    kinds = {t.kind for t in sq.transforms}
    assert kinds == {"smoothquant"} and all(t.alpha == 0.5 for t in sq.transforms if t.linears)
    norm_pairs = [t for t in sq.transforms if t.prev.endswith("layernorm")]
    assert len(norm_pairs) == 4 and all(t.gain > 2.0 for t in norm_pairs), norm_pairs
    src, art = load_file(outlier_llama / "model.safetensors"), load_file(tmp_path / "sq" / "model.safetensors")
    n = "model.layers.0.input_layernorm.weight"
    assert (art[n][list(OUTLIERS)] < 0.5 * src[n][list(OUTLIERS)]).all()  # the outliers moved into the weights
    # eval's loader runs the same int8 activations the engine's self-check ran
    model, _, _ = load_model(tmp_path / "sq")
    mods = [m for m in model.modules() if isinstance(m, Int8ActLinear)]
    assert len(mods) == 14 and all(m.scheme == "ct" for m in mods)
    assert "smoothquant" in (tmp_path / "sq" / "qtool_plan.yaml").read_text()


def test_llm_int8_keeps_outlier_columns_in_float(outlier_llama, tmp_path):
    bnb = "output: {format: bnb}\n"
    no_split = run(open_model(outlier_llama), _plan(None, extra="", out=bnb), tmp_path / "a")
    split = run(open_model(outlier_llama), _plan(None, extra=", outlier_threshold: 6.0"), tmp_path / "b")
    assert split.output_format == "bnb"
    assert split.check.kld < 0.5 * no_split.check.kld, (split.check.kld, no_split.check.kld)
    model, _, _ = load_model(tmp_path / "b")
    mods = [m for m in model.modules() if isinstance(m, Int8ActLinear)]
    assert len(mods) == 14 and all(m.scheme == "bnb" and m.threshold == 6.0 for m in mods)
    # the manifest counts the bytes the file holds: int8 codes + float32 SCB + the weight_format byte
    q = next(r for r in split.layers if r.name.endswith("layers.0.mlp.down_proj"))
    out, inp = open_model(outlier_llama).shape("model.layers.0.mlp.down_proj.weight")
    assert q.bytes == out * inp + 4 * out + 1


def test_w8a8_runs_are_deterministic(outlier_llama, calib_text, tmp_path):
    plan = _plan(calib_text, "[smoothquant, rtn]")
    run(open_model(outlier_llama), plan, tmp_path / "a", check=False)
    run(open_model(outlier_llama), plan, tmp_path / "b", check=False)
    for f in ("model.safetensors", "config.json", "qtool_manifest.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
