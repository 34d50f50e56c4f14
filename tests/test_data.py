"""Data pipeline: preprocessing to .bin/.idx, the default corpus cache, megatron datasets and the
per-rank sampler (determinism, exact resume, data-parallel partition), and input errors."""

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from trainer.data import DataConfig, build_train_valid
from trainer.default_corpus import ensure_default_corpus
from trainer.indexed import check_indexed_prefix, indexed_counts, read_index_header
from trainer.preprocess import preprocess
from trainer.tokenizer import load_tokenizer, trained_tokenizer_path

REPO = Path(__file__).resolve().parents[1]
DOCS = [
    "Hello world.",
    "Second document, with ünïcödé and an emoji 🙂.",
    "Line one\nline two, same document",
    "  leading spaces and trailing  ",
    "Numbers 12345 and symbols <|> {} [] ()",
]
PARAGRAPHS = ["first paragraph\nstill the first", "second paragraph"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A jsonl and a text file preprocessed with a BPE trained on them: (dir, prefix, tokenizer)."""
    root = tmp_path_factory.mktemp("tiny")
    with open(root / "a.jsonl", "w") as f:
        for i, text in enumerate(DOCS):
            f.write(json.dumps({"body": text}) + "\n")
            if i == 1:
                f.write(json.dumps({"body": "   "}) + "\n\n")  # empty documents are skipped
    (root / "b.txt").write_text("\n\n".join(PARAGRAPHS) + "\n\n\n")
    prefix, tok = preprocess([str(root / "a.jsonl"), str(root / "b.txt")], str(root / "out" / "c"),
                             vocab_size=300, json_key="body")
    return root, prefix, tok


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache directory holding the prepared default corpus."""
    cache_dir = tmp_path_factory.mktemp("cache")
    ensure_default_corpus(str(cache_dir))
    return str(cache_dir)


def _child_env():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


def _read_docs(prefix):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron 0.17+: "could not determine rank" per log
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        dataset = IndexedDataset(prefix)
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_preprocess_round_trip(tiny):
    root, prefix, tok_path = tiny
    assert tok_path == trained_tokenizer_path(prefix) and os.path.isfile(tok_path)
    tokenizer, eod = load_tokenizer(tok_path)
    docs = _read_docs(prefix)
    assert len(docs) == len(DOCS) + len(PARAGRAPHS)
    for ids, text in zip(docs, DOCS + PARAGRAPHS):
        assert ids[-1] == eod and eod not in ids[:-1]
        assert tokenizer.decode(ids[:-1]) == text
    assert not list((root / "out").glob("*tmp*")), "temporary files left behind"


def test_preprocess_with_given_tokenizer_and_workers_is_identical(tiny, tmp_path):
    root, prefix, tok_path = tiny
    inputs = [str(root / "a.jsonl"), str(root / "b.txt")]
    again, tok2 = preprocess(inputs, str(tmp_path / "d"), tokenizer_path=tok_path, json_key="body",
                             workers=2)
    assert tok2 == tok_path
    for ext in (".bin", ".idx"):
        assert Path(again + ext).read_bytes() == Path(prefix + ext).read_bytes()


def test_command_line_writes_what_the_library_writes(tiny, tmp_path):
    """tools/preprocess_data.py, run as a script from another directory, is `preprocess`."""
    root, prefix, tok_path = tiny
    out = tmp_path / "cli"
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"),
                           "--input", str(root / "a.jsonl"), str(root / "b.txt"), "--output-prefix",
                           str(out), "--tokenizer", tok_path, "--json-key", "body"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == f"data prefix: {out}\ntokenizer: {tok_path}\n"
    for ext in (".bin", ".idx"):
        assert Path(f"{out}{ext}").read_bytes() == Path(prefix + ext).read_bytes()


def test_trainer_data_does_not_import_the_command_line():
    code = "import sys, trainer.data; print(sorted(m for m in sys.modules if m.split('.')[0] == 'tools'))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_child_env(), timeout=120)
    assert proc.returncode == 0 and proc.stdout == "[]\n", proc.stderr[-3000:]


def test_index_header_and_counts(tiny):
    _, prefix, _ = tiny
    docs = _read_docs(prefix)
    header = read_index_header(prefix + ".idx")
    assert header.sequences == check_indexed_prefix(prefix) == len(docs)
    assert header.boundaries == len(docs) + 1
    assert indexed_counts(prefix) == (len(docs), sum(len(d) for d in docs))


def test_preprocess_input_errors(tiny, tmp_path):
    root, _, tok_path = tiny
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        preprocess([missing], str(tmp_path / "x"), tokenizer_path=tok_path)
    with pytest.raises(ValueError, match=r"a\.jsonl:1: no string under key 'text'"):
        preprocess([str(root / "a.jsonl")], str(tmp_path / "x"), tokenizer_path=tok_path)
    assert not list(tmp_path.glob("x*")), "a failed run must not leave output files"


def test_default_corpus_prepared_once_then_reused(cache, capfd):
    from pydoc_data.topics import topics

    capfd.readouterr()
    t0 = time.perf_counter()
    prefix = ensure_default_corpus(cache)
    elapsed = time.perf_counter() - t0
    assert elapsed < 1.0 and "preparing" not in capfd.readouterr().err
    manifest = json.loads((Path(prefix).parent / "manifest.json").read_text())
    assert manifest["documents"] == len(topics) and manifest["tokens"] > 100_000
    tokenizer, eod = load_tokenizer(trained_tokenizer_path(prefix))
    assert tokenizer.get_vocab_size() == 4096
    first = _read_docs(prefix)[0]
    assert tokenizer.decode(first[:-1]) == topics[sorted(topics)[0]]


def test_default_corpus_two_processes_prepare_once(tmp_path):
    code = ("import sys; from trainer.default_corpus import ensure_default_corpus; "
            "print(ensure_default_corpus(sys.argv[1]))")
    env = _child_env()
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]
    assert sum("preparing the default corpus" in err for _, err in outs) == 1
    assert not list(tmp_path.rglob("*.lock")) and not list(tmp_path.rglob("*tmp*"))


