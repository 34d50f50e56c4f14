"""Hugging Face import and export (interop/) against transformers itself, on tiny random models
built with transformers (no download): a Mixtral (untied embeddings) and a Qwen3-MoE (qk-norm, an
explicit head_dim, a dense first layer, tied embeddings).

HF -> ours -> HF is bitwise for every tensor (fp32 and bf16; from the per-expert layout
save_pretrained writes and from transformers 5's fused one); our fp32 logits equal transformers'
within 1e-4 relative with the same top-k experts for every token; a run started from the HF weights
(checkpoint.init_from_hf) has transformers' loss on its first batch; its checkpoint, exported at the
end of the run and by tools/hf_export.py, loads in transformers with our logits. Bad input is a
clear error. A rank's shard is filled from only its own slices.
"""

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers  # the dev extra (pyproject.toml)

from interop.hf_config import check_matches, model_config_from_hf
from interop.hf_export import export_hf
from interop.hf_import import fill_shard, load_hf_weights, overlap
from interop.hf_io import INDEX, HfCheckpoint
from interop.hf_names import detect_layout, param_shapes, pieces_for
from moe.model import build_model

VOCAB = 128
# A rel. error of fp32 logits from two summation orders is ~1e-6: 1e-4 leaves room, a wrong
# weight (any transposition, a swapped gate/up, a missing norm) is O(1).
LOGITS_RTOL = 1e-4


@pytest.fixture(autouse=True)
def _reference_kernels(monkeypatch):
    """Our norm and RoPE by their pure-torch references (kernels/dispatch.py), not Triton's
    interpreter: the kernels against the references are tests/test_glue_*.py's; here our math
    against transformers'."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


def _hf_model(arch: str, dtype=torch.float32):
    common = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, max_position_embeddings=64, initializer_range=0.1)  # fmt: skip
    if arch == "mixtral":
        cfg = transformers.MixtralConfig(num_hidden_layers=2, intermediate_size=32, num_local_experts=4, **common)
        cls = transformers.MixtralForCausalLM
    else:
        cfg = transformers.Qwen3MoeConfig(num_hidden_layers=3, moe_intermediate_size=32, intermediate_size=48,
                                          num_experts=4, head_dim=32, norm_topk_prob=True, mlp_only_layers=[0],
                                          tie_word_embeddings=True, **common)  # fmt: skip
        cls = transformers.Qwen3MoeForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # norms away from 1, so a norm read into the wrong place shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model.to(dtype)


@pytest.fixture(scope="module", params=["mixtral", "qwen3_moe"])
def hf(request, tmp_path_factory):
    """(transformers model in fp32, its save_pretrained directory, transformers 5's fused-layout one,
    the architecture)."""
    model = _hf_model(request.param)
    root = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(root / "hf")
    model.save_pretrained(root / "fused", save_original_format=False, max_shard_size="50KB")
    return model, root / "hf", root / "fused", request.param


def _config(hf_dir):
    return model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))


def _ours(hf_dir, cfg=None, **moe):
    cfg = cfg or _config(hf_dir)
    for key, value in moe.items():
        setattr(cfg.moe, key, value)
    model = build_model(cfg).eval()
    load_hf_weights(model, str(hf_dir), cfg)
    return model, cfg


def _tensors(directory) -> dict[str, torch.Tensor]:
    with HfCheckpoint(directory) as ckpt:
        return {name: ckpt.read(name) for name in ckpt.shapes}


def _state_loader(model):
    state = model.state_dict()
    return lambda names: {n: state[n] for n in names}


# ---- HF -> ours -> HF ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_hf_to_ours_to_hf_is_bitwise(hf, dtype, tmp_path):
    _, hf_dir, fused_dir, arch = hf
    if dtype == "bfloat16":
        hf_dir = tmp_path / "bf16"
        _hf_model(arch, torch.bfloat16).save_pretrained(hf_dir)
    ours, cfg = _ours(hf_dir)
    out = export_hf(_state_loader(ours), cfg, tmp_path / "out", dtype=dtype, max_shard_bytes=40_000)
    original, exported = _tensors(hf_dir), _tensors(out)
    assert (out / INDEX).is_file() and len({*json.loads((out / INDEX).read_text())["weight_map"].values()}) > 1
    assert sorted(exported) == sorted(original)
    for name, tensor in original.items():
        assert exported[name].dtype == tensor.dtype and torch.equal(exported[name], tensor), name
    if dtype == "float32":  # transformers 5's fused layout gives the same weights, bit for bit
        assert detect_layout(_tensors(fused_dir)) == "fused"
        from_fused, _ = _ours(fused_dir)
        for (name, a), b in zip(ours.state_dict().items(), from_fused.state_dict().values()):
            assert torch.equal(a, b), name


# ---- forward parity --------------------------------------------------------------------------


def _topk_ids(model, router_cls, pick):
    """Every router's chosen experts, sorted per token, in layer order."""
    found = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: found.append(pick(out).sort(-1).values))
             for m in model.modules() if isinstance(m, router_cls)]  # fmt: skip
    return found, hooks


