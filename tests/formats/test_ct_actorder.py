"""Act-order groups (a ``g_idx``, GPTQ ``act_order: dynamic``) and compressed-tensors.

compressed-tensors 0.19/0.20 removed ``actorder: "group"`` (the only scheme with a ``weight_g_idx``): the config
of such a file no longer parses, so transformers + compressed-tensors 0.20 cannot load it. qtool therefore
refuses to write act-order groups as compressed-tensors (AWQ has no g_idx either), and keeps reading the
``weight_g_idx`` of files written for releases <= 0.18, exactly as those dequantize them (columns sorted by
g_idx, cut into groups of group_size).

Measured outside CI (compressed-tensors 0.18.0 put first on PYTHONPATH, transformers 5.24, CPU): 0.18's default
``from_pretrained`` of the artifact `old_artifact` builds gives logits identical to qtool's `load_model`
(max |diff| 0.0); with the natural g_idx written instead they are 0.50 relative off.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from qtool.errors import ModelError, UsageError
from qtool.formats import awq_format
from qtool.formats import compressed_tensors as ct
from conftest import dynamic_gptq
from qtool.formats.affine import AffineCodec
from qtool.formats.base import QTensor
from qtool.io.source import open_model
from qtool.runtime.load import load_model

pytest.importorskip("compressed_tensors")


def without_g_idx(q: QTensor) -> QTensor:
    return QTensor(q.codec, q.shape, q.codes, {k: v for k, v in q.params.items() if k != "g_idx"})


def old_layout(q: QTensor, g_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors <= 0.18 wrote for act-order groups: pack-quantized + weight_g_idx."""
    return ct.pack(without_g_idx(q)) | {"weight_g_idx": q.params["g_idx"] if g_idx is None else g_idx}


