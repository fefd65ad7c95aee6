"""A check of the thread contract (see loader/manager.py): engines belong to one thread.

``owned_by_one_thread`` wraps a class's public methods so that an instance refuses calls from
any thread but the one that built it (the prompt worker, in a server). It is on when the
environment sets STREAMLOADER_CHECK_THREADS=1 (the tests do) and costs nothing otherwise.
"""
from __future__ import annotations

import functools
import inspect
import os
import threading

CHECK_ENV = "STREAMLOADER_CHECK_THREADS"


class ThreadContractError(RuntimeError):
    """An engine method ran on a thread other than the one that owns the engine."""


def owned_by_one_thread(cls: type) -> type:
    """Class decorator: with STREAMLOADER_CHECK_THREADS=1, public methods raise ThreadContractError
    when called from a thread other than the one that ran ``__init__``."""
    if os.environ.get(CHECK_ENV) != "1":
        return cls
    _record_owner(cls)
    for name, member in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(member):
            setattr(cls, name, _checked(member))
    return cls


def _record_owner(cls: type) -> None:
    init = cls.__init__

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        self._owner_thread = threading.current_thread()
        init(self, *args, **kwargs)

    cls.__init__ = __init__


def _checked(method):
    @functools.wraps(method)
    def checked(self, *args, **kwargs):
        owner, caller = self._owner_thread, threading.current_thread()
        if caller is not owner:
            raise ThreadContractError(
                f"{type(self).__name__}.{method.__name__} was called from thread `{caller.name}`, but this "
                f"{type(self).__name__} belongs to thread `{owner.name}` (the prompt worker); the event loop "
                "may only read published snapshots and post requests (see the thread contract in loader/manager.py)")
        return method(self, *args, **kwargs)

    return checked
