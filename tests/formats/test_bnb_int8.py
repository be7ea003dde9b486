"""bitsandbytes 8-bit (LLM.int8()) artifacts: the on-disk layout against bitsandbytes' own serialization,
the scale mapping from qtool's int8 codec, and whole models written by qtool's engine, loaded by the real
client (transformers 5.24 + bitsandbytes 0.50 on CPU) and by qtool's `load_model`.

Measured (this machine, random tiny Llama, 4 x 48 tokens): qtool's runtime reproduces transformers + bitsandbytes
logits bit for bit (max |d| 0) at thresholds 0, 4 and 6 (float32) and 6 (bfloat16). The negative controls are
far: the same weights without activation quantization, LLM.int8() without the outlier split (threshold 0 on a
threshold-4 artifact), and compressed-tensors' per-token formula on the same weights (see the printed numbers).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import replace

import pytest
import torch
from conftest import make_tiny_llama
from safetensors.torch import load_file, save_file

from qtool.outputs import OUTPUT_FORMATS as OUTPUTS
from qtool.engine.run import run
from qtool.errors import ModelError, UsageError
from qtool.formats import bnb, bnb_int8
from qtool.formats.affine import AffineCodec
from qtool.formats.nf4 import NF4Codec
from qtool.io.source import open_model
from qtool.plan import parse_plan
from qtool.runtime import w8a8
from qtool.runtime.load import load_model

bitsandbytes = pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "MatMul8bitLt: inputs will be cast to float16"

INT8 = AffineCodec(8, 0, True)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- layout --------------------------------------------------------------------------------------------------
def test_pack_layout_and_round_trip():
    w = torch.randn(72, 256, generator=gen(0)) * 0.05
    q = INT8.encode(w)
    t = bnb_int8.pack(q)
    assert list(t) == ["weight", "SCB", "weight_format"]
    assert t["weight"].dtype == torch.int8 and t["weight"].shape == (72, 256) and torch.equal(t["weight"], q.codes)
    assert t["SCB"].dtype == torch.float32 and t["SCB"].shape == (72,)
    assert t["weight_format"].dtype == torch.uint8 and t["weight_format"].shape == () and t["weight_format"] == 0
    back = bnb_int8.unpack(t)
    assert back.codec == INT8 and torch.equal(back.codes, q.codes)
    assert torch.equal(back.params["scale"], q.params["scale"]) and torch.equal(back.dequantize(), q.dequantize())


def test_pack_equals_bitsandbytes_state_dict():
    """A Linear8bitLt holding our CB/SCB saves exactly our tensors (bnb's `_save_to_state_dict`)."""
    q = INT8.encode(torch.randn(64, 256, generator=gen(1)) * 0.05)
    ours = bnb_int8.pack(q)
    lin = bitsandbytes.nn.Linear8bitLt(256, 64, bias=False, has_fp16_weights=False)
    lin.weight = bitsandbytes.nn.Int8Params(ours["weight"].clone(), requires_grad=False, has_fp16_weights=False,
                                            CB=ours["weight"].clone(), SCB=ours["SCB"].clone())
    theirs = lin.state_dict()
    assert set(theirs) == set(ours)
    for k in ours:
        assert theirs[k].dtype == ours[k].dtype and theirs[k].shape == ours[k].shape and torch.equal(theirs[k], ours[k])


def ulp(t: torch.Tensor) -> torch.Tensor:
    return (torch.nextafter(t, torch.full_like(t, float("inf"))) - t).abs()


def test_scale_mapping_within_ulps():
    """scale = SCB / 127 round-trips exactly; SCB is within 1 ulp of the row absmax; bitsandbytes' dequantization
    CB * SCB * (1/127) is within 2 ulp of qtool's codes * scale. bitsandbytes quantizing the same float32 weight
    itself (through float16) would pick codes at most one step away."""
    w = torch.randn(8192, 256, generator=gen(2)) * torch.logspace(-4, 2, 8192).unsqueeze(1)
    q = INT8.encode(w)
    t = bnb_int8.pack(q)
    assert torch.equal(bnb_int8.unpack(t).params["scale"], q.params["scale"])
    absmax = w.abs().amax(1)
    scb_ulps = ((t["SCB"] - absmax).abs() / ulp(absmax)).max().item()
    ours = q.dequantize()
    theirs = bitsandbytes.functional.int8_vectorwise_dequant(t["weight"], t["SCB"])
    assert torch.equal(theirs, w8a8.bnb_dequantize(t["weight"], t["SCB"]))
    deq_ulps = ((theirs - ours).abs() / ulp(ours.abs().clamp_min(1e-30))).max().item()
    cb, scb, _ = bitsandbytes.functional.int8_vectorwise_quant(w.half())
    steps = (cb.int() - q.codes.int()).abs()
    print(f"SCB vs absmax: {scb_ulps} ulp; dequant: {deq_ulps} ulp; bnb's own codes differ by one step in "
          f"{(steps > 0).float().mean().item():.2%}")
    assert scb_ulps <= 1 and deq_ulps <= 2 and steps.max() <= 1


def test_quantization_config_matches_transformers():
    from transformers import BitsAndBytesConfig

    for threshold in (0.0, 2.0, 6.0):
        ours = bnb_int8.quantization_config(threshold, ["lm_head"])
        theirs = BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=threshold,
                                    llm_int8_skip_modules=["lm_head"]).to_dict()
        assert ours == theirs and list(ours) == list(theirs)
    for bad in (-1.0, float("nan"), float("inf"), True, "6"):
        with pytest.raises(ValueError, match="threshold"):
            bnb_int8.quantization_config(bad, [])


