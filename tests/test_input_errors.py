"""Bad input named by its cause: text that is not UTF-8, files that are not tokenizers, token ids
past the vocabulary, corpora shorter than a sample, config values out of range, config keys the
schema lacks, and benchmarks started where they cannot run."""

import json
import re
from pathlib import Path

import pytest
import torch

from bench import common, train_step
from trainer.config import register_configs, reject_unknown_keys
from trainer.data import DataConfig, build_train_valid
from trainer.documents import json_lines, text_documents
from trainer.indexed import count_tokens, write_indexed
from trainer.preprocess import preprocess
from trainer.tokenizer import load_tokenizer, save_tokenizer, train_bpe

REPO = Path(__file__).resolve().parents[1]


# ---- text and tokenizer files ---------------------------------------------------------------------


def test_non_utf8_jsonl_names_file_line_and_offset(tmp_path):
    path = tmp_path / "bad.jsonl"
    first = json.dumps({"text": "fine"}).encode() + b"\n"
    path.write_bytes(first + b'{"text": "caf\xe9"}\n')
    expected = f"bad.jsonl:2: not UTF-8 text (byte 0xe9 at byte offset {len(first) + 13} of the file)"
    with pytest.raises(ValueError, match=re.escape(expected) + ".*must be UTF-8"):
        list(json_lines(str(path)))


@pytest.mark.parametrize("text_split", ["paragraph", "file"])
def test_non_utf8_text_names_file_line_and_offset(tmp_path, text_split):
    path = tmp_path / "bad.txt"
    head = b"first paragraph\n\nsecond\n"
    path.write_bytes(head + b"na\xefve\n")
    expected = f"bad.txt:4: not UTF-8 text (byte 0xef at byte offset {len(head) + 2} of the file)"
    with pytest.raises(ValueError, match=re.escape(expected)):
        list(text_documents(str(path), text_split))


def test_preprocess_names_the_non_utf8_file(tmp_path):
    """Through the library: while the BPE trains (the tokenizers library pulls the documents)."""
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("plain text\n")
    bad.write_bytes(b"ok\n\xff\n")
    with pytest.raises(ValueError, match=r"bad\.txt:2: not UTF-8 text \(byte 0xff at byte offset 3"):
        preprocess([str(good), str(bad)], str(tmp_path / "out"), vocab_size=300)


@pytest.mark.parametrize(
    "content, why",
    [
        (b"not json", r"not JSON \(line 1 column 1: Expecting value\)"),
        (b'{"a": 1}', r"JSON, but not a tokenizer \(no \"model\" entry\)"),
        (b"\x80 binary", r"not JSON \(not even UTF-8 text\)"),
    ],
)
def test_tokenizer_file_that_is_not_one_names_the_file(tmp_path, content, why):
    path = tmp_path / "tok.json"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"tokenizer {re.escape(str(path))}: {why}; expected a Hugging Face"):
        load_tokenizer(str(path))


# ---- token files ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """(path, vocab size, EOD id) of a small trained BPE."""
    path = str(tmp_path_factory.mktemp("tok") / "tok.json")
    save_tokenizer(train_bpe(["a few words to learn a tokenizer from"] * 4, 300), path)
    tokenizer, eod = load_tokenizer(path)
    return path, tokenizer.get_vocab_size(with_added_tokens=True), eod


def _prefix(path, docs, eod) -> str:
    write_indexed([list(d) for d in docs], str(path), eod, vocab_size=1 << 16)
    return str(path)


