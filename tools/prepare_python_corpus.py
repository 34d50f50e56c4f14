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
import math
import os
import sys
import sysconfig
import time
from pathlib import Path
from typing import Iterator, Sequence

if __package__ in (None, ""):  # run as a script: make `trainer` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.default_corpus import default_cache_dir  # noqa: E402
from trainer.indexed import indexed_counts  # noqa: E402
from trainer.preprocess import preprocess  # noqa: E402
from trainer.progress import Progress  # noqa: E402
from trainer.tokenizer import save_tokenizer, train_bpe, trained_tokenizer_path  # noqa: E402

DEFAULT_VOCAB = 32000
DEFAULT_MAX_FILE_BYTES = 1 << 20  # larger .py files are mostly generated data


def default_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 2) - 1))


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


def sample_texts(jsonl_path: str, total_bytes: int, max_bytes: int) -> Iterator[str]:
    """Every k-th document of the jsonl (k = ceil(total / max_bytes)), up to max_bytes of text:
    a deterministic sample spread over all the packages, not just the first ones."""
    stride = max(1, math.ceil(total_bytes / max_bytes))
    taken = 0
    with open(jsonl_path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if i % stride:
                continue
            text = json.loads(line)["text"]
            taken += len(text.encode("utf-8"))
            yield text
            if taken >= max_bytes:
                return


def train_sample_bpe(jsonl_path: str, prefix: str, total_bytes: int, max_bytes: int, vocab_size: int) -> str:
    """Train the byte-level BPE on a sample of the documents; saved where `preprocess` would put it."""
    path = trained_tokenizer_path(prefix)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_tokenizer(train_bpe(sample_texts(jsonl_path, total_bytes, max_bytes), vocab_size), path)
    return path


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-prefix", default=None,
                        help=f"writes PREFIX.jsonl, .bin, .idx, .tokenizer.json (default: {default_prefix()})")
    parser.add_argument("--roots", nargs="+", default=None,
                        help="directories to collect .py files from (default: this interpreter's site-packages)")
    parser.add_argument("--max-bytes", type=int, default=0, help="cap on collected source bytes (0: none)")
    parser.add_argument("--max-file-bytes", type=int, default=DEFAULT_MAX_FILE_BYTES,
                        help="skip larger files (generated code)")
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB, help="of the trained BPE")
    parser.add_argument("--bpe-max-bytes", type=int, default=0,
                        help="train the BPE on an evenly spread sample of about this many bytes (0: all)")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="tokenizer processes (default: cores - 1, at most 16)")
    args = parser.parse_args(argv)
    for name in ("max_bytes", "bpe_max_bytes"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
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
    tokenizer_path = None
    if args.bpe_max_bytes and args.bpe_max_bytes < info["bytes"]:
        t = time.perf_counter()
        print(f"training a byte-level BPE (vocab {args.vocab_size}) on ~{args.bpe_max_bytes / 1e6:.0f} MB "
              "of the documents", file=sys.stderr, flush=True)
        tokenizer_path = train_sample_bpe(jsonl, prefix, info["bytes"], args.bpe_max_bytes, args.vocab_size)
        seconds["bpe"] = time.perf_counter() - t
    t = time.perf_counter()
    prefix, tokenizer = preprocess([jsonl], prefix, tokenizer_path, vocab_size=args.vocab_size,
                                   workers=args.workers)
    seconds["bpe+tokenize" if tokenizer_path is None else "tokenize"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    documents, tokens = indexed_counts(prefix)
    stats = {**info, "documents": documents, "tokens": tokens, "vocab_size": args.vocab_size,
             "bpe_max_bytes": args.bpe_max_bytes, "workers": args.workers, "cpus": os.cpu_count(),
             "roots": list(roots), "seconds": {k: round(v, 2) for k, v in seconds.items()}}
    Path(prefix + ".stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"{tokens} tokens in {documents} documents, {seconds['total']:.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in seconds.items() if k != 'total')})", file=sys.stderr)
    print(f"data prefix: {prefix}\ntokenizer: {tokenizer}\n"
          f"train with: data=megatron data.paths=[{prefix}] data.tokenizer={tokenizer}")


if __name__ == "__main__":
    main()
