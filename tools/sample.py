"""Generate text from a checkpoint: one of ours (a run directory, its checkpoints directory or one
step_NNNNNN directory) or a Hugging Face model directory.

    python -m tools.sample outputs/RUN --prompt "The " --max-new-tokens 64 [--greedy | --top-p 0.9 --temperature 0.8]
    python -m tools.sample --hf /models/mixtral --prompt "def " --greedy [--device cuda]

Ours: the model config is the one the checkpoint's run saved (its config.json); the tensors are read
whole by name, without running code from the files (interop/checkpoint_tensors.py); the tokenizer
is the one the run's data used: data.tokenizer, or the default corpus's BPE (prepared into the
corpus cache if it is not there), or --tokenizer. HF: config.json as our ModelConfig
(interop/hf_config.py), the weights through interop/hf_import.py, the directory's tokenizer.json,
its eos_token_id ending the text.

The model runs dropless (a capacity factor is a training setting), with fp32 weights: in fp32 on the
CPU, under bf16 autocast on a GPU. A run trained with an FP8 recipe samples through this same path:
its checkpoint holds the high-precision weights, FP8 is how its training computed with them.
Generation uses a KV cache (moe/generate.py). The text goes to stdout, everything else to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import sys
import time
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
from omegaconf import OmegaConf
from tokenizers import Tokenizer

from interop.checkpoint_tensors import CheckpointTensors
from interop.hf_config import model_config_from_hf, model_fields_from_hf
from interop.hf_import import load_hf_weights
from interop.hf_io import read_hf_config
from moe.config import ModelConfig, require
from moe.generate import generate
from moe.model import MoETransformer, build_model
from trainer.checkpoint import CheckpointManager
from trainer.checkpoint_config import CheckpointConfig
from trainer.checkpoint_files import MANIFEST
from trainer.default_corpus import ensure_default_corpus
from trainer.tokenizer import find_eod, load_tokenizer, trained_tokenizer_path

log = logging.getLogger("fp8moe")


@dataclasses.dataclass(frozen=True)
class Loaded:
    model: MoETransformer
    tokenizer: Tokenizer
    stop_ids: frozenset[int]  # end-of-text token ids (empty: generate max_new_tokens)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", nargs="?", help="a run directory, its checkpoints directory or a step directory")
    parser.add_argument("--hf", default=None, help="a Hugging Face model directory instead of a checkpoint of ours")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--greedy", action="store_true", help="always the most likely token")
    parser.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (default 0.9)")
    parser.add_argument("--temperature", type=float, default=None, help="logits divided by it (default 0.8)")
    parser.add_argument("--seed", type=int, default=0, help="the sampling generator's seed")
    parser.add_argument("--tokenizer", default=None, help="a tokenizer.json instead of the checkpoint's own")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-verify", action="store_true", help="skip the checkpoint's checksums")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.hf is None):
        parser.error("name either a checkpoint of ours (CHECKPOINT) or a Hugging Face directory (--hf), one of them")
    if args.greedy and (args.top_p is not None or args.temperature is not None):
        parser.error("--greedy takes no --top-p or --temperature: greedy decoding does not sample")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: this torch sees no CUDA device")
    args.top_p = 0.9 if args.top_p is None else args.top_p
    args.temperature = 0.8 if args.temperature is None else args.temperature
    return args


def sampling_config(cfg: ModelConfig) -> ModelConfig:
    """`cfg` without a capacity limit: which experts a token gets must not depend on the other
    tokens of the step (the prompt's, or none), so generation routes as dropless training does."""
    return dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, capacity_factor=None))


def find_checkpoint(path: Path) -> Path:
    """`path` if it is a checkpoint, else the newest complete one under it: a checkpoints
    directory, or a run directory (its saved checkpoint.dir, else <run>/checkpoints)."""
    require(path.is_dir(), f"{path}: no such directory (a run directory, its checkpoints directory or a step one)")
    if (path / MANIFEST).is_file():
        return path
    root = path
    hydra_config = path / ".hydra" / "config.yaml"
    if hydra_config.is_file():
        ckpt_dir = OmegaConf.select(OmegaConf.load(hydra_config), "checkpoint.dir", default="",
                                    throw_on_resolution_failure=False) or ""
        root = Path(ckpt_dir) if ckpt_dir else path / "checkpoints"
    elif (path / "checkpoints").is_dir():
        root = path / "checkpoints"
    newest = CheckpointManager(CheckpointConfig(dir=str(root)), run_dir=path).latest()
    require(newest is not None, f"{path}: no complete checkpoint (a step_NNNNNN directory) in {root}")
    return newest


def open_tokenizer(path: str, eos_ids: frozenset[int], eod_token: str | None) -> tuple[Tokenizer, frozenset[int]]:
    """A tokenizer.json other than the run's data tokenizer, and the ids that end the text: `eos_ids`
    (an HF config's), else its end-of-text token (`eod_token`, or one of the usual spellings),
    else none: the text runs to --max-new-tokens."""
    require(Path(path).is_file(), f"tokenizer file not found: {path} (name one with --tokenizer)")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as exc:  # tokenizers raises a bare Exception
        raise ValueError(f"{path}: not a tokenizer.json the tokenizers library reads ({exc})") from None
    if eos_ids or eod_token:
        return tokenizer, eos_ids or frozenset({find_eod(tokenizer, eod_token, path)})
    try:
        return tokenizer, frozenset({find_eod(tokenizer, None, path)})
    except ValueError:
        log.info("%s: no end-of-text token; generating --max-new-tokens tokens", path)
        return tokenizer, frozenset()


