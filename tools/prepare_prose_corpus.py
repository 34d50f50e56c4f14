"""A natural-language corpus found on any machine with Python: English documentation prose.

    python tools/prepare_prose_corpus.py [--output-prefix PREFIX] [--max-bytes 64000000]
        [--roots DIR ...] [--doc-dirs DIR ...] [--man-dirs DIR ...] [--no-topics]
        [--vocab-size 32000] [--bpe-max-bytes 32000000] [--workers N]

Sources (PREFIX.stats.json records each one's documents and bytes, found and kept):
  pydoc_topics      the running Python's pydoc_data/topics.py: the language reference's topics
  docstrings        module, class and function docstrings of every .py file under --roots (default:
                    the interpreter's stdlib and site-packages; test/tests directories skipped),
                    read with `ast`, so no code runs and none is kept; one document per module
  package_metadata  the long descriptions (READMEs) of the distributions installed under --roots
  usr_share_doc     text files under --doc-dirs (default /usr/share/doc; .gz read too): .txt,
                    .md, .rst, and README, NEWS, CHANGES, copyright and the like (TEXT_NAMES)
  man_pages         man pages under --man-dirs (default /usr/share/man, its man*/ sections only:
                    English), roff requests and escapes dropped
A missing directory is skipped. Every source goes through one paragraph filter (paragraphs are
split at blank lines): code is dropped (doctest and fenced blocks, paragraphs indented as a
whole, paragraphs under 75% letters among their non-space characters, with 7%+ code symbols
such as = ; {} / (CODE_SYMBOLS), or of fewer than 3 words), and so is every paragraph of 64+
bytes met before anywhere in the corpus (licenses, copied docstrings); documents left under 128
bytes are dropped.

Cap: --max-bytes (0: none). Sources under an equal share keep all their documents; the others
share what is left, each keeping an evenly spread subset of its documents. The kept
documents are then shuffled with a fixed seed: Megatron splits train/valid by document index,
so the valid split samples every source. Deterministic: the same files give the same corpus.
Then as tools/prepare_python_corpus.py: a byte-level BPE (on a spread sample of --bpe-max-bytes),
PREFIX.bin/.idx, PREFIX.jsonl ({"text", "source", "path"}) and PREFIX.stats.json.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import random
import re
import sys
import sysconfig
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional, Sequence

if __package__ in (None, ""):  # run as a script: make `trainer` and `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools.prepare_common import add_tokenizer_args, check_args, tokenize_and_record  # noqa: E402
from trainer.default_corpus import default_cache_dir  # noqa: E402
from trainer.progress import Progress  # noqa: E402

SOURCES = ("pydoc_topics", "docstrings", "package_metadata", "usr_share_doc", "man_pages")
DEFAULT_MAX_BYTES = 64_000_000
DEFAULT_BPE_MAX_BYTES = 32_000_000
MAX_FILE_BYTES = 4 << 20  # larger files are generated tables or logs
MIN_LETTER_SHARE = 0.75
CODE_SYMBOLS = frozenset("{}[]()<>=;$#\\|/@%&+")
MAX_SYMBOL_SHARE = 0.07
MIN_WORDS = 3
DEDUP_MIN_BYTES = 64
MIN_DOC_BYTES = 128
SHUFFLE_SEED = 0
TEXT_SUFFIXES = (".txt", ".md", ".rst")
# Files without a suffix are read when their name starts so (Makefiles and scripts are not).
TEXT_NAMES = ("README", "NEWS", "CHANGES", "CHANGELOG", "HISTORY", "AUTHORS", "THANKS", "TODO", "FAQ", "BUGS",
              "NOTES", "INSTALL", "USAGE", "COPYRIGHT")
SKIP_DIRS = {"__pycache__", "test", "tests"}
STATEMENT_LISTS = ("body", "orelse", "finalbody", "handlers", "cases")  # where nested defs can sit
WORD = re.compile(r"[A-Za-z]{2,}")
FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", re.S | re.M)
PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
ROFF_ESCAPES = [(re.compile(p), r) for p, r in (
    (r'\\".*$', ""), (r"\\f(\[[^\]]*\]|\(..|.)", ""), (r"\\\((em|en)", "-"), (r"\\\((lq|rq|dq)", '"'),
    (r"\\\((aq|oq|cq)", "'"), (r"\\\(bu", "*"), (r"\\\(..", ""), (r"\\\[[^\]]*\]", ""),
    (r"\\\*(\[[^\]]*\]|\(..|.)", ""), (r"\\s[+-]?\d+", ""), (r"\\[-]", "-"), (r"\\e", "\\\\"),
    (r"\\[ ~0]", " "), (r"\\[&|^c%:]", ""), (r"\\(.)", r"\1"),
)]  # fmt: skip
ROFF_TEXT_MACROS = {"B", "I", "BR", "RB", "IR", "RI", "BI", "IB", "SM", "SB", "Nm", "Nd", "Ar", "Fl", "Pa",
                    "Xr", "Em", "Sy", "Dv", "Ql", "Li", "Dq", "Sq", "Qq", "It", "Op", "Cm", "Ic", "Ev", "Va"}
ROFF_BREAK_MACROS = {"SH", "SS", "Sh", "Ss", "PP", "LP", "P", "TP", "IP", "HP", "sp", "Pp", "br", "RS", "RE"}


def default_prefix() -> str:
    return os.path.join(default_cache_dir(), "prose_corpus", "prose")


def default_roots() -> list[str]:
    paths = sysconfig.get_paths()
    return sorted({os.path.realpath(paths[k]) for k in ("stdlib", "purelib", "platlib") if os.path.isdir(paths[k])})


# ---- from raw text to prose paragraphs --------------------------------------------------------


def is_prose(paragraph: str) -> bool:
    lines = paragraph.splitlines()
    if any(line.lstrip().startswith((">>>", "... ", "$ ", "In [")) for line in lines):
        return False
    if all(line[:1] in (" ", "\t") for line in lines if line.strip()):  # an indented (code) block
        return False
    chars = [c for c in paragraph if not c.isspace()]
    if not chars or sum(c.isalpha() for c in chars) / len(chars) < MIN_LETTER_SHARE:
        return False
    symbols = sum(c in CODE_SYMBOLS for c in chars)
    if symbols >= 4 and symbols / len(chars) >= MAX_SYMBOL_SHARE:  # assignments, calls, paths, markup
        return False
    return len(WORD.findall(paragraph)) >= MIN_WORDS


def prose_paragraphs(text: str) -> list[str]:
    """The paragraphs of `text` that read as prose (module docstring), trailing spaces stripped."""
    text = FENCE.sub("", text.replace("\r\n", "\n"))
    out = []
    for raw in PARAGRAPH_BREAK.split(text):
        para = "\n".join(line.rstrip() for line in raw.strip("\n").splitlines())
        if para.strip() and is_prose(para):
            out.append(para)
    return out


def docstrings(source: str) -> list[str]:
    """Module, class and function docstrings in source order; [] when the file does not parse."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes and the like in old code
            tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError):
        return []
    out, stack = [], [tree]
    while stack:  # statements only: a docstring is never inside an expression
        node = stack.pop()
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                out.append(doc)
        children = [c for name in STATEMENT_LISTS for c in getattr(node, name, None) or () if isinstance(c, ast.AST)]
        stack.extend(reversed(children))
    return out


