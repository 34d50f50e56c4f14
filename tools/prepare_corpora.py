"""Both loss-parity corpora in one command, each where its experiment's data.paths expects it.

    python tools/prepare_corpora.py [--only python|prose] [--force] [--workers N] [--dry-run]

  python  tools/prepare_python_corpus.py --max-bytes 160000000 --bpe-max-bytes 64000000: the .py
          sources of the installed packages (~43M tokens; configs/experiment/parity_300m.yaml)
  prose   tools/prepare_prose_corpus.py with its defaults (--max-bytes 64000000 --bpe-max-bytes
          32000000): English documentation prose (configs/experiment/parity_300m_prose.yaml)
Both under $FP8MOE_CACHE (default ~/.cache/fp8moe), each with its own BPE of 32000 tokens. A
corpus prepared already (its PREFIX.stats.json, written last, and the files it describes) is
kept unless --force.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script: make `trainer` and `tools` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import prepare_prose_corpus, prepare_python_corpus  # noqa: E402
from tools.prepare_common import default_workers, prepared  # noqa: E402

CORPORA = {
    "python": (prepare_python_corpus, ["--max-bytes", "160000000", "--bpe-max-bytes", "64000000"]),
    "prose": (prepare_prose_corpus, []),
}


def commands(only: Sequence[str], workers: int) -> list[tuple[str, str, list[str]]]:
    """(name, output prefix, argv of its tool's main) for each corpus asked for."""
    out = []
    for name in only:
        module, args = CORPORA[name]
        prefix = module.default_prefix()
        out.append((name, prefix, [*args, "--output-prefix", prefix, "--workers", str(workers)]))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=sorted(CORPORA), default=None, help="prepare one corpus (default: both)")
    parser.add_argument("--force", action="store_true", help="prepare again a corpus prepared already")
    parser.add_argument("--workers", type=int, default=default_workers(),
                        help="processes for the CPU passes (default: cores - 1, at most 16)")
    parser.add_argument("--dry-run", action="store_true", help="print what would run")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be >= 1, got {args.workers}")
    for name, prefix, tool_argv in commands([args.only] if args.only else list(CORPORA), args.workers):
        tool = f"tools/{CORPORA[name][0].__name__.rsplit('.', 1)[-1]}.py"
        if prepared(prefix) and not args.force:
            print(f"{name}: prepared already at {prefix} (--force prepares it again)", flush=True)
            continue
        print(f"{name}: python {tool} {' '.join(tool_argv)}", flush=True)
        if not args.dry_run:
            CORPORA[name][0].main(tool_argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
