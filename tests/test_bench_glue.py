"""bench/glue.py on CPU: it refuses without a GPU before writing anything, and names bad arguments."""

import pytest
import torch

from bench import glue


def test_refuses_without_gpu_and_keeps_the_results_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "glue.json"
    out.write_text('{"committed": true}\n')
    with pytest.raises(SystemExit, match="bench.glue needs a CUDA GPU .*nothing was run or written"):
        glue.main(["--out", str(out)])
    assert out.read_text() == '{"committed": true}\n'


def test_unknown_names_are_refused():
    with pytest.raises(SystemExit, match=r"--ops: unknown \['softmax'\]; allowed: \['gqa', 'add_rmsnorm'"):
        glue.main(["--ops", "rope,softmax"])
    with pytest.raises(SystemExit, match=r"--widths: unknown \['llama'\]"):
        glue.main(["--widths", "llama"])
    assert set(glue.CASES) == set(glue.OPS)
