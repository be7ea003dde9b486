"""compressed-tensors W8A8 (int8 weights + dynamic per-token int8 activations) and W4A8 artifacts.

Layout and config against compressed-tensors 0.20 itself (its int-quantized compressor and its ``W8A8`` preset),
then whole models loaded by the real client (transformers 5.24 + compressed-tensors, default
``from_pretrained``, CPU) and by qtool's `load_model`:

* layer by layer (each client Linear's recorded input fed to qtool's module): identical activation codes;
  the integer path agrees to float32 rounding (~1e-7 relative), the float path (``matmul="float"``) bit for bit;
* whole model: the float path reproduces the client's logits bit for bit. The integer path differs by more
  than float noise: the client's float rounding moves some later activations across a rounding boundary
  (one code step), which the random tiny Llama amplifies (measured ~0.008 relative). The negative controls,
  the same weights without activation quantization and absmax/127 scales, are ~3x further away.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from qtool.outputs import OUTPUT_FORMATS as OUTPUTS
from qtool.errors import ModelError, UsageError
from qtool.formats import compressed_tensors as ct
from qtool.formats.affine import AffineCodec
from qtool.io.source import open_model
from qtool.plan import parse_plan
from qtool.runtime import w8a8
from qtool.runtime.load import load_model

pytest.importorskip("compressed_tensors")

W8 = AffineCodec(8, 0, True)


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- layout and config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", [W8, AffineCodec(8, 64, False)], ids=lambda c: c.name)
def test_int_quantized_equals_compressed_tensors_compressor(codec):
    """compressed-tensors' int-quantized compressor, fed our weight/scale/zero, writes exactly our tensors, and
    its decompression is our dequantization. (With bfloat16 weights and scales its compressor divides in
    bfloat16, so its own codes may differ from qtool's float32 ones; loading reads the stored codes either way.)"""
    from compressed_tensors.compressors.naive_quantized import IntQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    w = torch.randn(72, 256, generator=gen(0)) * 0.05
    q = codec.encode(w)
    assert ct.layout(codec, "int8") == "int-quantized" and ct.layout(codec) == "pack-quantized"
    scheme = QuantizationScheme(targets=["Linear"], weights=ct.weight_args(codec), input_activations=ct.input_args("int8"))
    state = {"weight": w.to(codec.scale_dtype), "weight_scale": q.params["scale"], "weight_zero_point": q.params["zero"]}
    theirs = IntQuantizationCompressor.compress(state, scheme)
    ours = ct.pack(q, "int8")
    assert set(theirs) == set(ours) == ({"weight", "weight_scale"} | ({"weight_zero_point"} if not codec.symmetric else set()))
    for k in ours:
        assert theirs[k].dtype == ours[k].dtype and torch.equal(theirs[k], ours[k]), k
    dense = IntQuantizationCompressor.decompress(ours, scheme)["weight"]
    assert torch.equal(dense.float(), q.dequantize())
    back = ct.unpack(ours, codec)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.dequantize(), q.dequantize())
    assert sum(t.numel() * t.element_size() for t in ours.values()) == q.nbytes - 16  # no weight_shape


def test_w4a8_is_int_quantized():
    """W4A8 too: one int8 per 4-bit code (as compressed-tensors infers and vLLM's W4A8-int scheme reads), so the
    file holds more than the codec's packed `nbytes`."""
    codec = AffineCodec(4, 64, False)
    q = codec.encode(torch.randn(16, 256, generator=gen(1)))
    assert ct.layout(codec, "int8") == "int-quantized"
    t = ct.pack(q, "int8")
    assert set(t) == {"weight", "weight_scale", "weight_zero_point"} and torch.equal(t["weight"], q.codes)
    assert t["weight_zero_point"].dtype == torch.int8 and t["weight_zero_point"].shape == (16, 4)
    assert sum(v.numel() * v.element_size() for v in t.values()) > q.nbytes
    assert torch.equal(ct.unpack(t, codec).dequantize(), q.dequantize())
    with pytest.raises(ValueError, match="float zero"):
        ct.pack(AffineCodec(4, 64, False, float_zero=True).encode(torch.randn(16, 256)), "int8")
    with pytest.raises(ValueError, match="activations"):
        ct.layout(codec, "fp8")


