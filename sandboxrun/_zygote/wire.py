"""The messages between the manager and one zygote, over one ``SOCK_SEQPACKET`` socket pair.

Each message is one datagram (the kernel keeps the boundaries), a kind byte then its body;
file descriptors travel beside it as ``SCM_RIGHTS``::

    manager -> zygote
        HELLO    pickle(Preparation)                  once, first
        LAUNCH   pickle(Request)      fds: result write end, control read end
        PRELOAD  pickle((modules, needs_main))        import before launches; READY answers
    zygote -> manager
        READY    u32 flags                            once, the answer to HELLO
        STARTED  i64 pid | u32 flags  fds: pidfd of the task's PID 1
        EXITED   i64 exit code (multiprocessing's: -N for signal N)
        FAILED   utf-8 text                           the launch did not happen

The manager pickles what it sends (it is the trusted side). What comes back is read as fixed
binary records only: the zygote shares its cgroup with nothing but it is forked from by hostile
tasks, so its word is checked (``client``) and never unpickled.
"""

from __future__ import annotations

import sys

assert sys.platform.startswith("linux")  # mypy --platform win32/darwin skips the rest

import array
import socket
import struct

HELLO = b"H"
LAUNCH = b"L"
PRELOAD = b"P"  # pickle((modules, needs_main)): import them now; answered with READY
READY = b"R"
STARTED = b"S"
EXITED = b"E"
FAILED = b"F"

STARTED_BODY = struct.Struct("=qI")
EXITED_BODY = struct.Struct("=q")
FLAGS = struct.Struct("=I")
FLAG_PID_NAMESPACE = 1  # the task got its own PID namespace
FLAG_UID_KEPT = 2  # the task kept the manager's uid: a handed path cannot be idmapped here

MAX_MESSAGE = 1 << 20  # manager -> zygote (a Preparation with a long sys.path stays far below)
MAX_REPLY = 4096  # zygote -> manager: anything longer is not one of ours
_FD_SPACE = socket.CMSG_SPACE(4 * array.array("i").itemsize)


def send(sock: socket.socket, kind: bytes, body: bytes = b"", fds: tuple[int, ...] = ()) -> None:
    if fds:
        sock.sendmsg([kind + body], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(kind + body)


def receive(sock: socket.socket, limit: int) -> tuple[bytes, bytes, list[int]]:
    """One message: ``(kind, body, fds)``; ``kind`` is ``b""`` at end of file.

    Every fd that arrived is returned (the caller owns and closes them), also with a message it
    rejects, so a hostile sender cannot make us leak descriptors.
    """
    data, ancillary, flags, _ = sock.recvmsg(limit, _FD_SPACE)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(payload[: len(payload) - len(payload) % received.itemsize])
            fds.extend(received)
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        data = b"?"  # cut off: not a message we know, whatever it started with
    return data[:1], data[1:], fds
