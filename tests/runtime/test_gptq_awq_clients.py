"""GPTQ (v1, v2) and AWQ GEMM artifacts written by qtool's engine, loaded by the real clients on CPU.

Every artifact is quantized by `qtool.engine.run.run` from the tiny float32 Llama and compared, logits against
logits, with qtool's own loader (`qtool.runtime.load.load_model`, which dequantizes through the same unpackers):

* transformers 5 + optimum + gptqmodel, default ``from_pretrained`` (gptqmodel's auto kernel: for 4-bit it is
  TorchAtenLinear / TorchAtenAwqLinear, which run the matmul in bfloat16 with bfloat16 scales: ~0.008 relative);
* the same with the plain torch kernels (``backend="torch"`` / ``"torch_awq"``): float32, 0.0 for GPTQ and ~8e-4
  for AWQ;
* GPTQModel.load (float16 only for GPTQ kernels), which also reads the ``dynamic`` skip rules.

Negative controls rewrite one thing in a correct artifact and must fail the same comparison: v1 zeros without
the -1, AWQ without the interleave, and a config without the skip list for float layers (transformers then
loads garbage silently; GPTQModel refuses).

Act-order groups (GPTQ ``act_order: dynamic``: ``desc_act: true`` and a real ``g_idx``) are checked on artifacts
written from GPTQ QTensors through `gptq_format` (the engine's output wiring is not involved): the same loads,
plus controls that write the natural or the reversed g_idx instead.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import dynamic_gptq
from qtool.engine.run import run
from qtool.errors import UsageError
from qtool.formats import awq_format, gptq_format
from qtool.formats.affine import AffineCodec
from qtool.formats.compressed_tensors import pack_int32
from qtool.io.source import open_model
from qtool.plan import parse_plan
from qtool.runtime.load import load_model

pytest.importorskip("optimum")
pytest.importorskip("gptqmodel")

IGNORE = ["layers\\.0\\.mlp\\.down_proj", "layers\\.1\\.self_attn\\.q_proj"]
SKIPPED = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
CASES = {  # name: (format, bits, symmetric, ignore some linears)
    "gptq-int4-sym": ("gptq", 4, True, False),
    "gptq-int3-sym": ("gptq", 3, True, False),
    "gptq_v2-int4-asym-ignore": ("gptq_v2", 4, False, True),
    "awq-int4-asym-ignore": ("awq", 4, False, True),
}
TOL_DEFAULT = 2e-2  # bfloat16 CPU kernels of gptqmodel's auto selection (measured ~0.008)
TOL_TORCH = 2e-3  # float32 torch kernels (measured 0.0 GPTQ, ~8e-4 AWQ)


def plan_text(fmt: str, bits: int, symmetric: bool, ignore: bool) -> str:
    text = (f"rules:\n  - {{match: '.*', bits: {bits}, group_size: 64, symmetric: {str(symmetric).lower()}}}\n"
            f"output: {{format: {fmt}}}\ncheck: {{sequences: 0}}\n")
    return text + ("ignore: [" + ", ".join(f"'{p}'" for p in IGNORE) + "]\n" if ignore else "")


def logits(model, dtype=torch.float32) -> torch.Tensor:
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(ids).logits.to(dtype).float()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def client_load(path, fmt: str, backend: str | None = None, info: bool = False):
    """``from_pretrained(path)``; `backend` overrides gptqmodel's kernel choice; `info` also returns loading info."""
    from transformers import AutoModelForCausalLM, AwqConfig, GPTQConfig

    kwargs = {}
    if backend:
        cfg = json.loads((path / "config.json").read_text())["quantization_config"]
        kwargs["quantization_config"] = (AwqConfig(bits=4, backend=backend) if fmt == "awq"
                                         else GPTQConfig(bits=cfg["bits"], backend=backend))
    model, loading = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    return (model.eval(), loading) if info else model.eval()


