"""Turn text into Megatron `.bin/.idx` token files, the format megatron-core's GPTDataset reads.

    python tools/preprocess_data.py --input a.jsonl [b.txt ...] --output-prefix out/corpus \
        [--tokenizer tok.json] [--vocab-size 4096] [--json-key text] [--workers N]

Documents:
- `.jsonl` / `.json` files: one document per line, the text under `--json-key` (default "text").
- any other file is plain text: by default one document per paragraph (blank-line separated),
  because a single-document file cannot be split into train/valid (megatron splits by document);
  `--text-split file` makes each whole file one document.
Empty documents are skipped. Every document is encoded without the tokenizer's own special tokens
(no BOS) and followed by one EOD token, the only separator GPTDataset needs.

Tokenizer: a Hugging Face `tokenizers` tokenizer.json (`--tokenizer`), or, when none is given, a
byte-level BPE (lossless: decode(encode(text)) == text) trained on the corpus itself and saved as
`<output-prefix>.tokenizer.json`. EOD is `--eod-token`, else the first of EOD_CANDIDATES present.

Outputs are written under temporary names and renamed when complete, `.idx` last, so an
interrupted run never leaves a pair that looks complete.

The command line only: the library is trainer/preprocess.py and the modules it imports.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make `trainer` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.documents import TEXT_SPLITS  # noqa: E402
from trainer.preprocess import preprocess  # noqa: E402
from trainer.tokenizer import EOD_CANDIDATES  # noqa: E402


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help=".jsonl or plain text files")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json; default: train a byte-level BPE on the input")
    parser.add_argument("--vocab-size", type=int, default=4096, help="for the trained BPE")
    parser.add_argument("--json-key", default="text", help="text field of each jsonl line")
    parser.add_argument("--text-split", choices=TEXT_SPLITS, default="paragraph",
                        help="plain text files: a document per paragraph or per file")
    parser.add_argument("--eod-token", default=None,
                        help=f"end-of-document token; default: first of {list(EOD_CANDIDATES)}")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    args = parser.parse_args(argv)
    prefix, tokenizer = preprocess(args.input, args.output_prefix, args.tokenizer, args.vocab_size,
                                   args.json_key, args.text_split, args.workers, args.eod_token)
    print(f"data prefix: {prefix}\ntokenizer: {tokenizer}")


if __name__ == "__main__":
    main()
