"""Each converter's private output folder, and the move of what it wrote into ``--out``.

    batch start ── OUT/.sandboxrun-staging/ (ours, 0711) ── leftover runs (no lock) removed
                ── RUN = a fresh <random>/ in it (0711), flock held for the batch's life
    each file   ── RUN/<random>/ (+ the file's parent folders), 0700 ──> {output}, {out_dir}
                   └─ the task's only writable path (``CommandTask.read_write_paths``)
    its launch  ── slot picked: hand_over() fchowns those folders to the task's uid (strict, root)
    its result  ── ok? ── walk it by dir fds (no symlink followed; each folder ours again, 0700),
                   │      every entry checked:
                   │      a regular file with one link, under a name that is not the journal
                   │      └─ all fine: fchown + fchmod each, then rename() into OUT/<same place>
                   │      └─ anything else: nothing moved, verdict "no output" with the reason
                   └─ its folder removed (fd-based rmtree) whatever the verdict
    batch end, Ctrl-C, an error ── RUN removed; a SIGKILLed batch's RUN goes at the next start

Why a staging folder on OUT's filesystem: rename() is atomic there, so OUT only ever holds
whole files of converters that succeeded -- a failed, killed or timed-out one leaves nothing.

Why the converter cannot plant anything (under ``strict``, the batch's default): its mount
namespace has ``/`` read-only but its own staging folder (``ProtectSystem=strict`` +
``ReadWritePaths=`` of that one folder, added per task at launch), so OUT, the journal, the key
and every neighbour's staging folder are read-only to it whatever their modes say.

Why no one else can write into it: each folder is made 0700, the manager's. Root in the manager
runs each task as its slot's uid (61000 + slot), known only once the launcher has picked the
slot: the task's ``LaunchHook`` (``hand_over``) then gives the folder and the parents made in it
to that uid, by fd and without following anything, just before the task's process starts
(nothing else is in the folder yet). Other local users never get a writable folder, even one
whose 128-bit name they learnt; RUN and the staging root are 0711 (no listing). Where the tasks
run elsewhere under uids we cannot know (``sandboxrun batch --scheduler``: a Dask cluster's
workers), the folders are 0777 as the only way they can write. When an ok task's folder is
collected, each folder in it is the manager's (0700) again before its entries are looked at.

What it leaves there is not trusted: symlinks, hard links, FIFOs and devices are refused, each
file gets the manager's owner and a plain mode (no set-uid) before it becomes visible in OUT.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import stat
import sys
from pathlib import Path

from .._task import LaunchHook

log = logging.getLogger("sandboxrun.cli")

STAGING = ".sandboxrun-staging"
MAX_ENTRIES = 10_000  # a converter leaving more is refused (and its folder removed)
#: Windows has no dir-fd calls: there the converter writes into OUT in place (and the psutil
#: monitor is a resource limiter, not a boundary: docs/security.md).
SUPPORTED = {os.open, os.mkdir, os.rename, os.stat} <= os.supports_dir_fd
_DIR = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
_DIR |= getattr(os, "O_CLOEXEC", 0)
_FILE = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
_FILE |= getattr(os, "O_CLOEXEC", 0)


class Refused(Exception):
    """What the converter left cannot be moved into OUT (the message says why)."""


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class Staging:
    """The batch's staging run: one private folder per file, moved or removed at its end."""

    def __init__(self, out_dir: Path, protected: tuple[Path, ...], unknown_uid: bool) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        self.out_dir = out_dir
        # OUT itself is the user's (it may be a symlink); below it nothing is followed.
        self._out_fd = os.open(out_dir, _DIR & ~getattr(os, "O_NOFOLLOW", 0))
        self._real_out = os.path.realpath(out_dir)
        self._protected = {os.path.realpath(path) for path in protected}  # the journal, its key
        self._folder_mode = 0o777 if unknown_uid else 0o700  # see the module's docstring
        self._parents: dict[str, tuple[str, ...]] = {}  # each folder's name -> what folder_for made
        self._file_mode = 0o666 & ~_umask()
        root_fd = self._root()
        try:
            _remove_leftovers(root_fd, out_dir / STAGING)
            name = secrets.token_hex(16)
            os.mkdir(name, 0o711, dir_fd=root_fd)
            os.chmod(name, 0o711, dir_fd=root_fd)  # not the umask's
            self._run_fd = os.open(name, _DIR, dir_fd=root_fd)
        finally:
            os.close(root_fd)
        _lock(self._run_fd)
        self.path = out_dir.absolute() / STAGING / name  # a task needs an absolute path

    def _root(self) -> int:
        """OUT/.sandboxrun-staging, ours: anything else there (a symlink planted by a converter
        under a weaker profile) is removed first."""
        for _ in range(2):
            with contextlib.suppress(FileExistsError):
                os.mkdir(STAGING, 0o711, dir_fd=self._out_fd)
            try:
                fd = os.open(STAGING, _DIR, dir_fd=self._out_fd)
            except OSError:  # ELOOP, ENOTDIR: not a real folder
                log.warning("%s is not a folder: removed", self.out_dir / STAGING)
                os.unlink(STAGING, dir_fd=self._out_fd)
                continue
            info = os.fstat(fd)
            if sys.platform != "win32" and info.st_uid != os.geteuid():
                os.close(fd)
                raise OSError(f"{self.out_dir / STAGING} belongs to uid {info.st_uid}, not us")
            if sys.platform != "win32":
                os.fchmod(fd, 0o711)
            return fd
        raise OSError(f"cannot make {self.out_dir / STAGING}")

    def folder_for(self, relative: Path) -> Path:
        """A fresh private folder for one file, with the file's parent folders made in it."""
        name = secrets.token_hex(16)
        fd = os.dup(self._run_fd)
        try:
            for part in (name, *relative.parts[:-1]):
                os.mkdir(part, self._folder_mode, dir_fd=fd)
                os.chmod(part, self._folder_mode, dir_fd=fd)  # not the umask's
                child = os.open(part, _DIR, dir_fd=fd)
                os.close(fd)
                fd = child
        finally:
            os.close(fd)
        self._parents[name] = relative.parts[:-1]
        return self.path / name

    def launch_hook(self, folder: Path) -> LaunchHook:
        """What the launcher calls for the task of ``folder``: ``hand_over`` with its uid."""
        return LaunchHook(lambda ids: self.hand_over(folder, ids))

    def hand_over(self, folder: Path, ids: tuple[int, int] | None) -> None:
        """Just before the task starts: ``folder`` and the parents made in it owned by the uid
        that runs the task, mode 0700 (None: the manager's own uid runs it, nothing to do).
        Only what ``folder_for`` made, each opened by fd with O_NOFOLLOW from the run's fd.
        Never raises: a folder not handed over stays ours, and the task just cannot write."""
        if ids is None or sys.platform == "win32" or folder.name not in self._parents:
            return
        fd = os.dup(self._run_fd)
        try:
            for part in (folder.name, *self._parents[folder.name]):
                child = os.open(part, _DIR, dir_fd=fd)
                os.close(fd)
                fd = child
                os.fchown(fd, *ids)
                os.fchmod(fd, 0o700)
        except OSError as error:
            shown = f"cannot hand {folder} to uid {ids[0]} ({error}): its task cannot write"
            log.warning("%s", shown)
        finally:
            os.close(fd)

    def _take_back(self, fd: int) -> None:
        """A folder the task had: the manager's again, 0700, before its entries are checked."""
        if sys.platform != "win32" and os.geteuid() == 0:
            os.fchown(fd, os.geteuid(), os.getegid())
            os.fchmod(fd, 0o700)

    def collect(self, folder: Path) -> list[str]:
        """Move every file the converter left in ``folder`` into OUT, or nothing (``Refused``).
        Returns their paths relative to OUT."""
        found = self._walk(folder.name)
        try:
            for parts, name, _ in found:
                shown = "/".join((*parts, name))
                if (*parts, name)[0] == STAGING:
                    raise Refused(f"{shown} is inside the batch's own staging folder")
                if os.path.join(self._real_out, *parts, name) in self._protected:
                    raise Refused(f"{shown} would replace the journal or its key")
            return [self._move(*entry) for entry in found]
        finally:
            for dir_fd in {fd for _, _, (fd, _) in found}:
                os.close(dir_fd)

    def _walk(self, name: str) -> list[tuple[tuple[str, ...], str, tuple[int, os.stat_result]]]:
        """(folder parts, name, (its folder's fd, lstat)) of every file; ``Refused`` on any
        entry that is not a regular file or a folder. Each folder fd is opened with
        O_NOFOLLOW relative to its parent's: no path is resolved twice."""
        found: list[tuple[tuple[str, ...], str, tuple[int, os.stat_result]]] = []
        opened = [os.open(name, _DIR, dir_fd=self._run_fd)]
        stack: list[tuple[tuple[str, ...], int]] = [((), opened[0])]
        try:
            while stack:
                parts, dir_fd = stack.pop()
                self._take_back(dir_fd)
                with os.scandir(dir_fd) as scan:
                    names = [entry.name for entry in scan]
                for entry in names:
                    info = os.stat(entry, dir_fd=dir_fd, follow_symlinks=False)
                    shown = "/".join((*parts, entry))
                    if len(found) + len(opened) > MAX_ENTRIES:
                        raise Refused(f"more than {MAX_ENTRIES} entries")
                    if stat.S_ISDIR(info.st_mode):
                        opened.append(os.open(entry, _DIR, dir_fd=dir_fd))
                        stack.append(((*parts, entry), opened[-1]))
                    elif not stat.S_ISREG(info.st_mode):
                        raise Refused(f"{shown} is {_kind(info.st_mode)}, not a regular file")
                    elif info.st_nlink != 1:
                        raise Refused(f"{shown} has {info.st_nlink} hard links (a host file?)")
                    else:
                        found.append((parts, entry, (dir_fd, info)))
        except BaseException:
            for dir_fd in opened:
                os.close(dir_fd)
            raise
        for dir_fd in set(opened) - {fd for _, _, (fd, _) in found}:
            os.close(dir_fd)  # folders without a file: not needed for the moves
        return found

    def _move(self, parts: tuple[str, ...], name: str, where: tuple[int, os.stat_result]) -> str:
        src_dir, seen = where
        shown = "/".join((*parts, name))
        fd = os.open(name, _FILE, dir_fd=src_dir)  # O_NOFOLLOW: a symlink swapped in is ELOOP
        try:
            info = os.fstat(fd)
            if (info.st_ino, info.st_dev) != (seen.st_ino, seen.st_dev) or info.st_nlink != 1:
                raise Refused(f"{shown} changed while it was checked")
            if sys.platform != "win32":
                if os.geteuid() == 0:
                    os.fchown(fd, os.geteuid(), os.getegid())  # clears set-uid/set-gid too
                os.fchmod(fd, self._file_mode)
            dst_dir = self._out_folder(parts)
            try:
                os.rename(name, name, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
            finally:
                os.close(dst_dir)
        finally:
            os.close(fd)
        log.debug("moved %s into %s", shown, self.out_dir)
        return shown

    def _out_folder(self, parts: tuple[str, ...]) -> int:
        """OUT/<parts> as a dir fd, made if missing; a symlink on the way is ``Refused``."""
        fd = os.dup(self._out_fd)
        try:
            for part in parts:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o777, dir_fd=fd)
                try:
                    child = os.open(part, _DIR, dir_fd=fd)
                except OSError as error:
                    raise Refused(f"{part} in {self.out_dir} is not a folder ({error})") from None
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def discard(self, folder: Path) -> None:
        """Remove one file's staging folder, whatever it holds (fd-based: a symlink inside is
        removed, never followed)."""
        self._parents.pop(folder.name, None)
        _rmtree(folder.name, self._run_fd, self.path)

    def close(self) -> None:
        """The whole run's staging (the batch ended, was interrupted or failed)."""
        with contextlib.suppress(OSError):
            for entry in os.listdir(self._run_fd):
                _rmtree(entry, self._run_fd, self.path)
        os.close(self._run_fd)  # drops the lock
        with contextlib.suppress(OSError):
            os.rmdir(self.path)
        with contextlib.suppress(OSError):
            os.rmdir(STAGING, dir_fd=self._out_fd)  # only if no other batch uses it
        os.close(self._out_fd)


