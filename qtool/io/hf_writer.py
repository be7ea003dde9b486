"""Writes a Hugging Face model directory atomically and deterministically.

Tensors stream in block by block: each one's bytes go straight to a spill file on disk (memory holds no
tensor after `add` returns), and shards of at most `max_shard_bytes` are assembled from the spill file,
one tensor at a time, in exactly the layout `safetensors.torch.save_file` writes (header with
`__metadata__`, tensors ordered by dtype then name, header padded with spaces to 8 bytes): the files
are byte-identical to save_file's, without its in-memory copy of the shard. Everything goes to a
temporary sibling directory that is renamed into place by `finish()` only when complete; `abort()` (or
an exception) removes it. No timestamps, fixed ordering: the same inputs give byte-identical files.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import torch

from qtool.errors import UsageError


def prepare_output(out: Path, force: bool, inputs: tuple[Path, ...] = ()) -> None:
    """Refuse an existing output unless `force`, and any output that is or holds an input (checked first)."""
    target = out.resolve()
    for p in inputs:
        p = Path(p).resolve()
        if p == target or target in p.parents:
            raise UsageError(f"{out}: the output would overwrite the input {p}; choose another --out")
    if out.exists() and not force:
        raise UsageError(f"{out}: already exists; pass --force to replace it")
    if not out.parent.exists():
        raise UsageError(f"{out.parent}: parent directory does not exist")


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2"}
# safetensors' Dtype enum order (save_file sorts tensors by it, descending, then by name)
_ST_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64",
             "I64", "U64")


class HFWriter:
    def __init__(self, out: Path, force: bool = False, max_shard_bytes: int = 512 << 20,
                 inputs: tuple[Path, ...] = ()):
        prepare_output(out, force, inputs)
        self.out, self.force, self.max_shard_bytes = out, force, max_shard_bytes
        self.tmp = out.parent / f".{out.name}.qtool-tmp-{os.getpid()}"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir()
        self._pending: list[tuple[str, torch.dtype, list[int], int, int]] = []  # name, dtype, shape, offset, n
        self._pending_bytes = 0
        self._spill = None  # the current shard's tensor bytes, in arrival order
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self.total_bytes = 0

    def add(self, name: str, t: torch.Tensor) -> None:
        if name in self._names:
            raise ValueError(f"tensor {name} written twice")
        self._names.add(name)
        t = t.detach().contiguous()
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {name}: dtype {t.dtype} cannot be written to safetensors")
        n = t.numel() * t.element_size()
        if self._spill is None:
            self._spill = open(self.tmp / f"shard-{len(self._shards)}.spill", "w+b")
        if n:
            self._spill.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        self._pending.append((name, t.dtype, list(t.shape), self._pending_bytes, n))
        self._pending_bytes += n
        self.total_bytes += n
        if self._pending_bytes >= self.max_shard_bytes:
            self._flush()

    def add_file(self, name: str, data: bytes | str) -> None:
        (self.tmp / name).write_bytes(data.encode() if isinstance(data, str) else data)

    def _flush(self) -> None:
        if not self._pending:
            return
        k = len(self._shards)
        shard = self.tmp / f"shard-{k}.safetensors"
        # save_file's layout: dtypes in descending enum order (wider first: every tensor stays aligned), then names
        order = sorted(self._pending, key=lambda e: (-_ST_ORDER.index(_ST_DTYPES[e[1]]), e[0]))
        header: dict = {"__metadata__": {"format": "pt"}}
        pos = 0
        for name, dtype, shape, _, n in order:
            header[name] = {"dtype": _ST_DTYPES[dtype], "shape": shape, "data_offsets": [pos, pos + n]}
            pos += n
        head = json.dumps(header, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        spill = self._spill
        with open(shard, "wb") as f:
            f.write(struct.pack("<Q", len(head)) + head)
            for _, _, _, offset, n in order:
                spill.seek(offset)
                left = n
                while left:
                    chunk = spill.read(min(left, 16 << 20))
                    f.write(chunk)
                    left -= len(chunk)
        spill.close()
        os.unlink(spill.name)
        self._spill = None
        shard.chmod(0o644)
        self._shards.append(sorted(e[0] for e in self._pending))
        self._pending, self._pending_bytes = [], 0

    def finish(self, config: dict) -> Path:
        """Write config.json (+ index when sharded), then atomically move the directory into place."""
        self._flush()
        n = len(self._shards)
        if n == 1:
            os.replace(self.tmp / "shard-0.safetensors", self.tmp / "model.safetensors")
        else:
            weight_map = {}
            for k, names in enumerate(self._shards):
                fname = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                os.replace(self.tmp / f"shard-{k}.safetensors", self.tmp / fname)
                weight_map.update({name: fname for name in names})
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
            self.add_file("model.safetensors.index.json", json.dumps(index, indent=2) + "\n")
        self.add_file("config.json", json.dumps(config, indent=2, sort_keys=True) + "\n")
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.qtool-old-{os.getpid()}"
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        if self._spill is not None:
            self._spill.close()
            self._spill = None
        shutil.rmtree(self.tmp, ignore_errors=True)
