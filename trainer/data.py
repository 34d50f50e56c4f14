"""Training data: token files through megatron-core's GPTDataset, served per data-parallel rank.

Shape letters (README.md): B batch (the sequences of a micro-batch), S sequence length.

Sources (`data.kind`): `default_corpus`, Python's pydoc topics prepared once into the cache
(trainer/default_corpus.py); `megatron`, `.bin/.idx` prefixes from tools/preprocess_data.py
(or Megatron-LM's own preprocessing), blended by weight; `mock`, megatron's synthetic
MockGPTDataset.

A batch is a dict of `tokens` (B, S) int64, `labels` (B, S) int64 (the next token of each
position) and `loss_mask` (B, S) float32 (0 on padding). Every id of a token file's sample is
checked against the tokenizer's vocabulary as it is read (`_CheckedIds`), and each split must hold
at least one sample's worth of tokens (`_check_split_sizes`).

Order: megatron shuffles the samples once, seeded by `data.seed`. Global batch k is samples
[c + k*g, c + (k+1)*g) of that order, c = consumed_samples, g = global batch size;
data-parallel rank r of d takes rows [r*g/d, (r+1)*g/d) of it, cut into micro-batches. Nothing
else is random, so `train(consumed_samples)` yields exactly the batches an uninterrupted run
would have yielded next, provided the data config, seq_len, train_steps and g are unchanged
(megatron sizes its shuffle from them).

Every rank must call `build_train_valid` when torch.distributed is initialised: megatron
builds its index files on rank 0 first, behind a barrier, into `<cache>/megatron_index`,
which must then be a directory all ranks see.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional

import torch

from trainer.default_corpus import default_cache_dir, ensure_default_corpus
from trainer.indexed import check_indexed_prefix, count_tokens
from trainer.tokenizer import load_tokenizer, trained_tokenizer_path

KINDS = ("default_corpus", "megatron", "mock")
SPLIT_NAMES = ("train", "valid", "test")
Batch = Dict[str, torch.Tensor]


@dataclass
class DataConfig:
    """The `data` group of the trainer config (a Hydra structured config: plain types only)."""

    kind: str = "default_corpus"  # one of KINDS
    # kind=megatron: data prefixes (PREFIX.bin + PREFIX.idx). Megatron's flat form
    # ["30", "a", "70", "b"] (weight, prefix, ...) is accepted too.
    paths: List[str] = field(default_factory=list)
    # One weight per prefix (normalised); empty: each prefix in proportion to its size.
    weights: List[float] = field(default_factory=list)
    split: str = "98,2,0"  # train,valid,test weights over each prefix's documents
    tokenizer: str = ""  # kind=megatron: the tokenizer.json the data was made with
    eod_token: str = ""  # "" = first of trainer.tokenizer.EOD_CANDIDATES in the tokenizer
    mock_vocab_size: int = 4096  # kind=mock: synthetic vocabulary; EOD is its last id
    num_workers: int = 2  # DataLoader worker processes per rank (0: load in the main process)
    cache_dir: str = ""  # default corpus + megatron index cache; "" = $FP8MOE_CACHE or ~/.cache/fp8moe
    seed: int = 1234  # megatron's shuffle of documents and samples
    # The validation samples' shuffle (which ones a pass reads); None: `seed`. Fixed, runs that
    # differ in data order are evaluated on the same sequences (tools/parity_report.py's floor).
    valid_seed: Optional[int] = None

    def validate(self, prefix: str = "data") -> None:
        if self.kind not in KINDS:
            raise ValueError(f"{prefix}.kind={self.kind!r}: allowed {list(KINDS)}")
        split_weights(self.split, prefix)
        if self.num_workers < 0:
            raise ValueError(f"{prefix}.num_workers={self.num_workers}: must be >= 0")
        for name in ("seed", "valid_seed"):  # megatron seeds numpy's RandomState with them
            value = getattr(self, name)
            if value is not None and not 0 <= value < 2**32:
                raise ValueError(f"{prefix}.{name}={value}: must be in [0, 2**32)")
        if self.kind == "mock" and self.mock_vocab_size < 2:
            raise ValueError(f"{prefix}.mock_vocab_size={self.mock_vocab_size}: must be >= 2")
        if self.kind == "megatron":
            blend(self.paths, self.weights, prefix)
            if not self.tokenizer:
                raise ValueError(f"{prefix}.tokenizer is empty: kind 'megatron' needs the "
                                 "tokenizer.json the data was preprocessed with (vocab size, EOD)")


def split_weights(split: str, prefix: str = "data") -> List[float]:
    """'98,2,0' -> [98.0, 2.0, 0.0]; missing trailing entries are 0."""
    allowed = "up to three comma-separated non-negative numbers with a positive sum, e.g. '98,2,0'"
    try:
        weights = [float(part) for part in str(split).split(",")]
    except ValueError:
        raise ValueError(f"{prefix}.split={split!r}: expected {allowed}") from None
    if len(weights) > 3 or not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"{prefix}.split={split!r}: expected {allowed}")
    return weights + [0.0] * (3 - len(weights))


def blend(paths: List[str], weights: List[float],
          prefix: str = "data") -> tuple[List[str], Optional[List[float]]]:
    """(prefixes, weights or None) in megatron's blend form."""
    paths, weights = [str(p) for p in paths], [float(w) for w in weights]
    if not paths:
        raise ValueError(f"{prefix}.paths is empty: kind 'megatron' needs at least one data prefix "
                         "(PREFIX.bin + PREFIX.idx, made by tools/preprocess_data.py)")
    if not weights and len(paths) % 2 == 0 and all(_is_number(p) for p in paths[0::2]):
        weights, paths = [float(w) for w in paths[0::2]], paths[1::2]  # Megatron's flat form
    if weights and len(weights) != len(paths):
        raise ValueError(f"{prefix}.weights has {len(weights)} entries but {prefix}.paths has "
                         f"{len(paths)} prefixes: give one weight per prefix, or none")
    if any(not (math.isfinite(w) and w > 0) for w in weights):
        raise ValueError(f"{prefix}.weights={weights}: every weight must be > 0")
    return paths, (weights or None)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class MegatronTokenizer:
    """The attributes megatron-core's datasets read from a tokenizer, and nothing else.

    GPTDatasetConfig reads `vocab_size` (token dtype), GPTDataset and MockGPTDataset read `eod`,
    and `unique_identifiers` enters the hash naming megatron's cache files. MegatronDataset also
    tries `pad`, `eos` and `special_tokens_dict`, catching their absence: it then pads with -1,
    which never collides with a real token. Plain ints only, so it pickles into DataLoader
    workers.
    """

    def __init__(self, vocab_size: int, eod: int, identity: dict) -> None:
        self.vocab_size = vocab_size
        self.eod = eod
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": vocab_size,
                                   "eod": eod, **identity}


