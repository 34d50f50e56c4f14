"""Tokenizers of the token files: loading a tokenizer.json, finding its end-of-document token,
and training the byte-level BPE used when a corpus comes without a tokenizer."""

from __future__ import annotations

import os
import sys
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# Tried in order when no EOD token is named: the spellings of the common tokenizer families.
EOD_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
TRAINED_EOD = "<|endoftext|>"


def trained_tokenizer_path(prefix: str) -> str:
    """Where preprocessing saves the tokenizer it trains for the data prefix `prefix`."""
    return prefix + ".tokenizer.json"


def find_eod(tokenizer: Tokenizer, eod_token: str | None, where: str) -> int:
    """The id of the end-of-document token; `where` names the tokenizer in errors."""
    if eod_token:
        token_id = tokenizer.token_to_id(eod_token)
        if token_id is None:
            raise ValueError(f"eod token {eod_token!r} is not in the tokenizer {where}")
        return token_id
    for candidate in EOD_CANDIDATES:
        token_id = tokenizer.token_to_id(candidate)
        if token_id is not None:
            return token_id
    raise ValueError(
        f"tokenizer {where} has none of the end-of-document tokens {list(EOD_CANDIDATES)}; "
        "name one with --eod-token (data.eod_token in the trainer config)"
    )


def load_tokenizer(path: str, eod_token: str | None = None) -> tuple[Tokenizer, int]:
    """A tokenizer.json and its EOD id."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    tokenizer = Tokenizer.from_file(path)
    return tokenizer, find_eod(tokenizer, eod_token, path)


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style, lossless: decode(encode(text)) == text) with TRAINED_EOD
    as token 0."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[TRAINED_EOD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=sys.stderr.isatty(),
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: str) -> None:
    """Save under a temporary name, then rename: a reader never sees half a tokenizer.json."""
    tmp = f"{path}.tmp-{os.getpid()}"
    tokenizer.save(tmp)
    os.replace(tmp, path)
