"""Turn text into Megatron `.bin/.idx` token files, the format megatron-core's GPTDataset reads.

    python tools/preprocess_data.py --input a.jsonl [b.txt ...] --output-prefix out/corpus \
        [--tokenizer tok.json] [--vocab-size 4096] [--json-key text] [--workers N]

Documents:
- `.jsonl` / `.json` files: one document per line, the text under `--json-key` (default "text").
- any other file is plain text: by default one document per paragraph (blank-line separated),
  because a single-document file cannot be split into train/valid (megatron splits by document);
  `--text-split file` makes each whole file one document.
Empty documents are skipped. Every document is encoded without the tokenizer's own special tokens
(no BOS) and followed by one EOD token, the only separator GPTDataset needs.

Tokenizer: a Hugging Face `tokenizers` tokenizer.json (`--tokenizer`), or, when none is given, a
byte-level BPE (lossless: decode(encode(text)) == text) trained on the corpus itself and saved as
`<output-prefix>.tokenizer.json`. EOD is `--eod-token`, else the first of EOD_CANDIDATES present.

Outputs are written under temporary names and renamed when complete, `.idx` last, so an
interrupted run never leaves a pair that looks complete.

Also here: `ensure_default_corpus`, the embedded corpus (Python's own pydoc topics, real English
present in every Python) prepared once into a cache directory.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import multiprocessing
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
TRAINED_EOD = "<|endoftext|>"
TEXT_SPLITS = ("paragraph", "file")
# Documents per encode_batch call / worker task: large enough to amortise the call, small
# enough that progress moves and memory stays flat.
CHUNK_DOCS = 512
DEFAULT_CORPUS_VOCAB = 4096
# Bump when the default corpus recipe changes, so old caches are not reused.
DEFAULT_CORPUS_FORMAT = 1
LOCK_TIMEOUT_S = 1800.0

# A document source: called again for each pass (BPE training, then encoding); yields
# (text, bytes of input consumed) so progress can be reported against total input size.
DocumentSource = Callable[[], Iterator[tuple[str, int]]]


def trained_tokenizer_path(prefix: str) -> str:
    """Where `preprocess` saves the tokenizer it trains for `prefix`."""
    return prefix + ".tokenizer.json"


def default_cache_dir() -> str:
    """$FP8MOE_CACHE, else ~/.cache/fp8moe."""
    return os.environ.get("FP8MOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fp8moe")


def find_eod(tokenizer: Tokenizer, eod_token: str | None, where: str) -> int:
    """The id of the end-of-document token; `where` names the tokenizer in errors."""
    if eod_token:
        token_id = tokenizer.token_to_id(eod_token)
        if token_id is None:
            raise ValueError(f"eod token {eod_token!r} is not in the tokenizer {where}")
        return token_id
    for candidate in EOD_CANDIDATES:
        token_id = tokenizer.token_to_id(candidate)
        if token_id is not None:
            return token_id
    raise ValueError(
        f"tokenizer {where} has none of the end-of-document tokens {list(EOD_CANDIDATES)}; "
        "name one with --eod-token (data.eod_token in the trainer config)"
    )


def load_tokenizer(path: str, eod_token: str | None = None) -> tuple[Tokenizer, int]:
    """A tokenizer.json and its EOD id."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    tokenizer = Tokenizer.from_file(path)
    return tokenizer, find_eod(tokenizer, eod_token, path)


def _file_documents(paths: Sequence[str], json_key: str, text_split: str) -> DocumentSource:
    def source() -> Iterator[tuple[str, int]]:
        for path in paths:
            if path.endswith((".jsonl", ".json")):
                yield from _jsonl_documents(path, json_key)
            else:
                yield from _text_documents(path, text_split)

    return source


