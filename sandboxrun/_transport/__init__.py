"""How the manager talks to its workers and waits for them, chosen once at import.

Two implementations of one shape (psutil style: the platform module is picked here, the callers
never test the platform)::

    _posix     raw pipes read with os.read/os.readv, pidfds (Linux) or the multiprocessing
               sentinel as the exit fd, one ``selectors.DefaultSelector`` -- the fast path
    _portable  ``multiprocessing.connection`` pipes, process sentinels and
               ``multiprocessing.connection.wait`` -- what Windows can do (its select() takes
               sockets only, it has no os.readv, no non-blocking pipes)

Both hand out plain ``int`` handles so the scheduler's book-keeping (``job.result_fd >= 0``,
selector keys) is the same: in ``_posix`` they are fds, in ``_portable`` keys of a table.

Chosen: ``_portable`` on Windows, or anywhere when ``SANDBOXRUN_TRANSPORT=portable`` (read once,
here; that is how Linux CI runs the code Windows runs); ``_posix`` elsewhere, macOS included
(kqueue selects on pipes; without pidfds the exit fd is a dup of the multiprocessing sentinel).

The API (same names in both modules):

    NAME                       "posix" or "portable"
    DEFAULT_START_METHOD       None (multiprocessing's default) or "spawn"
    BARE_FORK                  True when the bare os.fork launcher may be used (needs pidfds)
    Selector()                 register(handle, events, data) / unregister / select(timeout)
                               -> [(key, mask)] with key.fd the handle, key.data the data
    Channel(fd)                the worker's end of a pipe: fileno(), close()
    result_pipe()              -> (parent read handle, child's writing Channel)
    control_pipe()             -> (child's reading Channel, parent write handle)
    exit_handle(process)       -> handle that turns readable when the worker process ends
    read(handle, n) / readinto(handle, view)
                               non-blocking parent reads: BlockingIOError when nothing is there,
                               b"" / 0 at end of file
    write(handle, data)        non-blocking parent write: bytes written, or BlockingIOError
    close(handle)
    write_all(connection, data) / read_exactly(connection, n)
                               the worker's blocking side (read_exactly: None at end of file)
"""

from __future__ import annotations

import os
import sys

# One group per line keeps the two branches from reading as a copy.
# isort: off
if sys.platform == "win32" or os.environ.get("SANDBOXRUN_TRANSPORT") == "portable":
    from ._portable import BARE_FORK, DEFAULT_START_METHOD, NAME, Selector, close, read, write
    from ._portable import control_pipe, exit_handle, readinto, result_pipe
    from ._portable import EXIT_BY_PIDFD, read_exactly, write_all
    from ._portable import Channel
else:
    from ._posix import BARE_FORK, DEFAULT_START_METHOD, NAME
    from ._posix import close, read, write  # type: ignore[assignment]
    from ._posix import Selector  # type: ignore[assignment]
    from ._posix import control_pipe, exit_handle, result_pipe  # type: ignore[assignment]
    from ._posix import readinto  # type: ignore[assignment]
    from ._posix import EXIT_BY_PIDFD, read_exactly, write_all  # type: ignore[assignment]
    from ._posix import Channel  # type: ignore[assignment]
# isort: on

__all__ = [
    "BARE_FORK",
    "DEFAULT_START_METHOD",
    "EXIT_BY_PIDFD",
    "NAME",
    "Channel",
    "Selector",
    "close",
    "control_pipe",
    "exit_handle",
    "read",
    "read_exactly",
    "readinto",
    "result_pipe",
    "write",
    "write_all",
]