@pytest.fixture(scope="module")
def artifact(tiny_llama, tmp_path_factory):
    """case name -> (artifact dir, qtool runtime logits); each case is quantized once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            fmt, bits, sym, ignore = CASES[name]
            out = tmp_path_factory.mktemp(name) / "q"
            run(open_model(tiny_llama), parse_plan(plan_text(fmt, bits, sym, ignore)), out)
            model, _, _ = load_model(out)
            cache[name] = out, logits(model)
        return cache[name]

    return get


@pytest.mark.parametrize("name", CASES)
def test_transformers_default_load(artifact, name):
    """What a user types: ``AutoModelForCausalLM.from_pretrained(dir)`` on a CPU machine."""
    out, expected = artifact(name)
    fmt = CASES[name][0]
    model, loading = client_load(out, fmt, info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    linears = {n: type(m).__name__ for n, m in model.named_modules() if n.endswith("_proj")}
    assert len(linears) == 14
    assert all((t == "Linear") == (n in SKIPPED and CASES[name][3]) for n, t in linears.items()), linears
    err = rel(logits(model), expected)
    print(f"{name}: default load logits rel error {err:.3g}")
    assert err < TOL_DEFAULT


@pytest.mark.parametrize("name", CASES)
def test_transformers_torch_kernel_load(artifact, name):
    out, expected = artifact(name)
    fmt = CASES[name][0]
    err = rel(logits(client_load(out, fmt, "torch_awq" if fmt == "awq" else "torch")), expected)
    print(f"{name}: torch kernel logits rel error {err:.3g}")
    assert err < TOL_TORCH


@pytest.mark.parametrize("name", CASES)
def test_qtool_runtime_round_trip_exact(artifact, tiny_llama, name):
    """qtool's loader gives exactly (codes - zero) * float16(scale) of the codes RTN makes from the source.

    The engine's codecs keep float32 scales for a float32 model; GPTQ/AWQ store them in float16, so the expected
    weight is computed from the RTN QTensor with its scales rounded to float16 (exact when the plan's output
    dtype is float16).
    """
    out, _ = artifact(name)
    fmt, bits, sym, ignore = CASES[name]
    src = open_model(tiny_llama)
    plan = parse_plan(plan_text(fmt, bits, sym, ignore))
    shapes = {n.removesuffix(".weight"): tuple(src.shape(n)) for n in src.names() if n.endswith("_proj.weight")}
    specs = plan.resolve(shapes, torch.float32)
    model, _, _ = load_model(out)
    assert len(specs) == 14 - 2 * ignore
    for module, spec in specs.items():
        q = spec.codec.encode(src.get(module + ".weight").float())
        d = q.codes.to(torch.float16) - q.params["zero"].to(torch.float16).repeat_interleave(64, dim=1)
        expected = (d * q.params["scale"].half().repeat_interleave(64, dim=1)).float()
        assert torch.equal(model.get_submodule(module).weight, expected), module
    for module in SKIPPED if ignore else ():
        assert torch.equal(model.get_submodule(module).weight, src.get(module + ".weight"))
    warnings = json.loads((out / "qtool_manifest.json").read_text())["warnings"]
    assert any("gptq_v2" in w for w in warnings) == (fmt == "gptq_v2")


# ---- negative controls -----------------------------------------------------------------------------------------
def rewrite(src, dst, change_tensors=None, change_config=None):
    shutil.copytree(src, dst)
    if change_tensors:
        tensors = load_file(dst / "model.safetensors")
        save_file(change_tensors(tensors), dst / "model.safetensors", metadata={"format": "pt"})
    if change_config:
        config = json.loads((dst / "config.json").read_text())
        change_config(config["quantization_config"])
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def v1_without_minus_one(tensors):
    return {k: gptq_format.shift_zeros(v, 4, +1) if k.endswith(".qzeros") else v for k, v in tensors.items()}


def awq_without_interleave(tensors):
    out = dict(tensors)
    for key in [k for k in tensors if k.endswith(".qweight")]:
        module = key.removesuffix(".qweight")
        q = awq_format.unpack({k: tensors[f"{module}.{k}"] for k in awq_format.KEYS}, 64)
        out[f"{module}.qweight"] = pack_int32(q.codes.T.contiguous(), 4)
        out[f"{module}.qzeros"] = pack_int32(q.params["zero"].T.contiguous(), 4)
    return out


@pytest.mark.parametrize("name,wrong", [("gptq-int4-sym", v1_without_minus_one),
                                        ("awq-int4-asym-ignore", awq_without_interleave)])
def test_wrong_packing_fails(artifact, tmp_path, name, wrong):
    out, expected = artifact(name)
    bad = rewrite(out, tmp_path / "bad", change_tensors=wrong)
    fmt = CASES[name][0]
    err = rel(logits(client_load(bad, fmt, "torch_awq" if fmt == "awq" else "torch")), expected)
    print(f"{name} {wrong.__name__}: logits rel error {err:.3g}")
    assert not err < TOL_DEFAULT


def test_missing_skip_list_fails(artifact, tmp_path):
    """Float layers inside GPTQ blocks must be named, or the clients expect quantized tensors for them.

    Without ``modules_in_block_to_quantize`` transformers only *reports* the missing qweights and builds the
    layers from uninitialized memory (a forward then aborts the process inside a compiled kernel, or returns
    garbage), so this checks the loading report; GPTQModel without ``dynamic`` refuses outright.
    """
    from gptqmodel import BACKEND, GPTQModel

    out, _ = artifact("gptq_v2-int4-asym-ignore")
    bad = rewrite(out, tmp_path / "no_mib", change_config=lambda q: q.pop("modules_in_block_to_quantize"))
    _, loading = client_load(bad, "gptq_v2", "torch", info=True)
    assert {f"{m}.qweight" for m in SKIPPED} <= set(loading["missing_keys"])
    assert {f"{m}.weight" for m in SKIPPED} <= set(loading["unexpected_keys"])
    bad = rewrite(out, tmp_path / "no_dynamic", change_config=lambda q: q.pop("dynamic"))
    with pytest.raises(ValueError, match="Missing required quantized weights"):
        GPTQModel.load(str(bad), device="cpu", backend=BACKEND.TORCH)


# ---- GPTQModel's own loader ------------------------------------------------------------------------------------
def assert_gptqmodel_load_matches(out, name: str) -> None:
    """GPTQModel.load (torch kernel, float16) and qtool's loader give the same logits."""
    from gptqmodel import BACKEND, GPTQModel

    model = GPTQModel.load(str(out), device="cpu", dtype=torch.float16, backend=BACKEND.TORCH)
    ours, _, _ = load_model(out, dtype=torch.float16)
    err = rel(logits(model.model), logits(ours))
    print(f"{name}: GPTQModel.load float16 logits rel error {err:.3g}")
    assert err < TOL_TORCH


