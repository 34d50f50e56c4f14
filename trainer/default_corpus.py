"""The default corpus: Python's own pydoc topics (real English, present in every Python),
prepared once into a cache directory as `.bin/.idx` with a BPE trained on it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from pathlib import Path

from trainer.documents import DocumentSource
from trainer.preprocess import build_indexed
from trainer.run_lock import FileLock
from trainer.tokenizer import trained_tokenizer_path

DEFAULT_CORPUS_VOCAB = 4096
# Bump when the default corpus recipe changes, so old caches are not reused.
DEFAULT_CORPUS_FORMAT = 1
LOCK_TIMEOUT_S = 1800.0


def default_cache_dir() -> str:
    """$FP8MOE_CACHE, else ~/.cache/fp8moe."""
    return os.environ.get("FP8MOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fp8moe")


def pydoc_documents() -> list[str]:
    """The pydoc topics of the running Python, one document each."""
    from pydoc_data.topics import topics

    # Sorted: dict order is an implementation detail; the corpus must be the same every run.
    return [topics[key] for key in sorted(topics)]


def _manifest_ok(path: Path) -> bool:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    prefix = str(path.parent / manifest.get("prefix", ""))
    return all(os.path.isfile(p) for p in (prefix + ".bin", prefix + ".idx", trained_tokenizer_path(prefix)))


def _prepare(docs: list[str], prefix: str, manifest: Path) -> None:
    """Build the corpus at `prefix`, then write `manifest` (last: it marks the corpus complete)."""
    print(f"preparing the default corpus (pydoc topics) in {manifest.parent}", file=sys.stderr, flush=True)
    source: DocumentSource = lambda: ((d, len(d.encode("utf-8"))) for d in docs)
    total = sum(len(d.encode("utf-8")) for d in docs)
    corpus = build_indexed(source, total, prefix, None, DEFAULT_CORPUS_VOCAB, 1, None)
    info = dataclasses.asdict(corpus)
    info.update(prefix=os.path.basename(prefix), tokenizer=os.path.basename(corpus.tokenizer),
                python=sys.version.split()[0])
    tmp = manifest.with_suffix(f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(info, indent=2))
    os.replace(tmp, manifest)


def ensure_default_corpus(cache_dir: str | None = None) -> str:
    """The pydoc-topics corpus as .bin/.idx with its own BPE (vocab 4096); returns the prefix.

    Prepared once per Python version (the topics text differs between versions) into
    `cache_dir` (default: `default_cache_dir()`); `manifest.json`, written last, marks it
    complete. Safe when several processes (torchrun ranks) call it at once, with or without
    torch.distributed: the first to take `prepare.lock` (trainer/run_lock.py FileLock) prepares,
    the others wait for the manifest. A lock left by a killed process on this host is taken over;
    one from another host is waited for, and the TimeoutError names its holder and the `rm`.
    """
    docs = pydoc_documents()
    digest = hashlib.sha256(f"{DEFAULT_CORPUS_FORMAT}:{DEFAULT_CORPUS_VOCAB}".encode())
    for doc in docs:
        digest.update(doc.encode("utf-8") + b"\0")
    out_dir = Path(cache_dir or default_cache_dir()) / "default_corpus" / digest.hexdigest()[:16]
    prefix = str(out_dir / "pydoc_topics")
    manifest = out_dir / "manifest.json"
    if _manifest_ok(manifest):
        return prefix
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(out_dir / "prepare.lock", what=f"the default corpus cache {out_dir}")
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while not _manifest_ok(manifest):
        busy = lock.try_acquire()
        if busy is not None:  # another process prepares it: wait for its manifest
            if time.monotonic() > deadline:
                raise TimeoutError(f"waited {LOCK_TIMEOUT_S:.0f} s for another process to prepare the "
                                   f"default corpus: {busy}") from None
            time.sleep(0.2)
            continue
        try:
            if not _manifest_ok(manifest):  # another process may have finished meanwhile
                _prepare(docs, prefix, manifest)
        finally:
            lock.release()
    return prefix
