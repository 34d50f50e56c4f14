"""What the corpus command lines (prepare_python_corpus.py, prepare_prose_corpus.py) share: the
tokenizer options, a BPE trained on an evenly spread sample, tokenizing the collected documents
(`PREFIX.jsonl`, one {"text", ...} a line) into `PREFIX.bin/.idx`, and `PREFIX.stats.json`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterator

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.indexed import indexed_counts  # noqa: E402
from trainer.preprocess import preprocess  # noqa: E402
from trainer.tokenizer import save_tokenizer, train_bpe, trained_tokenizer_path  # noqa: E402

DEFAULT_VOCAB = 32000


def default_workers() -> int:
    return max(1, min(16, (os.cpu_count() or 2) - 1))


def add_tokenizer_args(parser: argparse.ArgumentParser, bpe_max_bytes: int = 0) -> None:
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB, help="of the trained BPE")
    parser.add_argument("--bpe-max-bytes", type=int, default=bpe_max_bytes,
                        help=f"train the BPE on an evenly spread sample of about this many bytes (0: all; "
                             f"default {bpe_max_bytes})")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes for the CPU passes (default: cores - 1, at most 16)")


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace, non_negative: tuple[str, ...]) -> None:
    for name in (*non_negative, "bpe_max_bytes"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")


def sample_texts(jsonl_path: str, total_bytes: int, max_bytes: int) -> Iterator[str]:
    """Every k-th document of the jsonl (k = ceil(total / max_bytes)), up to max_bytes of text:
    a deterministic sample spread over the whole corpus, not just its first documents."""
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


def tokenize_and_record(prefix: str, jsonl: str, info: dict[str, Any], args: argparse.Namespace,
                        seconds: dict[str, float], t0: float, **extra: Any) -> dict[str, Any]:
    """BPE (on a sample when args.bpe_max_bytes is below the corpus) and .bin/.idx from `jsonl`;
    writes PREFIX.stats.json ({**info, documents, tokens, ..., **extra, seconds}) and prints the
    overrides that train on it. `info["bytes"]` is the corpus's size."""
    tokenizer_path = None
    if args.bpe_max_bytes and args.bpe_max_bytes < info["bytes"]:
        t = time.perf_counter()
        print(f"training a byte-level BPE (vocab {args.vocab_size}) on ~{args.bpe_max_bytes / 1e6:.0f} MB "
              "of the documents", file=sys.stderr, flush=True)
        tokenizer_path = train_sample_bpe(jsonl, prefix, info["bytes"], args.bpe_max_bytes, args.vocab_size)
        seconds["bpe"] = time.perf_counter() - t
    t = time.perf_counter()
    prefix, tokenizer = preprocess([jsonl], prefix, tokenizer_path, vocab_size=args.vocab_size, workers=args.workers)
    seconds["bpe+tokenize" if tokenizer_path is None else "tokenize"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    documents, tokens = indexed_counts(prefix)
    stats = {**info, "documents": documents, "tokens": tokens, "vocab_size": args.vocab_size,
             "bpe_max_bytes": args.bpe_max_bytes, "workers": args.workers, "cpus": os.cpu_count(), **extra,
             "seconds": {k: round(v, 2) for k, v in seconds.items()}}  # fmt: skip
    Path(prefix + ".stats.json").write_text(json.dumps(stats, indent=1) + "\n")
    print(f"{tokens} tokens in {documents} documents, {seconds['total']:.1f} s "
          f"({', '.join(f'{k} {v:.1f} s' for k, v in seconds.items() if k != 'total')})", file=sys.stderr)
    print(f"data prefix: {prefix}\ntokenizer: {tokenizer}\n"
          f"train with: data=megatron data.paths=[{prefix}] data.tokenizer={tokenizer}")
    return stats


def prepared(prefix: str) -> bool:
    """A finished preparation: the stats file (written last) and the files it describes."""
    return all(os.path.isfile(prefix + s) for s in (".stats.json", ".bin", ".idx", ".tokenizer.json"))
