"""bench.kernels --merge: parts measured side by side on several GPUs joined into one kernels.json."""

import json

import pytest

from bench.kernels import merge


def _part(path, bench, copy_gbps, n, commit="abc", complete=True):
    row = {"kernel": str(bench), "shape": "seed", "experts": 16, "ms": 0.1, "gbps": 3000.0,
           "frac_of_copy": 3000.0 / copy_gbps, "torchao_ms": None, "peak_gib": 1.0}  # fmt: skip
    info = {"commit": commit, "gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6.0"}
    benches = bench if isinstance(bench, list) else [bench]
    path.write_text(json.dumps({**info, "complete": complete, "benches": benches, "copy_gbps": copy_gbps,
                                "rows": [row] * n}))  # fmt: skip
    return str(path)


def test_merge_keeps_each_rows_own_fraction_and_records_parts(tmp_path):
    a = _part(tmp_path / "a.json", "quantize_rows", 4200.0, 2)
    b = _part(tmp_path / "b.json", "act_rows", 4300.0, 3)
    merge([a, b], str(tmp_path / "kernels.json"))
    out = json.loads((tmp_path / "kernels.json").read_text())
    assert [r["kernel"] for r in out["rows"]] == ["quantize_rows"] * 2 + ["act_rows"] * 3
    assert out["rows"][0]["frac_of_copy"] == pytest.approx(3000 / 4200)  # untouched
    assert out["copy_gbps"] == pytest.approx(4250.0) and out["complete"] is True
    assert out["benches"] == ["quantize_rows", "act_rows"] and [p["rows"] for p in out["parts"]] == [2, 3]


def test_merge_refuses_parts_from_other_commits(tmp_path):
    a = _part(tmp_path / "a.json", "quantize_rows", 4200.0, 1, commit="abc")
    b = _part(tmp_path / "b.json", "act_rows", 4300.0, 1, commit="def")
    with pytest.raises(SystemExit, match="differ in commit"):
        merge([a, b], str(tmp_path / "kernels.json"))


def test_merge_of_a_cut_short_part_and_the_rest_is_complete(tmp_path):
    from bench.kernels import BENCHES

    names = list(BENCHES)
    a = _part(tmp_path / "a.json", names[:-2], 4200.0, 1, complete=False)  # cut short by its time limit
    b = _part(tmp_path / "b.json", names[-2:], 4300.0, 1)  # the families it did not reach
    merge([a, b], str(tmp_path / "kernels.json"))
    assert json.loads((tmp_path / "kernels.json").read_text())["complete"] is True
    merge([a], str(tmp_path / "kernels.json"))
    assert json.loads((tmp_path / "kernels.json").read_text())["complete"] is False