def test_logits_and_routing_equal_transformers(hf):
    from interop.hf_check import compare_logits
    from moe.router import Router

    model, hf_dir, _, _ = hf
    ours, cfg = _ours(hf_dir, expert_impl="loop")
    tokens = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    ours_ids, h1 = _topk_ids(ours, Router, lambda out: out.topk_ids_TA)
    gate_cls = type(next(m for n, m in model.named_modules() if n.endswith("mlp.gate") or n.endswith("moe.gate")))
    theirs_ids, h2 = _topk_ids(model, gate_cls, lambda out: out[2])
    match = compare_logits(ours, model, tokens)
    for h in h1 + h2:
        h.remove()
    assert match.rel_err < LOGITS_RTOL, match
    assert match.argmax_agree == 1.0
    assert len(ours_ids) == len(theirs_ids) == cfg.n_layers - cfg.first_k_dense
    for layer, (a, b) in enumerate(zip(ours_ids, theirs_ids)):
        assert torch.equal(a, b), f"MoE layer {layer}: {(a != b).any(-1).sum()} tokens routed differently"
    # Our routing is not degenerate here: the tokens spread over every expert.
    assert all(ids.unique().numel() == cfg.moe.num_experts for ids in ours_ids)


# ---- a run from HF weights, exported ---------------------------------------------------------


def _train_config(hf_dir, cfg, run_dir):
    from trainer.config import TrainConfig

    c = TrainConfig()
    c.model = cfg
    c.model.max_seq_len = 16
    c.data.kind, c.data.mock_vocab_size, c.data.num_workers = "mock", VOCAB, 0
    c.run.seq_len, c.run.micro_batch_size, c.run.steps = 16, 2, 1
    c.optim.warmup_steps = 0
    c.run.dtype, c.run.device, c.run.eval_interval = "float32", "cpu", 0
    c.logging.wandb = "disabled"
    c.checkpoint.interval_minutes, c.checkpoint.dir = 0, str(run_dir / "checkpoints")
    c.checkpoint.init_from_hf, c.checkpoint.export_hf_at_end = str(hf_dir), True
    c.checkpoint.export_hf_dtype = "float32"
    c.validate()
    return c


_DATA = {}  # the mock data, built once: both architectures train on the same batches


def _shared_data(build):
    def cached(cfg, **kw):
        key = (repr(cfg), tuple(sorted(kw.items())))
        if key not in _DATA:
            _DATA[key] = build(cfg, **kw)
        return _DATA[key]

    return cached


