"""A stand-in `wandb` module for tests of the metrics logger: what the logger sends, in order."""

import sys


def install_fake_wandb(monkeypatch) -> list:
    """Replace `wandb` for the test; returns the events list, in call order: the keyword arguments
    of each `wandb.init` (a dict) and a (step, payload) tuple for each `run.log`."""
    events: list = []

    class Run:
        def log(self, payload, step):
            events.append((step, payload))

        def finish(self):
            pass

    class FakeWandb:
        class Settings:
            def __init__(self, **kw):
                pass

        class Histogram:
            def __init__(self, values):
                self.values = values

        @staticmethod
        def init(**kw):
            events.append(kw)
            return Run()

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    return events