def test_default_corpus_breaks_a_stale_lock(tmp_path):
    import socket

    cache = tmp_path / "c"
    prefix = ensure_default_corpus(str(cache))  # learn the directory
    out_dir = Path(prefix).parent
    (out_dir / "manifest.json").unlink()
    (out_dir / "prepare.lock").write_text(f"{socket.gethostname()} 999999999")  # a dead pid
    assert ensure_default_corpus(str(cache)) == prefix
    assert (out_dir / "manifest.json").exists() and not (out_dir / "prepare.lock").exists()


def _build(cfg, dp_rank=0, dp_size=1, micro=2, global_batch=8, steps=6):
    return build_train_valid(cfg, seq_len=16, micro_batch_size=micro, global_batch_size=global_batch,
                             train_steps=steps, eval_steps=2, dp_rank=dp_rank, dp_size=dp_size)


def _tokens(batches):
    return [b["tokens"] for b in batches]


def _take(iterator, n):
    return list(itertools.islice(iterator, n))


def test_valid_seed_fixes_the_validation_sequences_whatever_the_data_order(cache):
    def build(seed, valid_seed=None):
        data = _build(DataConfig(kind="default_corpus", cache_dir=cache, num_workers=0, seed=seed,
                                 valid_seed=valid_seed))  # fmt: skip
        return torch.cat(_tokens(_take(data.train(0), 2))), torch.cat(_tokens(list(data.valid())))

    train_a, valid_a = build(1, valid_seed=7)
    train_b, valid_b = build(2, valid_seed=7)
    assert not torch.equal(train_a, train_b)  # another data order...
    assert torch.equal(valid_a, valid_b)  # ...evaluated on the same sequences
    assert torch.equal(build(7)[1], valid_a)  # valid_seed=7 is what seed=7 evaluates on
    assert not torch.equal(build(1)[1], build(2)[1])  # without it the validation follows the seed
    with pytest.raises(ValueError, match="data.valid_seed=-1: must be in"):
        DataConfig(valid_seed=-1).validate()