def test_run_from_hf_weights_and_export(hf, tmp_path, caplog, monkeypatch):
    """The first step's loss is transformers' on that batch; the final checkpoint, exported at the
    end of the run and by the tool, loads in transformers with the trained model's logits."""
    import trainer.loop
    from interop.hf_check import compare_logits, load_hf_model
    from interop.trainer_hooks import export_at_end
    from tools import hf_export
    from trainer.loop import Trainer
    from trainer.parallel import DistEnv

    monkeypatch.setattr(trainer.loop, "build_train_valid", _shared_data(trainer.loop.build_train_valid))
    model, hf_dir, _, _ = hf
    cfg = _train_config(hf_dir, _config(hf_dir), tmp_path)
    trainer = Trainer(cfg, str(tmp_path), DistEnv(0, 1, 0, torch.device("cpu")))
    trainer.resume()  # a fresh start: the HF weights
    batch = next(trainer.data.train(0))
    with torch.no_grad():
        logits = model(batch["tokens"]).logits
    want = float(F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten()))
    got = trainer.train_step(trainer.data.train(0))["loss"]
    assert math.isclose(got, want, rel_tol=1e-5), (got, want)

    trainer.save()
    at_end = export_at_end(trainer)
    assert at_end == tmp_path / "hf"
    tool_out = tmp_path / "tool"
    with caplog.at_level(logging.INFO, logger="fp8moe"):
        rc = hf_export.main([str(trainer.ckpt.path_for(1)), str(tool_out), "--dtype", "float32",
                             "--max-shard-gb", "0.00005", "--check-logits"])  # fmt: skip
    assert rc == 0, caplog.text
    assert "argmax agreement 1.0000: ok" in caplog.text
    assert json.loads((tool_out / INDEX).read_text())["weight_map"]  # sharded, with its index
    a, b = _tensors(at_end), _tensors(tool_out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    trained = trainer.model.eval()
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(2))
    match = compare_logits(trained, load_hf_model(str(at_end)), tokens)
    assert match.rel_err < LOGITS_RTOL and match.argmax_agree == 1.0, match
    assert not torch.equal(_tensors(at_end)["model.norm.weight"], _tensors(hf_dir)["model.norm.weight"])  # trained


# ---- sharded import --------------------------------------------------------------------------


def test_a_shard_reads_only_its_own_slices(hf):
    """Two "ranks" each holding half of every parameter (dim 0, as EP and FSDP split): each fills
    its half from exactly its half of the bytes, and the halves make the one-process load."""
    _, hf_dir, _, _ = hf
    full, cfg = _ours(hf_dir)
    shapes = param_shapes(full)
    with HfCheckpoint(hf_dir) as ckpt:
        pieces = pieces_for(cfg, json.loads((hf_dir / "config.json").read_text())["architectures"][0],
                            "per_expert", VOCAB, shapes)  # fmt: skip
        for name, p in full.named_parameters():
            mine = [q for q in pieces if q.ours == name]
            halves, read = [], 0
            for lo, hi in ((0, p.shape[0] // 2), (p.shape[0] // 2, p.shape[0])):
                region = (slice(lo, hi), *(slice(0, n) for n in p.shape[1:]))
                shard = torch.zeros(hi - lo, *p.shape[1:])
                read += fill_shard(shard, region, mine, ckpt)
                halves.append(shard)
            assert torch.equal(torch.cat(halves), p.detach()), name
            assert read == p.numel() * 4, name  # every byte once, none twice
    assert overlap((1, slice(0, 4)), (slice(2, 4), slice(0, 4))) is None  # another rank's expert


# ---- errors ----------------------------------------------------------------------------------


def test_mismatched_config_names_every_override(hf):
    _, hf_dir, _, _ = hf
    cfg = _config(hf_dir)
    hf_cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.n_layers, cfg.rope_theta, cfg.moe.top_k = 5, 123.0, 1
    with pytest.raises(ValueError) as err:
        check_matches(cfg, hf_cfg, "checkpoint.init_from_hf=X")
    for want in ("model.n_layers=", "model.rope_theta=", "model.moe.top_k=2 (this run: 1)"):
        assert want in str(err.value)


def test_checkpoint_with_missing_or_unknown_tensors_is_refused(hf, tmp_path):
    from safetensors.torch import save_file

    _, hf_dir, _, _ = hf
    with pytest.raises(ValueError, match="checkpoint.init_from_hf=.*nowhere: no such directory"):
        load_hf_weights(None, str(tmp_path / "nowhere"), _config(hf_dir))
    tensors = _tensors(hf_dir)
    (tmp_path / "config.json").write_text((hf_dir / "config.json").read_text())
    dropped = sorted(tensors)[3]
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=f"lacks 1 tensor.*{dropped}"):
        _ours(tmp_path)
    save_file({**tensors, "model.layers.0.mlp.shared_expert.gate_proj.weight": torch.zeros(2)},
              str(tmp_path / "model.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match="holds 1 tensor.*no parameter of ours takes.*shared_expert"):
        _ours(tmp_path)
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"model.norm.weight": "../model.safetensors"}}))
    with pytest.raises(ValueError, match=r"names '\.\./model.safetensors', which is not a file in"):
        _ours(tmp_path)


