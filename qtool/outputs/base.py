"""The output-format object: everything the plan, the flags, the engine and the loader ask of one format.

One subclass per format, one file each (`outputs/<format>.py`), registered by name in `outputs/__init__.py`.
A format answers:

* **what it holds** — `codecs` (plan codec -> the int bit widths it stores; `()` = any), `refuse(rule)`: why a
  plan rule cannot be written in it (None when it can). Rules such as "GPTQ v1 cannot be asymmetric" are written
  here once; `plan.py` (naming the file, line and field) and `flags.py` (naming the flags) both ask `refuse`;
* **how a codec is fitted for it** — `fp16_scales` (its files store fp16 scales: fit on that grid), `g_idx`
  (it can store act-order groups);
* **how a QTensor is written** — `pack(q, dtype, spec)` (the module's on-disk tensors), `config(specs,
  unquantized, dtype)` (the ``quantization_config``), `warning(qconfig)` (known client incompatibilities),
  `int8_runtime(packed, bias, spec)` (the module that quantizes inputs at run time, for W8A8 rules);
* **its exact size** — `tensor_bytes(codec, shape)`: the bytes one weight takes on disk (every packed tensor;
  bnb's double-quant JSON holds a float as text: an upper bound within 24 bytes there);
* **how to read it back** — `quant_method` (the ``quantization_config.quant_method`` it writes),
  `read_keys(qconfig)`, `quantized_modules(names)`, `read(module, tensors, qconfig, dtype, where)`.
"""

from __future__ import annotations

import torch

from qtool.formats.base import QTensor


class OutputFormat:
    name: str = ""
    quant_method: str | None = None
    codecs: dict[str, tuple[int, ...]] = {}
    fp16_scales: bool = False
    g_idx: bool = False
    activations: bool = False  # holds int8 input schemes (W8A8)
    outliers: bool = False  # holds LLM.int8()'s outlier threshold
    float_zero: bool = False  # holds float zero points (HQQ)
    needs_groups: bool = False  # qtool writes it with groups only (no per-channel)

    # ---- what it holds
    def refuse(self, rule) -> tuple[str, str] | None:
        """Why `rule` (a `plan.Rule`) cannot be written in this format, as (the rule's field at fault, the
        reason); None when it can."""
        why = self.refusals(rule)
        return why[0] if why else None

    def refusals(self, rule) -> list[tuple[str, str]]:
        """Every reason `rule` cannot be written in this format (first = the one reported)."""
        from qtool.plan import FORMAT_OF_CODEC

        if rule.codec not in self.codecs:
            return [("codec", f"codec {rule.codec!r} cannot be written as {self.name!r}; "
                              f"it needs {FORMAT_OF_CODEC[rule.codec]!r}")]
        out = []
        bits = self.codecs[rule.codec]
        if rule.codec == "int" and bits and rule.bits not in bits:
            out.append(("bits", f"{self.name!r} holds int codes of {', '.join(map(str, bits))} bits; "
                                f"a rule asks for {rule.bits}"))
        if self.needs_groups and rule.group_size == 0:
            out.append(("group_size", f"{self.name!r} needs a group size (per-channel is not written by qtool)"))
        if rule.activations != "none" and not self.activations:
            out.append(("activations", f"{self.name!r} has no activation scheme; int8 activations are written as "
                                       "compressed-tensors (W8A8) or bnb (LLM.int8)"))
        if rule.outlier_threshold > 0 and not self.outliers:
            out.append(("outlier_threshold", f"{self.name!r} cannot hold an outlier threshold; LLM.int8 artifacts "
                                             "are bitsandbytes int8: `output: {format: bnb}`"))
        if rule.method == "hqq" and not self.float_zero:
            out.append(("method", f"hqq's float zero points cannot be written as {self.name!r}; "
                                  "allowed: compressed-tensors"))
        if rule.act_order == "dynamic" and not self.g_idx:
            out.append(("act_order", f"dynamic act-order groups are written with a g_idx, which output format "
                                     f"{self.name!r} cannot hold (compressed-tensors 0.20 removed actorder 'group'; "
                                     "AWQ has none): use `output: {format: gptq_v2}` (or gptq), or `act_order: true` "
                                     "for static groups"))
        return out + self._refusals(rule)

    def _refusals(self, rule) -> list[tuple[str, str]]:
        """Format-specific reasons (subclasses)."""
        return []

    # ---- writing
    def pack(self, q: QTensor, dtype: torch.dtype, spec=None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def config(self, specs: dict, unquantized: list[str], dtype: torch.dtype) -> dict:
        raise NotImplementedError

    def warning(self, qconfig: dict) -> str | None:
        return None

    def int8_runtime(self, packed: dict[str, torch.Tensor], bias, spec):
        raise TypeError(f"{self.name} holds no int8 activation scheme")

    def tensor_bytes(self, codec, shape: tuple[int, int], dtype: torch.dtype = torch.float16) -> int:
        """Exact on-disk bytes of one weight of `shape` through `codec` (all its packed tensors), measured on
        the packed tensors of an all-zero weight (so it is right by construction, whatever the layout)."""
        q = codec.encode(torch.zeros(shape))
        return sum(t.numel() * t.element_size() for t in self.pack(q, dtype).values())

    # ---- reading back
    def read_keys(self, qconfig: dict) -> tuple[str, ...]:
        """The tensor-name suffixes of one quantized module."""
        raise NotImplementedError

    def quantized_modules(self, names: list[str], qconfig: dict) -> set[str]:
        raise NotImplementedError

    def read(self, module: str, tensors: dict[str, torch.Tensor], qconfig: dict, dtype: torch.dtype, bias,
             where: str):
        """(float weight or None, runtime module or None) of one quantized module from its tensors."""
        raise NotImplementedError
