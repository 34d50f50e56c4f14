"""Reading a torch.distributed.checkpoint (DCP) checkpoint without running code from its files.

DCP reads `.metadata` with plain `pickle.load`, and its default load planner reads every
non-tensor entry (optimizer param_groups, scheduler state, our JSON metadata strings) with
`torch.load(weights_only=False)`: a checkpoint directory someone hands over, or drops into
`checkpoints/` for resume=auto, could run any command. Here `.metadata` goes through an
unpickler that builds only DCP's own metadata classes, torch sizes, dtypes and layouts, and every
other pickle through `torch.load(weights_only=True)`. Tensors already load that way in DCP's
reader. Saving stays DCP's own.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

METADATA_FILE = ".metadata"

# The globals a DCP `.metadata` pickle names (torch 2.11 to 2.13): its dataclasses, the enum that
# encodes a memory format, the per-entry file location, torch.Size, and (as module attributes)
# torch dtypes and the layout helper. StorageMeta.checkpoint_id is a pathlib path.
_DCP_CLASSES = {
    dcp_metadata: ("Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata",
                   "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                   "_MEM_FORMAT_ENCODING"),
    dcp_filesystem: ("_StorageInfo",),
    torch.serialization: ("_get_layout",),
}
# torch.load's refusal names the global ("GLOBAL posix.system ..."); we repeat only the name.
_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


class UnsafeCheckpointError(RuntimeError):
    """A checkpoint file asks to import a Python global no checkpoint needs: it could run code."""


class DamagedCheckpointError(RuntimeError):
    """A checkpoint file cannot be read back as what it should be."""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    """(module, name) -> object, for every global a DCP metadata pickle may name."""
    objects: list[Any] = [torch.Size, pathlib.PosixPath]
    for module, names in _DCP_CLASSES.items():
        for name in names:
            obj = getattr(module, name, None)
            if obj is None:
                raise RuntimeError(f"torch {torch.__version__} has no {module.__name__}.{name}, "
                                   f"which reading checkpoint metadata needs; install torch>=2.11")
            objects.append(obj)
    # pickle names an object by its own __module__ (TensorProperties lived elsewhere in older
    # torch, pathlib's classes in pathlib._local on newer Python), so take the names from them.
    allowed = {(obj.__module__, obj.__qualname__): obj for obj in objects}
    allowed[("pathlib", "PosixPath")] = pathlib.PosixPath
    allowed.update({("torch", name): value for name, value in vars(torch).items()
                    if isinstance(value, torch.dtype)})
    return allowed


class _ForbiddenGlobal(pickle.UnpicklingError):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


class _MetadataUnpickler(pickle.Unpickler):
    """Builds DCP metadata and nothing else: any other global is refused before its lookup."""

    def __init__(self, file: BinaryIO, allowed: dict[tuple[str, str], Any]) -> None:
        super().__init__(file)
        self._allowed = allowed

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(f"{module}.{name}") from None


def _refusal(what: str, name: str) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{what} names the Python global {name}, which no checkpoint needs and which could run "
        f"code when loaded; refusing to load it. Use only checkpoints you or your runs wrote")


def read_dcp_metadata(path: Path, listed: set[str] | None = None) -> Metadata:
    """The DCP metadata of checkpoint `path`, unpickled through the allow-list.

    listed: the files the checkpoint's manifest lists (and checksums); when given, every data
    file the metadata points DCP at must be one of them. Raises UnsafeCheckpointError for a
    forbidden global, DamagedCheckpointError for anything else that is not DCP metadata.
    """
    file = path / METADATA_FILE
    what = f"checkpoint {path}: {file}"
    allowed = _allowed_globals()
    try:
        with open(file, "rb") as f:
            metadata = _MetadataUnpickler(f, allowed).load()
    except _ForbiddenGlobal as exc:
        raise _refusal(what, exc.name) from None
    except Exception as exc:  # noqa: BLE001 - any other failure to unpickle means a damaged file
        raise DamagedCheckpointError(f"{what} is unreadable ({type(exc).__name__}: {exc}); the "
                                     f"checkpoint is damaged") from exc
    if not isinstance(metadata, Metadata) or not isinstance(metadata.state_dict_metadata, dict):
        raise DamagedCheckpointError(f"{what} holds a {type(metadata).__name__}, not DCP "
                                     f"metadata; the checkpoint is damaged")
    if listed is not None:
        storage = metadata.storage_data if isinstance(metadata.storage_data, dict) else {}
        for info in storage.values():
            name = getattr(info, "relative_path", None)
            if name not in listed:
                raise DamagedCheckpointError(f"{what} points at data file {name!r}, which the "
                                             f"manifest does not list; the checkpoint is damaged")
    return metadata


def safe_torch_load(source: str | Path | BinaryIO, what: str) -> Any:
    """`torch.load(weights_only=True)` whose errors name `what` and never advise unsafe loading.

    torch's own message suggests retrying with weights_only=False, which is exactly the code
    execution this module exists to prevent, so it is neither repeated nor chained.
    """
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - sorted into the two errors below
        message = str(exc)
        if match := _REFUSED_GLOBAL.search(message):
            raise _refusal(what, match.group(1)) from None
        reason = message.split(". ")[0].strip() if "weights_only" not in message else ""
        reason = reason[:200] or "not a file torch.save wrote"
        raise DamagedCheckpointError(f"{what} is unreadable ({type(exc).__name__}: {reason}); "
                                     f"the checkpoint is damaged") from None


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader, with `.metadata` read through the allow-list.

    read_metadata takes no **kwargs on purpose: DCP then never falls back to per-rank
    `__<rank>.metadata` files, so `.metadata` is the only metadata a load reads.
    """

    def __init__(self, path: str | Path, listed: set[str] | None = None) -> None:
        super().__init__(path)
        self._listed = listed

    def read_metadata(self) -> Metadata:  # type: ignore[override]
        metadata = read_dcp_metadata(Path(self.path), self._listed)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner; non-tensor entries load by `torch.load(weights_only=True)`."""

    def __init__(self, checkpoint: str | Path) -> None:
        super().__init__()
        self._checkpoint = checkpoint

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = safe_torch_load(value, f"checkpoint {self._checkpoint}: entry {fqn!r}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
