"""Preprocessing: documents -> token ids -> a `.bin/.idx` pair, training the tokenizer first
when none is given. tools/preprocess_data.py is its command line.

Every document is encoded without the tokenizer's own special tokens (no BOS) and followed by
one EOD token, the only separator GPTDataset needs. Empty documents are skipped.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from tokenizers import Tokenizer

from trainer.documents import TEXT_SPLITS, DocumentSource, file_documents, non_empty
from trainer.indexed import megatron_writer, write_indexed
from trainer.progress import Progress
from trainer.tokenizer import load_tokenizer, save_tokenizer, train_bpe, trained_tokenizer_path

# Documents per encode_batch call / worker task: large enough to amortise the call, small
# enough that progress moves and memory stays flat.
CHUNK_DOCS = 512


@dataclass(frozen=True)
class IndexedCorpus:
    """What `build_indexed` wrote."""

    documents: int
    tokens: int  # EOD included
    vocab_size: int
    eod: int
    tokenizer: str  # path of the tokenizer.json the tokens come from


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


def encode_documents(source: DocumentSource, tokenizer_path: str, workers: int,
                     progress: Progress) -> Iterator[list[int]]:
    """Token ids of each non-empty document, in input order, encoded in `workers` processes."""
    chunks = _chunks(non_empty(source), CHUNK_DOCS)
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


def build_indexed(source: DocumentSource, total_bytes: int, output_prefix: str,
                  tokenizer_path: str | None, vocab_size: int, workers: int,
                  eod_token: str | None) -> IndexedCorpus:
    """Tokenize `source` (`total_bytes` of input, for progress) into output_prefix.bin/.idx.

    Without `tokenizer_path`, first trains a byte-level BPE of `vocab_size` tokens on the
    documents and saves it at `trained_tokenizer_path(output_prefix)`.
    """
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    if tokenizer_path is None:
        tokenizer_path = trained_tokenizer_path(output_prefix)
        print(f"training a byte-level BPE (vocab {vocab_size}) on the corpus", file=sys.stderr, flush=True)
        progress = Progress(total_bytes, "reading for BPE")

        def texts() -> Iterator[str]:
            for text, n in non_empty(source):
                progress.update(n)
                yield text

        tokenizer = train_bpe(texts(), vocab_size)
        progress.close()
        save_tokenizer(tokenizer, tokenizer_path)
    tokenizer, eod = load_tokenizer(tokenizer_path, eod_token)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    megatron_writer()  # its import takes seconds: not inside the progress bar
    progress = Progress(total_bytes, "tokenizing")
    try:
        docs, tokens = write_indexed(encode_documents(source, tokenizer_path, workers, progress),
                                     output_prefix, eod, vocab)
    finally:
        progress.close()
    print(f"wrote {output_prefix}.bin/.idx: {docs} documents, {tokens} tokens", file=sys.stderr, flush=True)
    return IndexedCorpus(docs, tokens, vocab, eod, tokenizer_path)


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer_path: str | None = None,
               vocab_size: int = 4096, json_key: str = "text", text_split: str = "paragraph",
               workers: int = 1, eod_token: str | None = None) -> tuple[str, str]:
    """Tokenize the files `inputs` (see trainer/documents.py) into `output_prefix`.bin/.idx;
    returns (prefix, tokenizer path)."""
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
    source = file_documents(list(inputs), json_key, text_split)
    total = sum(os.path.getsize(p) for p in inputs)
    corpus = build_indexed(source, total, output_prefix, tokenizer_path, vocab_size, workers, eod_token)
    return output_prefix, corpus.tokenizer
