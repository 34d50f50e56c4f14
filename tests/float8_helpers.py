"""Shared by the Float8Linear tests (tests/test_float8_linear_layer.py,
tests/test_float8_linear_convert.py): the relative L2 difference they compare results by.

Test files import it as `float8_helpers`: tests/ has no __init__.py, so pytest's default "prepend"
import mode puts tests/ itself on sys.path.
"""

import torch


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()
