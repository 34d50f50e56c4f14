"""The loss-parity corpora: tools/prepare_python_corpus.py, tools/prepare_prose_corpus.py (on a
directory tree built by the test), tools/prepare_corpora.py, and the experiments that read them."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tools import prepare_common, prepare_corpora, prepare_prose_corpus, prepare_python_corpus
from trainer.indexed import indexed_counts

ROOT = Path(__file__).resolve().parents[1]
PROSE = "The widget factory builds every widget of the garden from a plan that names its parts."
LONG = " It takes a sentence or two more to pass the filter's minimum of 128 bytes for a document."
MODULE = f'''"""Widgets for the garden.

{PROSE}
"""

SECRET_CONSTANT = compute_value(42)


def build(count):
    """Build `count` widgets and return how many were finished before the sun went down.{LONG}

    >>> build(3)
    7

        for part in plan.parts(): assemble(part, count=count)
    """
    return count + 4
'''
ROFF = r""".\" a comment the converter drops
.TH TOOL 1
.SH NAME
tool \- prints \fBfriendly\fR greetings to the terminal
.SH DESCRIPTION
.B tool
writes a short greeting for every name it is given on its command line, and nothing else at all.
"""


def _tree(tmp_path: Path) -> tuple[Path, Path, Path]:
    roots, doc, man = tmp_path / "site", tmp_path / "doc", tmp_path / "man"
    (roots / "garden" / "tests").mkdir(parents=True)
    (roots / "garden" / "widgets.py").write_text(MODULE)
    copy = f'"""{PROSE}\n\nA copy of a paragraph the widgets module has.{LONG}"""\n'
    (roots / "garden" / "zcopy.py").write_text(copy)
    (roots / "garden" / "tests" / "test_widgets.py").write_text('"""Tests are skipped: never shown."""\n')
    (roots / "garden" / "broken.py").write_text('"""Unparsable files are skipped, docstring and all."""\ndef (:\n')
    meta = roots / "garden-1.0.dist-info"
    meta.mkdir()
    (meta / "METADATA").write_text("Metadata-Version: 2.1\nName: garden\nVersion: 1.0\n\n"
                                   f"The garden package ships a description that reads as plain English prose."
                                   f"{LONG}\n\n```python\nimport garden\ngarden.build(3)\n```\n")
    (doc / "garden").mkdir(parents=True)
    (doc / "garden" / "notes.txt").write_text(f"Release notes say what changed between the garden's versions.{LONG}\n")
    with gzip.open(doc / "garden" / "changelog.gz", "wt") as f:
        f.write(f"The changelog lists every fix that went into the garden since its first release.{LONG}\n")
    (doc / "garden" / "Makefile").write_text(f"all install and clean are the targets this file offers.{LONG}\n")
    (man / "man1").mkdir(parents=True)
    (man / "de" / "man1").mkdir(parents=True)
    with gzip.open(man / "man1" / "tool.1.gz", "wt") as f:
        f.write(ROFF)
    (man / "de" / "man1" / "tool.1").write_text(".SH NAME\nWerkzeug druckt freundliche Gruesse auf das Terminal.\n")
    return roots, doc, man


def test_prose_keeps_docstrings_and_prose_and_drops_code(tmp_path):
    roots, doc, man = _tree(tmp_path)
    jsonl = tmp_path / "a.jsonl"
    info = prepare_prose_corpus.collect(str(jsonl), [str(roots)], [str(doc)], [str(man)], topics=False)
    docs = [json.loads(line) for line in jsonl.read_text().splitlines()]
    text = "\n".join(d["text"] for d in docs)
    for kept in (PROSE, "Build `count` widgets", "reads as plain English prose", "Release notes say",
                 "The changelog lists", "prints friendly greetings to the terminal", "writes a short greeting"):
        assert kept in text, kept
    for dropped in ("SECRET_CONSTANT", "compute_value", ">>>", "return count", "assemble(part", "import garden",
                    "Tests are skipped", "Unparsable", "targets this file", "Werkzeug", r"\fB", "comment"):
        assert dropped not in text, dropped
    assert text.count(PROSE) == 1 and info["dropped"]["duplicate_paragraphs"] == 1  # zcopy.py's copy
    assert {d["source"] for d in docs} == {"docstrings", "package_metadata", "usr_share_doc", "man_pages"}
    assert info["sources"]["pydoc_topics"]["documents"] == 0 and info["bytes"] == sum(
        len(d["text"].encode()) for d in docs)
    # deterministic: the same tree gives the same file, byte for byte
    prepare_prose_corpus.collect(str(tmp_path / "b.jsonl"), [str(roots)], [str(doc)], [str(man)], topics=False)
    assert (tmp_path / "b.jsonl").read_bytes() == jsonl.read_bytes()


def test_prose_cap_shares_and_spread_subsample():
    assert prepare_prose_corpus.allocate({"a": 10, "b": 100, "c": 1000}, 300) == {"a": 10, "b": 100, "c": 190}
    assert prepare_prose_corpus.allocate({"a": 10, "b": 100}, 0) == {"a": 10, "b": 100}
    docs = [{"bytes": 10, "i": i} for i in range(10)]
    kept = prepare_prose_corpus.subsample(docs, 50)
    assert [d["i"] for d in kept] == [1, 3, 5, 7, 9]  # spread over the list, not its first half


def test_prose_corpus_command(tmp_path):
    roots, doc, man = _tree(tmp_path)
    prefix = tmp_path / "out" / "prose"
    prepare_prose_corpus.main(["--output-prefix", str(prefix), "--roots", str(roots), "--doc-dirs", str(doc),
                               "--man-dirs", str(man), "--no-topics", "--vocab-size", "300", "--workers", "1"])
    stats = json.loads(Path(f"{prefix}.stats.json").read_text())
    assert indexed_counts(str(prefix)) == (stats["documents"], stats["tokens"]) and stats["documents"] >= 4
    assert stats["sources"]["man_pages"]["documents"] == 1 and stats["vocab_size"] == 300
    assert set(stats["seconds"]) >= {"collect", "total"} and prepare_common.prepared(str(prefix))


def test_python_corpus_bpe_sample_workers_stats_and_determinism(tmp_path):
    prefix = tmp_path / "py"
    proc = subprocess.run([sys.executable, "tools/prepare_python_corpus.py", "--output-prefix", str(prefix),
                           "--max-bytes", "200000", "--bpe-max-bytes", "50000", "--workers", "2",
                           "--vocab-size", "512"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for suffix in (".bin", ".idx", ".tokenizer.json", ".jsonl", ".files.txt", ".stats.json"):
        assert Path(f"{prefix}{suffix}").is_file(), suffix
    docs = [json.loads(line) for line in Path(f"{prefix}.jsonl").read_text().splitlines()]
    assert docs and all(d["path"].endswith(".py") and d["text"].strip() for d in docs)
    sizes = [int(line.split("\t")[0]) for line in Path(f"{prefix}.files.txt").read_text().splitlines()]
    assert len(sizes) == len(docs) and sum(sizes) <= 200000
    stats = json.loads(Path(f"{prefix}.stats.json").read_text())
    assert stats["workers"] == 2 and stats["bpe_max_bytes"] == 50000 and 0 < stats["bytes"] <= 200000
    assert set(stats["seconds"]) == {"collect", "bpe", "tokenize", "total"}
    # the token count is the .bin's: every document's tokens plus one EOD each
    assert stats["documents"] == stats["files"] and stats["tokens"] > stats["bytes"] / 8
    assert indexed_counts(str(prefix)) == (stats["documents"], stats["tokens"])
    # the BPE saw a spread sample (every k-th document), not the first files only
    sample = list(prepare_common.sample_texts(f"{prefix}.jsonl", stats["bytes"], 50000))
    stride = -(-stats["bytes"] // 50000)
    assert sample == [d["text"] for d in docs][::stride][:len(sample)] and len(sample) > 1
    assert sum(len(t.encode()) for t in sample[:-1]) < 50000
    assert "tokens in" in proc.stderr and f"data.paths=[{prefix}]" in proc.stdout
    # deterministic: collecting again gives the same documents
    again = tmp_path / "again.jsonl"
    prepare_python_corpus.collect(prepare_python_corpus.site_packages(), str(again), max_bytes=200000)
    assert again.read_bytes() == Path(f"{prefix}.jsonl").read_bytes()


def _experiment(name: str):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = OmegaConf.to_object(compose(config_name="config", overrides=[f"experiment={name}"]))
    cfg.validate()
    return cfg


def test_experiments_read_where_prepare_corpora_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FP8MOE_CACHE", str(tmp_path))
    python, prose = _experiment("parity_300m"), _experiment("parity_300m_prose")
    assert python.data.paths == [prepare_python_corpus.default_prefix()]
    assert prose.data.paths == [prepare_prose_corpus.default_prefix()]
    for cfg in (python, prose):
        assert cfg.data.tokenizer == cfg.data.paths[0] + ".tokenizer.json"
        assert cfg.run.eval_steps * cfg.run.micro_batch_size * cfg.run.seq_len == 327_680
        assert cfg.run.eval_interval == 100 and cfg.model.vocab_size == prepare_common.DEFAULT_VOCAB
    assert (prose.model, prose.optim, prose.run.steps) == (python.model, python.optim, python.run.steps)
    assert prose.run.name == "parity_300m_prose-bf16" and prose.logging.group == "parity_300m_prose"
    # one command prepares both; a prepared corpus is kept
    for suffix in (".stats.json", ".bin", ".idx", ".tokenizer.json"):
        Path(python.data.paths[0] + suffix).parent.mkdir(parents=True, exist_ok=True)
        Path(python.data.paths[0] + suffix).write_text("")
    assert prepare_corpora.main(["--dry-run", "--workers", "3"]) == 0
    out = capsys.readouterr().out
    assert f"python: prepared already at {python.data.paths[0]}" in out
    assert f"prose: python tools/prepare_prose_corpus.py --output-prefix {prose.data.paths[0]} --workers 3" in out
    with pytest.raises(SystemExit):
        prepare_corpora.main(["--workers", "0"])