def _jsonl_documents(path: str, json_key: str) -> Iterator[tuple[str, int]]:
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON line ({e.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
                raise ValueError(
                    f"{path}:{line_no}: no string under key {json_key!r} (set --json-key)"
                )
            yield record[json_key], len(line)


def _text_documents(path: str, text_split: str) -> Iterator[tuple[str, int]]:
    with open(path, encoding="utf-8") as f:
        if text_split == "file":
            text = f.read()
            yield text, len(text.encode("utf-8"))
            return
        lines: list[str] = []
        nbytes = 0
        for line in f:
            nbytes += len(line.encode("utf-8"))
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip("\n"), nbytes
                lines, nbytes = [], 0
        if lines:
            yield "".join(lines).rstrip("\n"), nbytes


def _non_empty(source: DocumentSource) -> Iterator[tuple[str, int]]:
    skipped = 0  # bytes of skipped documents ride on the next one, so progress reaches 100%
    for text, n in source():
        if text.strip():
            yield text, n + skipped
            skipped = 0
        else:
            skipped += n


class _Progress:
    """tqdm when installed, else a line every 30 s: preprocessing a large corpus takes hours."""

    def __init__(self, total: int, desc: str) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        # Outside a terminal (Slurm logs) every redraw is a new line: keep them rare.
        interval = 0.1 if sys.stderr.isatty() else 30.0
        self._bar = None if tqdm is None else tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                                  mininterval=interval, file=sys.stderr)
        self._desc, self._total, self._done, self._last = desc, total, 0, time.monotonic()

    def update(self, n: int) -> None:
        if self._bar is not None:
            return self._bar.update(n)
        self._done += n
        if time.monotonic() - self._last > 30.0:
            self._last = time.monotonic()
            print(f"{self._desc}: {self._done}/{self._total} bytes", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style, lossless) with TRAINED_EOD as token 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TRAINED_EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


@functools.lru_cache(maxsize=2)
def _cached_tokenizer(path: str) -> Tokenizer:
    # A memo so each worker process parses the tokenizer once, not once per chunk.
    return Tokenizer.from_file(path)


def _encode_chunk(args: tuple[str, list[str]]) -> list[list[int]]:
    path, texts = args
    encodings = _cached_tokenizer(path).encode_batch(texts, add_special_tokens=False)
    return [e.ids for e in encodings]


def _chunks(docs: Iterator[tuple[str, int]], size: int) -> Iterator[tuple[list[str], int]]:
    texts: list[str] = []
    nbytes = 0
    for text, n in docs:
        texts.append(text)
        nbytes += n
        if len(texts) == size:
            yield texts, nbytes
            texts, nbytes = [], 0
    if texts:
        yield texts, nbytes


def _encoded(source: DocumentSource, tokenizer_path: str, workers: int,
             progress: _Progress) -> Iterator[list[int]]:
    """Token ids per document, in input order."""
    chunks = _chunks(_non_empty(source), CHUNK_DOCS)
    if workers <= 1:
        for texts, nbytes in chunks:
            yield from _encode_chunk((tokenizer_path, texts))
            progress.update(nbytes)
        return
    sizes: list[int] = []

    def tasks() -> Iterator[tuple[str, list[str]]]:
        for texts, nbytes in chunks:
            sizes.append(nbytes)
            yield tokenizer_path, texts

    # spawn, not fork: the parent may already run tokenizers' thread pool, which fork corrupts.
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for i, ids in enumerate(pool.imap(_encode_chunk, tasks())):
            yield from ids
            progress.update(sizes[i])


def _megatron_writer():
    with warnings.catch_warnings():
        # megatron.core's package import warns about optional GPU libraries irrelevant here.
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    return DType, IndexedDatasetBuilder


def _write_indexed(docs: Iterable[list[int]], prefix: str, eod: int, vocab_size: int) -> tuple[int, int]:
    """Write prefix.bin/.idx atomically; returns (documents, tokens including EOD)."""
    DType, IndexedDatasetBuilder = _megatron_writer()
    tmp = f"{prefix}.tmp-{socket.gethostname()}-{os.getpid()}"  # unique even on a shared disk
    num_docs = num_tokens = 0
    try:
        builder = IndexedDatasetBuilder(tmp + ".bin", dtype=DType.optimal_dtype(vocab_size))
        for ids in docs:
            ids.append(eod)
            builder.add_document(ids, [len(ids)])
            num_docs += 1
            num_tokens += len(ids)
        if num_docs == 0:
            raise ValueError(f"no non-empty documents in the input for {prefix}")
        builder.finalize(tmp + ".idx")
        # .idx goes away first and comes back last: a reader never pairs a new .bin with an
        # old .idx, and an .idx present means its .bin is complete.
        if os.path.exists(prefix + ".idx"):
            os.unlink(prefix + ".idx")
        os.replace(tmp + ".bin", prefix + ".bin")
        os.replace(tmp + ".idx", prefix + ".idx")
    finally:
        for leftover in (tmp + ".bin", tmp + ".idx"):
            if os.path.exists(leftover):
                os.unlink(leftover)
    return num_docs, num_tokens


def _build(source: DocumentSource, total_bytes: int, output_prefix: str, tokenizer_path: str | None,
           vocab_size: int, workers: int, eod_token: str | None) -> dict:
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    if tokenizer_path is None:
        tokenizer_path = trained_tokenizer_path(output_prefix)
        print(f"training a byte-level BPE (vocab {vocab_size}) on the corpus", file=sys.stderr, flush=True)
        progress = _Progress(total_bytes, "reading for BPE")

        def texts() -> Iterator[str]:
            for text, n in _non_empty(source):
                progress.update(n)
                yield text

        tokenizer = train_bpe(texts(), vocab_size)
        progress.close()
        tmp = f"{tokenizer_path}.tmp-{os.getpid()}"
        tokenizer.save(tmp)
        os.replace(tmp, tokenizer_path)
    tokenizer, eod = load_tokenizer(tokenizer_path, eod_token)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    _megatron_writer()  # its import takes seconds: not inside the progress bar
    progress = _Progress(total_bytes, "tokenizing")
    try:
        docs, tokens = _write_indexed(_encoded(source, tokenizer_path, workers, progress),
                                      output_prefix, eod, vocab)
    finally:
        progress.close()
    print(f"wrote {output_prefix}.bin/.idx: {docs} documents, {tokens} tokens", file=sys.stderr, flush=True)
    return {"documents": docs, "tokens": tokens, "vocab_size": vocab, "eod": eod,
            "tokenizer": tokenizer_path}


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer_path: str | None = None,
               vocab_size: int = 4096, json_key: str = "text", text_split: str = "paragraph",
               workers: int = 1, eod_token: str | None = None) -> tuple[str, str]:
    """Tokenize `inputs` into `output_prefix`.bin/.idx; returns (prefix, tokenizer path)."""
    if not inputs:
        raise ValueError("inputs: give at least one .jsonl or text file")
    for path in inputs:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file not found: {path}")
    if tokenizer_path is not None and not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"tokenizer file not found: {tokenizer_path}")
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size}: must be >= 257 (256 bytes + EOD)")
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"text_split={text_split!r}: allowed {list(TEXT_SPLITS)}")
    if workers < 1:
        raise ValueError(f"workers={workers}: must be >= 1")
    source = _file_documents(list(inputs), json_key, text_split)
    total = sum(os.path.getsize(p) for p in inputs)
    info = _build(source, total, output_prefix, tokenizer_path, vocab_size, workers, eod_token)
    return output_prefix, info["tokenizer"]


