"""A `.gguf` file seen as a ModelSource: HF-named float32 tensors, dequantized one at a time.

The constructor parses and checks the whole header (magic, version, metadata, tensor infos, every
tensor's byte range, architecture) with a small bounds-checked parser of its own, so a truncated or
foreign file is refused with a one-line `ModelError` before any tensor is read. `gguf.GGUFReader`
is not used for this: on a truncated file it fails with numpy reshape errors that name nothing.

Tensor data is read with `pread`-style file reads (not a memmap, so a file truncated while in use
gives a ModelError instead of SIGBUS), dequantized with `gguf.quants.dequantize`, and the llama.cpp
q/k row permutation is undone for arch `llama` (formats.md 1.5; never for `qwen2`). Config and
tokenizer come from transformers' own GGUF loader (about 3 s each for a 49k vocabulary, because it
parses the token arrays), so both are built lazily on first use and cached.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import mmap
import struct
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from qtool.errors import ModelError

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")  # Mistral is written as arch llama by llama.cpp's converter
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
           10: "<Q", 11: "<q", 12: "<d"}  # GGUF metadata value type -> struct format
_STRING, _ARRAY = 8, 9
_MAX_COUNT = 1 << 24  # more tensors/keys/dims than this means a corrupt header, not a model
# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N."), formats.md 1.4
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",  # qwen3
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_SKIPPED = {"rope_freqs.weight"}  # llama3 rope factors: HF derives them from the config


class _Truncated(Exception):
    """Internal: the header parser ran past the end of the file."""


class _HeaderParser:
    """Bounds-checked little-endian reads over a memory-mapped GGUF header."""

    def __init__(self, buf: mmap.mmap):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise _Truncated(f"header ends early: {size} more bytes needed at byte {self.pos}")
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def count(self, what: str) -> int:
        n = self.unpack("<Q")
        if n > _MAX_COUNT:
            raise ModelError(f"implausible {what} count {n} at byte {self.pos - 8} (corrupt header)")
        return n

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise _Truncated(f"string of {n} bytes at byte {self.pos} runs past the end")
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        """One metadata value; long arrays (token lists, merges) are skipped and kept as their length."""
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ModelError(f"unknown metadata value type {vtype} at byte {self.pos - 4}")
        etype, n = self.unpack("<I"), self.count("array element")
        if etype == _STRING:  # skip the strings without decoding them
            for _ in range(n):
                self.pos += 8 + self.unpack("<Q")
            if self.pos > len(self.buf):
                raise _Truncated("string array runs past the end")
            return n
        if etype not in _SCALAR:
            raise ModelError(f"unsupported array element type {etype} at byte {self.pos - 12}")
        size = struct.calcsize(_SCALAR[etype]) * n
        if self.pos + size > len(self.buf):
            raise _Truncated(f"array of {size} bytes at byte {self.pos} runs past the end")
        values = list(struct.unpack_from("<" + _SCALAR[etype][1] * n, self.buf, self.pos)) if n <= 4096 else n
        self.pos += size
        return values


class GGUFSource:
    """A llama/qwen2 GGUF checkpoint, validated on open, read one dequantized tensor at a time."""

    def __init__(self, path: Path):
        self.path = Path(path)
        if not self.path.exists():
            raise ModelError(f"{self.path}: no such file")
        if not self.path.is_file():
            raise ModelError(f"{self.path}: not a file")
        self._size = self.path.stat().st_size
        if self._size < 24:
            raise ModelError(f"{self.path}: not a GGUF file ({self._size} bytes, too short for a header)")
        try:
            with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                self._parse(_HeaderParser(buf))
        except _Truncated as e:
            raise ModelError(f"{self.path}: truncated or corrupt GGUF file: {e} "
                             f"(file has {self._size} bytes)") from None
        except ModelError as e:
            raise ModelError(f"{self.path}: {e}") from None
        self._tokenizer = None
        self._digest: str | None = None

    def _parse(self, p: _HeaderParser) -> None:
        """Read header, metadata and tensor infos; check arch, types and every tensor's byte range."""
        magic = bytes(p.buf[:4])
        if magic != b"GGUF":
            raise ModelError(f"not a GGUF file (starts with {magic!r}, expected b'GGUF')")
        p.pos = 4
        version = p.unpack("<I")
        if version not in (2, 3):
            raise ModelError(f"unsupported GGUF version {version} (2 and 3 are read)")
        n_tensors, n_kv = p.count("tensor"), p.count("metadata key")
        self.metadata: dict[str, object] = {}
        for _ in range(n_kv):
            key = p.string()
            self.metadata[key] = p.value(p.unpack("<I"))
        arch = self.metadata.get("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise ModelError(f"architecture {arch!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_ARCHS)})")
        self.arch: str = arch
        alignment = self.metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
            raise ModelError(f"general.alignment {alignment!r} is not a power of two")
        infos = []
        for _ in range(n_tensors):
            name, n_dims = p.string(), p.unpack("<I")
            if n_dims > 4:
                raise ModelError(f"tensor {name} has {n_dims} dimensions (at most 4)")
            ne = [p.unpack("<Q") for _ in range(n_dims)]
            infos.append((name, ne, p.unpack("<I"), p.unpack("<Q")))
        data_start = -(-p.pos // alignment) * alignment
        self._tensors: dict[str, tuple[GGMLQuantizationType, tuple[int, ...], int, int]] = {}
        for name, ne, type_id, offset in infos:
            try:
                qtype = GGMLQuantizationType(type_id)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise ModelError(f"tensor {name} has unknown GGML type {type_id}") from None
            if not ne or 0 in ne or ne[0] % block:
                raise ModelError(f"tensor {name} shape {ne} is empty or its rows are not "
                                 f"whole {qtype.name} blocks")
            nbytes = int(np.prod(ne[1:], dtype=np.int64)) * (ne[0] // block) * type_size
            start = data_start + offset
            if start + nbytes > self._size:
                raise ModelError(f"truncated: tensor {name} ends at byte {start + nbytes} "
                                 f"but the file has {self._size} bytes")
            hf = self._hf_name(name)
            if hf in self._tensors:
                raise ModelError(f"tensor {name} appears twice")
            if hf is not None:
                self._tensors[hf] = (qtype, tuple(reversed(ne)), start, nbytes)
        n_head = self._per_layer(f"{arch}.attention.head_count")
        n_kv = self._per_layer(f"{arch}.attention.head_count_kv") or n_head
        self._heads = {"q_proj": n_head, "k_proj": n_kv}  # rope groups for the q/k permutation
        if arch == "llama":  # every q/k tensor must split into rope heads of even size
            for hf, (_, shape, _, _) in self._tensors.items():
                proj = hf.rsplit(".", 2)[-2]
                n = self._heads.get(proj)
                if proj in self._heads and (not n or shape[0] % (2 * n)):
                    raise ModelError(f"tensor {hf} ({shape[0]} rows) cannot be split into {n} rope heads")

    def _per_layer(self, key: str) -> int | None:
        """A head count that may be stored as one value per layer (then all layers must agree)."""
        value = self.metadata.get(key)
        if isinstance(value, list):
            if len(set(value)) != 1:
                raise ModelError(f"{key} varies per layer ({value}), which is not supported")
            value = value[0]
        return value

    @staticmethod
    def _hf_name(name: str) -> str | None:
        """HF parameter name of a GGUF tensor, None for tensors HF has no parameter for."""
        if name in _SKIPPED:
            return None
        stem, _, suffix = name.rpartition(".")
        parts = stem.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _BLOCK_NAMES:
            return f"model.layers.{int(parts[1])}.{_BLOCK_NAMES[parts[2]]}.{suffix}"
        if len(parts) == 1 and stem in _TOP_NAMES:
            return f"{_TOP_NAMES[stem]}.{suffix}"
        raise ModelError(f"tensor {name} has no Hugging Face equivalent for a dense llama/qwen2 model")

    # --- ModelSource protocol -------------------------------------------------------------------

    def _cache_dir(self) -> Path:
        """Where the config and tokenizer transformers builds from this file are kept: keyed by the file's
        sha256 and the transformers version ($QTOOL_CACHE_DIR, else ~/.cache/qtool; derived data only)."""
        import transformers

        from qtool.cache import cache_root

        return cache_root() / "gguf" / f"{self.digest()[:32]}-transformers-{transformers.__version__}"

    def _cached(self, kind: str, build, save, load):
        """`load(dir)` from the cache when present, else `build()`, `save(obj, tmp)` and rename into place.

        Building either from the GGUF takes transformers 5-20 s (it reads the whole file); loading the
        cached files takes well under one. A cache that cannot be written (read-only home) is skipped."""
        final = self._cache_dir() / kind
        if (final / ".complete").is_file():
            try:
                return load(final)
            except Exception:  # noqa: BLE001 - a damaged cache entry is rebuilt, never trusted
                shutil.rmtree(final, ignore_errors=True)
        obj = build()
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=final.parent))
            save(obj, tmp)
            (tmp / ".complete").write_text("")
            try:
                os.replace(tmp, final)
            except OSError:  # another process won the race: keep its copy
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass
        return obj

    @cached_property
    def config(self):
        """The transformers config that transformers itself builds from this file (cached: see `_cached`)."""
        from transformers import AutoConfig

        def build():
            try:
                cfg = AutoConfig.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            except Exception as e:  # noqa: BLE001 - any loader failure is a bad model to the user
                raise ModelError(f"{self.path}: transformers cannot build a config: {e}") from None
            head_dim = self.metadata.get(f"{self.arch}.attention.key_length")
            if head_dim and getattr(cfg, "head_dim", None) != head_dim:  # transformers' qwen3 reader ignores it
                cfg.head_dim = int(head_dim)
            return _with_architectures(cfg)

        def load(d):
            cfg = _with_architectures(AutoConfig.from_pretrained(str(d)))
            cfg._name_or_path = str(self.path.parent)  # as built from the file: artifacts must not name the cache
            return cfg

        return self._cached("config", build, lambda c, d: c.save_pretrained(d), load)

    @property
    def dtype(self) -> torch.dtype:
        """GGUF tensors are dequantized to float32."""
        return torch.float32

    @property
    def float_dtype(self) -> torch.dtype:
        """The float width unquantized tensors keep in an artifact: the source's own (F16 -> float16, BF16 ->
        bfloat16, all F32 -> float32); a quantized source -> bfloat16 (its dequantized values need no more)."""
        types = {q for q, *_ in self._tensors.values() if len(_[0]) > 1}
        if types <= {GGMLQuantizationType.F32}:
            return torch.float32
        if types <= {GGMLQuantizationType.F16, GGMLQuantizationType.F32}:
            return torch.float16
        return torch.bfloat16

    def names(self) -> list[str]:
        """HF tensor names present in the file, sorted (no lm_head.weight when embeddings are tied)."""
        return sorted(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        """PyTorch-order shape of a tensor, from the header only."""
        return self._info(name)[1]

    def get(self, name: str) -> torch.Tensor:
        """Read and dequantize one tensor to float32, with the llama q/k row permutation undone."""
        qtype, shape, start, nbytes = self._info(name)
        raw = np.fromfile(self.path, dtype=np.uint8, count=nbytes, offset=start)
        if raw.size != nbytes:
            raise ModelError(f"{self.path}: tensor {name} could not be read "
                             "(file changed since it was opened?)")
        rows = int(np.prod(shape[:-1], dtype=np.int64))  # blocks never span rows; 1 row for a 1-D tensor
        try:
            values = dequantize(raw.reshape(rows, nbytes // rows), qtype)
        except NotImplementedError:
            raise ModelError(f"{self.path}: tensor {name} has type {qtype.name}, "
                             "which cannot be dequantized") from None
        values = values.reshape(shape)
        proj = name.rsplit(".", 2)[-2]
        if self.arch == "llama" and proj in self._heads:  # formats.md 1.5: undo the rope pair reorder
            n = self._heads[proj]
            values = values.reshape(n, shape[0] // n // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
        return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))  # `raw` is ours: no copy

    def _info(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise ModelError(f"{self.path}: no tensor {name!r}") from None

    def load_tokenizer(self):
        """The transformers tokenizer built from the GGUF vocabulary (cached on disk: see `_cached`).

        Kept in memory only when the disk cache could not be written (then a reload would rebuild it from
        the GGUF): otherwise callers hold it as long as they need it (~45 MB for a 49k vocabulary) and a
        later call reloads it from the cache in well under a second."""
        if self._tokenizer is not None:
            return self._tokenizer
        from transformers import AutoTokenizer

        def build():
            try:
                return AutoTokenizer.from_pretrained(str(self.path.parent), gguf_file=self.path.name)
            except Exception as e:  # noqa: BLE001
                raise ModelError(f"{self.path}: transformers cannot build a tokenizer: {e}") from None

        tok = self._cached("tokenizer", build, lambda t, d: t.save_pretrained(str(d)),
                           lambda d: AutoTokenizer.from_pretrained(str(d)))
        if not (self._cache_dir() / "tokenizer" / ".complete").is_file():
            self._tokenizer = tok
        return tok

    def save_tokenizer(self, out_dir: Path) -> None:
        """Write the tokenizer (tokenizer.json, tokenizer_config.json, ...) into an HF model directory."""
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        self.load_tokenizer().save_pretrained(str(out_dir))

    def digest(self) -> str:
        """sha256 of the whole file (hashing is ~1.8 GB/s here: 0.055 s for this 98 MB file), cached."""
        if self._digest is None:
            with open(self.path, "rb") as f:
                self._digest = hashlib.file_digest(f, "sha256").hexdigest()
        return self._digest


def _with_architectures(cfg):
    """transformers' GGUF reader leaves `architectures` empty; vLLM (and AutoRound) pick the model class from it,
    so an HF artifact made from a GGUF source names it (from the architecture table's model types)."""
    from qtool.io.arch import MODEL_TYPES

    if not getattr(cfg, "architectures", None) and cfg.model_type in MODEL_TYPES:
        cfg.architectures = [MODEL_TYPES[cfg.model_type]]
    return cfg