def test_unpack_int_quantized_rejects_malformed():
    codec = AffineCodec(4, 64, True)
    t = {"weight": torch.full((8, 64), 9, dtype=torch.int8), "weight_scale": torch.ones(8, 1)}
    with pytest.raises(ValueError, match="4-bit"):
        ct.unpack(t, codec)
    with pytest.raises(ValueError, match="int8 codes"):
        ct.unpack({"weight": torch.zeros(8, 64), "weight_scale": torch.ones(8, 1)}, W8)
    with pytest.raises(ValueError, match="weight_zero_point"):
        ct.unpack({"weight": torch.zeros(8, 64, dtype=torch.int8), "weight_scale": torch.ones(8, 1)},
                  AffineCodec(8, 0, False))


NAMES = [f"model.layers.{i}.{m}" for i in range(2)
         for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                   "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]
ATTN = [n for n in NAMES if "self_attn" in n]
MLP = [n for n in NAMES if "mlp" in n]


def test_config_matches_w8a8_preset():
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme
    from transformers import CompressedTensorsConfig

    cfg = ct.quantization_config([(W8, NAMES, "int8")], ["lm_head"], all_linear=NAMES + ["lm_head"])
    group = cfg["config_groups"]["group_0"]
    assert cfg["format"] == group["format"] == "int-quantized" and group["targets"] == ["Linear"]
    preset = preset_name_to_scheme("W8A8", ["Linear"])
    assert QuantizationArgs.model_validate(group["input_activations"]) == preset.input_activations
    assert QuantizationArgs.model_validate(group["weights"]) == preset.weights
    parsed = QuantizationConfig.model_validate(cfg)
    assert parsed.config_groups["group_0"].input_activations == preset.input_activations
    assert CompressedTensorsConfig.from_dict(cfg).is_quantization_compressed
    assert "dequantize" not in cfg

    mixed = ct.quantization_config([(AffineCodec(4, 64, True), ATTN, "none"), (W8, MLP, "int8")], ["lm_head"])
    assert mixed["format"] == "mixed-precision"
    assert [g["format"] for g in mixed["config_groups"].values()] == ["pack-quantized", "int-quantized"]
    assert mixed["config_groups"]["group_0"]["input_activations"] is None
    QuantizationConfig.model_validate(mixed)
    # same codec, different activations: two groups; asymmetric int-quantized keeps the default load path
    split = ct.quantization_config([(AffineCodec(8, 64, False), ATTN, "none"), (AffineCodec(8, 64, False), MLP, "int8")], [])
    assert len(split["config_groups"]) == 2 and ct.transformers_load_warning(split) is not None  # packed asym zp
    for bits in (8, 4):  # unpacked int8 zero points: the default load path works, no dequantize key
        asym = ct.quantization_config([(AffineCodec(bits, 64, False), NAMES, "int8")], [])
        assert "dequantize" not in asym and ct.transformers_load_warning(asym) is None
    mixed_int = ct.quantization_config([(AffineCodec(4, 64, False), ATTN, "int8"), (W8, MLP, "int8")], [])
    assert mixed_int["format"] == "int-quantized" and ct.transformers_load_warning(mixed_int) is None


def test_weight_only_config_unchanged():
    """A weight-only scheme writes the same config whether or not activations are named ("none")."""
    for codec in (AffineCodec(4, 64, True), AffineCodec(4, 64, False), W8, AffineCodec(4, 64, False, float_zero=True)):
        a = ct.quantization_config([(codec, NAMES)], ["lm_head"], all_linear=NAMES + ["lm_head"])
        b = ct.quantization_config([(codec, NAMES, "none")], ["lm_head"], all_linear=NAMES + ["lm_head"])
        assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
        assert a["format"] == "pack-quantized" and a["config_groups"]["group_0"]["input_activations"] is None


# ---- the engine's compressed-tensors output ----------------------------------------------------------------------
def rule(match: str, bits: int, group: str, sym: bool, act: str | None, extra: str = "") -> str:
    a = f", activations: {act}" if act else ""
    return (f"  - {{match: '{match}', bits: {bits}, group_size: {group}, symmetric: {str(sym).lower()}{a}{extra}}}\n")


def plan_text(*rules: str, fmt: str = "compressed-tensors") -> str:
    return "rules:\n" + "".join(rules) + f"output: {{format: {fmt}}}\ncheck: {{sequences: 0}}\n"


PLANS = {
    "w8a8": plan_text(rule(".*", 8, "channel", True, "int8")),
    "w8a8-g64-asym": plan_text(rule(".*", 8, 64, False, "int8")),
    "w4a8-g64-asym": plan_text(rule(".*", 4, 64, False, "int8")),
    "w4a16-attn+w8a8-mlp": plan_text(rule("self_attn", 4, 64, True, None), rule(".*", 8, "channel", True, "int8")),
}


def test_output_groups_by_activation_scheme():
    shapes = {n: (256, 256) for n in NAMES}
    text = plan_text(rule("mlp", 8, "channel", True, "int8"), rule(".*", 8, "channel", True, None))
    specs = parse_plan(text).resolve(shapes, torch.float32)
    cfg = OUTPUTS["compressed-tensors"].config(specs, ["lm_head"], torch.float32)
    groups = {g["format"]: g for g in cfg["config_groups"].values()}
    assert set(groups) == {"int-quantized", "pack-quantized"} and cfg["format"] == "mixed-precision"
    assert groups["int-quantized"]["targets"] == sorted(MLP) and groups["pack-quantized"]["targets"] == sorted(ATTN)
    q = W8.encode(torch.randn(256, 256, generator=gen(2)))
    assert "weight" in OUTPUTS["compressed-tensors"].pack(q, torch.float32, specs[MLP[0]])
    assert "weight_packed" in OUTPUTS["compressed-tensors"].pack(q, torch.float32, specs[ATTN[0]])
    assert "weight_packed" in OUTPUTS["compressed-tensors"].pack(q, torch.float32)  # no spec: weight-only
    outlier = {n: replace(s, rule=replace(s.rule, outlier_threshold=6.0)) for n, s in specs.items()}  # plan.py refuses it too
    with pytest.raises(UsageError, match="outlier"):
        OUTPUTS["compressed-tensors"].config(outlier, ["lm_head"], torch.float32)
    for fmt in ("gptq", "awq"):
        with pytest.raises(UsageError, match="activations"):
            OUTPUTS[fmt].config(parse_plan(PLANS["w4a8-g64-asym"]).resolve(shapes, torch.float32), ["lm_head"],
                                torch.float32)


def write_artifact(src, dst, text: str) -> None:
    """What the engine writes for plan `text` (RTN): `output_format(fmt).pack(q, dtype, spec)` per linear and
    `.config(...)`, assembled into an HF directory."""
    source = open_model(src)
    plan = parse_plan(text)
    out = OUTPUTS[plan.output_format]
    shapes = {n.removesuffix(".weight"): tuple(source.shape(n)) for n in source.names() if n.endswith("_proj.weight")}
    specs = plan.resolve(shapes, torch.float32)
    tensors = {}
    for name in source.names():
        module = name.removesuffix(".weight")
        if module in specs:
            q = specs[module].codec.encode(source.get(name).float())
            tensors.update({f"{module}.{k}": t for k, t in out.pack(q, torch.float32, specs[module]).items()})
        else:
            tensors[name] = source.get(name)
    dst.mkdir(parents=True)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = out.config(specs, sorted(set(shapes) - set(specs)) + ["lm_head"], torch.float32)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for f in src.iterdir():
        if f.name not in ("config.json", "model.safetensors"):
            shutil.copy(f, dst / f.name)


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tmp_path_factory.mktemp(name) / "q"
            write_artifact(tiny_llama, cache[name], PLANS[name])
        return cache[name]

    return get


IDS = torch.randint(0, 300, (4, 48), generator=gen(3))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def client_load(path):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def int8_modules(model) -> dict[str, w8a8.Int8ActLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, w8a8.Int8ActLinear)}