BAD = {
    "SCB float16": lambda t: t.update(SCB=t["SCB"].half()),
    "SCB shape": lambda t: t.update(SCB=t["SCB"][:-1]),
    "SCB NaN": lambda t: t["SCB"].__setitem__(0, float("nan")),
    "SCB negative": lambda t: t["SCB"].__setitem__(0, -1.0),
    "weight float": lambda t: t.update(weight=t["weight"].float()),
    "weight 1-D": lambda t: t.update(weight=t["weight"].reshape(-1)),
    "weight_format 1": lambda t: t.update(weight_format=torch.tensor(1, dtype=torch.uint8)),
    "weight_format float": lambda t: t.update(weight_format=torch.tensor(0.0)),
    "no SCB": lambda t: t.pop("SCB"),
    "extra key": lambda t: t.update(CB=t["weight"]),
}


@pytest.mark.parametrize("bad", BAD)
def test_unpack_rejects_malformed(bad):
    t = bnb_int8.pack(INT8.encode(torch.randn(8, 64, generator=gen(3))))
    BAD[bad](t)
    with pytest.raises(ValueError):
        bnb_int8.unpack(t)


def test_pack_rejects_other_codecs():
    for codec in (AffineCodec(8, 64, True), AffineCodec(8, 0, False), AffineCodec(4, 0, True)):
        with pytest.raises(ValueError, match="int8_ch_sym"):
            bnb_int8.pack(codec.encode(torch.randn(8, 64, generator=gen(4))))
    with pytest.raises(TypeError):
        bnb_int8.pack(NF4Codec("nf4", 64).encode(torch.randn(8, 64, generator=gen(4))))


# ---- the engine's bnb output ---------------------------------------------------------------------------------------
def plan_text(threshold: float | None = 6.0, extra_rule: str = "", activations: str = "int8") -> str:
    t = f", outlier_threshold: {threshold}" if threshold is not None else ""
    return (f"rules:\n{extra_rule}  - {{match: '.*', bits: 8, group_size: channel, symmetric: true, "
            f"activations: {activations}{t}}}\noutput: {{format: bnb}}\ncheck: {{sequences: 0}}\n")


SHAPES = {f"model.layers.0.{m}": (256, 256) for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")}


def specs_of(text: str) -> dict:
    return parse_plan(text).resolve(SHAPES, torch.float32)


def test_output_dispatch_and_config():
    assert OUTPUTS["bnb"].config(specs_of(plan_text(2.5)), ["lm_head"], torch.float32) == \
        bnb_int8.quantization_config(2.5, ["lm_head"])
    q8 = INT8.encode(torch.randn(16, 64, generator=gen(5)))
    assert OUTPUTS["bnb"].pack(q8, torch.float32).keys() == {"weight", "SCB", "weight_format"}
    q4 = NF4Codec("nf4", 64).encode(torch.randn(16, 64, generator=gen(5)))
    ours, theirs = OUTPUTS["bnb"].pack(q4, torch.float32), bnb.pack(q4, torch.float32)
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in ours)  # 4-bit unchanged


def with_down_proj(**changes) -> dict:
    """Valid LLM.int8() specs with one linear changed (plan validation may refuse some of these earlier)."""
    specs = specs_of(plan_text(6.0))
    name = "model.layers.0.mlp.down_proj"
    codec = changes.pop("codec", specs[name].codec)
    specs[name] = replace(specs[name], codec=codec, rule=replace(specs[name].rule, **changes))
    return specs


@pytest.mark.parametrize("changes,match", [
    (dict(outlier_threshold=3.0), "one llm_int8_threshold"),
    (dict(activations="none", outlier_threshold=0.0), "activations: int8"),
    (dict(codec=AffineCodec(4, 64, True)), "int8_ch_sym"),
    (dict(codec=AffineCodec(8, 0, False)), "int8_ch_sym"),
])
def test_output_config_refuses(changes, match):
    with pytest.raises(UsageError, match=match):
        OUTPUTS["bnb"].config(with_down_proj(**changes), ["lm_head"], torch.float32)


