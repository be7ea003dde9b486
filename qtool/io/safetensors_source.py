"""Lazy reader of a Hugging Face directory (config.json + safetensors, sharded or not, + tokenizer).

Every safetensors header is checked before work starts: a file whose tensors do not exactly cover its
bytes (truncated, padded or corrupt) is refused with the file and tensor named. Pickle checkpoints
(`*.bin`, `*.pt`) are never loaded.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import torch
from safetensors import safe_open

from qtool.errors import ModelError

_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_ALL_DTYPES = {**_DTYPES, "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
               "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def read_header(f: Path) -> dict:
    """The JSON header of a safetensors file, validated against the file size."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ModelError(f"{f}: not a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100_000_000):
            raise ModelError(f"{f}: corrupt safetensors header (header length {n}, file {size} bytes)")
        try:
            header = json.loads(fh.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{f}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise ModelError(f"{f}: corrupt safetensors header: not a JSON object")
    data = size - 8 - n
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ModelError(f"{f}: corrupt safetensors header: tensor {name} has no valid data_offsets")
        lo, hi = offsets
        if hi > data:
            raise ModelError(f"{f}: truncated: tensor {name} ends at byte {hi} of the data section, "
                             f"which has only {data} bytes")
        end = max(end, hi)
    if end != data:
        raise ModelError(f"{f}: corrupt: tensors cover {end} bytes but the data section has {data}")
    return header


class SafetensorsSource:
    def __init__(self, path: Path, trust_remote_code: bool = False):
        self.path = path
        if not (path / "config.json").is_file():
            pickles = sorted(p.name for p in (*path.glob("*.bin"), *path.glob("*.pt")))
            hint = f" (and {pickles[0]} is a pickle checkpoint, which qtool never loads)" if pickles else ""
            raise ModelError(f"{path}: no config.json: not a Hugging Face model directory{hint}")
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ModelError(f"{index}: corrupt index: {e}") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in path.glob("*.safetensors"))
        if not files:
            pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
            hint = f" (found {pickles[0]}: pickle checkpoints are not loaded; save as safetensors)" if pickles else ""
            raise ModelError(f"{path}: no .safetensors weights{hint}")
        self._file_of: dict[str, Path] = {}
        self._info: dict[str, dict] = {}
        self._data_start: dict[Path, int] = {}
        for fname in files:
            f = path / fname
            if not f.is_file():
                raise ModelError(f"{f}: listed in the index but missing")
            header = read_header(f)  # validates the file before anything else reads it
            with open(f, "rb") as fh:
                self._data_start[f] = 8 + struct.unpack("<Q", fh.read(8))[0]
            for name, info in header.items():
                if name != "__metadata__":
                    self._file_of[name], self._info[name] = f, info
            try:  # safetensors' own check of dtypes, shapes and offsets against each other
                safe_open(str(f), framework="pt")
            except Exception as e:
                raise ModelError(f"{f}: corrupt safetensors file: {e}") from None
        try:
            from transformers import AutoConfig

            self.config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        except Exception as e:  # transformers raises many types for a bad config
            raise ModelError(f"{path / 'config.json'}: cannot be read: {str(e).splitlines()[0]}") from None

    def names(self) -> list[str]:
        return sorted(self._info)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info[name]["shape"])

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor with a positioned read (no mmap: only this tensor's bytes become resident)."""
        if name not in self._info:
            raise ModelError(f"{self.path}: tensor {name} is missing")
        f, info = self._file_of[name], self._info[name]
        if info["dtype"] not in _ALL_DTYPES:
            raise ModelError(f"{f}: tensor {name} has unsupported dtype {info['dtype']}")
        lo, hi = info["data_offsets"]
        with open(f, "rb") as fh:
            fh.seek(self._data_start[f] + lo)
            buf = bytearray(fh.read(hi - lo))
        if len(buf) != hi - lo:
            raise ModelError(f"{f}: truncated while reading {name}")
        t = torch.frombuffer(buf, dtype=_ALL_DTYPES[info["dtype"]]) if buf else torch.empty(0, dtype=_ALL_DTYPES[info["dtype"]])
        return t.reshape(info["shape"])

    @property
    def dtype(self) -> torch.dtype:
        for name in self.names():
            dt = _DTYPES.get(self._info[name]["dtype"])
            if dt is not None and name.endswith("proj.weight"):
                return dt
        return torch.float32

    def load_tokenizer(self):
        from transformers import AutoTokenizer

        try:
            return AutoTokenizer.from_pretrained(self.path)
        except Exception as e:
            raise ModelError(f"{self.path}: no usable tokenizer: {str(e).splitlines()[0]}") from None

    def save_tokenizer(self, out_dir: Path) -> None:
        self.load_tokenizer().save_pretrained(out_dir)

    def digest(self) -> str:
        """sha256 over config.json, every header and file size, and the first/last MiB of each file."""
        h = hashlib.sha256((self.path / "config.json").read_bytes())
        for f in sorted(set(self._file_of.values())):
            size = f.stat().st_size
            h.update(f.name.encode() + str(size).encode())
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                fh.seek(max(0, size - (1 << 20)))
                h.update(fh.read())
        return h.hexdigest()
