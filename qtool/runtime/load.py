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
from pathlib import Path

import torch
from torch import nn

from qtool.errors import ModelError
from qtool.io.source import ModelSource, open_model


def _dequantized(source: ModelSource, qconfig: dict | None,
                 dtype: torch.dtype) -> tuple[dict[str, torch.Tensor], dict[str, nn.Module]]:
    """(float state dict of the artifact with weight-only quantized linears dequantized, {module name:
    Int8ActLinear} for linears with int8 activations; their tensors are not in the state dict). Each format
    reads its own modules (`qtool/outputs/<format>.py`: `read_keys`, `quantized_modules`, `read`)."""
    from qtool.outputs import reader

    names = source.names()
    method = (qconfig or {}).get("quant_method")
    fmt = None
    if method is not None:
        fmt = reader(method)
        if fmt is None:
            raise ModelError(f"{source.path}: quant_method {method!r} is not one qtool loads")
        try:
            keys = fmt.read_keys(qconfig)
        except ModelError as e:
            raise ModelError(f"{source.path}: {e}") from None
        quantized = fmt.quantized_modules(names, qconfig)
    else:
        keys, quantized = (), set()
    groups: dict[str, dict[str, torch.Tensor]] = {}
    sd: dict[str, torch.Tensor] = {}
    modules: dict[str, nn.Module] = {}
    for n in names:
        module = next((n.removesuffix("." + k) for k in keys if n.endswith("." + k)
                       and n.removesuffix("." + k) in quantized), None)
        if module is None:
            sd[n] = source.get(n)
        else:
            groups.setdefault(module, {})[n.removeprefix(module + ".")] = source.get(n)
    for module, tensors in groups.items():
        weight, runtime = fmt.read(module, tensors, qconfig, dtype, sd.get(module + ".bias"),
                                   f"{source.path}: {module}")
        if runtime is not None:
            sd.pop(module + ".bias", None)
            modules[module] = runtime
        else:
            sd[module + ".weight"] = weight
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
