"""Hugging Face safetensors checkpoints on disk: a directory read lazily, and one written in shards.

Reading (`HfCheckpoint`): `model.safetensors.index.json` (its weight_map names each tensor's file)
or one `model.safetensors`. Tensors are read by slice through safetensors' lazy
`safe_open(...).get_slice`, so a rank reads only the bytes of its own shards. A safetensors file
is a JSON header and raw bytes: reading one never runs code (no pickle, no torch.load).

Writing: `plan_shards` groups tensors, in order, into files of at most `max_shard_bytes` (a tensor
larger than that alone in its file), named as transformers names them
(`model-00001-of-00004.safetensors`, or `model.safetensors` when one file holds all);
`write_shard` writes one file (under a temporary name, then renamed), `write_index` the
`model.safetensors.index.json` that transformers reads for a sharded checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe.config import require

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
CONFIG = "config.json"


class HfCheckpoint:
    """The tensors of an HF model directory by name: shapes without reading data, slices on demand.
    Use as a context manager (closes the files)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        require(self.path.is_dir(), f"{self.path}: not a directory (an HF model directory holds config.json "
                                    f"and {SINGLE} or {INDEX} with its shards)")  # fmt: skip
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ValueError(f"{index}: not a safetensors index (a JSON object with 'weight_map'): {exc}") from exc
            files = sorted(set(weight_map.values()))
        else:
            require((self.path / SINGLE).is_file(), f"{self.path} holds neither {INDEX} nor {SINGLE}")
            weight_map, files = None, [SINGLE]
        self._handles = {}
        self.file_of: dict[str, str] = {}
        for name in files:
            file = self.path / name
            require(file.is_file() and file.resolve().parent == self.path.resolve(),
                    f"{index} names {name!r}, which is not a file in {self.path}")  # fmt: skip
            handle = safe_open(str(file), framework="pt")
            self._handles[name] = handle
            for key in handle.keys():
                self.file_of[key] = name
        if weight_map is not None:
            wrong = sorted(k for k, f in weight_map.items() if self.file_of.get(k) != f)
            require(not wrong, f"{index} places {len(wrong)} tensor(s) in files that do not hold them: {wrong[:5]}")
            self.file_of = {k: f for k, f in self.file_of.items() if k in weight_map}
        self.shapes = {k: tuple(self._slice(k).get_shape()) for k in self.file_of}

    def _slice(self, name: str):
        return self._handles[self.file_of[name]].get_slice(name)

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> torch.Tensor:
        """Tensor `name`, or only `index` of it (one slice per dimension)."""
        if index is None:
            return self._handles[self.file_of[name]].get_tensor(name)
        return self._slice(name)[index]

    def config(self) -> dict:
        return read_hf_config(self.path)

    def close(self) -> None:
        self._handles.clear()  # safe_open handles release their mapping when collected

    def __enter__(self) -> HfCheckpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_hf_config(directory: str | os.PathLike) -> dict:
    """The config.json of an HF model directory."""
    file = Path(directory) / CONFIG
    require(file.is_file(), f"{directory} has no {CONFIG} (an HF model directory holds one)")
    try:
        config = json.loads(file.read_text())
    except ValueError as exc:
        raise ValueError(f"{file}: not JSON ({exc})") from exc
    require(isinstance(config, dict), f"{file}: holds a {type(config).__name__}, not a JSON object")
    return config


def shard_names(n: int) -> list[str]:
    return [SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def plan_shards(sizes: Sequence[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """(name, bytes) in order -> the names of each file, every file at most max_shard_bytes unless
    one tensor alone is larger."""
    require(max_shard_bytes > 0, f"max_shard_bytes must be > 0, got {max_shard_bytes}")
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def write_shard(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def write_index(out_dir: Path, shards: list[list[str]], total_bytes: int) -> None:
    """The index of a sharded checkpoint (nothing for a single file); shards as `plan_shards` made."""
    if len(shards) == 1:
        return
    weight_map = {t: f for f, tensors in zip(shard_names(len(shards)), shards) for t in tensors}
    index = {"metadata": {"total_size": total_bytes}, "weight_map": weight_map}
    (out_dir / INDEX).write_text(json.dumps(index, indent=2) + "\n")
