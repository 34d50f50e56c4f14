"""CommTimer on the host clock (CPU); the dispatcher's use of it is tested over gloo in
tests/test_ep_dispatch.py, its CUDA-event path on a GPU."""

import time

import pytest
import torch

from moe.comm_timer import CommTimer


def test_spans_are_counted_summed_and_forgotten_on_drain():
    timer = CommTimer(torch.device("cpu"))
    assert timer.spans == 0 and timer.drain_ms() == 0.0
    with timer.span():
        pass
    with timer.span():
        time.sleep(0.02)
    assert timer.spans == 2
    ms = timer.drain_ms()
    # The sleep alone is 20 ms; the upper bound only catches a unit slip (seconds, microseconds).
    assert 20.0 <= ms < 2000.0, ms
    assert timer.spans == 0 and timer.drain_ms() == 0.0  # drained: nothing is counted twice
    with timer.span():
        pass
    assert timer.spans == 1 and 0.0 <= timer.drain_ms() < 20.0


@pytest.mark.gpu
def test_cuda_spans_are_counted_and_drained_without_a_prior_sync():
    timer = CommTimer(torch.device("cuda"))
    a = torch.randn(4096, 4096, device="cuda")
    with timer.span():
        for _ in range(10):
            a = a @ a / 64  # queued work: drain_ms must wait for the end event itself
    assert timer.spans == 1
    assert timer.drain_ms() > 0.0 and timer.spans == 0
