"""Tokenizers of the token files: loading a tokenizer.json, finding its end-of-document token,
and training the byte-level BPE used when a corpus comes without a tokenizer."""

from __future__ import annotations

import json
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
    """A tokenizer.json and its EOD id; a file that is not one raises a ValueError naming it."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file not found: {path}")
    try:
        tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # tokenizers raises a bare Exception that names neither file nor cause
        raise ValueError(f"tokenizer {path}: {_why_not_a_tokenizer(path, e)}; expected a Hugging Face "
                         "tokenizers file (a tokenizer.json as Tokenizer.save writes it)") from None
    return tokenizer, find_eod(tokenizer, eod_token, path)


def _why_not_a_tokenizer(path: str, err: Exception) -> str:
    try:
        with open(path, "rb") as f:
            value = json.load(f)
    except UnicodeDecodeError:
        return "not JSON (not even UTF-8 text)"
    except json.JSONDecodeError as e:
        return f"not JSON (line {e.lineno} column {e.colno}: {e.msg})"
    if not isinstance(value, dict) or "model" not in value:
        return 'JSON, but not a tokenizer (no "model" entry)'
    return f"a tokenizer the installed tokenizers library cannot read ({err})"


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
