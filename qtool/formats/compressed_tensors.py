"""compressed-tensors ``pack-quantized`` on-disk layout (as compressed-tensors 0.20 writes and reads it).

Per quantized Linear ``P`` (keys below are relative to ``P.``):

* ``weight_packed``  int32 [out, ceil(in*b/32)]: codes + 2^(b-1) (unsigned), element i of a row at bit i*b
  of the row's bit stream, LSB first, 32-bit words little-endian; for b in {3,5,6,7} a code may straddle two
  words (0.20's dense layout; older releases put 32//b codes per word: stick to 2/4/8 bits for old readers).
* ``weight_scale``   [out, n_groups] in the codec's scale dtype ([out, 1] per channel).
* ``weight_shape``   int64 [2] = (out, in).
* ``weight_zero_point`` (asymmetric only) the int8 zero points packed the same way along dim 0:
  int32 [ceil(out*b/32), n_groups].

The layout is the one every compressed-tensors reader (and vLLM) expects; for the asymmetric loading bug of
transformers 5.23-5.24 and how the config works around it, see `quantization_config`.

Act-order groups (a QTensor with ``g_idx``, GPTQ ``act_order: dynamic``) are **not written**. Releases up to
0.18 stored them as ``weight_g_idx`` int32 [in] with ``actorder: "group"`` in the weights args; 0.19 and 0.20
removed that mode: their ``QuantizationArgs`` raise "actorder='group' has been removed" on such a config, so
transformers + compressed-tensors 0.20 cannot load the file at all (tests/formats/test_ct_actorder.py).
`pack` refuses them (write GPTQ, whose readers take a g_idx, or use static groups, ``act_order: true``). `unpack`
still reads ``weight_g_idx`` from files of older releases: 0.18 sorts the columns by g_idx, cuts them into
groups of ``group_size`` and dequantizes those, which for maps with ``group_size`` columns per group (required
here) is ``scale[:, g_idx]``.

Float zero points (``AffineCodec(float_zero=True)``, HQQ). compressed-tensors 0.20's dequantize computes
``(q - zp.to(scale.dtype)) * scale``, so a fractional zero is fine, and ``QuantizationArgs.zp_dtype`` types
the zero-point parameter. But its pack-quantized compressor packs/unpacks ``weight_zero_point`` as int32 for
the ``group`` and ``channel`` strategies unconditionally: a float zero point under ``strategy: group``
fails to load in transformers 5.24 both ways ("Expected torch.int32 but got torch.float16, Aborting
unpack."). It leaves zero points of the ``block`` strategy alone, and a block of ``[1, group_size]`` is
exactly a group. So a float-zero codec is written as

* ``weights``: ``strategy: block``, ``block_structure: [1, group_size]``, ``group_size: null``,
  ``symmetric: false``, ``zp_dtype: torch.<scale dtype>`` (without ``zp_dtype`` the default-path loader
  creates an int8 parameter and the zeros are truncated);
* ``weight_zero_point``: [out, n_groups] in the scale dtype, *unpacked*; the other tensors as above.

transformers 5.24 + compressed-tensors 0.20 load it with ``dequantize=True`` bit-exactly and with the
default path too (no packed zero point, so no size mismatch; the default path makes ``weight_scale`` a
parameter of the model dtype, so with float16/bfloat16 scales it dequantizes in float32: a ~1e-4 relative
difference). Limits: per-channel float zeros cannot be written (a ``[1, in]`` block would need the width of
every module in the config); vLLM's compressed-tensors int kernels take group/channel int zero points only.

Int8 activations (W8A8, W4A8; a rule with ``activations: int8``). The config group carries
``input_activations`` = dynamic per-token symmetric int8 (`input_args`, equal to compressed-tensors'
``W8A8`` preset), and the weights use the ``int-quantized`` layout: the one llm-compressor writes for W8A8,
the one compressed-tensors 0.20 infers for any int weight with activation quantization
(``infer_module_format``), and the only one vLLM runs int activation schemes from (its
``is_activation_quantization_format`` gate; its W8A8-int8 and W4A8-int schemes read an int8 ``weight``):

* ``weight``  int8 [out, in]: the signed codes themselves (also for 4-bit codes: one byte each);
* ``weight_scale`` as above; ``weight_zero_point`` (asymmetric only) int8 [out, n_groups], *unpacked*
  (so the packed-zero-point trap below does not apply);
* no ``weight_shape``.

So with fewer than 8 bits the file is larger than `AffineCodec.nbytes` says (that counts the packed
layout): W4A8 stores a byte per code. When the groups' layouts differ, the top-level ``format`` is
``mixed-precision`` (each group's ``format`` is what loaders use). transformers 5.24 + compressed-tensors
0.20 run the activation quantization on the default ``from_pretrained`` path only: with
``dequantize: true`` the model stays dense and activations are not quantized, so that key is never
written for a group with input activations.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import torch

from qtool.errors import UsageError
from qtool.formats.affine import AffineCodec, check_g_idx, natural_g_idx
from qtool.formats.base import QTensor

CT_VERSION = "0.20.0"  # written as quantization_config.version: fixed so output is byte-identical across envs


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding unsigned 32-bit values -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _layout(bits: int):
    """For the 32 elements of one chunk (= `bits` words): word index, bit offset, and straddle mask."""
    start = torch.arange(32, dtype=torch.int64) * bits
    word, shift = start // 32, start % 32
    return word, shift, shift + bits > 32


_ROWS_ELEMS = 1 << 22  # rows are (un)packed in slices of about this many codes to bound int64 temporaries


def _row_slices(rows: int, cols: int):
    step = max(1, _ROWS_ELEMS // max(cols, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)] or [slice(0, 0)]


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack signed int8 codes [rows, cols] into int32 [rows, ceil(cols*bits/32)] (0.20 dense layout)."""
    if codes.dtype != torch.int8 or codes.ndim != 2:
        raise ValueError(f"pack_int32: expected 2-D int8 codes, got {codes.dtype} {tuple(codes.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"pack_int32: bits must be in 1..8, got {bits}")
    half = 1 << (bits - 1)
    if bits < 8 and ((codes < -half).any() or (codes >= half).any()):  # every int8 is a valid 8-bit code
        raise ValueError(f"pack_int32: codes outside the signed {bits}-bit range")
    return torch.cat([_pack_rows(codes[sl], bits) for sl in _row_slices(*codes.shape)])


def _pack_rows(codes: torch.Tensor, bits: int) -> torch.Tensor:
    rows, cols = codes.shape
    u = codes.to(torch.int64) + (1 << (bits - 1))
    n_chunks = math.ceil(cols / 32)
    u = torch.nn.functional.pad(u, (0, n_chunks * 32 - cols)).reshape(rows, n_chunks, 32)
    word, shift, straddle = (t.to(codes.device) for t in _layout(bits))
    out = torch.zeros(rows, n_chunks, bits, dtype=torch.int64, device=codes.device)
    out.index_add_(2, word, (u << shift) & 0xFFFFFFFF)
    if straddle.any():
        out.index_add_(2, word[straddle] + 1, u[..., straddle] >> (32 - shift[straddle]))
    return _to_int32(out.reshape(rows, n_chunks * bits)[:, : math.ceil(cols * bits / 32)]).contiguous()


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of `pack_int32`: int32 [rows, ceil(cols*bits/32)] -> signed int8 codes [rows, cols]."""
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError(f"unpack_int32: expected 2-D int32, got {packed.dtype} {tuple(packed.shape)}")
    if not 1 <= bits <= 8:
        raise ValueError(f"unpack_int32: bits must be in 1..8, got {bits}")
    if packed.shape[1] != math.ceil(cols * bits / 32):
        raise ValueError(f"unpack_int32: {packed.shape[1]} words per row cannot hold {cols} {bits}-bit codes")
    return torch.cat([_unpack_rows(packed[sl], bits, cols) for sl in _row_slices(packed.shape[0], cols)])


def _unpack_rows(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    rows, n_words = packed.shape
    n_chunks = math.ceil(cols / 32)
    w = torch.nn.functional.pad(packed.to(torch.int64) & 0xFFFFFFFF, (0, n_chunks * bits - n_words))
    w = w.reshape(rows, n_chunks, bits)
    word, shift, straddle = (t.to(packed.device) for t in _layout(bits))
    u = w[..., word] >> shift
    if straddle.any():
        hi = w[..., torch.clamp(word + 1, max=bits - 1)] << (32 - shift)
        u = torch.where(straddle, u | hi, u)
    u = (u & ((1 << bits) - 1)).reshape(rows, n_chunks * 32)[:, :cols]
    return (u - (1 << (bits - 1))).to(torch.int8)


ACTIVATIONS = ("none", "int8")


def layout(codec: AffineCodec, activations: str = "none") -> str:
    """The compressed-tensors format of one module: ``int-quantized`` with int8 activations (W8A8, W4A8),
    else ``pack-quantized``."""
    _check_activations(codec, activations)
    return "int-quantized" if activations == "int8" else "pack-quantized"


def _check_activations(codec: AffineCodec, activations: str) -> None:
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if activations != "none" and codec.float_zero:
        raise ValueError(f"{codec.name}: int8 activations need integer weight zero points (no float zero)")


def pack(q: QTensor, activations: str = "none") -> dict[str, torch.Tensor]:
    """QTensor of an `AffineCodec` -> compressed-tensors tensors, keys relative to the module prefix.

    `activations` is the module's rule (``"none"`` | ``"int8"``): it picks the layout (`layout`)."""
    codec = q.codec
    if not isinstance(codec, AffineCodec):
        raise TypeError(f"compressed-tensors pack needs an AffineCodec, got {type(codec).__name__}")
    _check_float_zero(codec)
    if "g_idx" in q.params:
        raise UsageError("compressed-tensors 0.20 cannot hold act-order groups (a g_idx; its actorder 'group' was "
                         "removed and such configs no longer load): write format gptq/gptq_v2, or use static "
                         "groups (`act_order: true`)")
    out, inp = q.shape
    if layout(codec, activations) == "int-quantized":
        tensors = {"weight": q.codes.to(torch.int8).contiguous(),
                   "weight_scale": q.params["scale"].to(codec.scale_dtype).contiguous()}
        if not codec.symmetric:
            tensors["weight_zero_point"] = q.params["zero"].to(torch.int8).contiguous()
        return tensors
    tensors = {
        "weight_packed": pack_int32(q.codes, codec.bits),
        "weight_scale": q.params["scale"].to(codec.scale_dtype).contiguous(),
        "weight_shape": torch.tensor([out, inp], dtype=torch.int64),
    }
    if codec.float_zero:
        tensors["weight_zero_point"] = q.params["zero"].to(codec.scale_dtype).contiguous()
    elif not codec.symmetric:
        tensors["weight_zero_point"] = pack_int32(q.params["zero"].T.contiguous(), codec.bits).T.contiguous()
    return tensors


def unpack(tensors: dict[str, torch.Tensor], codec: AffineCodec) -> QTensor:
    """Exact inverse of `pack` (for files written by `pack` or by compressed-tensors itself).

    Reads ``pack-quantized`` (``weight_packed``) and ``int-quantized`` (int8 ``weight``) tensors alike, and a
    ``weight_g_idx`` (act-order groups of compressed-tensors <= 0.18; the caller drops it when the config
    does not say ``actorder: group``): kept in the params unless it is the natural ``j // group_size``."""
    q = _unpack(tensors, codec)
    g_idx = tensors.get("weight_g_idx")
    if g_idx is None:
        return q
    inp = q.shape[1]
    g_idx = check_g_idx(g_idx, inp, codec.n_groups(inp))
    if torch.equal(g_idx, natural_g_idx(inp, codec.group_width(inp))):
        return q
    if (torch.bincount(g_idx.long(), minlength=codec.n_groups(inp)) != codec.group_width(inp)).any():
        # compressed-tensors sorts the columns by g_idx and cuts them into groups of group_size
        raise ValueError(f"weight_g_idx must give every group exactly {codec.group_width(inp)} columns")
    return QTensor(codec=codec, shape=q.shape, codes=q.codes, params=q.params | {"g_idx": g_idx})


def _unpack(tensors: dict[str, torch.Tensor], codec: AffineCodec) -> QTensor:
    packed = "weight_packed" in tensors
    if packed:
        out, inp = (int(v) for v in tensors["weight_shape"].tolist())
    else:
        weight = tensors.get("weight")
        if weight is None or weight.dtype != torch.int8 or weight.ndim != 2:
            got = "nothing" if weight is None else f"{weight.dtype} {tuple(weight.shape)}"
            raise ValueError(f"int-quantized weight: expected 2-D int8 codes, got {got}")
        out, inp = weight.shape
        qmin, qmax = codec.qmin, codec.qmax
        if codec.bits < 8 and ((weight < qmin) | (weight > qmax)).any():
            raise ValueError(f"int-quantized weight: codes outside the signed {codec.bits}-bit range")
    codec.check_shape((out, inp))
    scale = tensors["weight_scale"]
    if scale.shape != (out, codec.n_groups(inp)):
        expected = (out, codec.n_groups(inp))
        raise ValueError(f"weight_scale has shape {tuple(scale.shape)}, expected {expected}")
    codes = unpack_int32(tensors["weight_packed"], codec.bits, inp) if packed else tensors["weight"]
    if not packed and not codec.symmetric:
        zero = tensors.get("weight_zero_point")
        if zero is None or zero.shape != scale.shape or zero.is_floating_point():
            got = "nothing" if zero is None else f"{zero.dtype} {tuple(zero.shape)}"
            raise ValueError(f"weight_zero_point: expected integers of shape {tuple(scale.shape)}, got {got}")
        return QTensor(codec=codec, shape=(out, inp), codes=codes,
                       params={"scale": scale, "zero": zero.to(torch.int8)})
    if codec.symmetric:
        zero = torch.zeros(scale.shape, dtype=torch.int8)
    elif codec.float_zero:
        zero = tensors["weight_zero_point"]
        if zero.shape != scale.shape or not zero.is_floating_point():
            raise ValueError(f"weight_zero_point: expected a float tensor of shape {tuple(scale.shape)}, "
                             f"got {zero.dtype} {tuple(zero.shape)}")
        zero = zero.to(codec.scale_dtype)
    else:
        zero = unpack_int32(tensors["weight_zero_point"].T.contiguous(), codec.bits, out).T.contiguous()
    return QTensor(codec=codec, shape=(out, inp), codes=codes, params={"scale": scale, "zero": zero})


def _check_float_zero(codec: AffineCodec) -> None:
    if codec.float_zero and not codec.group_size:
        raise ValueError(f"{codec.name}: compressed-tensors cannot hold per-channel float zero points (they are "
                         "written as [1, group_size] blocks); use a group size, e.g. int4_g64_asym_fz")


def weight_args(codec: AffineCodec) -> dict:
    """The ``weights`` QuantizationArgs of a config group, as compressed-tensors 0.20 serializes them.

    A float-zero codec is a ``[1, group_size]`` block scheme with ``zp_dtype`` (see the module docstring).
    """
    if codec.float_zero:
        _check_float_zero(codec)
        return {
            "actorder": None,
            "block_structure": [1, codec.group_size],
            "dynamic": False,
            "group_size": None,
            "num_bits": codec.bits,
            "strategy": "block",
            "symmetric": False,
            "type": "int",
            "zp_dtype": str(codec.scale_dtype),
        }
    return {
        "actorder": None,
        "block_structure": None,
        "dynamic": False,
        "group_size": codec.group_size or None,
        "num_bits": codec.bits,
        "strategy": "group" if codec.group_size else "channel",
        "symmetric": codec.symmetric,
        "type": "int",
    }


def input_args(activations: str) -> dict | None:
    """The ``input_activations`` QuantizationArgs of a config group: None, or for ``"int8"`` dynamic per-token
    symmetric int8 (compressed-tensors' ``W8A8`` preset; the arithmetic is in `qtool.runtime.w8a8`)."""
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    if activations == "none":
        return None
    return {
        "actorder": None,
        "block_structure": None,
        "dynamic": True,
        "group_size": None,
        "num_bits": 8,
        "strategy": "token",
        "symmetric": True,
        "type": "int",
    }


def quantization_config(
    schemes: list[tuple[AffineCodec, list[str]] | tuple[AffineCodec, list[str], str]],
    ignore: list[str],
    all_linear: Iterable[str] | None = None,
) -> dict:
    """The config.json ``quantization_config`` for `schemes` (codec, module names[, activations]), keys sorted.

    `activations` (default ``"none"``) is ``"int8"`` for modules whose inputs are quantized at run time.
    One config group per distinct on-disk scheme (bits, group size, symmetry, float zero with its dtype, input
    activations; not clip_search, nor the scale dtype of integer-zero codecs),
    named ``group_0``, ``group_1``... in order of first appearance. A group's ``format`` is `layout`; the
    top-level ``format`` is the groups' common one, else ``mixed-precision``. A group's ``targets`` are the exact module names
    (compressed-tensors matches targets by exact module name, ``re:`` regex, or class name). When there is a
    single group and `all_linear` (every Linear module name of the model) is given, and the group covers
    exactly `all_linear` minus `ignore`, the target is ``["Linear"]``.
    `ignore` lists module names left dense (e.g. ``lm_head``).

    Asymmetric trap (transformers 5.23-5.24 with compressed-tensors 0.20): the default ``from_pretrained``
    builds the model on the meta device and calls ``compress_model``, whose meta branch leaves
    ``weight_zero_point`` unpacked [out, n_groups] while the file holds it packed [ceil(out*b/32), n_groups]
    -> "size mismatch ... You set `ignore_mismatched_sizes` to `False`". Their ``dequantize=True`` path
    (weights dequantized one by one while loading) is correct, but applies the *first* config group's scheme
    to every module. So for a single asymmetric scheme this writes ``"dequantize": true``, which
    ``CompressedTensorsConfig`` reads from config.json (5.20-5.24 load it bit-exactly; readers that do not
    know the key, vLLM and compressed-tensors itself, ignore it). A mixed config with an asymmetric group
    has no such fix: see `transformers_load_warning`.
    """
    merged: dict[str, list[str]] = {}  # on-disk scheme (weights, input activations, layout as JSON) -> names
    seen: set[str] = set()
    for codec, names, *rest in schemes:
        activations = rest[0] if rest else "none"
        for n in names:
            if n in seen:
                raise ValueError(f"module {n!r} appears in more than one quantization scheme")
            seen.add(n)
        key = [weight_args(codec), input_args(activations), layout(codec, activations)]
        merged.setdefault(json.dumps(key, sort_keys=True), []).extend(names)
    if not merged or not seen:
        raise ValueError("quantization_config needs at least one quantized module")
    if seen & set(ignore):
        raise ValueError(f"modules both quantized and ignored: {sorted(seen & set(ignore))}")
    single_all = len(merged) == 1 and all_linear is not None and seen == set(all_linear) - set(ignore)
    groups = {}
    for i, (key, names) in enumerate(merged.items()):
        w_args, in_args, fmt = json.loads(key)
        groups[f"group_{i}"] = {
            "format": fmt,
            "input_activations": in_args,
            "output_activations": None,
            "targets": ["Linear"] if single_all else sorted(names),
            "weights": w_args,
        }
    formats = {g["format"] for g in groups.values()}
    cfg = {
        "config_groups": groups,
        "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "global_compression_ratio": None,
        "ignore": sorted(ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "sparsity_config": {},
        "transform_config": {},
        "version": CT_VERSION,
    }
    g0 = groups["group_0"]
    if (len(groups) == 1 and not g0["weights"]["symmetric"] and g0["format"] == "pack-quantized"
            and g0["input_activations"] is None):  # dequantize=True would drop activation quantization
        cfg["dequantize"] = True
    return dict(sorted(cfg.items()))


def transformers_load_warning(config: dict) -> str | None:
    """A user-facing warning when transformers 5.23-5.24 cannot load `config` (a `quantization_config`).

    That is a mixed config (several groups) with a group of packed integer zero points: the default load
    fails on the packed zero point and ``dequantize=True`` silently dequantizes every layer with the first
    group's scheme. Float-zero (block) groups are not packed and load on the default path, and so do the
    unpacked zero points of ``int-quantized`` (int8 activation) groups.
    vLLM and transformers <= 5.22 load it correctly.
    """
    groups = config.get("config_groups", {})
    packed_zp = [g for g in groups.values() if not g["weights"]["symmetric"] and g["weights"]["strategy"] != "block"
                 and g.get("format", config.get("format")) == "pack-quantized"]
    if packed_zp and len(groups) > 1:
        return (
            "mixed compressed-tensors schemes with an asymmetric group do not load in transformers 5.23-5.24 "
            "(zero-point size mismatch; dequantize=True applies the first group's scheme to all layers); "
            "vLLM and transformers <= 5.22 load them. Use symmetric schemes for transformers 5.23-5.24."
        )
    return None