@dataclass(frozen=True)
class TrainValidData:
    """What the trainer gets: `train(consumed_samples)` and `valid()` make fresh iterators."""

    train: Callable[[int], Iterator[Batch]]
    valid: Optional[Callable[[], Iterator[Batch]]]  # None when the split has no valid part
    vocab_size: int
    eod: int
    train_samples: int  # samples in megatron's train dataset (>= train_steps * global_batch_size)
    vocab_source: str  # what sets vocab_size, for errors: "the tokenizer PATH", "the mock data (...)"
    kind: str  # data.kind

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """Refuse a model whose embedding has fewer rows than the data has token ids, saying
        which setting to change."""
        if self.vocab_size <= model_vocab_size:
            return
        fix = f"set model.vocab_size >= {self.vocab_size}"
        if self.kind == "mock":
            fix = (f"set data.mock_vocab_size=N with 2 <= N <= {model_vocab_size} "
                   f"(or model.vocab_size >= {self.vocab_size})")
        raise ValueError(f"{self.vocab_source} has {self.vocab_size} tokens but model.vocab_size="
                         f"{model_vocab_size}: {fix}")


def _megatron():
    """megatron-core's dataset classes, imported on first use: it takes seconds, and the config
    schema above must stay cheap to import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its package import warns about absent GPU libraries
        from megatron.core.datasets import blended_megatron_dataset_builder as builder_mod
        from megatron.core.datasets import gpt_dataset
        from megatron.core.datasets.blended_dataset import BlendedDataset
    # It logs a dozen lines per dataset and rank (cache paths, timings); keep them out of the
    # training log unless someone configured this logger on purpose.
    logger = logging.getLogger("megatron.core.datasets")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)

    class Builder(builder_mod.BlendedMegatronDatasetBuilder):
        @staticmethod
        def build_generic_dataset(cls, is_built_on_rank, synchronize_ranks, *args):
            # megatron-core <= 0.16 calls torch.distributed.get_rank() unguarded when a blend's
            # index is not cached yet, which raises without a process group (0.17+ checks
            # is_initialized). Without one there is a single process, so build the blend's
            # index in memory (a cheap C++ pass) instead of caching it.
            if cls is BlendedDataset and not torch.distributed.is_initialized():
                *head, config = args
                args = (*head, dataclasses.replace(config, path_to_cache=None))
            return builder_mod.BlendedMegatronDatasetBuilder.build_generic_dataset(
                cls, is_built_on_rank, synchronize_ranks, *args)

    return gpt_dataset, Builder


@contextlib.contextmanager
def _no_rank_warnings() -> Iterator[None]:
    """megatron-core 0.17+ warns on every log call made without a process group or $RANK,
    though a lone process being rank 0 is exactly right."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Could not determine rank")
        yield