def roff_to_text(source: str) -> str:
    """Man-page roff as plain text: section and paragraph requests become blank lines, font and
    text macros keep their words, other requests and every escape are dropped."""
    out = []
    for line in source.splitlines():
        if line.startswith((".", "'")):
            macro, _, rest = line[1:].strip().partition(" ")
            if macro in ROFF_BREAK_MACROS:
                out += ["", _roff_clean(rest).replace('"', ""), ""] if rest.strip() else [""]
            elif macro in ROFF_TEXT_MACROS:
                out.append(_roff_clean(rest).replace('"', ""))
            continue
        out.append(_roff_clean(line))
    return "\n".join(out)


def _roff_clean(text: str) -> str:
    for pattern, repl in ROFF_ESCAPES:
        text = pattern.sub(repl, text)
    return text


def _read_text(path: str) -> Optional[str]:
    """UTF-8 text of a file (.gz decompressed), None if not text or too large."""
    try:
        if os.path.getsize(path) > MAX_FILE_BYTES:
            return None
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
        if len(data) > MAX_FILE_BYTES or b"\0" in data:
            return None
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return None


def extract(task: tuple[str, str]) -> list[str]:
    """The prose paragraphs of one file: task = (source, path). Runs in worker processes."""
    source, path = task
    text = _read_text(path)
    if text is None:
        return []
    if source == "docstrings":
        return [p for doc in docstrings(text) for p in prose_paragraphs(doc)]
    if source == "man_pages":
        text = roff_to_text(text)
    return prose_paragraphs(text)


