"""Generation with a KV cache (moe/kv_cache.py, moe/generate.py) against the full forward, nucleus
sampling against a plain-Python reference, and tools/sample.py on the default tiny run's checkpoint,
also through its Hugging Face export."""

import dataclasses
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from app_helpers import ROOT, app_env, run_train
from moe.config import ModelConfig, MoEConfig
from moe.generate import generate, top_p_probs
from moe.kv_cache import KVCache
from moe.model import build_model


def _tiny(**overrides) -> ModelConfig:
    moe = MoEConfig(num_experts=4, top_k=2, ffn_dim=16)
    cfg = ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, init_std=0.2, moe=moe)
    return dataclasses.replace(cfg, **overrides)


@pytest.fixture
def cpu_path(monkeypatch):
    """The kernels' pure-torch references, the CPU product path (the interpreter is slow for the
    many small steps of a generation; the kernels have their own tests)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("overrides", [{"qk_norm": True}, {"n_kv_heads": 4, "first_k_dense": 1}],
                         ids=["gqa-qk_norm", "mha-dense_first"])  # fmt: skip
def test_cached_logits_equal_full_forward(overrides):
    """Prompt chunks of 5, 4 (a prefill after cached positions: the bottom-right causal mask), 1,
    1 and 6 tokens, batch 2: each chunk's last logits are the full forward's at that position."""
    torch.manual_seed(0)
    model = build_model(_tiny(**overrides)).eval()
    tokens_BS = torch.randint(0, 97, (2, 17))
    caches = model.new_kv_caches(20)
    with torch.no_grad():
        full_BSV = model(tokens_BS).logits
        for start, end in [(0, 5), (5, 9), (9, 10), (10, 11), (11, 17)]:
            logits_BV = model.forward_cached(tokens_BS[:, start:end], caches)
            torch.testing.assert_close(logits_BV, full_BSV[:, end - 1], rtol=0, atol=1e-5)
    assert all(c.pos == 17 and c.k_BJSD.shape == (2, model.cfg.n_kv_heads, 20, 8) for c in caches)


@pytest.mark.parametrize("on", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_greedy_with_cache_equals_recompute(on, cpu_path):
    torch.manual_seed(1)
    model = build_model(_tiny(), on).eval()
    prompt = [5, 17, 42]
    cached = generate(model, prompt, 24, greedy=True)
    recomputed = generate(model, prompt, 24, greedy=True, use_cache=False)
    assert cached == recomputed and len(cached) == 24
    assert len(set(cached)) > 1  # not one repeated token: the positions matter
    # A stop token ends the text after its first occurrence, and is returned.
    assert generate(model, prompt, 24, greedy=True, stop_ids={cached[3]}) == cached[: cached.index(cached[3]) + 1]


def _nucleus_reference(probs: list[float], top_p: float) -> list[float]:
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = [0.0] * len(probs), 0.0
    for i in order:
        if mass >= top_p:
            break
        kept[i], mass = probs[i], mass + probs[i]
    return kept


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.5, 0.9, 0.999, 1.0])
def test_top_p_probs_against_reference(top_p):
    logits_V = torch.tensor([0.3, -1.0, 2.5, 2.0, 0.0, -3.0, 1.1], dtype=torch.float64)
    got_V = top_p_probs(logits_V, temperature=0.7, top_p=top_p)
    probs = torch.softmax(logits_V.float() / 0.7, dim=-1).tolist()
    torch.testing.assert_close(got_V, torch.tensor(_nucleus_reference(probs, top_p)), rtol=0, atol=0)
    assert got_V[2] > 0  # the most likely token is always kept


def test_sampling_reproducible(cpu_path):
    torch.manual_seed(2)
    model = build_model(_tiny()).eval()
    draw = lambda seed, top_p=0.9: generate(model, [3, 4], 12, temperature=1.5, top_p=top_p, seed=seed)  # noqa: E731
    assert draw(0) == draw(0) and draw(0) != draw(1)
    assert draw(5, top_p=1e-6) == generate(model, [3, 4], 12, greedy=True)  # a nucleus of one token


def test_generation_refusals():
    model = build_model(_tiny())
    with pytest.raises(ValueError, match="max_seq_len=32"):
        generate(model, list(range(20)), 13, greedy=True)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [1], 2, top_p=0.0)
    with pytest.raises(ValueError, match=r"vocab_size=97"):
        generate(model, [97], 2, greedy=True)
    capped = build_model(_tiny(moe=MoEConfig(num_experts=4, top_k=2, ffn_dim=16, capacity_factor=1.0)))
    with pytest.raises(ValueError, match="capacity_factor"):
        generate(capped, [1, 2], 2, greedy=True)
    cache = KVCache(3)
    cache.append(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))
    with pytest.raises(ValueError, match="max_len=3"):
        cache.append(torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8))


# ---- tools/sample.py on the default tiny run --------------------------------------------------

PROMPT, NEW = "The ", 12


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The default tiny run (tests' TINY width), two steps, its checkpoint saved at the end."""
    out = tmp_path_factory.mktemp("runs")
    env = app_env(tmp_path_factory.mktemp("cache"))
    run_train(env, out, "run.name=tiny", "run.steps=2")
    return env, out / "tiny"


