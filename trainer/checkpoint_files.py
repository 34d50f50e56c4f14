"""The files of one checkpoint directory: durable writes, the manifest, checksums, a full disk.

`manifest.json`, written last by rank 0, lists every other file with its size and a CRC32 of its
bytes. A checkpoint is complete when its manifest says so, and intact when every listed file
has the listed size and checksum. CRC32 (zlib's, in the standard library) catches flipped bytes
and torn writes; it is no defence against someone who rewrites the manifest too, which is why
loading also never runs code from the files (trainer/safe_dcp.py).
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import zlib
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 2  # 2 added "checksum" and "checksums"; format 1 manifests load unverified
CONFIG = "config.json"
CHECKSUM = "crc32"
STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_DIR = re.compile(r"^step_(\d+)\..*tmp$")  # step_000200.tmp and step_000200.old.tmp
FIX = "delete that directory or set checkpoint.resume to another checkpoint (or 'none')"

_CHUNK = 16 << 20  # bytes read per crc32 update: large enough that hashing runs at disk speed
_NEARLY_FULL = 1 << 20  # free bytes under which a failed write is put down to a full disk


class DiskFullError(RuntimeError):
    """A checkpoint save ran out of disk space."""


def fsync(path: Path) -> None:
    """fsync a file, or a directory: a rename is durable only once its directory is synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, data: bytes) -> None:
    """Write `data` to `path` and fsync it; through Python's file object, so a full disk raises
    OSError(ENOSPC) (torch.save to a path reports it as "unexpected pos 704 vs 598")."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def list_files(root: Path) -> dict[str, int]:
    """Every file under `root` but the manifest, by path relative to `root`, with its size."""
    return {str(p.relative_to(root)): p.stat().st_size
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST}


def crc32_file(path: Path) -> str:
    """zlib.crc32 of a file's bytes, as 8 hex digits."""
    crc = 0
    buffer = bytearray(_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            crc = zlib.crc32(view[:n], crc)
    return f"{crc:08x}"


def checksums(root: Path, names: Iterable[str]) -> dict[str, str]:
    return {name: crc32_file(root / name) for name in names}


def verify_checksums(path: Path, manifest: dict[str, Any], names: Iterable[str]) -> None:
    """Check `names` (this rank's share of the manifest's files) against their checksums."""
    listed = manifest["checksums"]
    for name in names:
        got = crc32_file(path / name)
        if got != listed[name]:
            raise RuntimeError(f"checkpoint {path}: {path / name} does not match its checksum "
                               f"({CHECKSUM} {got}, manifest says {listed[name]}): the file is "
                               f"damaged; {FIX}")


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint `path`, after checking that every file it lists has its size.

    Any defect raises RuntimeError naming the path: resuming from scratch or from an older
    checkpoint without being asked would silently throw away training. Checksums are checked
    separately (every rank hashes a share of the files).
    """
    if not path.is_dir():
        raise RuntimeError(f"checkpoint {path} is not a directory; name a step_* directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        hint = ""
        if any(STEP_DIR.match(p.name) for p in path.iterdir() if p.is_dir()):
            hint = " (this looks like a checkpoints root; name one of its step_* directories)"
        raise RuntimeError(f"checkpoint {path} has no {MANIFEST}, so it is incomplete or not a "
                           f"checkpoint{hint}; {FIX}")
    try:
        manifest = json.loads(manifest_path.read_text())
        step, files, complete = manifest["step"], manifest["files"], manifest["complete"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise RuntimeError(f"checkpoint {path}: {MANIFEST} is corrupt ({exc!r}); {FIX}") from exc
    if complete is not True or not isinstance(step, int) or not isinstance(files, dict):
        raise RuntimeError(f"checkpoint {path}: {MANIFEST} is malformed or not marked complete; "
                           f"{FIX}")
    name_match = STEP_DIR.match(path.name)
    if name_match and int(name_match.group(1)) != step:
        raise RuntimeError(f"checkpoint {path}: {MANIFEST} says step {step}, the directory name "
                           f"says {int(name_match.group(1))}; {FIX}")
    for name, size in files.items():
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts:
            raise RuntimeError(f"checkpoint {path}: {MANIFEST} lists {name!r}, which is not a "
                               f"file inside the checkpoint; {FIX}")
        file = path / name
        if not file.is_file() or file.stat().st_size != size:
            raise RuntimeError(f"checkpoint {path}: {file} is missing or truncated (manifest says "
                               f"{size} bytes); {FIX}")
    if "checksums" in manifest:
        sums = manifest["checksums"]
        if manifest.get("checksum") != CHECKSUM:
            raise RuntimeError(f"checkpoint {path}: {MANIFEST} uses checksum "
                               f"{manifest.get('checksum')!r}; this version reads {CHECKSUM!r}")
        if not isinstance(sums, dict) or sums.keys() != files.keys():
            raise RuntimeError(f"checkpoint {path}: {MANIFEST} has checksums for other files than "
                               f"it lists; {FIX}")
    return manifest


def read_config(path: Path, manifest: dict[str, Any]) -> dict[str, Any] | None:
    """The run config saved with checkpoint `path`, or None if it was saved without one."""
    if CONFIG not in manifest["files"]:
        return None
    try:
        config = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"checkpoint {path}: {path / CONFIG} is unreadable ({exc}); the "
                           f"checkpoint is damaged; {FIX}") from exc
    if not isinstance(config, dict):
        raise RuntimeError(f"checkpoint {path}: {path / CONFIG} holds a "
                           f"{type(config).__name__}, not a config mapping; {FIX}")
    return config


# --------------------------------------------------------------------------------------------
# a full disk


def _free_bytes(directory: Path) -> int | None:
    for candidate in (directory, *directory.parents):  # the save may have failed before mkdir
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _no_space_error(exc: BaseException) -> BaseException | None:
    """The ENOSPC (or quota) error anywhere in exc's chain, DCP's per-rank failures included.

    torch.save's zip writer turns the OSError into "unexpected pos ..." with the OSError as
    context, and an error from another rank arrives pickled, with only its message left.
    """
    stack, seen = [exc], set()
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if "No space left on device" in str(e) or "Disk quota exceeded" in str(e):
            return e
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # torch's CheckpointException: rank -> (exc, tb)
        if isinstance(failures, dict):
            stack += [f[0] for f in failures.values() if isinstance(f, tuple) and f]
    return None


def disk_full(exc: BaseException, directory: Path, what: str) -> DiskFullError | None:
    """A DiskFullError for `exc` if a full disk explains it, else None.

    Also when the errno is lost (torch's writers drop it) but the filesystem has under 1 MiB
    free, which a failed write on a full disk leaves.
    """
    free = _free_bytes(directory)
    cause = _no_space_error(exc)
    if cause is None and (free is None or free >= _NEARLY_FULL):
        return None
    cause = cause or exc
    first_line = (str(cause).strip().splitlines() or [""])[0][:200]
    return DiskFullError(f"{what}: disk full in {directory} ({free} bytes free); the partial "
                         f"save was removed and complete checkpoints are untouched. Free space "
                         f"or set checkpoint.dir to a larger disk ({type(cause).__name__}: "
                         f"{first_line})")
