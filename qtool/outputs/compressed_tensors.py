"""compressed-tensors (vLLM, transformers): int codes of any width, group-wise or per channel, W8A8 schemes,
HQQ's float zero points (`formats/compressed_tensors.py` holds the byte layout)."""

from __future__ import annotations

import re

import torch

from qtool.errors import ModelError, UsageError
from qtool.formats.base import QTensor
from qtool.outputs.base import OutputFormat


def activations(spec) -> str:
    return spec.rule.activations if spec is not None and spec.rule is not None else "none"


def threshold(spec) -> float:
    return spec.rule.outlier_threshold if spec is not None and spec.rule is not None else 0.0


class CompressedTensors(OutputFormat):
    name = "compressed-tensors"
    quant_method = "compressed-tensors"
    codecs = {"int": (2, 3, 4, 8)}
    activations = True
    float_zero = True

    def pack(self, q: QTensor, dtype: torch.dtype, spec=None) -> dict[str, torch.Tensor]:
        from qtool.formats import compressed_tensors

        return compressed_tensors.pack(q, activations(spec))

    def config(self, specs: dict, unquantized: list[str], dtype: torch.dtype) -> dict:
        """One config group per (codec, activation scheme); compressed-tensors has no outlier decomposition."""
        from qtool.formats import compressed_tensors

        outliers = sorted(n for n, s in specs.items() if threshold(s) > 0)
        if outliers:
            raise UsageError(f"compressed-tensors has no LLM.int8() outlier threshold (rule of {outliers[0]}): "
                             "use output format bnb, or outlier_threshold 0")
        by_scheme: dict = {}
        for name, spec in sorted(specs.items()):
            by_scheme.setdefault((spec.codec, activations(spec)), []).append(name)
        try:
            return compressed_tensors.quantization_config(
                [(c, names, act) for (c, act), names in by_scheme.items()], ignore=unquantized,
                all_linear=sorted(specs) + unquantized)
        except ValueError as e:
            raise UsageError(f"compressed-tensors cannot hold this plan: {e}") from None

    def warning(self, qconfig: dict) -> str | None:
        from qtool.formats import compressed_tensors

        return compressed_tensors.transformers_load_warning(qconfig)

    def int8_runtime(self, packed: dict[str, torch.Tensor], bias, spec):
        from qtool.runtime.w8a8 import Int8ActLinear

        return Int8ActLinear(packed["weight"], packed["weight_scale"], packed.get("weight_zero_point"), bias=bias,
                             scheme="ct")

    # ---- reading back
    def read_keys(self, qconfig: dict) -> tuple[str, ...]:
        return ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx", "weight")

    def quantized_modules(self, names: list[str], qconfig: dict) -> set[str]:
        # pack-quantized (weight_packed), or int-quantized (int8 weight + scale)
        return ({n.removesuffix(".weight_packed") for n in names if n.endswith(".weight_packed")}
                | {n.removesuffix(".weight_scale") for n in names if n.endswith(".weight_scale")})

    def read(self, module: str, tensors: dict[str, torch.Tensor], qconfig: dict, dtype: torch.dtype, bias,
             where: str):
        from qtool.formats import compressed_tensors
        from qtool.runtime.w8a8 import Int8ActLinear

        if "weight_scale" not in tensors:
            raise ModelError(f"{where}: compressed-tensors weight without weight_scale")
        group = _group(qconfig, module)
        codec = _codec(group, module, tensors["weight_scale"])
        tensors = _g_idx(tensors, group["weights"], codec, where)
        try:
            q = compressed_tensors.unpack(tensors, codec)
        except (KeyError, ValueError) as e:
            raise ModelError(f"{where}: cannot read compressed-tensors tensors: {e}") from None
        if not _int8_inputs(group, module):
            return q.dequantize(), None
        if codec.float_zero or "g_idx" in q.params:
            what = "float zero points" if codec.float_zero else "act-order groups (weight_g_idx)"
            raise ModelError(f"{where}: int8 activations with {what}")
        return None, Int8ActLinear(q.codes, q.params["scale"], None if codec.symmetric else q.params["zero"],
                                   None if bias is None else bias.to(dtype), scheme="ct")


def _group(qconfig: dict, module: str) -> dict:
    """The config group whose targets match `module` (first match)."""
    for group in qconfig["config_groups"].values():
        for target in group["targets"]:
            if (target == "Linear" or target == module
                    or (target.startswith("re:") and re.match(target[3:], module))):
                return group
    raise ModelError(f"quantization_config has no scheme for {module}")


def _int8_inputs(group: dict, module: str) -> bool:
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


def _codec(group: dict, module: str, scale: torch.Tensor):
    from qtool.formats.affine import AffineCodec

    w = group["weights"]
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


def _g_idx(tensors: dict[str, torch.Tensor], weights: dict, codec, where: str) -> dict[str, torch.Tensor]:
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


FORMAT = CompressedTensors()
