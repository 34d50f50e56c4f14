"""Document sources: the texts a corpus is made of, read from JSON-lines and plain text files.

- `.jsonl` / `.json` files: one document per line, the text under a key ("text" by default).
- any other file is plain text: by default one document per paragraph (blank-line separated),
  because a single-document file cannot be split into train/valid (megatron splits by document);
  `text_split="file"` makes each whole file one document.

Both must be UTF-8: a byte that is not raises a ValueError naming the file, the line and the
byte's offset in the file.
"""

from __future__ import annotations

import json
from typing import Any, Callable, Iterator, Sequence

TEXT_SPLITS = ("paragraph", "file")

# A document source: called again for each pass (BPE training, then encoding); yields
# (text, bytes of input consumed) so progress can be reported against total input size.
DocumentSource = Callable[[], Iterator[tuple[str, int]]]


def _not_utf8(path: str, line_no: int, offset: int, bad: bytes) -> ValueError:
    """The error for a byte that is not UTF-8 at byte `offset` of `path`, on line `line_no`."""
    shown = " ".join(f"0x{byte:02x}" for byte in bad)
    return ValueError(
        f"{path}:{line_no}: not UTF-8 text (byte {shown} at byte offset {offset} of the file): "
        "input files must be UTF-8 encoded; convert this one first, e.g. `iconv -f latin1 -t utf-8`")


def _first_non_utf8(path: str) -> ValueError:
    # Text mode decodes in chunks, so its own error gives an offset within a chunk: find the
    # line and the file offset by decoding line by line.
    offset = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as e:
                return _not_utf8(path, line_no, offset + e.start, line[e.start:e.end])
            offset += len(line)
    return ValueError(f"{path}: not UTF-8 text: input files must be UTF-8 encoded")


def json_lines(path: str) -> Iterator[tuple[int, Any, int]]:
    """(line number, value, bytes of the line) of each non-blank line of a JSON-lines file; a
    line that is not JSON, or not UTF-8, raises a ValueError naming the file and the line."""
    offset = 0
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            start, offset = offset, offset + len(line)
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except UnicodeDecodeError as e:  # json decodes bytes itself: UTF-8, or UTF-16/32 by BOM
                raise _not_utf8(path, line_no, start + e.start, line[e.start:e.end]) from None
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{line_no}: not a JSON line ({e.msg})") from None
            yield line_no, value, len(line)


def jsonl_documents(path: str, json_key: str) -> Iterator[tuple[str, int]]:
    """The string under `json_key` of each line of a JSON-lines file."""
    for line_no, record, nbytes in json_lines(path):
        if not isinstance(record, dict) or not isinstance(record.get(json_key), str):
            raise ValueError(f"{path}:{line_no}: no string under key {json_key!r} (set --json-key)")
        yield record[json_key], nbytes


def text_documents(path: str, text_split: str) -> Iterator[tuple[str, int]]:
    """A plain text file's paragraphs (`text_split="paragraph"`) or the whole file ("file")."""
    if text_split not in TEXT_SPLITS:
        raise ValueError(f"text_split={text_split!r}: allowed {list(TEXT_SPLITS)}")
    try:
        yield from _text_documents(path, text_split)
    except UnicodeDecodeError:
        raise _first_non_utf8(path) from None


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


def file_documents(paths: Sequence[str], json_key: str, text_split: str) -> DocumentSource:
    """The documents of `paths` in order: JSON-lines files by their extension, else plain text."""

    def source() -> Iterator[tuple[str, int]]:
        for path in paths:
            if path.endswith((".jsonl", ".json")):
                yield from jsonl_documents(path, json_key)
            else:
                yield from text_documents(path, text_split)

    return source


def non_empty(source: DocumentSource) -> Iterator[tuple[str, int]]:
    """The documents of `source` that hold more than whitespace."""
    skipped = 0  # bytes of skipped documents ride on the next one, so progress reaches 100%
    for text, n in source():
        if text.strip():
            yield text, n + skipped
            skipped = 0
        else:
            skipped += n
