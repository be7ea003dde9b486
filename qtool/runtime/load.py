"""qtool's own loader: any artifact qtool writes (and any float HF directory or GGUF) -> a float torch model.

Weight-only quantized linears are dequantized on load, through the same codecs that wrote them; linears
whose inputs are quantized at run time (compressed-tensors ``input_activations`` dynamic per-token int8, or
bitsandbytes ``load_in_8bit``, LLM.int8() with its ``llm_int8_threshold``) become
`qtool.runtime.w8a8.Int8ActLinear`, which quantizes activations exactly as those clients do. This is the
model `qtool eval` measures. Real clients (transformers + compressed-tensors / bitsandbytes) are proven to
load the same files by the test suite.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from qtool.errors import ModelError
from qtool.io.source import ModelSource, open_model


def _ct_group(qconfig: dict, module: str) -> dict:
    """The config group whose targets match `module` (first match)."""
    for group in qconfig["config_groups"].values():
        for target in group["targets"]:
            if (target == "Linear" or target == module
                    or (target.startswith("re:") and re.match(target[3:], module))):
                return group
    raise ModelError(f"quantization_config has no scheme for {module}")


def _ct_int8_inputs(group: dict, module: str) -> bool:
    """True when the group quantizes inputs (dynamic per-token symmetric int8, the only scheme qtool runs)."""
    if group.get("output_activations"):
        raise ModelError(f"{module}: output activation quantization is not one qtool runs")
    args = group.get("input_activations")
    if not args:
        return False
    scheme = {k: args.get(k) for k in ("type", "num_bits", "symmetric", "dynamic", "strategy")}
    if scheme != {"type": "int", "num_bits": 8, "symmetric": True, "dynamic": True, "strategy": "token"}:
        raise ModelError(f"{module}: input activations {scheme} are not one qtool runs "
                         "(only dynamic per-token symmetric int8)")
    return True


def _ct_codec(qconfig: dict, module: str, scale: torch.Tensor):
    from qtool.formats.affine import AffineCodec

    w = _ct_group(qconfig, module)["weights"]
    if w.get("type", "int") != "int":
        raise ModelError(f"{module}: compressed-tensors weights of type {w.get('type')!r} are not one qtool loads")
    gs = w.get("group_size") if w["strategy"] == "group" else 0
    if w["strategy"] == "block":  # float zero points: [1, group_size] blocks (formats/compressed_tensors)
        block = w.get("block_structure") or []
        if len(block) != 2 or block[0] != 1:
            raise ModelError(f"{module}: compressed-tensors block {block} is not one qtool loads")
        gs = block[1]
    fz = not w["symmetric"] and str(w.get("zp_dtype")).removeprefix("torch.") in ("float16", "bfloat16", "float32")
    return AffineCodec(bits=w["num_bits"], group_size=gs or 0, symmetric=w["symmetric"], scale_dtype=scale.dtype,
                       float_zero=fz)


def _ct_g_idx(tensors: dict[str, torch.Tensor], weights: dict, codec, where: str) -> dict[str, torch.Tensor]:
    """The module's tensors, keeping ``weight_g_idx`` only where its scheme says ``actorder: group``.

    compressed-tensors <= 0.18 created (and applied) the parameter for that scheme only; 0.19+ refuse such a
    config (`formats/compressed_tensors.py`), but qtool still reads those files. A non-sequential g_idx under
    another scheme would be ignored by the clients: refused as inconsistent rather than guessed at.
    """
    g_idx = tensors.get("weight_g_idx")
    if g_idx is None or str(weights.get("actorder")).lower() in ("group", "dynamic"):
        return tensors
    inp = g_idx.shape[0] if g_idx.ndim == 1 else 0
    if inp and torch.equal(g_idx.to(torch.int64), torch.arange(inp) // codec.group_width(inp)):
        return {k: v for k, v in tensors.items() if k != "weight_g_idx"}
    raise ModelError(f"{where}: weight_g_idx holds act-order groups but the config's actorder is "
                     f"{weights.get('actorder')!r}, not 'group': compressed-tensors would ignore it")


def _dequantized(source: ModelSource, qconfig: dict | None,
                 dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """(float state dict of the artifact with weight-only quantized linears dequantized, {module name:
    Int8ActLinear} for linears with int8 activations; their tensors are not in the state dict)."""
    from qtool.runtime.w8a8 import Int8ActLinear

    names = source.names()
    method = (qconfig or {}).get("quant_method")
    int8 = method == "bitsandbytes" and bool(qconfig.get("load_in_8bit", qconfig.get("_load_in_8bit")))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    sd: dict[str, torch.Tensor] = {}
    modules: dict[str, nn.Module] = {}
    if method == "compressed-tensors":
        keys = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx", "weight")
    elif int8:
        keys = ("weight", "SCB", "weight_format")
        if qconfig.get("llm_int8_has_fp16_weight"):
            raise ModelError(f"{source.path}: llm_int8_has_fp16_weight artifacts hold float weights; qtool "
                             "loads pre-quantized 8-bit weights only")
    elif method == "bitsandbytes":
        keys = ("weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax", "weight.nested_quant_map",
                "weight.quant_state.bitsandbytes__nf4", "weight.quant_state.bitsandbytes__fp4")
    elif method == "gptq":
        keys = ("qweight", "qzeros", "scales", "g_idx")
        fmt = qconfig.get("checkpoint_format") or qconfig.get("format") or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise ModelError(f"{source.path}: GPTQ checkpoint format {fmt!r} is not one qtool loads (gptq, gptq_v2)")
    elif method == "awq":
        keys = ("qweight", "qzeros", "scales")
        if str(qconfig.get("version", qconfig.get("format", "gemm"))).lower() != "gemm" or not qconfig.get(
                "zero_point", True):
            raise ModelError(f"{source.path}: only AWQ version gemm with zero points is loaded by qtool")
    elif method is None:
        keys = ()
    else:
        raise ModelError(f"{source.path}: quant_method {method!r} is not one qtool loads")
    quantized = set()
    if method == "compressed-tensors":  # pack-quantized (weight_packed), or int-quantized (int8 weight + scale)
        quantized = {n.removesuffix(".weight_packed") for n in names if n.endswith(".weight_packed")}
        quantized |= {n.removesuffix(".weight_scale") for n in names if n.endswith(".weight_scale")}
    elif int8:
        quantized = {n.removesuffix(".SCB") for n in names if n.endswith(".SCB")}
    elif method == "bitsandbytes":
        quantized = {n.split(".weight.quant_state.")[0] for n in names if ".weight.quant_state." in n}
    elif method in ("gptq", "awq"):
        quantized = {n.removesuffix(".qweight") for n in names if n.endswith(".qweight")}
    for n in names:
        module = next((n.removesuffix("." + k) for k in keys if n.endswith("." + k)
                       and n.removesuffix("." + k) in quantized), None)
        if module is None:
            sd[n] = source.get(n)
        else:
            groups.setdefault(module, {})[n.removeprefix(module + ".")] = source.get(n)
    for module, tensors in groups.items():
        if method == "compressed-tensors":
            from qtool.formats import compressed_tensors

            if "weight_scale" not in tensors:
                raise ModelError(f"{source.path}: {module}: compressed-tensors weight without weight_scale")
            codec = _ct_codec(qconfig, module, tensors["weight_scale"])
            tensors = _ct_g_idx(tensors, _ct_group(qconfig, module)["weights"], codec, f"{source.path}: {module}")
            try:
                q = compressed_tensors.unpack(tensors, codec)
            except (KeyError, ValueError) as e:
                raise ModelError(f"{source.path}: {module}: cannot read compressed-tensors tensors: {e}") from None
            if _ct_int8_inputs(_ct_group(qconfig, module), module):
                if codec.float_zero or "g_idx" in q.params:
                    what = "float zero points" if codec.float_zero else "act-order groups (weight_g_idx)"
                    raise ModelError(f"{source.path}: {module}: int8 activations with {what}")
                bias = sd.pop(module + ".bias", None)
                modules[module] = Int8ActLinear(q.codes, q.params["scale"], None if codec.symmetric else q.params["zero"],
                                                None if bias is None else bias.to(dtype), scheme="ct")
            else:
                sd[module + ".weight"] = q.dequantize()
        elif int8:
            from qtool.formats import bnb_int8

            try:
                cb, scb = bnb_int8.check_tensors(tensors)
            except ValueError as e:
                raise ModelError(f"{source.path}: {module}: cannot read bitsandbytes 8-bit tensors: {e}") from None
            threshold = qconfig.get("llm_int8_threshold", 6.0)
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold >= 0:
                raise ModelError(f"{source.path}: llm_int8_threshold {threshold!r} is not a number >= 0")
            bias = sd.pop(module + ".bias", None)
            modules[module] = Int8ActLinear(cb, scb, None, None if bias is None else bias.to(dtype),
                                            scheme="bnb", threshold=float(threshold))
        elif method in ("gptq", "awq"):
            from qtool.formats import awq_format, gptq_format

            try:
                q = (gptq_format.unpack(tensors, qconfig["bits"], qconfig["group_size"], qconfig.get("sym", True), fmt)
                     if method == "gptq" else awq_format.unpack(tensors, qconfig["group_size"]))
            except (KeyError, ValueError) as e:
                raise ModelError(f"{source.path}: {module}: cannot read {method} tensors: {e}") from None
            sd[module + ".weight"] = q.dequantize()
        else:
            from qtool.formats import bnb

            sd[module + ".weight"] = bnb.unpack(tensors).dequantize()
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}, modules


def load_model(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, object, ModelSource]:
    """(model in eval mode, tokenizer, source) for a qtool artifact, a float HF directory or a GGUF file."""
    from transformers import AutoModelForCausalLM

    source = open_model(path)
    qconfig = None
    if source.path.is_dir():
        qconfig = json.loads((source.path / "config.json").read_text()).get("quantization_config")
    cfg = source.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    sd, int8_modules = _dequantized(source, qconfig, dtype)
    for name, module in sorted(int8_modules.items()):
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"{source.path}: {name} is not a module of this architecture") from None
        if not isinstance(old, nn.Linear) or (old.out_features, old.in_features) != (module.out_features,
                                                                                     module.in_features):
            raise ModelError(f"{source.path}: {name}: int8 weight {module.out_features}x{module.in_features} does "
                             f"not match the architecture's {old}")
        if (old.bias is not None) != (module.bias is not None):
            raise ModelError(f"{source.path}: {name}: bias {'missing' if old.bias is not None else 'unexpected'}")
        model.set_submodule(name, module)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    missing = [m for m in missing if not (cfg.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ModelError(f"{source.path}: tensors do not match the architecture "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    for name, buf in list(model.named_buffers()):
        if buf.is_meta:  # computed buffers (rotary inv_freq): rebuild the owning module on CPU
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            parent_name, attr = name.rsplit(".", 1)[0].rsplit(".", 1)
            setattr(model.get_submodule(parent_name), attr, type(owner)(config=cfg))
    model.eval()
    return model, source.load_tokenizer(), source