def _build(paths, tok_path, tmp_path, *, seq_len=16, eval_steps=0, split="1,0,0", num_workers=0, **kw):
    cfg = DataConfig(kind="megatron", paths=paths, tokenizer=tok_path, split=split,
                     num_workers=num_workers, cache_dir=str(tmp_path / "cache"), **kw)
    return build_train_valid(cfg, seq_len=seq_len, micro_batch_size=2, global_batch_size=4,
                             train_steps=4, eval_steps=eval_steps)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_token_id_past_the_tokenizer_is_named_with_its_source(tok, tmp_path, num_workers):
    """Id 1000 is inside the default model's embedding (4096 rows) but outside the tokenizer's
    300 tokens: it trained silently before."""
    tok_path, vocab, eod = tok
    docs = [[1 + (i + j) % 50 for j in range(20)] for i in range(12)]
    good = _prefix(tmp_path / "good", docs, eod)
    bad = _prefix(tmp_path / "bad", [d[:5] + [1000] + d[5:] for d in docs], eod)
    clean = _build([good], tok_path, tmp_path, num_workers=num_workers)
    assert sum(1 for _ in clean.train(0)) >= 8  # 4 steps of 2 micro-batches, or more: a whole epoch
    expected = (rf"token id 1000 in train sample \d+ \(data prefix {re.escape(bad)}\) is outside the "
                rf"vocabulary of the tokenizer {re.escape(tok_path)}: allowed ids are 0\.\.{vocab - 1}")
    for paths in ([bad], [good, bad]):  # a blend names the prefix the sample came from
        data = _build(paths, tok_path, tmp_path, num_workers=num_workers)
        with pytest.raises(ValueError, match=expected):
            list(data.train(0))


def test_model_vocab_smaller_than_the_data_says_what_to_set(tok, tmp_path):
    tok_path, vocab, eod = tok
    prefix = _prefix(tmp_path / "p", [[1, 2, 3, 4, 5, 6, 7, 8]] * 8, eod)
    data = _build([prefix], tok_path, tmp_path)
    data.check_model_vocab(vocab)
    with pytest.raises(ValueError, match=rf"the tokenizer {re.escape(tok_path)} has {vocab} tokens but "
                                         rf"model\.vocab_size=100: set model\.vocab_size >= {vocab}"):
        data.check_model_vocab(100)
    mock = build_train_valid(DataConfig(kind="mock", mock_vocab_size=32000, num_workers=0), seq_len=16,
                             micro_batch_size=2, global_batch_size=2, train_steps=1, eval_steps=0)
    mock.check_model_vocab(32000)
    with pytest.raises(ValueError, match=r"the mock data \(data\.mock_vocab_size=32000\) has 32000 tokens but "
                                         r"model\.vocab_size=4096: set data\.mock_vocab_size=N with 2 <= N <= 4096"):
        mock.check_model_vocab(4096)


def test_count_tokens_stops_once_enough(tok, tmp_path):
    _, _, eod = tok
    prefix = _prefix(tmp_path / "c", [[1] * n for n in range(1, 11)], eod)  # documents of 2..11 tokens
    assert count_tokens(prefix, 0, 10, 10**9) == sum(range(2, 12))
    assert count_tokens(prefix, 2, 4, 10**9) == 4 + 5
    assert 3 <= count_tokens(prefix, 0, 10, 3) < sum(range(2, 12))
    with pytest.raises(ValueError, match=r"documents \[0, 11\) are outside the 10"):
        count_tokens(prefix, 0, 11, 1)


def test_corpus_shorter_than_a_sample_is_refused_a_repeating_one_is_not(tok, tmp_path):
    """10 documents of 4 tokens, split 80/20: 32 train and 8 valid tokens."""
    tok_path, _, eod = tok
    prefix = _prefix(tmp_path / "small", [[1, 2, 3]] * 10, eod)
    with pytest.raises(ValueError, match=rf"the train split of {re.escape(prefix)} \(data\.split='80,20,0': "
                                         r"documents \[0, 8\) of 10\) holds 32 tokens, fewer than one sample "
                                         r"of run\.seq_len \+ 1 = 65.*run\.seq_len <= 31"):
        _build([prefix], tok_path, tmp_path, seq_len=64, split="80,20,0")
    with pytest.raises(ValueError, match=r"the valid split .* holds 8 tokens, fewer than one sample of "
                                         r"run\.seq_len \+ 1 = 17.*run\.eval_interval=0"):
        _build([prefix], tok_path, tmp_path, seq_len=16, split="80,20,0", eval_steps=2)
    # Without validation the valid split is not read; 4 steps of 4 samples of 16 tokens read the
    # 32 train tokens twice over: epochs repeat, as the default run's do (~4 of the default corpus).
    data = _build([prefix], tok_path, tmp_path, seq_len=16, split="80,20,0", eval_steps=0)
    assert sum(1 for _ in data.train(0)) >= 8