@pytest.mark.parametrize("name", PLANS)
def test_client_layers_equal_qtool_modules(artifact, name):
    """Each client Linear's recorded input, fed to qtool's module: same output up to float32 rounding (integer
    path) and bit for bit (float path)."""
    client = client_load(artifact(name))
    logits(client)  # the first forward decompresses the weights
    ours, _, _ = load_model(artifact(name))
    mods = int8_modules(ours)
    assert len(mods) == (6 if name.startswith("w4a16") else 14)  # 8 attention + 6 MLP linears
    records = {}
    hooks = [client.get_submodule(n).register_forward_hook(
        lambda m, i, o, n=n: records.__setitem__(n, (i[0].clone(), o.clone()))) for n in mods]
    logits(client)
    for h in hooks:
        h.remove()
    worst = 0.0
    for n, m in mods.items():
        assert client.get_submodule(n).quantization_scheme.input_activations is not None
        x, y = records[n]
        worst = max(worst, ((m(x) - y).abs().max() / y.abs().max()).item())
        m.matmul = "float"
        assert torch.equal(m(x), y), n
    print(f"{name}: per-layer integer path vs client, max |d| / max |y| = {worst:.3g}")
    assert worst < 1e-5
    for n, m in ours.named_modules():  # weight-only linears are plain dequantized Linears, as before
        if n.endswith("_proj") and n not in mods:
            assert type(m) is torch.nn.Linear and torch.equal(m.weight, client.get_submodule(n).weight)