def _pydoc_documents() -> list[str]:
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


def _lock_is_stale(lock: Path) -> bool:
    """The lock's holder ran on this host and is gone (killed mid-preparation)."""
    try:
        host, pid = lock.read_text().split()
    except (OSError, ValueError):
        return False  # being written right now, or already removed
    if host != socket.gethostname():
        return False
    try:
        os.kill(int(pid), 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return True
    except PermissionError:  # exists, under another user
        pass
    return False


def ensure_default_corpus(cache_dir: str | None = None) -> str:
    """The pydoc-topics corpus as .bin/.idx with its own BPE (vocab 4096); returns the prefix.

    Prepared once per Python version (the topics text differs between versions) into
    `cache_dir` (default: `default_cache_dir()`); `manifest.json`, written last, marks it
    complete. Safe when several processes (torchrun ranks) call it at once, with or without
    torch.distributed: the first to create `prepare.lock` (O_EXCL) prepares, the others wait
    for the manifest. A lock left by a killed process on this host is broken; elsewhere, delete
    it by hand (the TimeoutError names it).
    """
    docs = _pydoc_documents()
    digest = hashlib.sha256(f"{DEFAULT_CORPUS_FORMAT}:{DEFAULT_CORPUS_VOCAB}".encode())
    for doc in docs:
        digest.update(doc.encode("utf-8") + b"\0")
    out_dir = Path(cache_dir or default_cache_dir()) / "default_corpus" / digest.hexdigest()[:16]
    prefix = str(out_dir / "pydoc_topics")
    manifest = out_dir / "manifest.json"
    lock = out_dir / "prepare.lock"
    if _manifest_ok(manifest):
        return prefix
    out_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + LOCK_TIMEOUT_S
    while not _manifest_ok(manifest):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            if _lock_is_stale(lock):
                lock.unlink(missing_ok=True)
            elif time.monotonic() > deadline:
                raise TimeoutError(
                    f"waited {LOCK_TIMEOUT_S:.0f} s for another process to prepare the default "
                    f"corpus; if none is running, delete {lock}"
                ) from None
            time.sleep(0.2)
            continue
        try:
            os.write(fd, f"{socket.gethostname()} {os.getpid()}".encode())
            os.close(fd)
            if not _manifest_ok(manifest):  # another process may have finished meanwhile
                print(f"preparing the default corpus (pydoc topics) in {out_dir}",
                      file=sys.stderr, flush=True)
                source: DocumentSource = lambda: ((d, len(d.encode("utf-8"))) for d in docs)
                total = sum(len(d.encode("utf-8")) for d in docs)
                info = _build(source, total, prefix, None, DEFAULT_CORPUS_VOCAB, 1, None)
                info.update(prefix=os.path.basename(prefix),
                            tokenizer=os.path.basename(info["tokenizer"]),
                            python=sys.version.split()[0])
                tmp = manifest.with_suffix(f".tmp-{os.getpid()}")
                tmp.write_text(json.dumps(info, indent=2))
                os.replace(tmp, manifest)
        finally:
            lock.unlink(missing_ok=True)
    return prefix


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl or plain text files")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json; default: train a byte-level BPE on the input")
    parser.add_argument("--vocab-size", type=int, default=4096, help="for the trained BPE")
    parser.add_argument("--json-key", default="text", help="text field of each jsonl line")
    parser.add_argument("--text-split", choices=TEXT_SPLITS, default="paragraph",
                        help="plain text files: a document per paragraph or per file")
    parser.add_argument("--eod-token", default=None,
                        help=f"end-of-document token; default: first of {list(EOD_CANDIDATES)}")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    args = parser.parse_args(argv)
    prefix, tokenizer = preprocess(args.input, args.output_prefix, args.tokenizer, args.vocab_size,
                                   args.json_key, args.text_split, args.workers, args.eod_token)
    print(f"data prefix: {prefix}\ntokenizer: {tokenizer}")


if __name__ == "__main__":
    main()