# ---- config -----------------------------------------------------------------------------------------


def _compose(overrides):
    from hydra import compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def _validated(overrides):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_object(_compose(overrides))
    cfg.validate()
    return cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.weight_decay=-1"], r"optim\.weight_decay must be finite and >= 0, got -1"),
        (["optim.weight_decay=inf"], r"optim\.weight_decay must be finite and >= 0, got inf"),
        (["run.eval_interval=-1"], r"run\.eval_interval must be >= 0 \(0 disables validation\), got -1"),
        (["run.eval_steps=0"], r"run\.eval_steps must be >= 1 while run\.eval_interval > 0, got 0"),
        (["run.eval_interval=0", "run.eval_steps=-1"], r"run\.eval_steps must be >= 0, got -1"),
        (["run.steps=10"], r"optim\.warmup_steps must be <= run\.steps=10 .*, got 20"),
        (["optim.schedule_steps=10"], r"optim\.warmup_steps must be <= optim\.schedule_steps=10 .*, got 20"),
        (["optim.schedule_steps=-1"], r"optim\.schedule_steps must be >= 0 \(0: run\.steps\), got -1"),
        (["optim.beta1=1.0"], r"optim\.beta1 must be in \[0, 1\), got 1\.0"),
        (["optim.beta2=-0.5"], r"optim\.beta2 must be in \[0, 1\), got -0\.5"),
        (["optim.beta2=nan"], r"optim\.beta2 must be in \[0, 1\), got nan"),
        (["optim.eps=0"], r"optim\.eps must be finite and > 0, got 0"),
        (["optim.eps=inf"], r"optim\.eps must be finite and > 0, got inf"),
        (["optim.lr=inf"], r"optim\.lr must be finite and > 0, got inf"),
        (["optim.lr=nan"], r"optim\.lr must be finite and > 0, got nan"),
        (["logging.expert_hist_interval=-1"], r"logging\.expert_hist_interval must be >= 0"),
        (["logging.wandb_id=a/b"], r"logging\.wandb_id must be at most 64 letters, digits, '-' or '_'.*'a/b'"),
        (["run.name=''"], r"run\.name must not be empty"),
        (["data.seed=-1"], r"data\.seed=-1: must be in \[0, 2\*\*32\)"),
        (["run.compile=true", "run.compile_mode=max-autotune"],
         r"run\.compile_mode must be one of \('default', 'reduce-overhead'\), got 'max-autotune'"),
        (["run.compile_mode=reduce-overhead"], r"run\.compile_mode=reduce-overhead applies to compiled blocks"),
        (["run.compile=true", "run.compile_mode=reduce-overhead", "parallel.ep=2"],
         r"reduce-overhead needs parallel\.ep=1 and parallel\.backend=ddp, got parallel\.ep=2, parallel\.backend=ddp"),
        (["run.compile=true", "run.compile_mode=reduce-overhead", "parallel.backend=fsdp"],
         r"reduce-overhead needs parallel\.ep=1 .*parallel\.backend=fsdp"),
    ],
)
def test_bad_config_values_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        _validated(overrides)


