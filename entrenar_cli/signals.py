"""Stop signals: Ctrl-C (SIGINT) and SIGTERM ask a run to stop at a safe point, never mid-write.

While a run trains, evaluates for the last time and saves, the handlers only set a flag: the
current optimizer step finishes and a checkpoint is written, or, after the last step, the final
model is saved; more signals are noted and change nothing. The pipeline and the engine share one
:data:`STOP` (it nests), so the handlers stay installed from the first step until the final model
is on disk. Outside a run the previous handlers are back.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """A nestable context that turns SIGINT/SIGTERM into a flag (main thread only; elsewhere a no-op)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self.count = 0  # signals in this run
        self.total = 0  # signals in this process (never reset): the CLI compares it around a command
        self._depth = 0
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is not threading.main_thread():
            return self
        if self._depth == 0:
            self.signal, self.count = None, 0
            self._previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
            for sig in SIGNALS:
                signal.signal(sig, self._handle)
        self._depth += 1
        return self

    def __exit__(self, *_exc: object) -> None:
        if threading.current_thread() is not threading.main_thread() or self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self.count += 1
        self.total += 1
        name = signal.Signals(signum).name
        if self.signal is None:
            self.signal = signum
            text = (f"\n{name} received: stopping at a safe point (the current step finishes, then a checkpoint "
                    "or the final model is written)\n")
        else:
            text = f"\n{name} received again: still saving; entrenar exits as soon as the files are complete\n"
        try:
            os.write(2, text.encode())
        except OSError:
            pass

    def ignore_from_now(self) -> None:
        """After a stop the process only exits: further signals must not break its shutdown (atexit)."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_IGN)


STOP = StopRequest()

_PAUSE_ENV = "ENTRENAR_TEST_PAUSE_BEFORE_SAVE"


def pause_for_tests(where: str) -> None:
    """Test-only hook: with ``ENTRENAR_TEST_PAUSE_BEFORE_SAVE=SECONDS`` wait before a final save or an
    interrupt checkpoint, so a test can deliver a signal in exactly that window. Not for users."""
    value = os.environ.get(_PAUSE_ENV)
    if not value:
        return
    try:
        seconds = float(value)
    except ValueError:
        return
    os.write(2, f"test pause before {where} ({_PAUSE_ENV})\n".encode())
    time.sleep(seconds)