@pytest.mark.parametrize("name", [n for n in CASES if n.startswith("gptq")])
def test_gptqmodel_load(artifact, name):
    assert_gptqmodel_load_matches(artifact(name)[0], name)


# ---- refusals at the engine ------------------------------------------------------------------------------------
def test_engine_refuses_asymmetric_v1_and_mixed_schemes(tiny_llama, tmp_path):
    with pytest.raises(UsageError, match="gptq_v2"):
        run(open_model(tiny_llama), parse_plan(plan_text("gptq", 4, False, False)), tmp_path / "asym")
    mixed = ("rules:\n  - {match: 'mlp', bits: 8, group_size: 64}\n  - {match: '.*', bits: 4, group_size: 64}\n"
             "output: {format: gptq}\ncheck: {sequences: 0}\n")
    with pytest.raises(UsageError, match="one scheme"):
        run(open_model(tiny_llama), parse_plan(mixed), tmp_path / "mixed")
    assert not (tmp_path / "asym").exists() and not (tmp_path / "mixed").exists()


# ---- act-order groups: desc_act with a real g_idx ------------------------------------------------------------
DESC_ACT = {"gptq-int4-sym-desc_act": ("gptq", True), "gptq_v2-int4-asym-desc_act": ("gptq_v2", False)}