def test_batches_shape_and_resume_exactly(cache):
    cfg = DataConfig(kind="default_corpus", cache_dir=cache, num_workers=0)
    data = _build(cfg)
    assert data.vocab_size == 4096 and data.eod == 0
    straight = _take(data.train(0), 24)  # 6 global batches of 4 micro-batches
    batch = straight[0]
    assert set(batch) == {"tokens", "labels", "loss_mask"}
    assert batch["tokens"].shape == (2, 16) and batch["tokens"].dtype == torch.int64
    assert batch["labels"].dtype == torch.int64 and batch["loss_mask"].dtype == torch.float32
    assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
    # A restarted process: a fresh build (index cache hit) resumed after 2 global batches.
    resumed = _take(_build(cfg).train(2 * 8), 16)
    assert all(torch.equal(a, b) for a, b in zip(_tokens(straight[8:]), _tokens(resumed)))
    # Worker processes change nothing.
    workers = _build(DataConfig(kind="default_corpus", cache_dir=cache, num_workers=2))
    assert all(torch.equal(a, b) for a, b in zip(_tokens(straight), _tokens(_take(workers.train(0), 24))))
    valid = list(data.valid())
    assert len(valid) == 2 and valid[0]["tokens"].shape == (2, 16)


def test_default_run_shape_passes_the_corpus_size_checks(cache):
    """The default run (seq_len 256, 200 steps of 8 sequences) reads the ~112k-token default
    corpus ~4 times over and validates on its ~1k-token valid split: both are larger than one
    sample, so neither is refused, and every id is inside the tokenizer's vocabulary."""
    cfg = DataConfig(kind="default_corpus", cache_dir=cache, num_workers=0)
    data = build_train_valid(cfg, seq_len=256, micro_batch_size=8, global_batch_size=8, train_steps=200,
                             eval_steps=10)
    assert data.vocab_source.startswith("the tokenizer ") and data.kind == "default_corpus"
    batch = next(data.train(0))
    assert batch["tokens"].shape == (8, 256) and int(batch["tokens"].max()) < data.vocab_size
    assert len(list(data.valid())) == 10


def test_data_parallel_ranks_partition_the_global_batch(cache):
    cfg = DataConfig(kind="default_corpus", cache_dir=cache, num_workers=0)
    single = _tokens(_take(_build(cfg).train(8), 8))  # 2 global batches from a resumed point
    ranks = [_tokens(_take(_build(cfg, dp_rank=r, dp_size=2).train(8), 4)) for r in range(2)]
    for k in range(2):  # global batch k: rank 0's micro-batches, then rank 1's, in order
        from_ranks = torch.cat(ranks[0][2 * k:2 * k + 2] + ranks[1][2 * k:2 * k + 2])
        assert torch.equal(from_ranks, torch.cat(single[4 * k:4 * k + 4]))


def test_mock_kind():
    data = _build(DataConfig(kind="mock", mock_vocab_size=100, num_workers=0), steps=2)
    assert (data.vocab_size, data.eod) == (100, 99)
    batches = _take(data.train(0), 8)
    assert len(batches) == 8
    for b in batches:
        assert b["tokens"].shape == (2, 16) and int(b["tokens"].max()) < 100
        assert torch.equal(b["tokens"][:, 1:], b["labels"][:, :-1])


def test_blend_with_and_without_process_group(cache, tmp_path):
    prefix = ensure_default_corpus(cache)
    kw = dict(kind="megatron", tokenizer=trained_tokenizer_path(prefix), cache_dir=cache, num_workers=0)
    weighted = _tokens(list(_build(DataConfig(paths=[prefix, prefix], weights=[0.3, 0.7], **kw)).train(0)))
    flat = _tokens(list(_build(DataConfig(paths=["30", prefix, "70", prefix], **kw)).train(0)))
    assert len(weighted) >= 24 and all(torch.equal(a, b) for a, b in zip(weighted, flat))
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        cfg = DataConfig(paths=[prefix, prefix], weights=[0.3, 0.7], split="90,5,5", **kw)
        with_group = _tokens(list(_build(cfg).train(0)))
    finally:
        dist.destroy_process_group()
    assert len(with_group) >= 24