# ---- the sources -------------------------------------------------------------------------------


def _walk(root: str, skip_roots: set[str]) -> Iterator[tuple[str, list[str]]]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS
                             and os.path.realpath(os.path.join(dirpath, d)) not in skip_roots)  # fmt: skip
        yield dirpath, sorted(filenames)


def _is_text_name(filename: str) -> bool:
    name = filename[:-3] if filename.endswith(".gz") else filename
    stem, suffix = os.path.splitext(name)
    return suffix.lower() in TEXT_SUFFIXES or (not suffix and stem.upper().startswith(TEXT_NAMES))


def file_tasks(roots: Sequence[str], doc_dirs: Sequence[str], man_dirs: Sequence[str]) -> list[tuple[str, str]]:
    """(source, path) of every file to read, in a fixed order; a root inside another is walked once."""
    real_roots = sorted({os.path.realpath(r) for r in roots if os.path.isdir(r)})
    tasks = []
    for root in real_roots:
        for dirpath, files in _walk(root, set(real_roots) - {root}):
            tasks += [("docstrings", os.path.join(dirpath, f)) for f in files if f.endswith(".py")]
    for root in sorted({os.path.realpath(d) for d in doc_dirs if os.path.isdir(d)}):
        for dirpath, files in _walk(root, set()):
            for f in files:
                if _is_text_name(f) and not os.path.islink(os.path.join(dirpath, f)):
                    tasks.append(("usr_share_doc", os.path.join(dirpath, f)))
    for root in sorted({os.path.realpath(d) for d in man_dirs if os.path.isdir(d)}):
        for section in sorted(d for d in os.listdir(root) if re.fullmatch(r"man\w+", d)):
            for dirpath, files in _walk(os.path.join(root, section), set()):
                tasks += [("man_pages", os.path.join(dirpath, f)) for f in files
                          if not os.path.islink(os.path.join(dirpath, f))]  # fmt: skip
    return tasks


def topic_documents() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics

    return [(f"pydoc_data/topics.py:{key}", topics[key]) for key in sorted(topics)]


def metadata_documents(roots: Sequence[str]) -> list[tuple[str, str]]:
    """(name, long description) of each distribution installed under `roots`, sorted by name."""
    from importlib.metadata import distributions

    found: dict[str, str] = {}
    for dist in distributions(path=[r for r in roots if os.path.isdir(r)]):
        meta = dist.metadata
        name = (meta.get("Name") or "").lower()
        body = meta.get_payload() or meta.get("Description") or ""
        if name and body.strip() and name not in found:
            found[name] = body
    return [(f"metadata:{n}", found[n]) for n in sorted(found)]


def allocate(sizes: dict[str, int], cap: int) -> dict[str, int]:
    """Bytes each source may keep: those under an equal share of what is left keep all."""
    if not cap or sum(sizes.values()) <= cap:
        return dict(sizes)
    out, left, remaining = {}, cap, dict(sizes)
    while remaining:
        equal = left / len(remaining)
        small = {k: v for k, v in remaining.items() if v <= equal}
        if not small:
            out.update({k: int(equal) for k in remaining})
            break
        for k, v in small.items():
            out[k] = v
            left -= v
            del remaining[k]
    return out


def subsample(docs: list[dict], budget: int) -> list[dict]:
    """An evenly spread share budget / bytes of the documents (document i is kept when
    floor((i + 1) * share) > floor(i * share)), then cut at `budget` bytes."""
    total = sum(d["bytes"] for d in docs)
    if total <= budget:
        return docs
    share, kept, taken = budget / total, [], 0
    for i, d in enumerate(docs):
        if math.floor((i + 1) * share) > math.floor(i * share) and taken + d["bytes"] <= budget:
            kept.append(d)
            taken += d["bytes"]
    return kept


