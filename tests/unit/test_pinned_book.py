"""The pinned-memory book: a registration never outlives the memory it covers."""
import gc
import weakref

import torch

from loader.pinning import PinnedBook


class RecordingBook(PinnedBook):
    """Records the addresses registered and unregistered, as CUDA's books would hold them."""

    def __init__(self, cap_bytes: int):
        super().__init__(cap_bytes)
        self.calls: list[tuple[str, int]] = []

    def _register(self, host):
        self.calls.append(("register", host.data_ptr()))
        return True

    def _unregister(self, host):
        self.calls.append(("unregister", host.data_ptr()))


def test_a_registered_buffer_stays_alive_until_it_is_unregistered():
    book = RecordingBook(cap_bytes=1 << 20)
    host = torch.empty(8192, dtype=torch.uint8)
    alive, address = weakref.ref(host), host.data_ptr()
    assert book.register(host)
    del host
    gc.collect()
    assert alive() is not None, "freed while still registered: a later buffer at its address would fail copies"
    book.unregister(alive())
    gc.collect()
    assert alive() is None, "unregistered: the book lets it go"
    assert book.calls == [("register", address), ("unregister", address)] and book.own_bytes == 0


def test_a_refused_buffer_is_not_held():
    book = RecordingBook(cap_bytes=4096)
    host = torch.empty(8192, dtype=torch.uint8)
    alive = weakref.ref(host)
    assert not book.register(host), "over the cap"
    del host
    gc.collect()
    assert alive() is None and book.calls == []