def test_features_without_hf_counterpart_are_refused(hf, tmp_path):
    _, hf_dir, _, _ = hf
    ours, cfg = _ours(hf_dir, expert_bias=True)
    with torch.no_grad():
        ours.layers[-1].ffn.router.expert_bias.fill_(0.25)
    with pytest.raises(ValueError, match="expert bias.*non-zero.*drop-expert-bias"):
        export_hf(_state_loader(ours), cfg, tmp_path / "a")
    export_hf(_state_loader(ours), cfg, tmp_path / "b", drop_expert_bias=True)  # with a warning
    cfg.moe.score_func = "sigmoid"
    with pytest.raises(ValueError, match="no Hugging Face architecture.*score_func='sigmoid'"):
        export_hf(_state_loader(ours), cfg, tmp_path / "c")


def test_hydra_composes_the_hf_options(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from trainer.config import register_configs

    register_configs()
    configs = Path(__file__).resolve().parents[1] / "configs"

    def validated(*overrides):
        with initialize_config_dir(config_dir=str(configs), version_base="1.3"):
            cfg = OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))
        cfg.validate()
        return cfg

    cfg = validated("model=qwen3_30b_a3b", f"checkpoint.init_from_hf={tmp_path}", "checkpoint.export_hf_at_end=true")
    assert cfg.checkpoint.init_from_hf == str(tmp_path) and cfg.checkpoint.export_hf_dtype == "bfloat16"
    assert validated().checkpoint.init_from_hf == ""
    with pytest.raises(ValueError, match="checkpoint.export_hf_dtype must be one of .*'float16'"):
        validated("checkpoint.export_hf_dtype=float16")
    with pytest.raises(ValueError, match="export_hf_at_end=true .* needs checkpoint.at_end=true"):
        validated("checkpoint.export_hf_at_end=true", "checkpoint.at_end=false")
    with pytest.raises(ValueError, match="no Hugging Face architecture.*score_func='sigmoid'"):
        validated("model=deepseek_v3", "checkpoint.export_hf_at_end=true")


MIXTRAL, QWEN3 = "MixtralForCausalLM", "Qwen3MoeForCausalLM"


@pytest.mark.parametrize("preset, arch", [("mixtral_8x7b", MIXTRAL), ("mixtral_8x22b", MIXTRAL),
                                          ("qwen3_30b_a3b", QWEN3), ("qwen3_235b_a22b", QWEN3), ("deepseek_v3", None)])
def test_presets_map_onto_transformers_models(preset, arch):
    """Each preset's exported config builds (on the meta device) a transformers model whose tensors
    are exactly our name map's, at full size; the config reads back as the same architecture."""
    from omegaconf import OmegaConf

    from interop.hf_config import architecture_for, hf_config_for
    from interop.hf_export import meta_shapes
    from moe.config import ModelConfig

    yaml = Path(__file__).resolve().parents[1] / "configs" / "model" / f"{preset}.yaml"
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(yaml)))
    if arch is None:  # DeepSeek-V3: sigmoid group-limited routing, shared experts, dense layers
        with pytest.raises(ValueError, match="no Hugging Face architecture.*sigmoid.*num_groups.*shared"):
            architecture_for(cfg)
        return
    assert architecture_for(cfg) == arch
    hf_cfg = hf_config_for(cfg, arch, "bfloat16", cfg.vocab_size)
    check_matches(cfg, hf_cfg, preset)
    config = transformers.AutoConfig.for_model(**hf_cfg)
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(config)
    want = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}  # transformers 5: fused experts
    pieces = pieces_for(cfg, arch, "fused", cfg.vocab_size, meta_shapes(cfg))
    assert {p.hf: p.hf_shape for p in pieces} == want