def write_desc_act(tiny_llama, dst, name: str, g_idx=None):
    """tiny_llama with every linear GPTQ-quantized with act-order groups, written as `name`'s format with
    ``desc_act: true``; `g_idx(q, packed)` overrides the written g_idx. Returns (dir, {module: QTensor})."""
    fmt, sym = DESC_ACT[name]
    codec = AffineCodec(4, 64, sym, torch.float16)  # float16 scales: the file holds exactly the QTensors
    src = open_model(tiny_llama)
    qs = {n.removesuffix(".weight"): dynamic_gptq(src.get(n).float(), codec, i)
          for i, n in enumerate(sorted(src.names())) if n.endswith("_proj.weight")}
    shutil.copytree(tiny_llama, dst)
    sd = load_file(dst / "model.safetensors")
    for module, q in qs.items():
        packed = gptq_format.pack(q, fmt)
        if g_idx is not None:
            packed["g_idx"] = g_idx(q, packed)
        del sd[module + ".weight"]
        sd |= {f"{module}.{k}": v for k, v in packed.items()}
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = gptq_format.quantization_config(codec, fmt, ["lm_head"], desc_act=True)
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    return dst, qs


@pytest.fixture(scope="module")
def desc_act(tiny_llama, tmp_path_factory):
    """name -> (artifact dir, {module: QTensor}, qtool runtime logits); built once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            out, qs = write_desc_act(tiny_llama, tmp_path_factory.mktemp(name) / "q", name)
            model, _, _ = load_model(out)
            cache[name] = out, qs, logits(model)
        return cache[name]

    return get


@pytest.mark.parametrize("name", DESC_ACT)
def test_desc_act_qtool_loader_is_exact(desc_act, name):
    out, qs, _ = desc_act(name)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["desc_act"] is True
    model, _, _ = load_model(out)
    for module, q in qs.items():
        assert torch.equal(model.get_submodule(module).weight, q.dequantize()), module


@pytest.mark.parametrize("backend", [None, "torch"])
@pytest.mark.parametrize("name", DESC_ACT)
def test_desc_act_transformers_load(desc_act, name, backend):
    """Default ``from_pretrained`` (TorchAtenLinear, bfloat16: measured 0.008 relative) and the float32 torch
    kernel (measured 0.0); the client's layers hold qtool's g_idx."""
    out, qs, expected = desc_act(name)
    model, loading = client_load(out, DESC_ACT[name][0], backend, info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    if backend == "torch":
        for module, q in qs.items():
            assert torch.equal(model.get_submodule(module).g_idx.cpu().int(), q.params["g_idx"]), module
    err = rel(logits(model), expected)
    print(f"{name} {backend or 'default'}: logits rel error {err:.3g}, "
          f"max |diff| {(logits(model) - expected).abs().max():.3g}")
    assert err < (TOL_TORCH if backend else TOL_DEFAULT)


@pytest.mark.parametrize("name,wrong", [
    ("gptq-int4-sym-desc_act", "natural"), ("gptq_v2-int4-asym-desc_act", "natural"),
    ("gptq-int4-sym-desc_act", "reversed")])
def test_desc_act_wrong_g_idx_fails(desc_act, tiny_llama, tmp_path, name, wrong):
    _, _, expected = desc_act(name)
    change = {"natural": lambda q, p: (torch.arange(q.shape[1]) // 64).to(torch.int32),
              "reversed": lambda q, p: p["g_idx"].flip(0).contiguous()}[wrong]
    bad, _ = write_desc_act(tiny_llama, tmp_path / "bad", name, change)
    err = rel(logits(client_load(bad, DESC_ACT[name][0], "torch")), expected)
    print(f"{name} {wrong} g_idx: logits rel error {err:.3g}")
    assert not err < TOL_DEFAULT


@pytest.mark.parametrize("name", DESC_ACT)
def test_desc_act_gptqmodel_load(desc_act, name):
    assert_gptqmodel_load_matches(desc_act(name)[0], name)


def test_desc_act_artifact_is_byte_identical(tiny_llama, tmp_path):
    a, _ = write_desc_act(tiny_llama, tmp_path / "a", "gptq_v2-int4-asym-desc_act")
    b, _ = write_desc_act(tiny_llama, tmp_path / "b", "gptq_v2-int4-asym-desc_act")
    for f in ("model.safetensors", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
