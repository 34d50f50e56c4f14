"""Megatron's `.bin/.idx` token files, the format megatron-core's GPTDataset reads: writing a
pair atomically, and the one reader of the `.idx` header.

A data prefix PREFIX names the pair PREFIX.bin (every document's token ids, back to back) and
PREFIX.idx (their lengths and byte offsets). Each document is one sequence here.
"""

from __future__ import annotations

import os
import socket
import struct
import warnings
from dataclasses import dataclass
from typing import Iterable

import numpy

# The .idx layout megatron's _IndexWriter writes: magic, version (u64), dtype code (u8),
# sequence count (u64), document-boundary count (u64), then int32 sequence lengths, int64 byte
# pointers and int64 document boundaries.
IDX_MAGIC = b"MMIDIDX\x00\x00"
IDX_HEADER_BYTES = 34
TOKEN_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 8, 7: 4, 8: 2}  # megatron DType code -> bytes


@dataclass(frozen=True)
class IndexHeader:
    """The fixed-size head of an `.idx` file."""

    version: int
    dtype_code: int  # megatron's DType code of the .bin's token ids
    sequences: int
    boundaries: int  # entries of the document-boundary array: documents + 1

    @property
    def token_bytes(self) -> int:
        return TOKEN_BYTES[self.dtype_code]


def read_index_header(idx_path: str) -> IndexHeader:
    """The header of `idx_path`; a ValueError when the file is not a Megatron index of the
    version and token types written here."""
    size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as f:
        head = f.read(IDX_HEADER_BYTES)
    if len(head) < IDX_HEADER_BYTES or head[:len(IDX_MAGIC)] != IDX_MAGIC:
        raise ValueError(f"{idx_path}: not a Megatron index file (bad header, {size} bytes)")
    version, code, sequences, boundaries = struct.unpack("<QBQQ", head[len(IDX_MAGIC):])
    if version != 1 or code not in TOKEN_BYTES:
        raise ValueError(f"{idx_path}: unsupported index version {version} / dtype code {code}")
    return IndexHeader(version, code, sequences, boundaries)


def check_indexed_prefix(prefix: str) -> int:
    """Number of sequences (documents) in PREFIX.bin/.idx, after checking the pair is whole.

    megatron reads the index with bare asserts and numpy views, so a missing, truncated or
    mismatched file fails deep inside it (or later, as garbage tokens); these checks read only
    the header and three numbers.
    """
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    missing = [p for p in (bin_path, idx_path) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"data prefix {prefix}: missing {' and '.join(missing)} "
                                "(make them with tools/preprocess_data.py)")
    header = read_index_header(idx_path)
    sequences, boundaries = header.sequences, header.boundaries
    size = os.path.getsize(idx_path)
    expected = IDX_HEADER_BYTES + sequences * 12 + boundaries * 8
    if size != expected:
        raise ValueError(f"{idx_path}: truncated or corrupted: its header describes {sequences} "
                         f"sequences ({expected} bytes) but the file has {size} bytes")
    if sequences == 0:
        raise ValueError(f"{idx_path}: holds no documents")
    with open(idx_path, "rb") as f:
        f.seek(IDX_HEADER_BYTES + (sequences - 1) * 4)
        (last_length,) = struct.unpack("<i", f.read(4))
        f.seek(IDX_HEADER_BYTES + sequences * 4 + (sequences - 1) * 8)
        (last_pointer,) = struct.unpack("<q", f.read(8))
        f.seek(IDX_HEADER_BYTES + sequences * 12 + (boundaries - 1) * 8)
        (last_boundary,) = struct.unpack("<q", f.read(8))
    if last_boundary != sequences:
        raise ValueError(f"{idx_path}: corrupted: document boundaries end at {last_boundary}, "
                         f"expected {sequences}")
    bin_expected = last_pointer + last_length * header.token_bytes
    if os.path.getsize(bin_path) != bin_expected:
        raise ValueError(f"{bin_path}: has {os.path.getsize(bin_path)} bytes but {idx_path} indexes "
                         f"{bin_expected}: truncated, or the two files come from different runs")
    return sequences


def count_tokens(prefix: str, first: int, stop: int, enough: int) -> int:
    """Tokens of documents [first, stop) of PREFIX.idx, counted only until `enough`: a split of
    millions of documents is known to fill a sample after reading a few lengths, not all of them."""
    header = read_index_header(prefix + ".idx")
    if not 0 <= first <= stop <= header.sequences:
        raise ValueError(f"documents [{first}, {stop}) are outside the {header.sequences} of {prefix}.idx")
    lengths = numpy.memmap(prefix + ".idx", dtype=numpy.int32, mode="r", offset=IDX_HEADER_BYTES,
                           shape=(header.sequences,))
    total, chunk = 0, max(1, enough)  # every document holds >= 1 token (its EOD): one chunk, mostly
    for start in range(first, stop, chunk):
        total += int(lengths[start:min(stop, start + chunk)].sum(dtype=numpy.int64))
        if total >= enough:
            break
    return total


def indexed_counts(prefix: str) -> tuple[int, int]:
    """(documents, tokens) of PREFIX.bin/.idx, from the index header and the .bin size."""
    header = read_index_header(prefix + ".idx")
    return header.sequences, os.path.getsize(prefix + ".bin") // header.token_bytes


def megatron_writer():
    """megatron-core's (DType, IndexedDatasetBuilder), imported on first use: it takes seconds."""
    with warnings.catch_warnings():
        # megatron.core's package import warns about optional GPU libraries irrelevant here.
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    return DType, IndexedDatasetBuilder


def write_indexed(docs: Iterable[list[int]], prefix: str, eod: int, vocab_size: int) -> tuple[int, int]:
    """Write prefix.bin/.idx, each document followed by `eod`, atomically; returns (documents,
    tokens including EOD). Under temporary names until complete, `.idx` renamed last, so an
    interrupted run never leaves a pair that looks complete."""
    DType, IndexedDatasetBuilder = megatron_writer()
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