def as_018_dequantizes(t: dict[str, torch.Tensor], codec: AffineCodec) -> torch.Tensor:
    """compressed-tensors 0.18's group dequantize with a g_idx, re-implemented: sort the columns by g_idx, cut them
    into groups of group_size, (q - z) * s per group, put the columns back."""
    out, inp = (int(v) for v in t["weight_shape"].tolist())
    codes = ct.unpack_int32(t["weight_packed"], codec.bits, inp)
    zero = (torch.zeros(out, inp // codec.group_size, dtype=torch.int8) if codec.symmetric
            else ct.unpack_int32(t["weight_zero_point"].T.contiguous(), codec.bits, out).T)
    perm = torch.argsort(t["weight_g_idx"].long(), stable=True)
    grouped = codes[:, perm].reshape(out, -1, codec.group_size).float()
    w = ((grouped - zero.float().unsqueeze(-1)) * t["weight_scale"].unsqueeze(-1)).reshape(out, inp)
    return w[:, torch.argsort(perm)]


# ---- why qtool does not write them -----------------------------------------------------------------------------
def test_compressed_tensors_020_refuses_actorder_group():
    from compressed_tensors.quantization import QuantizationArgs

    args = ct.weight_args(AffineCodec(4, 64, True))
    assert QuantizationArgs(**(args | {"actorder": "weight"})).actorder == "weight"  # static act-order: fine
    for value in ("group", "dynamic"):
        with pytest.raises(ValueError, match="has been removed"):
            QuantizationArgs(**(args | {"actorder": value}))


@pytest.mark.parametrize("sym", [True, False])
def test_formats_without_g_idx_refuse_act_order_groups(sym):
    codec = AffineCodec(4, 64, sym, torch.float16)
    q = dynamic_gptq(torch.randn(64, 256, generator=torch.Generator().manual_seed(1)), codec, 0)
    for activations in ("none", "int8"):
        with pytest.raises(UsageError, match="compressed-tensors 0.20 cannot hold act-order groups"):
            ct.pack(q, activations)
    with pytest.raises(UsageError, match="awq .*no g_idx"):
        awq_format.pack(q)
    assert set(ct.pack(without_g_idx(q))) >= {"weight_packed", "weight_scale"}  # the same weight, natural groups


# ---- reading files of compressed-tensors <= 0.18 ---------------------------------------------------------------
@pytest.mark.parametrize("sym", [True, False])
def test_unpack_reads_weight_g_idx_as_018_dequantizes(sym):
    codec = AffineCodec(4, 64, sym)
    q = dynamic_gptq(torch.randn(64, 256, generator=torch.Generator().manual_seed(2)) * 0.05, codec, 3)
    t = old_layout(q)
    back = ct.unpack(t, codec)
    assert torch.equal(back.codes, q.codes) and torch.equal(back.params["g_idx"], q.params["g_idx"])
    assert torch.equal(back.dequantize(), as_018_dequantizes(t, codec))
    assert torch.equal(back.dequantize(), q.dequantize())
    natural = ct.unpack(old_layout(q, (torch.arange(256) // 64).to(torch.int32)), codec)
    assert "g_idx" not in natural.params and not torch.allclose(natural.dequantize(), q.dequantize())
    uneven = q.params["g_idx"].clone()
    uneven[uneven == 1] = 0  # group 0 gets 128 columns, group 1 none
    with pytest.raises(ValueError, match="exactly 64 columns"):
        ct.unpack(old_layout(q, uneven), codec)
    with pytest.raises(ValueError, match="g_idx values"):
        ct.unpack(old_layout(q, q.params["g_idx"] + 4), codec)


@pytest.fixture(scope="module")
def old_artifact(tiny_llama, tmp_path_factory):
    """Write tiny_llama's linears as compressed-tensors 0.18 wrote act-order groups. Returns a function
    (name, g_idx override or None, actorder) -> directory, plus the QTensors."""
    src = open_model(tiny_llama)
    codec = AffineCodec(4, 64, True)
    qs = {n.removesuffix(".weight"): dynamic_gptq(src.get(n).float(), codec, i)
          for i, n in enumerate(sorted(src.names())) if n.endswith("_proj.weight")}
    qconfig = ct.quantization_config([(codec, sorted(qs))], ignore=["lm_head"], all_linear=sorted(qs) + ["lm_head"])
    root = tmp_path_factory.mktemp("ct_actorder")

    def build(name: str, g_idx=None, actorder="group"):
        dst = root / name
        shutil.copytree(tiny_llama, dst)
        sd = load_file(dst / "model.safetensors")
        for module, q in qs.items():
            del sd[module + ".weight"]
            sd |= {f"{module}.{k}": v for k, v in old_layout(q, None if g_idx is None else g_idx(q)).items()}
        save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
        config = json.loads((dst / "config.json").read_text())
        config["quantization_config"] = json.loads(json.dumps(qconfig))
        config["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = actorder
        (dst / "config.json").write_text(json.dumps(config))
        return dst

    return build, qs


def _logits(model) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits.float()


def test_load_model_reads_old_act_order_artifacts(old_artifact, tiny_llama, tmp_path):
    """qtool's loader dequantizes every linear through its g_idx: its model equals a float transformers model
    holding the QTensors' weights; with the natural map written instead it does not. transformers +
    compressed-tensors 0.20 itself refuses the file (see the module docstring for 0.18)."""
    from transformers import AutoModelForCausalLM

    build, qs = old_artifact
    good = build("good")
    with pytest.raises(ValueError, match="actorder='group' has been removed"):
        AutoModelForCausalLM.from_pretrained(good)
    ours, _, _ = load_model(good)
    for module, q in qs.items():
        assert torch.equal(ours.get_submodule(module).weight, q.dequantize()), module
    float_dir = shutil.copytree(tiny_llama, tmp_path / "float")
    sd = load_file(float_dir / "model.safetensors") | {m + ".weight": q.dequantize() for m, q in qs.items()}
    save_file(sd, float_dir / "model.safetensors", metadata={"format": "pt"})
    expected = _logits(AutoModelForCausalLM.from_pretrained(float_dir).eval())
    assert torch.equal(_logits(ours), expected)
    natural, _, _ = load_model(build("natural", lambda q: (torch.arange(q.shape[1]) // 64).to(torch.int32)))
    err = float((_logits(natural) - expected).norm() / expected.norm())
    print(f"natural g_idx: logits rel error {err:.3g}")
    assert err > 0.1


def test_load_model_refuses_g_idx_the_config_does_not_announce(old_artifact):
    build, _ = old_artifact
    with pytest.raises(ModelError, match="weight_g_idx holds act-order groups but the config's actorder is None"):
        load_model(build("no_actorder", actorder=None))
    natural = build("natural_no_actorder", lambda q: (torch.arange(q.shape[1]) // 64).to(torch.int32), None)
    load_model(natural)  # a sequential weight_g_idx means nothing either way