@pytest.mark.slow
def test_sample_tool_on_tiny_run(tiny_run, tmp_path, monkeypatch, capsys, cpu_path):
    env, run_dir = tiny_run
    cmd = [sys.executable, "-m", "tools.sample", str(run_dir), "--prompt", PROMPT, "--max-new-tokens", str(NEW),
           "--greedy", "--device", "cpu"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout.rstrip("\n")
    assert text.startswith(PROMPT) and len(text) > len(PROMPT), text
    assert f"{NEW} new tokens, greedy" in proc.stderr  # the requested length: no end-of-text token came

    from tools import hf_export, sample

    monkeypatch.setenv("FP8MOE_CACHE", env["FP8MOE_CACHE"])
    step_dir = sample.find_checkpoint(run_dir)
    assert step_dir.name == "step_000002"

    def run(*args: str) -> str:
        assert sample.main([*args, "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--device", "cpu"]) == 0
        return capsys.readouterr().out.rstrip("\n")

    assert run(str(step_dir), "--greedy") == text
    # The same weights exported for transformers, sampled through the HF import: the same text.
    hf_dir = tmp_path / "hf"
    assert hf_export.main([str(step_dir), str(hf_dir), "--dtype", "float32"]) == 0
    shutil.copy(sample.run_tokenizer_path(sample.CheckpointTensors(step_dir).run_config), hf_dir / "tokenizer.json")
    assert run("--hf", str(hf_dir), "--greedy") == text
    # Nucleus sampling: reproducible by seed, another seed another text.
    drawn = run(str(run_dir), "--top-p", "0.9", "--temperature", "0.8", "--seed", "3")
    assert drawn == run(str(run_dir), "--top-p", "0.9", "--temperature", "0.8", "--seed", "3") != text
    assert drawn != run(str(run_dir), "--top-p", "0.9", "--temperature", "0.8", "--seed", "4")


@pytest.mark.slow
@pytest.mark.gpu
def test_sample_tool_on_cuda(tiny_run, monkeypatch, capsys):
    """The GPU path: bf16 autocast, the KV cache in bf16, the Triton kernels."""
    from tools import sample

    env, run_dir = tiny_run
    monkeypatch.setenv("FP8MOE_CACHE", env["FP8MOE_CACHE"])
    argv = [str(run_dir), "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--greedy", "--device", "cuda"]
    assert sample.main(argv) == 0
    text = capsys.readouterr().out.rstrip("\n")
    assert text.startswith(PROMPT) and len(text) > len(PROMPT), text
