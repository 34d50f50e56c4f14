"""A real corpus found wherever torch is installed: the Python sources of the installed packages.

    python tools/prepare_python_corpus.py [--output-prefix PREFIX] [--max-bytes N] [--roots DIR ...]
        [--vocab-size 32000] [--bpe-max-bytes N] [--workers N]

Collects every `.py` file under the running interpreter's site-packages (torch, numpy, triton,
transformers, ...: about 200 MB, tens of millions of tokens, on a typical training image), one
document per file, into `PREFIX.jsonl` ({"text", "path"} per line; the file list with sizes in
`PREFIX.files.txt`), then tokenizes it (trainer/preprocess.py, as tools/preprocess_data.py does)
into `PREFIX.bin/.idx` with a byte-level BPE trained on it (`PREFIX.tokenizer.json`;
--bpe-max-bytes trains it on an evenly spread sample of the documents instead, which is faster
on a large corpus). `PREFIX.stats.json` records the counts and the seconds each phase took.
Train on it with `data=megatron data.paths=[PREFIX] data.tokenizer=PREFIX.tokenizer.json` (what
configs/experiment/parity_300m.yaml points at by default).

Deterministic: roots, directories and files are visited in sorted order, so the same packages give
the same corpus, token for token. Skipped: `__pycache__`, files that are not UTF-8, files over
--max-file-bytes (generated tables, vendored blobs), empty files. --max-bytes stops collecting
before the file that would exceed it (0: no cap).

Most of the time goes to tokenizing, which runs in --workers processes (default: one per core
but one, at most 16); the BPE trainer uses every core by itself.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterator, Sequence

if __package__ in (None, ""):  # run as a script: make `trainer` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.prepare_common import add_tokenizer_args, check_args, tokenize_and_record  # noqa: E402
from trainer.default_corpus import default_cache_dir  # noqa: E402
from trainer.progress import Progress  # noqa: E402

DEFAULT_MAX_FILE_BYTES = 1 << 20  # larger .py files are mostly generated data


def default_prefix() -> str:
    return os.path.join(default_cache_dir(), "python_corpus", "python_sources")


def site_packages() -> list[str]:
    """The running interpreter's package directories (purelib and platlib, deduplicated, sorted)."""
    paths = sysconfig.get_paths()
    return sorted({os.path.realpath(paths[k]) for k in ("purelib", "platlib") if os.path.isdir(paths[k])})


def python_files(roots: Sequence[str]) -> Iterator[tuple[str, str]]:
    """(absolute path, path relative to its root) of every .py file, in a fixed order."""
    for root in sorted(os.path.realpath(r) for r in roots):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
            for name in sorted(filenames):
                if name.endswith(".py"):
                    path = os.path.join(dirpath, name)
                    yield path, os.path.relpath(path, root)


def collect(roots: Sequence[str], jsonl_path: str, max_bytes: int = 0,
            max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> dict:
    """Write the documents to `jsonl_path`; returns counts. Atomic: a temporary name, then renamed."""
    for root in roots:
        if not os.path.isdir(root):
            raise FileNotFoundError(f"--roots: not a directory: {root}")
    candidates = [(p, rel, os.path.getsize(p)) for p, rel in python_files(roots)]
    total = sum(size for _, _, size in candidates)
    if max_bytes:
        total = min(total, max_bytes)
    Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{jsonl_path}.tmp-{os.getpid()}"
    listing = []
    kept_bytes = skipped = 0
    progress = Progress(total, "collecting .py files")
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for path, rel, size in candidates:
                if size == 0 or size > max_file_bytes:
                    skipped += 1
                    continue
                if max_bytes and kept_bytes + size > max_bytes:
                    break
                try:
                    with open(path, encoding="utf-8") as f:
                        text = f.read()
                except (UnicodeDecodeError, OSError):
                    skipped += 1
                    continue
                if not text.strip():
                    skipped += 1
                    continue
                out.write(json.dumps({"text": text, "path": rel}) + "\n")
                listing.append(f"{size}\t{rel}")
                kept_bytes += size
                progress.update(size)
        os.replace(tmp, jsonl_path)
    finally:
        progress.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
    if not listing:
        raise ValueError(f"no .py files collected under {list(roots)} (max_bytes={max_bytes})")
    Path(jsonl_path).with_suffix(".files.txt").write_text("\n".join(listing) + "\n")
    return {"files": len(listing), "bytes": kept_bytes, "skipped": skipped}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-prefix", default=None,
                        help=f"writes PREFIX.jsonl, .bin, .idx, .tokenizer.json (default: {default_prefix()})")
    parser.add_argument("--roots", nargs="+", default=None,
                        help="directories to collect .py files from (default: this interpreter's site-packages)")
    parser.add_argument("--max-bytes", type=int, default=0, help="cap on collected source bytes (0: none)")
    parser.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
                        help="skip larger files (generated code)")
    add_tokenizer_args(parser)
    args = parser.parse_args(argv)
    check_args(parser, args, ("max_bytes",))
    prefix = args.output_prefix or default_prefix()
    roots = args.roots or site_packages()
    jsonl = prefix + ".jsonl"
    seconds = {}
    t0 = t = time.perf_counter()
    print(f"collecting .py files under {roots}", file=sys.stderr, flush=True)
    info = collect(roots, jsonl, args.max_bytes, args.max_file_bytes)
    seconds["collect"] = time.perf_counter() - t
    print(f"wrote {jsonl}: {info['files']} files, {info['bytes'] / 1e6:.1f} MB ({info['skipped']} skipped)"
          f" in {seconds['collect']:.1f} s", file=sys.stderr, flush=True)
    tokenize_and_record(prefix, jsonl, info, args, seconds, t0, roots=list(roots))


if __name__ == "__main__":
    main()