def test_edge_config_values_are_accepted():
    cfg = _validated(["run.steps=20", "optim.warmup_steps=20", "run.eval_interval=0", "run.eval_steps=0",
                      "optim.weight_decay=0", "optim.beta1=0", "logging.expert_hist_interval=0"])
    assert cfg.optim.warmup_steps == cfg.run.steps == 20
    # A short run of a longer schedule may stop inside its warm-up.
    assert _validated(["run.steps=10", "optim.schedule_steps=100"]).optim.warmup_steps == 20


@pytest.mark.parametrize(
    "override, message",
    [
        ("+modle=tiny", r"'modle': did you mean 'model'\? allowed under the top level: checkpoint, data"),
        ("+run.stepz=5", r"'run\.stepz': did you mean 'run\.steps'\? allowed under run: "),
        ("+model.moe.top_kk=3", r"'model\.moe\.top_kk': did you mean 'model\.moe\.top_k'"),
        ("+data.qqq=1", r"'data\.qqq': allowed under data: cache_dir"),
    ],
)
def test_unknown_keys_are_refused_even_with_plus(override, message):
    cfg = _compose([override])  # Hydra itself accepts these
    with pytest.raises(ValueError, match=r"unknown config keys .*\n  " + message):
        reject_unknown_keys(cfg)


@pytest.mark.parametrize("overrides", [[], ["experiment=parity_300m"], ["experiment=mixtral_2layer_bench"],
                                       ["data=megatron", "parallel=fsdp", "optim=adamw_large"]])
def test_known_keys_pass(overrides):
    reject_unknown_keys(_compose(overrides))


# ---- benchmarks -------------------------------------------------------------------------------------


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_benchmark_without_gpu_refuses_before_writing(no_gpu, tmp_path):
    out = tmp_path / "train_step.json"
    out.write_text('{"committed": true}\n')
    with pytest.raises(SystemExit, match="bench.train_step needs a CUDA GPU .*nothing was run or written"):
        train_step.main(["--models", "parity_300m", "--impls", "bf16", "--out", str(out)])
    assert out.read_text() == '{"committed": true}\n'
    with pytest.raises(SystemExit, match="bench.x needs a CUDA GPU"):
        common.require_gpu("bench.x")


def _fake_measure(model, impl, warmup, steps, extra, scratch):
    if impl != "bf16":
        raise RuntimeError(f"{impl} broke")
    return {"model": model, "impl": impl, "tokens_per_s": 1000.0, "tflops_per_gpu": 1.0, "mfu": 0.1,
            "peak_gib": 1.0, "step_ms": 8.0}


def test_failed_rows_keep_the_others_a_run_with_none_keeps_the_file(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(train_step, "require_gpu", lambda what: None)
    monkeypatch.setattr(train_step, "measure", _fake_measure)
    out = tmp_path / "train_step.json"
    out.write_text('{"committed": true}\n')
    with pytest.raises(SystemExit, match="rows that failed: parity_300m/rowwise, parity_300m/blockwise"):
        train_step.main(["--models", "parity_300m", "--impls", "rowwise,blockwise", "--out", str(out)])
    assert out.read_text() == '{"committed": true}\n'
    assert f"every row failed: {out} left as it was" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="rows that failed: parity_300m/rowwise"):
        train_step.main(["--models", "parity_300m", "--impls", "bf16,rowwise", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["complete"] is True and [r["impl"] for r in result["rows"]] == ["bf16", "rowwise"]
    assert result["rows"][0]["tokens_per_s"] == 1000.0 and "rowwise broke" in result["rows"][1]["error"]


def test_write_results_skips_runs_with_no_good_row(tmp_path):
    out = tmp_path / "r.json"
    assert common.write_results(out, {"rows": [{"error": "x"}, {"error": "y"}]}) is None
    assert common.write_results(out, {"results": []}, rows_key="results") is None
    assert not out.exists()
    assert common.write_results(out, {"rows": [{"error": "x"}, {"ms": 1.0}]}) == out
    assert json.loads(out.read_text())["rows"][1] == {"ms": 1.0}