_RANK_SCRIPT = """
import sys, torch, torch.distributed as dist
from trainer.data import DataConfig, build_train_valid
rank, store, cache, out = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
cfg = DataConfig(kind="default_corpus", cache_dir=cache, num_workers=0, seed=7)
data = build_train_valid(cfg, seq_len=24, micro_batch_size=2, global_batch_size=8, train_steps=3,
                         eval_steps=1, dp_rank=rank, dp_size=2)
it = data.train(8)
torch.save([next(it)["tokens"] for _ in range(4)], out)
dist.barrier()
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_two_gloo_ranks_build_and_partition(cache, tmp_path):
    """Two processes with a gloo group: megatron builds its index on rank 0 behind a barrier
    (a cache miss: new seed and seq_len), and the ranks split each global batch."""
    env = _child_env()
    outs = [str(tmp_path / f"rank{r}.pt") for r in range(2)]
    procs = [subprocess.Popen([sys.executable, "-c", _RANK_SCRIPT, str(r), str(tmp_path / "store"),
                               cache, outs[r]], env=env, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    ranks = [torch.load(o) for o in outs]
    cfg = DataConfig(kind="default_corpus", cache_dir=cache, num_workers=0, seed=7)
    single = _take(build_train_valid(cfg, seq_len=24, micro_batch_size=2, global_batch_size=8,
                                     train_steps=3, eval_steps=1).train(8), 8)
    for k in range(2):
        from_ranks = torch.cat(ranks[0][2 * k:2 * k + 2] + ranks[1][2 * k:2 * k + 2])
        assert torch.equal(from_ranks, torch.cat(_tokens(single[4 * k:4 * k + 4])))


def _copy_prefix(prefix, dst):
    for ext in (".bin", ".idx"):
        Path(str(dst) + ext).write_bytes(Path(prefix + ext).read_bytes())
    return str(dst)


def test_bad_inputs_raise_errors_naming_the_problem(tiny, tmp_path):
    _, prefix, tok = tiny

    def build(**kw):
        return _build(DataConfig(**{"kind": "megatron", "tokenizer": tok, "num_workers": 0,
                                    "cache_dir": str(tmp_path / "cache"), **kw}))

    missing_bin = _copy_prefix(prefix, tmp_path / "nobin")
    os.unlink(missing_bin + ".bin")
    with pytest.raises(FileNotFoundError, match=r"nobin\.bin"):
        build(paths=[missing_bin])
    with pytest.raises(FileNotFoundError, match=r"absent\.bin and .*absent\.idx"):
        build(paths=[str(tmp_path / "absent")])

    truncated = _copy_prefix(prefix, tmp_path / "trunc")
    data = Path(truncated + ".idx").read_bytes()
    Path(truncated + ".idx").write_bytes(data[:-8])
    with pytest.raises(ValueError, match=r"trunc\.idx: truncated or corrupted"):
        build(paths=[truncated])
    Path(truncated + ".idx").write_bytes(b"GARBAGE!!" + data[9:])
    with pytest.raises(ValueError, match=r"trunc\.idx: not a Megatron index"):
        build(paths=[truncated])
    short_bin = _copy_prefix(prefix, tmp_path / "shortbin")
    Path(short_bin + ".bin").write_bytes(Path(short_bin + ".bin").read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"shortbin\.bin: has"):
        build(paths=[short_bin])

    with pytest.raises(ValueError, match=r"data\.kind='csv'"):
        build(kind="csv")
    for split in ("0,0,0", "a,b", "1,2,3,4", "-1,2"):
        with pytest.raises(ValueError, match=r"data\.split"):
            build(paths=[prefix], split=split)
    with pytest.raises(ValueError, match=r"data\.weights has 1 entries but data\.paths has 2"):
        build(paths=[prefix, prefix], weights=[1.0])
    with pytest.raises(ValueError, match=r"data\.tokenizer is empty"):
        build(paths=[prefix], tokenizer="")
    # 7 documents: a 1% valid split rounds to none, which would hang megatron.
    with pytest.raises(ValueError, match=r"valid split 0 of the 7 documents"):
        build(paths=[prefix], split="99,1,0")
    with pytest.raises(ValueError, match=r"global_batch_size=6"):
        build_train_valid(DataConfig(kind="mock"), seq_len=16, micro_batch_size=4,
                          global_batch_size=6, train_steps=1, eval_steps=0)


def test_collate_accepts_old_megatron_text_samples():
    from trainer.data import collate

    text = torch.arange(10)
    old = collate([{"text": text.numpy()}, {"text": (text + 1).numpy()}])
    new = collate([{"tokens": text[:-1], "labels": text[1:], "loss_mask": torch.ones(9)},
                   {"tokens": text[:-1] + 1, "labels": text[1:] + 1, "loss_mask": torch.ones(9)}])
    for key in ("tokens", "labels", "loss_mask"):
        assert torch.equal(old[key], new[key]) and old[key].dtype == new[key].dtype
