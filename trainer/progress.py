"""Progress of the long CPU passes over a corpus (collecting, BPE training, tokenizing)."""

from __future__ import annotations

import sys
import time


class Progress:
    """tqdm when installed, else a line every 30 s: preprocessing a large corpus takes hours."""

    def __init__(self, total: int, desc: str) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            tqdm = None
        # Outside a terminal (Slurm logs) every redraw is a new line: keep them rare.
        interval = 0.1 if sys.stderr.isatty() else 30.0
        self._bar = None if tqdm is None else tqdm(total=total, desc=desc, unit="B", unit_scale=True,
                                                   mininterval=interval, file=sys.stderr)
        self._desc, self._total, self._done, self._last = desc, total, 0, time.monotonic()

    def update(self, n: int) -> None:
        """Count `n` more bytes done."""
        if self._bar is not None:
            self._bar.update(n)
            return
        self._done += n
        if time.monotonic() - self._last > 30.0:
            self._last = time.monotonic()
            print(f"{self._desc}: {self._done}/{self._total} bytes", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