def _gpt_config(gpt_dataset, **kwargs):
    # Fields come and go between megatron-core versions (create_attention_mask, ...): pass only
    # those this version has.
    names = {f.name for f in dataclasses.fields(gpt_dataset.GPTDatasetConfig) if f.init}
    with _no_rank_warnings():
        return gpt_dataset.GPTDatasetConfig(**{k: v for k, v in kwargs.items() if k in names})


def collate(samples: List[dict]) -> Batch:
    """Megatron samples -> one batch of tokens, labels, loss_mask."""
    first = samples[0]
    if "text" in first:
        # megatron-core before 0.5 returned seq_len + 1 tokens per sample under "text".
        text = torch.stack([torch.as_tensor(s["text"], dtype=torch.int64) for s in samples])
        tokens, labels = text[:, :-1], text[:, 1:]
        loss_mask = torch.ones(tokens.shape, dtype=torch.float32)
    else:
        tokens = torch.stack([torch.as_tensor(s["tokens"]) for s in samples]).long()
        labels = torch.stack([torch.as_tensor(s["labels"]) for s in samples]).long()
        if "loss_mask" in first:
            loss_mask = torch.stack([torch.as_tensor(s["loss_mask"]) for s in samples]).float()
        else:
            loss_mask = torch.ones(tokens.shape, dtype=torch.float32)
    return {"tokens": tokens.contiguous(), "labels": labels.contiguous(), "loss_mask": loss_mask.contiguous()}


class RankBatchSampler:
    """This rank's micro-batches, as lists of sample indices, for global batches taken in order
    from `start` while a whole one fits before `stop` (see the module docstring)."""

    def __init__(self, start: int, stop: int, global_batch_size: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int) -> None:
        self.start, self.stop = start, stop
        self.global_batch, self.micro = global_batch_size, micro_batch_size
        self.per_rank = global_batch_size // dp_size
        self.offset = dp_rank * self.per_rank

    def __iter__(self) -> Iterator[List[int]]:
        for first in range(self.start, self.stop - self.global_batch + 1, self.global_batch):
            rank_first = first + self.offset
            for m in range(rank_first, rank_first + self.per_rank, self.micro):
                yield list(range(m, m + self.micro))

    def __len__(self) -> int:
        global_batches = max(0, (self.stop - self.start) // self.global_batch)
        return global_batches * (self.per_rank // self.micro)


def _iterate(dataset, sampler: RankBatchSampler, num_workers: int) -> Iterator[Batch]:
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=num_workers, collate_fn=collate,
        pin_memory=torch.cuda.is_available(),
    )
    return iter(loader)


class _CheckedIds(torch.utils.data.Dataset):
    """A token-file dataset whose samples are checked against the tokenizer's vocabulary: an id
    past the model's embedding fails deep in it (a bare IndexError on a CPU, a device-side assert
    on a GPU), and one within the model's but past the tokenizer's trains rows the tokenizer never
    makes. One max per sample, in the DataLoader workers, on the CPU: no device sync."""

    def __init__(self, dataset, vocab_size: int, vocab_source: str, split: str,
                 prefixes: List[str]) -> None:
        self.dataset, self.vocab_size, self.vocab_source = dataset, vocab_size, vocab_source
        self.split, self.prefixes = split, prefixes

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, idx: int) -> dict:
        sample = self.dataset[idx]
        if "text" in sample:
            top = int(sample["text"].max())
        else:  # labels are the tokens shifted by one: only their last entry is new
            top = max(int(sample["tokens"].max()), int(sample["labels"][-1]))
        if top >= self.vocab_size:
            if "dataset_id" in sample:  # a blend says which prefix the sample came from
                where = f"data prefix {self.prefixes[int(sample['dataset_id'])]}"
            else:
                where = f"data prefix {' or '.join(self.prefixes)}"
            raise ValueError(
                f"token id {top} in {self.split} sample {idx} ({where}) is outside the vocabulary of "
                f"{self.vocab_source}: allowed ids are 0..{self.vocab_size - 1}. The data was made with "
                "another tokenizer: name that one in data.tokenizer, or make the data again with this "
                "one (tools/preprocess_data.py --tokenizer)")
        return sample


