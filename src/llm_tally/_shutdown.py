"""Storing what is still queued in memory when the server stops the process.

How each server ends a process decides which hook runs:

- uvicorn (and other ASGI servers) end with lifespan shutdown: the ASGI middleware flushes
  there, since uvicorn then re-raises SIGTERM and the process ends without exit handlers.
- gunicorn workers (sync, gthread...) leave through ``sys.exit`` after their graceful stop,
  and so does werkzeug's reloader child on SIGTERM: Python's exit handlers run, and the
  Tallies' ``atexit`` close stores what is queued.
- werkzeug's server (``app.run()``, ``flask run``, ``run_simple``) leaves SIGTERM at its
  default disposition: the process ends at once, without exit handlers. For those,
  the WSGI middleware installs :func:`_flush_then_terminate` as SIGTERM handler, only where
  that changes nothing else (see :func:`flush_on_sigterm`).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from types import FrameType

from ._internal import guard, logger
from ._tally import Tally, _open_tallies

#: How long a shutdown waits, in all, for the queued records to be stored.
SHUTDOWN_FLUSH_TIMEOUT = 10.0

# Servers that embed Python and handle signals in C: Python still sees SIGTERM's default
# disposition there, and a handler of ours would replace theirs.
_EMBEDDING_SERVERS = ("uwsgi", "mod_wsgi")


def flush_before_exit(tallies: Iterable[Tally], timeout: float = SHUTDOWN_FLUSH_TIMEOUT) -> bool:
    """Wait, at most ``timeout`` seconds in all, until the open ``tallies`` stored every
    record queued so far, including those queued while waiting (requests still finishing
    in other threads). Logs a warning for each Tally that could not; False if one could not.
    """
    deadline = time.monotonic() + timeout
    waiting = [tally for tally in tallies if not tally.closed]
    stored = True
    while waiting:
        for tally in waiting:
            if not tally.flush(timeout=max(0.0, deadline - time.monotonic())):
                stored = False
                logger.warning(
                    "llm-tally: records still waiting to be stored after %.1f s at shutdown "
                    "(%d in memory) stay in the crash journal for the next Tally on this "
                    "store to store; is the store reachable?",
                    timeout,
                    tally.stats()["queue_depth"],
                )
        if not stored:
            break
        waiting = [t for t in waiting if not t.closed and t.stats()["queue_depth"]]
    return stored


def flush_on_sigterm() -> None:
    """Make SIGTERM store the queued records before it ends the process, where SIGTERM
    would otherwise end it at once (werkzeug's server).

    Only in the main thread, and only while SIGTERM has its default disposition: a server
    (gunicorn, uvicorn) or an app that handles SIGTERM keeps its own handler, and servers
    that embed Python (uWSGI, mod_wsgi) are left alone. The handler restores the default
    disposition (a second SIGTERM ends the process at once), flushes (at most
    ``SHUTDOWN_FLUSH_TIMEOUT`` seconds) and sends SIGTERM again: the process ends as it
    would have, killed by SIGTERM, without exit handlers.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if any(name in sys.modules for name in _EMBEDDING_SERVERS):
        return
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _flush_then_terminate)
    except (ValueError, OSError):  # not the main interpreter, or no SIGTERM here
        return


def _flush_then_terminate(signum: int, frame: FrameType | None) -> None:
    signal.signal(signum, signal.SIG_DFL)
    guard("flush at SIGTERM", flush_before_exit, list(_open_tallies))
    os.kill(os.getpid(), signum)