def collect(jsonl_path: str, roots: Sequence[str], doc_dirs: Sequence[str], man_dirs: Sequence[str],
            topics: bool = True, max_bytes: int = 0, workers: int = 1) -> dict:
    """Write the prose documents to `jsonl_path` (atomically); returns the counts per source."""
    tasks = file_tasks(roots, doc_dirs, man_dirs)
    seen: set[bytes] = set()
    docs: dict[str, list[dict]] = {s: [] for s in SOURCES}
    dropped = {"duplicate_paragraphs": 0, "short_documents": 0}

    def add(source: str, path: str, paragraphs: list[str]) -> None:
        kept = []
        for para in paragraphs:
            if len(para.encode("utf-8")) >= DEDUP_MIN_BYTES:
                digest = hashlib.blake2b(para.encode("utf-8"), digest_size=16).digest()
                if digest in seen:
                    dropped["duplicate_paragraphs"] += 1
                    continue
                seen.add(digest)
            kept.append(para)
        text = "\n\n".join(kept)
        size = len(text.encode("utf-8"))
        if size < MIN_DOC_BYTES:
            dropped["short_documents"] += bool(kept)
            return
        docs[source].append({"text": text, "source": source, "path": path, "bytes": size})

    for path, text in topic_documents() if topics else []:
        add("pydoc_topics", path, prose_paragraphs(text))
    sizes = [os.path.getsize(path) for _, path in tasks]
    progress = Progress(sum(sizes), "reading files for prose")
    try:
        if workers > 1 and len(tasks) > 64:
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                results = pool.imap(extract, tasks, chunksize=16)
                for (source, path), size, paragraphs in zip(tasks, sizes, results):
                    add(source, path, paragraphs)
                    progress.update(size)
        else:
            for task, size in zip(tasks, sizes):
                add(*task, extract(task))
                progress.update(size)
    finally:
        progress.close()
    for path, text in metadata_documents(roots):
        add("package_metadata", path, prose_paragraphs(text))
    found = {s: sum(d["bytes"] for d in ds) for s, ds in docs.items()}
    budget = allocate(found, max_bytes)
    kept = {s: subsample(ds, budget[s]) for s, ds in docs.items()}
    ordered = [d for s in SOURCES for d in kept[s]]
    if not ordered:
        raise ValueError(f"no prose found: roots {list(roots)}, doc dirs {list(doc_dirs)}, man dirs "
                         f"{list(man_dirs)}, topics {topics}")
    random.Random(SHUFFLE_SEED).shuffle(ordered)
    Path(jsonl_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{jsonl_path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as out:
            for d in ordered:
                out.write(json.dumps({"text": d["text"], "source": d["source"], "path": d["path"]}) + "\n")
        os.replace(tmp, jsonl_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    sources = {s: {"documents_found": len(docs[s]), "bytes_found": found[s], "documents": len(kept[s]),
                   "bytes": sum(d["bytes"] for d in kept[s])} for s in SOURCES}  # fmt: skip
    return {"files": len(tasks), "bytes": sum(d["bytes"] for d in ordered), "sources": sources, "dropped": dropped}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-prefix", default=None,
                        help=f"writes PREFIX.jsonl, .bin, .idx, .tokenizer.json (default: {default_prefix()})")
    parser.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES, help="cap on the corpus's bytes (0: none)")
    parser.add_argument("--roots", nargs="+", default=None,
                        help="directories of .py files and installed distributions (default: stdlib, site-packages)")
    parser.add_argument("--doc-dirs", nargs="*", default=["/usr/share/doc"], help="text files (default /usr/share/doc)")
    parser.add_argument("--man-dirs", nargs="*", default=["/usr/share/man"], help="man pages (default /usr/share/man)")
    parser.add_argument("--no-topics", action="store_true", help="leave out the pydoc topics")
    add_tokenizer_args(parser, bpe_max_bytes=DEFAULT_BPE_MAX_BYTES)
    args = parser.parse_args(argv)
    check_args(parser, args, ("max_bytes",))
    prefix = args.output_prefix or default_prefix()
    roots = args.roots or default_roots()
    jsonl = prefix + ".jsonl"
    seconds = {}
    t0 = time.perf_counter()
    print(f"collecting prose from {roots}, {args.doc_dirs}, {args.man_dirs}", file=sys.stderr, flush=True)
    info = collect(jsonl, roots, args.doc_dirs, args.man_dirs, not args.no_topics, args.max_bytes, args.workers)
    seconds["collect"] = time.perf_counter() - t0
    per_source = ", ".join(f"{s} {v['bytes'] / 1e6:.1f} MB" for s, v in info["sources"].items())
    print(f"wrote {jsonl}: {info['bytes'] / 1e6:.1f} MB from {info['files']} files ({per_source}) in "
          f"{seconds['collect']:.1f} s", file=sys.stderr, flush=True)
    tokenize_and_record(prefix, jsonl, info, args, seconds, t0, roots=list(roots), doc_dirs=args.doc_dirs,
                        man_dirs=args.man_dirs, max_bytes=args.max_bytes)


if __name__ == "__main__":
    main()