def _kind(mode: int) -> str:
    kinds = {stat.S_IFLNK: "a symlink", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
             stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}  # fmt: skip
    return kinds.get(stat.S_IFMT(mode), "a special file")


def _lock(fd: int) -> None:
    """Held for the batch's life: a batch starting next to this one leaves its run alone."""
    if sys.platform != "win32":
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def _remove_leftovers(root_fd: int, shown: Path) -> None:
    """Runs of batches that died (SIGKILL, a crash): their lock is gone with them."""
    if sys.platform == "win32":
        return  # no flock: a live batch's run cannot be told from a dead one's
    import fcntl

    for name in os.listdir(root_fd):
        try:
            fd = os.open(name, _DIR, dir_fd=root_fd)
        except OSError:  # not a folder: not ours either
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=root_fd)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.debug("staging %s/%s belongs to a running batch: kept", shown, name)
            continue
        finally:
            os.close(fd)
        log.info("removing %s/%s, left by a batch that did not finish", shown, name)
        _rmtree(name, root_fd, shown)


def _rmtree(name: str, dir_fd: int, shown: Path) -> None:
    def warn(function: object, path: str, error: object) -> None:
        log.warning("cannot remove %s (%s): it stays in %s", path, error, shown)

    if not shutil.rmtree.avoids_symlink_attacks:  # pragma: no cover - Linux and macOS have it
        log.warning("this platform's rmtree follows symlinks raced in: %s/%s", shown, name)
    if sys.version_info >= (3, 11):
        shutil.rmtree(name, dir_fd=dir_fd, onerror=warn)
    else:  # pragma: no cover - 3.10: by path (the run folder is ours and read-only to tasks)
        shutil.rmtree(shown / name, onerror=warn)