def wrong_scale(x: torch.Tensor):
    """Negative control: absmax / 127 with codes clamped to +-127 (a common W8A8 formula, not this client's)."""
    s = x.abs().amax(-1, keepdim=True) / 127
    s = torch.where(s == 0, torch.ones_like(s), s)
    return torch.round(torch.clamp(x / s, -127, 127)).to(torch.int8), s


def weight_only(model):
    for name, m in int8_modules(model).items():
        lin = torch.nn.Linear(m.in_features, m.out_features, bias=False)
        lin.weight.data = m.dequantized_weight()
        model.set_submodule(name, lin)
    return model


@pytest.mark.parametrize("name", PLANS)
def test_whole_model_logits(artifact, name, monkeypatch):
    theirs = logits(client_load(artifact(name)))
    ours_model, _, _ = load_model(artifact(name))
    ours = logits(ours_model)
    for m in int8_modules(ours_model).values():
        m.matmul = "float"
    assert torch.equal(logits(ours_model), theirs)  # compressed-tensors' arithmetic: bit for bit
    for m in int8_modules(ours_model).values():
        m.matmul = "int"
    controls = {"weight-only": rel(logits(weight_only(load_model(artifact(name))[0])), theirs)}
    monkeypatch.setattr(w8a8, "ct_token_quantize", wrong_scale)
    controls["absmax/127"] = rel(logits(ours_model), theirs)
    monkeypatch.undo()
    err = rel(ours, theirs)
    print(f"{name}: logits rel error vs transformers+compressed-tensors: integer path {err:.3g} "
          f"(max |d| {(ours - theirs).abs().max().item():.3g}), float path 0; controls "
          + ", ".join(f"{k} {v:.3g}" for k, v in controls.items()))
    assert err < 0.02 and err < min(controls.values()) / 2


def rewrite_config(src, dst, change):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    change(cfg["quantization_config"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("change,match", [
    (lambda q: q["config_groups"]["group_0"]["input_activations"].update(dynamic=False), "input activations"),
    (lambda q: q["config_groups"]["group_0"]["input_activations"].update(symmetric=False), "input activations"),
    (lambda q: q["config_groups"]["group_0"].update(output_activations={"num_bits": 8}), "output activation"),
    (lambda q: q["config_groups"]["group_0"]["weights"].update(type="float"), "type 'float'"),
])
def test_load_model_rejects_unsupported_schemes(artifact, tmp_path, change, match):
    with pytest.raises(ModelError, match=match):
        load_model(rewrite_config(artifact("w8a8"), tmp_path / "bad", change))


def test_load_model_rejects_malformed_int_weight(artifact, tmp_path):
    dst = tmp_path / "bad"
    shutil.copytree(artifact("w8a8"), dst)
    tensors = load_file(dst / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].float()
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelError, match="up_proj"):
        load_model(dst)


def test_weight_only_artifact_loads_as_before(tiny_llama, tmp_path):
    """W4A16 / W8A16 artifacts: plain Linears holding exactly the codec's dequantized weights."""
    text = plan_text(rule("self_attn", 4, 64, True, None), rule(".*", 8, "channel", True, None))
    write_artifact(tiny_llama, tmp_path / "q", text)
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert cfg["format"] == "pack-quantized" and all(g["input_activations"] is None for g in cfg["config_groups"].values())
    model, _, _ = load_model(tmp_path / "q")
    src = open_model(tiny_llama)
    specs = parse_plan(text).resolve({n: (1, 256) for n in NAMES}, torch.float32)
    assert not int8_modules(model)
    for n in NAMES:
        expected = specs[n].codec.encode(src.get(n + ".weight").float()).dequantize()
        assert type(model.get_submodule(n)) is torch.nn.Linear and torch.equal(model.get_submodule(n).weight, expected)


def test_engine_writes_int_quantized(tiny_llama, tmp_path):
    from qtool.engine.run import run

    run(open_model(tiny_llama), parse_plan(PLANS["w8a8"]), tmp_path / "q")
    names = open_model(tmp_path / "q").names()
    assert "model.layers.0.mlp.down_proj.weight" in names and "model.layers.0.mlp.down_proj.weight_packed" not in names
    theirs = logits(client_load(tmp_path / "q"))
    model, _, _ = load_model(tmp_path / "q")
    for m in int8_modules(model).values():
        m.matmul = "float"
    assert torch.equal(logits(model), theirs)