def _train_iter(dataset, global_batch_size, micro_batch_size, dp_rank, dp_size, num_workers,
                consumed_samples: int = 0) -> Iterator[Batch]:
    if consumed_samples < 0:
        raise ValueError(f"consumed_samples={consumed_samples}: must be >= 0")
    if consumed_samples > len(dataset):
        raise ValueError(f"consumed_samples={consumed_samples} is past the end of the train "
                         f"dataset ({len(dataset)} samples): was train_steps lowered?")
    sampler = RankBatchSampler(consumed_samples, len(dataset), global_batch_size,
                               micro_batch_size, dp_rank, dp_size)
    return _iterate(dataset, sampler, num_workers)


def _resolve_source(cfg: DataConfig, cache_dir: str):
    """(blend or None, MegatronTokenizer, what sets the vocabulary) for the configured kind."""
    if cfg.kind == "mock":
        vocab = cfg.mock_vocab_size
        source = f"the mock data (data.mock_vocab_size={vocab})"
        return None, MegatronTokenizer(vocab, vocab - 1, {"name": "mock"}), source
    if cfg.kind == "default_corpus":
        prefixes, weights = [ensure_default_corpus(cache_dir)], None
        tokenizer_path = trained_tokenizer_path(prefixes[0])
    else:
        prefixes, weights = blend(cfg.paths, cfg.weights)
        for prefix in prefixes:
            check_indexed_prefix(prefix)  # before the tokenizer: the likelier mistake
        tokenizer_path = cfg.tokenizer
    tokenizer, eod = load_tokenizer(tokenizer_path, cfg.eod_token or None)
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    # megatron names its cached sample indices by the prefix path, not the content: data
    # re-made under the same prefix would reuse stale indices (wrong samples, or reads past a
    # document). The fingerprints go into the tokenizer's identity, which enters that name.
    identity = {"name": os.path.basename(tokenizer_path),
                "data": [_fingerprint(p + ".idx") for p in prefixes]}
    return (prefixes, weights), MegatronTokenizer(vocab, eod, identity), f"the tokenizer {tokenizer_path}"


def _fingerprint(path: str, edge: int = 1 << 20) -> str:
    """Size and the first and last MiB of a file: cheap, and the same on every node (mtime
    is not, where data is copied to local disks)."""
    digest = hashlib.sha1(str(os.path.getsize(path)).encode())
    with open(path, "rb") as f:
        digest.update(f.read(edge))
        f.seek(max(0, os.path.getsize(path) - edge))
        digest.update(f.read(edge))
    return digest.hexdigest()[:16]


def _check_split_sizes(prefixes: List[str], split_matrix, split: str, seq_len: int,
                       valid_samples: int) -> None:
    # A split with a positive weight but no documents makes megatron loop forever looking for
    # tokens (_get_num_epochs); one with fewer tokens than a sample makes it repeat them inside
    # every sample (4 tokens at seq_len 256: each ~65 times), which trains on nothing. Same
    # rounding as megatron's builder.
    needed = seq_len + 1  # a sample: seq_len inputs and the label of the last
    for prefix in prefixes:
        documents = check_indexed_prefix(prefix)
        for name, bookends in zip(SPLIT_NAMES, split_matrix):
            if bookends is None:
                continue
            first, stop = (int(round(b * documents)) for b in bookends)
            if stop == first:
                raise ValueError(
                    f"data.split={split!r} gives the {name} split 0 of the {documents} documents "
                    f"in {prefix}: set its weight to 0 or use more (or smaller) documents")
            if name == "test" or (name == "valid" and valid_samples == 0):
                continue  # no sample is drawn from it
            tokens = count_tokens(prefix, first, stop, needed)
            if tokens < needed:
                fits = f"run.seq_len <= {tokens - 1}, " if tokens > 1 else ""
                skip = ", or run.eval_interval=0 (no validation)" if name == "valid" else ""
                raise ValueError(
                    f"the {name} split of {prefix} (data.split={split!r}: documents [{first}, {stop}) "
                    f"of {documents}) holds {tokens} tokens, fewer than one sample of run.seq_len + 1 "
                    f"= {needed}: each sample would repeat them ~{needed / tokens:.0f} times. Use more "
                    f"data, {fits}a larger {name} weight in data.split{skip}")


