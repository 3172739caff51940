"""Which paths a task's call hands it (sandboxrun/_isolation/handed.py): the inference's edges."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from sandboxrun import Task
from sandboxrun._command import CommandTask
from sandboxrun._isolation.handed import handed_paths

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX paths")


def noop(*args: object, **kwargs: object) -> None:
    return None


def handed(*args: object, cwd: str | None = None, **kwargs: object) -> tuple[str, ...]:
    return handed_paths(Task(noop, args, kwargs), cwd)


@pytest.fixture
def job(tmp_path: Path) -> Path:
    (tmp_path / "in.docx").write_text("x")
    (tmp_path / "sub").mkdir()
    return tmp_path.resolve()


def test_an_existing_file_hands_its_folder(job: Path) -> None:
    assert handed(str(job / "in.docx")) == (str(job),)


def test_a_folder_hands_itself(job: Path) -> None:
    assert handed(str(job / "sub")) == (str(job / "sub"),)


def test_a_missing_path_hands_its_first_existing_parent_and_no_further(job: Path) -> None:
    assert handed(str(job / "sub" / "a" / "b" / "out.pdf")) == (str(job / "sub"),)


def test_path_objects_bytes_and_nested_values(job: Path) -> None:
    assert handed([{"out": job / "sub"}]) == (str(job / "sub"),)
    assert handed(os.fsencode(job / "in.docx")) == (str(job),)
    assert handed(options={"target": str(job / "sub" / "x")}) == (str(job / "sub"),)


def test_relative_paths_count_only_when_they_exist(job: Path) -> None:
    assert handed("in.docx", cwd=str(job / "sub")) == (str(job / "sub"),)  # the cwd only
    assert handed("sub", cwd=str(job)) == (str(job),)  # cwd covers sub


def test_words_and_urls_are_not_paths() -> None:
    assert handed("utf-8", "w", "https://example.com/a/b", "", "a\0b") == ()


@pytest.mark.parametrize(
    "path", ["/", "/etc/passwd", "/etc", "/usr/bin", "/usr/local", "/tmp", "/var/tmp", "/home",
             "/root", "/proc/self", "/dev/null", "/var/lib/dpkg"],
)  # fmt: skip
def test_system_and_shared_folders_are_never_handed(path: str) -> None:
    assert handed(path) == ()


def test_a_file_directly_under_tmp_is_handed_alone(tmp_path: Path) -> None:
    path = Path("/tmp") / f"sandboxrun-handed-{os.getpid()}.txt"
    path.write_text("x")
    try:
        assert handed(str(path)) == (str(path),)
        assert handed(f"/tmp/missing-{os.getpid()}.pdf") == ()  # /tmp itself: never
    finally:
        path.unlink()


def test_code_and_homes_are_never_handed(tmp_path: Path) -> None:
    for entry in (p for p in sys.path if p and os.path.isdir(p)):
        assert handed(entry) == ()  # a folder of sys.path
        assert handed(os.path.dirname(entry)) == () or os.path.dirname(entry) == entry
    assert handed(os.path.expanduser("~")) == ()
    assert handed(os.path.expanduser("~/.bashrc")) == ()
    home_like = tmp_path / "alice"
    (home_like / ".ssh").mkdir(parents=True)
    assert handed(str(home_like)) == ()
    assert handed(str(home_like / "notes.txt")) == ()  # missing: its parent is a home


def test_symlinks_are_resolved_and_judged_by_their_target(job: Path) -> None:
    (job / "link-to-etc").symlink_to("/etc")
    (job / "link-to-sub").symlink_to(job / "sub")
    assert handed(str(job / "link-to-etc")) == ()
    assert handed(str(job / "link-to-sub")) == (str(job / "sub"),)


def test_the_working_folder_and_command_arguments(job: Path) -> None:
    command = CommandTask(["convert", str(job / "in.docx"), "out.pdf"], cwd=str(job / "sub"))
    assert handed_paths(command, None) == (str(job),)  # in.docx's folder covers sub
    shell = CommandTask(f"tool '{job / 'sub'}' --level 3", shell=True)
    assert handed_paths(shell, None) == (str(job / "sub"),)
    assert handed_paths(Task(noop), str(job / "sub")) == (str(job / "sub"),)


def test_inner_paths_are_dropped(job: Path) -> None:
    assert handed(str(job / "sub"), str(job / "in.docx")) == (str(job),)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the task side is Linux's")
def test_the_task_side_opens_no_symlink(job: Path) -> None:
    """A path checked by the manager, then swapped for a symlink before the task's side opens
    it: the walk refuses it instead of following."""
    from sandboxrun._isolation import _idmap

    fd = _idmap.open_path(str(job / "sub"))
    os.close(fd)
    (job / "sub").rmdir()
    (job / "sub").symlink_to("/etc")
    with pytest.raises(OSError):
        os.close(_idmap.open_path(str(job / "sub")))
    with pytest.raises(OSError):
        os.close(_idmap.open_path(str(job / "sub" / "passwd")))
