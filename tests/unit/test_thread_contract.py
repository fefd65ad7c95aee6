"""The thread contract's check: with STREAMLOADER_CHECK_THREADS=1 (set for every test run),
an engine refuses calls from any thread but the one that built it."""
import threading

import torch
from torch import nn

from loader.device import device_for
from loader.streaming import StreamEngine
from loader.threads import CHECK_ENV, ThreadContractError, owned_by_one_thread


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Linear(64, 64) for _ in range(4))

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def on_other_thread(fn):
    """Run ``fn`` on a new thread; returns the exception it raised (None if none)."""
    raised = []

    def run():
        try:
            fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            raised.append(e)

    t = threading.Thread(target=run, name="event-loop")
    t.start()
    t.join()
    return raised[0] if raised else None


def test_the_check_is_on_in_the_test_environment():
    import os

    assert os.environ.get(CHECK_ENV) == "1"


def test_an_engine_refuses_calls_from_another_thread_and_serves_its_own():
    net = Net()
    engine = StreamEngine(net, net, chunk_bytes=0)
    error = on_other_thread(lambda: engine.attach(device_for(torch.device("cpu")), None))
    assert isinstance(error, ThreadContractError)
    assert "`event-loop`" in str(error) and "`MainThread`" in str(error) and engine.attached is None
    assert on_other_thread(engine.detach) is not None and on_other_thread(engine.close) is not None
    engine.attach(device_for(torch.device("cpu")), None)  # the owner may
    assert engine.attached is not None
    error = on_other_thread(lambda: engine.attached.end_step())
    assert isinstance(error, ThreadContractError) and "Placement.end_step" in str(error)
    engine.close()


def test_without_the_setting_a_class_is_left_as_it_was(monkeypatch):
    monkeypatch.delenv(CHECK_ENV)

    class Plain:
        def run(self):
            return 1

    method = Plain.run
    assert owned_by_one_thread(Plain) is Plain and Plain.run is method
    assert on_other_thread(Plain().run) is None


def test_private_methods_and_properties_are_not_checked(monkeypatch):
    monkeypatch.setenv(CHECK_ENV, "1")

    @owned_by_one_thread
    class Owned:
        def public(self):
            return self._private()

        def _private(self):
            return 2

        @property
        def size(self):
            return 3

    owned = Owned()
    assert on_other_thread(owned._private) is None and on_other_thread(lambda: owned.size) is None
    assert isinstance(on_other_thread(owned.public), ThreadContractError)