def build_train_valid(cfg: DataConfig, *, seq_len: int, micro_batch_size: int,
                      global_batch_size: int, train_steps: int, eval_steps: int,
                      dp_rank: int = 0, dp_size: int = 1) -> TrainValidData:
    """Build the train and valid datasets and their per-rank iterators.

    The train dataset holds at least train_steps * global_batch_size samples; each validation
    pass is `eval_steps` micro-batches per rank, always the same samples (the first
    eval_steps * micro_batch_size * dp_size of the valid split).
    """
    DataConfig.validate(cfg)  # unbound: cfg may be an OmegaConf DictConfig of this schema
    if seq_len < 1 or micro_batch_size < 1 or train_steps < 1 or eval_steps < 0:
        raise ValueError(f"seq_len={seq_len}, micro_batch_size={micro_batch_size}, train_steps="
                         f"{train_steps}, eval_steps={eval_steps}: all must be >= 1 (eval_steps >= 0)")
    if not 0 <= dp_rank < dp_size:
        raise ValueError(f"dp_rank={dp_rank}: must be in [0, dp_size={dp_size})")
    if global_batch_size < 1 or global_batch_size % (micro_batch_size * dp_size):
        raise ValueError(f"global_batch_size={global_batch_size}: must be a positive multiple of "
                         f"micro_batch_size * dp_size = {micro_batch_size * dp_size}")
    cache_dir = cfg.cache_dir or default_cache_dir()
    train_samples = train_steps * global_batch_size
    valid_samples = eval_steps * micro_batch_size * dp_size
    blend_, tokenizer, vocab_source = _resolve_source(cfg, cache_dir)
    verbose = dp_rank == 0
    t0 = time.perf_counter()
    if verbose:
        print(f"data: building {cfg.kind} datasets (seq_len {seq_len}, {train_samples} train / "
              f"{valid_samples} valid samples)", file=sys.stderr, flush=True)
    gpt_dataset, Builder = _megatron()
    mock = blend_ is None
    config_kw = dict(
        random_seed=cfg.seed,
        sequence_length=seq_len,
        blend=blend_,
        split=None if mock else cfg.split,  # megatron forces "1,1,1" for mock data
        # Mock indices are rebuilt in memory in a moment; nothing to cache.
        path_to_cache=None if mock else os.path.join(cache_dir, "megatron_index"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # the model masks causally itself; an S x S mask per sample is waste
        add_extra_token_to_sequence=True,  # seq_len + 1 tokens per sample: inputs and labels both S long
    )
    config = _gpt_config(gpt_dataset, **config_kw)
    if not mock:
        _check_split_sizes(blend_[0], config.split_matrix, cfg.split, seq_len, valid_samples)
    cls = gpt_dataset.MockGPTDataset if mock else gpt_dataset.GPTDataset
    with _no_rank_warnings():
        builder = Builder(cls, [train_samples, valid_samples, 0], lambda: True, config)
        train_ds, valid_ds, _ = builder.build()
        if cfg.valid_seed is not None and cfg.valid_seed != cfg.seed and valid_samples:
            # The same split under the validation seed: its valid part, the train part unused.
            valid_config = _gpt_config(gpt_dataset, **{**config_kw, "random_seed": cfg.valid_seed})
            valid_ds = Builder(cls, [train_samples, valid_samples, 0], lambda: True, valid_config).build()[1]
    if not mock:  # mock ids are taken modulo the vocabulary already
        check = functools.partial(_CheckedIds, vocab_size=tokenizer.vocab_size,
                                  vocab_source=vocab_source, prefixes=blend_[0])
        train_ds = check(train_ds, split="train")
        valid_ds = None if valid_ds is None else check(valid_ds, split="valid")
    if verbose:
        valid_len = 0 if valid_ds is None else len(valid_ds)
        print(f"data: {len(train_ds)} train / {valid_len} valid samples ready "
              f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr, flush=True)
    train = functools.partial(_train_iter, train_ds, global_batch_size, micro_batch_size,
                              dp_rank, dp_size, cfg.num_workers)
    valid = None
    if valid_ds is not None and valid_samples > 0:
        step = micro_batch_size * dp_size  # one micro-batch per rank per validation step
        sampler = RankBatchSampler(0, min(valid_samples, len(valid_ds)), step, micro_batch_size,
                                   dp_rank, dp_size)
        valid = functools.partial(_iterate, valid_ds, sampler, cfg.num_workers)
    return TrainValidData(train, valid, tokenizer.vocab_size, tokenizer.eod, len(train_ds),
                          vocab_source, cfg.kind)