# ---- whole models: transformers + bitsandbytes vs qtool's runtime -------------------------------------------------
CASES = {"f32-thr0": (torch.float32, 0.0), "f32-thr4": (torch.float32, 4.0), "f32-thr6": (torch.float32, 6.0),
         "bf16-thr6": (torch.bfloat16, 6.0)}


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            dtype, threshold = CASES[name]
            src = tiny_llama
            if dtype != torch.float32:
                src = make_tiny_llama(tmp_path_factory.mktemp("src-" + name) / "model", dtype=dtype)
            out = tmp_path_factory.mktemp(name) / "q"
            run(open_model(src), parse_plan(plan_text(threshold)), out)
            cache[name] = out
        return cache[name]

    return get


IDS = torch.randint(0, 300, (4, 48), generator=gen(6))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def weight_only(model):
    """Negative control: the same int8 weights, activations left in float."""
    dtype = next(model.parameters()).dtype
    for name, m in list(model.named_modules()):
        if isinstance(m, w8a8.Int8ActLinear):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=False, dtype=dtype)
            lin.weight.data = m.dequantized_weight().to(dtype)
            model.set_submodule(name, lin)
    return model


@pytest.mark.parametrize("name", CASES)
def test_transformers_bitsandbytes_equals_qtool_runtime(artifact, name):
    from transformers import AutoModelForCausalLM

    dtype, threshold = CASES[name]
    out = artifact(name)
    client, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    linears = {n: m for n, m in client.eval().named_modules() if n.endswith("_proj")}
    assert len(linears) == 14
    assert all(type(m).__name__ == "Linear8bitLt" and m.state.threshold == threshold for m in linears.values())
    theirs = logits(client)

    ours_model, _, _ = load_model(out, dtype=dtype)
    modules = [m for n, m in ours_model.named_modules() if n.endswith("_proj")]
    assert all(isinstance(m, w8a8.Int8ActLinear) and m.scheme == "bnb" and m.threshold == threshold for m in modules)
    n_outlier_cols = []
    hooks = [m.register_forward_hook(lambda m, i, o: n_outlier_cols.append(
        w8a8.bnb_row_quantize(i[0].reshape(-1, i[0].shape[-1]), m.threshold)[2].numel())) for m in modules]
    ours = logits(ours_model)
    for h in hooks:
        h.remove()
    print(f"{name}: max |d| qtool vs transformers+bitsandbytes {(ours - theirs).abs().max().item():.3g}; "
          f"outlier columns per layer call {sum(n_outlier_cols) / len(n_outlier_cols):.1f}")
    assert torch.equal(ours, theirs)
    if threshold == 4.0:
        assert sum(n_outlier_cols) > 0  # the outlier path is exercised


def test_negative_controls_are_far(artifact):
    """Weight-only, no outlier split, and compressed-tensors' activation formula all move the logits away from
    bitsandbytes; qtool's runtime does not (0.0)."""
    from transformers import AutoModelForCausalLM

    out = artifact("f32-thr4")
    theirs = logits(AutoModelForCausalLM.from_pretrained(out).eval())
    model, _, _ = load_model(out)
    errors = {}
    for m in model.modules():
        if isinstance(m, w8a8.Int8ActLinear):
            m.threshold = 0.0
    errors["no outlier split"] = (logits(model) - theirs).abs().max().item()
    for name, m in list(model.named_modules()):
        if isinstance(m, w8a8.Int8ActLinear):
            model.set_submodule(name, w8a8.Int8ActLinear(m.codes, (m.scale / 127).reshape(-1, 1), scheme="ct"))
    errors["compressed-tensors activations"] = (logits(model) - theirs).abs().max().item()
    errors["weight-only"] = (logits(weight_only(load_model(out)[0])) - theirs).abs().max().item()
    print("negative controls, max |d| vs transformers+bitsandbytes:",
          ", ".join(f"{k} {v:.3g}" for k, v in errors.items()))
    assert min(errors.values()) > 1e-2


def rewrite(src, dst, change):
    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    change(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize("bad", ["SCB float16", "weight_format 1", "SCB shape", "weight float"])
def test_load_model_rejects_malformed(artifact, tmp_path, bad):
    module = "model.layers.0.mlp.down_proj"

    def change(tensors):
        t = {k.removeprefix(module + "."): v for k, v in tensors.items() if k.startswith(module + ".")}
        BAD[bad](t)
        for k in [k for k in tensors if k.startswith(module + ".")]:
            del tensors[k]
        tensors.update({f"{module}.{k}": v.contiguous() for k, v in t.items()})

    dst = rewrite(artifact("f32-thr6"), tmp_path / "bad", change)
    with pytest.raises(ModelError, match="down_proj"):
        load_model(dst)


def test_load_model_rejects_fp16_weight_flag(artifact, tmp_path):
    dst = tmp_path / "fp16w"
    shutil.copytree(artifact("f32-thr6"), dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["quantization_config"]["llm_int8_has_fp16_weight"] = True
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="fp16_weight"):
        load_model(dst)