def run_tokenizer_path(run_config: dict) -> str:
    """The tokenizer.json of the run's data (data.kind megatron: data.tokenizer; the default
    corpus: its BPE in the corpus cache, made again there if it is not)."""
    data = run_config.get("data") or {}
    kind = data.get("kind", "default_corpus")
    if kind == "default_corpus":
        return trained_tokenizer_path(ensure_default_corpus(data.get("cache_dir") or None))
    require(kind == "megatron" and data.get("tokenizer"),
            f"the run trained on data.kind={kind!r}, which has no tokenizer: name one with --tokenizer")  # fmt: skip
    return data["tokenizer"]


def load_ours(path: Path, device: torch.device, tokenizer: str | None, verify: bool) -> Loaded:
    source = CheckpointTensors(find_checkpoint(path), verify=verify)
    cfg = sampling_config(source.model_config())
    fp8 = source.run_config.get("fp8") or {}
    recipe = {k: fp8.get(k, "bf16") for k in ("experts", "dense")}
    log.info("checkpoint %s (step %d), model %s%s", source.path, source.step, cfg.name,
             "" if set(recipe.values()) == {"bf16"} else f"; trained with fp8.experts={recipe['experts']} "
             f"fp8.dense={recipe['dense']}, sampled in fp32/bf16 from its high-precision weights")  # fmt: skip
    model = build_model(cfg, device)
    state = model.state_dict()
    missing = [name for name, _ in model.named_parameters() if name not in source.entries]
    require(not missing, f"checkpoint {source.path} holds no tensor {missing[:5]} of model {cfg.name!r}")
    by_layer: dict[str, list[str]] = defaultdict(list)  # read a layer at a time, never the whole model
    for name in state:
        if name in source.entries:
            by_layer[".".join(name.split(".")[:2]) if name.startswith("layers.") else ""].append(name)
    with torch.no_grad():
        for names in by_layer.values():
            for name, value in source.load(names).items():
                state[name].copy_(value)
    eod_token = (source.run_config.get("data") or {}).get("eod_token") or None
    if tokenizer is not None:
        return Loaded(model.eval(), *open_tokenizer(tokenizer, frozenset(), eod_token))
    run_tokenizer, eod = load_tokenizer(run_tokenizer_path(source.run_config), eod_token)
    return Loaded(model.eval(), run_tokenizer, frozenset({eod}))


def load_hf(hf_dir: str, device: torch.device, tokenizer: str | None) -> Loaded:
    hf = read_hf_config(hf_dir)
    cfg = model_config_from_hf(hf)
    window = model_fields_from_hf(hf).get("sliding_window")
    if window:  # attention equals HF's only where no query looks further back than the window
        cfg = dataclasses.replace(cfg, max_seq_len=min(cfg.max_seq_len, int(window)))
    cfg = sampling_config(cfg)
    model = build_model(cfg, device)
    load_hf_weights(model, hf_dir, cfg, what="--hf")
    eos = hf.get("eos_token_id")
    eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
    path = tokenizer or str(Path(hf_dir) / "tokenizer.json")
    return Loaded(model.eval(), *open_tokenizer(path, eos_ids, None))


def continuation(tokenizer: Tokenizer, prompt_ids: list[int], new_ids: list[int]) -> str:
    """The text of `new_ids` after the prompt: decoded with the prompt, so a tokenizer that marks
    word starts (a leading space) decodes the first new token as it reads in context."""
    before = tokenizer.decode(prompt_ids)
    both = tokenizer.decode(prompt_ids + new_ids)
    return both[len(before):] if both.startswith(before) else tokenizer.decode(new_ids)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    device = torch.device(args.device)
    if args.hf is not None:
        loaded = load_hf(args.hf, device, args.tokenizer)
    else:
        loaded = load_ours(Path(args.checkpoint), device, args.tokenizer, verify=not args.no_verify)
    prompt_ids = loaded.tokenizer.encode(args.prompt).ids
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    started = time.monotonic()
    with autocast:
        new_ids = generate(loaded.model, prompt_ids, args.max_new_tokens, temperature=args.temperature,
                           top_p=args.top_p, greedy=args.greedy, seed=args.seed, stop_ids=loaded.stop_ids)  # fmt: skip
    elapsed = time.monotonic() - started
    print(args.prompt + continuation(loaded.tokenizer, prompt_ids, new_ids), flush=True)
    ended = " (stopped at the end-of-text token)" if new_ids and new_ids[-1] in loaded.stop_ids else ""
    how = "greedy" if args.greedy else f"top_p={args.top_p} temperature={args.temperature} seed={args.seed}"
    log.info("%d prompt tokens, %d new tokens%s, %s, on %s: %.2f s (%.1f tokens/s)", len(prompt_ids), len(new_ids),
             ended, how, device.type, elapsed, len(new_ids) / max(elapsed, 1e-9))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
