"""Glasswall drop-in behaviour (issue 13): policies as text, a plain Task, the seed's reprs,
``sandboxrun.multiprocessing`` and a cgroup-aware ``get_available_memory_gib``."""

from __future__ import annotations

import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from sandboxrun import ProcessManager
from sandboxrun._backends import cgroupfs
from sandboxrun.multiprocessing import GlasswallProcessManager, Task, TaskResult, memory_usage

from . import tasks

MIB = 1024**2
GIB = 1024**3
START_METHODS = multiprocessing.get_all_start_methods()

# --- point 5: Glasswall policy objects travel as their XML text ---------------------------------

# A stand-in for glasswall.content_management.policies, written to disk so that spawn and
# forkserver workers can import it too. Like the real Policy it looks names up in its own
# config_elements from __getattr__, so unpickling one (no instance dict yet) recurses forever.
FAKE_POLICY = """
class Policy:
    def __init__(self, default="sanitise"):
        self.config_elements = [default]

    def __getattr__(self, name):
        for element in self.config_elements:
            if element == name:
                return element
        raise AttributeError(name)

    @property
    def text(self):
        body = "".join(f"<{e}/>" for e in self.config_elements)
        return f'<?xml version="1.0" encoding="utf-8"?><config>{body}</config>'
"""
FAKE_EDITOR = """
from glasswall.content_management.policies.policy import Policy

class Editor(Policy):
    pass
"""
EDITOR_TEXT = '<?xml version="1.0" encoding="utf-8"?><config><sanitise/></config>'


@pytest.fixture
def fake_glasswall(tmp_path, monkeypatch):
    """The stand-in package importable here and in workers; gone from sys.modules after."""
    package = tmp_path / "site" / "glasswall" / "content_management" / "policies"
    package.mkdir(parents=True)
    for level in (package.parent.parent, package.parent, package):
        (level / "__init__.py").write_text("")
    (package / "policy.py").write_text(FAKE_POLICY)
    (package / "editor.py").write_text(FAKE_EDITOR)
    site = str(tmp_path / "site")
    monkeypatch.syspath_prepend(site)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [site, os.environ.get("PYTHONPATH")]))
    )
    import glasswall.content_management.policies.editor as editor

    yield editor
    for name in [name for name in sys.modules if name.split(".")[0] == "glasswall"]:
        del sys.modules[name]


def test_policy_objects_become_their_text(fake_glasswall):
    policy = fake_glasswall.Editor()
    assert type(policy).__module__ == "glasswall.content_management.policies.editor"

    class MyEditor(fake_glasswall.Editor):  # a user's own subclass: upstream isinstance sees it
        pass

    class LookAlike:  # has .text but is no Glasswall policy: left alone
        text = "not xml"

    look_alike = LookAlike()
    task = Task(
        tasks.identity,
        args=[policy, 1, look_alike],
        kwargs={"content_management_policy": MyEditor()},
    )
    assert task.args == (EDITOR_TEXT, 1, look_alike)
    assert task.kwargs == {"content_management_policy": EDITOR_TEXT}
    assert Task(tasks.identity, (policy,)) == Task(tasks.identity, (EDITOR_TEXT,))


@pytest.mark.parametrize("method", START_METHODS)
def test_policy_reaches_the_worker_as_text(fake_glasswall, method):
    # Before: RecursionError in a spawn/forkserver worker; under fork the function got the object.
    policy = fake_glasswall.Editor()
    with ProcessManager(1, start_method=method, worker_timeout_seconds=60, isolation="none") as pm:
        pm.queue_task(Task(tasks.identity, kwargs={"x": policy}))
        pm.queue_task(Task(tasks.identity, args=(policy,)))
    assert [r.exception for r in pm.task_results] == [None, None]
    assert [r.result for r in pm.task_results] == [EDITOR_TEXT, EDITOR_TEXT]


# --- point 6: Task is a plain object; any iterable args -----------------------------------------


def test_task_is_a_plain_object():
    task = Task(tasks.double, (2,), {"n": 3})
    task.label = "invoice.pdf"
    assert vars(task) == {
        "func": tasks.double,
        "args": (2,),
        "kwargs": {"n": 3},
        "label": "invoice.pdf",
    }
    task.args = (5,)  # reassigning a field works as well
    copy = pickle.loads(pickle.dumps(task))
    assert copy == task and hash(copy) == hash(task)
    assert copy.label == "invoice.pdf" and copy.args == (5,)
    assert repr(copy) == repr(task) == "Task(func=double, args=(5), kwargs=(n=3))"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((x for x in (1, 2)), (1, 2)),
        ({7}, (7,)),
        (range(3), (0, 1, 2)),
        ({"a": 1}.keys(), ("a",)),
        ([4, 5], (4, 5)),
        (iter(()), ()),
    ],
    ids=["generator", "set", "range", "dict_keys", "list", "empty-iterator"],
)
def test_any_iterable_args(args, expected):
    task = Task(tasks.identity, args)
    assert task.args == expected and type(task.args) is tuple


def test_args_that_are_not_arguments_still_raise_early():
    with pytest.raises(TypeError, match="iterable"):
        Task(tasks.identity, 5)
    with pytest.raises(TypeError, match=r"args=\('abc',\)"):  # one string: a slip for (text,)
        Task(tasks.identity, "abc")
    with pytest.raises(TypeError, match="callable"):  # deliberate: Glasswall fails in the worker
        Task(None)


def test_generator_args_and_attributes_reach_the_worker():
    task = Task(tasks.pid_and_value, (x * 3 for x in [7]))
    task.label = "kept"
    with GlasswallProcessManager(1, worker_timeout_seconds=60) as pm:
        pm.queue_task(task)
    (result,) = pm.task_results
    assert result.success and result.result[1] == 21 and result.result[0] != os.getpid()
    assert result.task.label == "kept"


# --- point 8: reprs character for character -------------------------------------------------------


def test_task_repr_cuts_each_argument_at_100_characters_then_dots():
    def worker_function(*args, **kwargs):  # a local function: Glasswall prints __name__
        return None

    long = "a" * 150
    task = Task(worker_function, ("b" * 98, 12), {"input_file": long})
    expected_long = "'" + "a" * 99 + "..."
    assert repr(task) == (
        f"Task(func=worker_function, args=('{'b' * 98}', 12), kwargs=(input_file={expected_long}))"
    )
    exactly_100 = "c" * 98  # its repr is 100 characters: not cut
    assert repr(Task(worker_function, (exactly_100,))).endswith(
        f"args=('{exactly_100}'), kwargs=())"
    )


SEED_LINE = (
    r"TaskResult(task=Task(func=worker_function, args=(), kwargs=(input_file='C:\\gwpw\\input"
    r"\\TestFile_11.doc', outp..., success=True, result=None, exception=None, exit_code=0, "
    r"timeout_seconds=5, memory_limit_in_gib=4, start_time=1710507465.3883162, "
    r"end_time=1710507466.5565898, elapsed_time=1.168273687362671, timed_out=False, "
    r"max_memory_used_in_gib=0.06385421752929688, out_of_memory=False)"
)
SEED_BYTES_LINE = (
    r"TaskResult(task=Task(func=worker_function, args=(), kwargs=(input_file='C:\\gwpw\\input"
    r"\\TestFile_11.doc', cont..., success=True, result=b'PK\x03\x04\x14\x00\x0e\x00\x08\x00"
    r"\xceloX\xc7\x95\x89\xba\xce\x07\x00\x00-\x19\x00\x00\x19\..., exception=None, "
    r"exit_code=0, timeout_seconds=5, memory_limit_in_gib=4, start_time=1710509905.3188772, "
    r"end_time=1710509908.5976403, elapsed_time=3.2787630558013916, timed_out=False, "
    r"max_memory_used_in_gib=0.06348419189453125, out_of_memory=False)"
)
OWN_FIELDS = (
    ", cpu_time_used_seconds=None, cpu_time_limit_exceeded=False, process_limit_exceeded=False,"
    " backend='', cpu_throttled_periods=None, cpu_throttled_seconds=None, isolation='')"
)


def _seed_result(kwargs, result, start, end, elapsed, peak):
    def worker_function(*args, **kwargs):
        return None

    return TaskResult(
        task=Task(func=worker_function, args=tuple(), kwargs=kwargs),
        success=True, result=result, exception=None, exit_code=0,
        timeout_seconds=5, memory_limit_in_gib=4,
        start_time=start, end_time=end, elapsed_time=elapsed,
        timed_out=False, max_memory_used_in_gib=peak, out_of_memory=False,
    )  # fmt: skip


def test_task_result_repr_matches_the_seed_output(fake_glasswall):
    policy = fake_glasswall.Editor()
    first = _seed_result(
        {
            "input_file": "C:\\gwpw\\input\\TestFile_11.doc",
            "output_file": "C:\\gwpw\\output\\editor\\multiprocessing\\TestFile_11.doc.zip",
            "content_management_policy": policy,
        },
        None, 1710507465.3883162, 1710507466.5565898, 1.168273687362671, 0.06385421752929688,
    )  # fmt: skip
    assert repr(first) == SEED_LINE[:-1] + OWN_FIELDS
    # The third example: file-to-memory, the export zip's bytes as the result.
    zip_head = b"PK\x03\x04\x14\x00\x0e\x00\x08\x00\xceloX\xc7\x95\x89\xba\xce\x07"
    zip_head += b"\x00\x00-\x19\x00\x00\x19"
    third = _seed_result(
        {"input_file": "C:\\gwpw\\input\\TestFile_11.doc", "content_management_policy": policy},
        zip_head + b"\x00" * 97_000, 1710509905.3188772, 1710509908.5976403, 3.2787630558013916,
        0.06348419189453125,
    )  # fmt: skip
    assert repr(third) == SEED_BYTES_LINE[:-1] + OWN_FIELDS


def test_task_result_repr_keeps_the_seed_quirk_near_100_characters():
    # Glasswall cuts "name=repr" at 100 but adds "..." only when the repr alone exceeds 100.
    short_cut = TaskResult(task=Task(tasks.identity), success=True, result="r" * 96)  # repr: 98
    assert f", result='{'r' * 92}, exception=None," in repr(short_cut)
    long_cut = TaskResult(task=Task(tasks.identity), success=True, result="r" * 99)  # repr: 101
    assert f", result='{'r' * 92}..., exception=None," in repr(long_cut)


# --- point 9: sandboxrun.multiprocessing and get_available_memory_gib ---------------------------


def test_the_subpackage_mirrors_glasswall_multiprocessing():
    import sandboxrun
    import sandboxrun._manager as manager
    import sandboxrun.multiprocessing as ours

    assert ours.GlasswallProcessManager is ours.ProcessManager is sandboxrun.ProcessManager
    assert ours.Task is sandboxrun.Task and ours.TaskResult is sandboxrun.TaskResult
    # Our own modules still get the standard library's multiprocessing, not this subpackage.
    assert manager.multiprocessing is multiprocessing
    assert Path(multiprocessing.__file__).parent.parent == Path(os.__file__).parent
    assert sys.modules["multiprocessing"] is not ours


def _fake_hierarchy(tmp_path, monkeypatch, own, mounts):
    """Point cgroupfs at a fake /proc/self/cgroup and mountinfo; return the fake mount points."""
    (tmp_path / "cgroup").write_text(
        "".join(f"{n}:{key}:{path}\n" for n, (key, path) in enumerate(own))
    )
    lines, points = [], {}
    for n, (fstype, options) in enumerate(mounts):
        point = tmp_path / "fs" / f"{fstype}{n}"
        point.mkdir(parents=True)
        points[options] = point
        lines.append(
            f"{30 + n} 23 0:{40 + n} / {point} rw,relatime - {fstype} {fstype} rw,{options}\n"
        )
    (tmp_path / "mountinfo").write_text("".join(lines))
    monkeypatch.setattr(cgroupfs, "PROC_SELF_CGROUP", tmp_path / "cgroup")
    monkeypatch.setattr(cgroupfs, "CGROUP_MOUNTS", tmp_path / "mountinfo")
    return points


def _files(directory: Path, **files: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name.replace("_", ".", 1)).write_text(text + "\n")


def test_v2_tightest_ancestor_counts_and_inactive_file_is_free(tmp_path, monkeypatch):
    points = _fake_hierarchy(
        tmp_path, monkeypatch, [("", "/service/runner")], [("cgroup2", "nsdelegate")]
    )
    root = points["nsdelegate"]
    _files(root, memory_stat="inactive_file 0")  # the root has no memory.max: skipped
    _files(
        root / "service",
        memory_max=str(GIB),
        memory_current=str(600 * MIB),
        memory_stat="inactive_file 0",
    )
    _files(root / "service" / "runner", memory_max="max", memory_current=str(100 * MIB))
    assert memory_usage.cgroup_headroom_bytes() == GIB - 600 * MIB
    assert memory_usage.get_available_memory_bytes() == min(
        psutil.virtual_memory().available, GIB - 600 * MIB
    )
    _files(root / "service", memory_stat=f"anon 1\ninactive_file {100 * MIB}")
    assert memory_usage.cgroup_headroom_bytes() == GIB - 500 * MIB
    _files(root / "service" / "runner", memory_high=str(300 * MIB))  # throttles above it
    assert memory_usage.cgroup_headroom_bytes() == 200 * MIB
    assert memory_usage.get_available_memory_gib() == pytest.approx(200 / 1024)
    _files(root / "service", memory_current=str(2 * GIB))  # over the limit: nothing left, not < 0
    assert memory_usage.cgroup_headroom_bytes() == 0


def test_v1_unlimited_is_ignored_and_a_limit_counts(tmp_path, monkeypatch):
    own = [("memory", "/process_api/job"), ("cpu,cpuacct", "/"), ("", "/")]
    points = _fake_hierarchy(
        tmp_path,
        monkeypatch,
        own,
        [("cgroup", "memory"), ("cgroup", "cpu,cpuacct"), ("cgroup2", "x")],
    )
    memory = points["memory"]
    unlimited = "9223372036854771712"  # v1's "no limit", page-rounded
    for level in (memory, memory / "process_api", memory / "process_api" / "job"):
        _files(level, memory_limit_in_bytes=unlimited, memory_usage_in_bytes=str(50 * MIB))
    assert memory_usage.cgroup_headroom_bytes() is None
    # With no limit anywhere the answer is the host's, as in Glasswall.
    host = psutil.virtual_memory().available
    assert abs(memory_usage.get_available_memory_bytes() - host) < 256 * MIB
    _files(
        memory / "process_api",
        memory_limit_in_bytes=str(256 * MIB),
        memory_usage_in_bytes=str(56 * MIB),
    )
    _files(memory / "process_api", memory_stat=f"cache 5\ntotal_inactive_file {10 * MIB}")
    assert memory_usage.cgroup_headroom_bytes() == 210 * MIB
    assert memory_usage.get_available_memory_gib() == pytest.approx(210 / 1024)


def test_a_container_without_cgroup_namespace_uses_the_visible_tail(tmp_path, monkeypatch):
    # /proc/self/cgroup names the host path; the container's mount shows only its own subtree.
    points = _fake_hierarchy(
        tmp_path, monkeypatch, [("memory", "/docker/abc123/app")], [("cgroup", "memory")]
    )
    memory = points["memory"]
    _files(memory, memory_limit_in_bytes=str(GIB), memory_usage_in_bytes=str(100 * MIB))
    _files(
        memory / "app", memory_limit_in_bytes=str(512 * MIB), memory_usage_in_bytes=str(12 * MIB)
    )
    assert memory_usage.cgroup_headroom_bytes() == 500 * MIB
    (memory / "app" / "memory.limit_in_bytes").unlink()
    assert memory_usage.cgroup_headroom_bytes() == GIB - 100 * MIB  # the container's own limit


def _own_v1_memory_cgroup() -> Path | None:
    own = cgroupfs.own_cgroups()
    key = next((k for k in own if "memory" in k.split(",")), None)
    point = next((p for t, p, o in cgroupfs.mounts() if t == "cgroup" and "memory" in o), None)
    if key is None or point is None:
        return None
    directory = point / own[key].lstrip("/")
    return directory if (directory / "memory.limit_in_bytes").is_file() else None


@pytest.mark.timeout(60)
def test_real_v1_memory_cgroup_limit_is_reported(tmp_path):
    parent = _own_v1_memory_cgroup()
    if parent is None or not os.access(parent, os.W_OK):
        pytest.skip("no writable cgroup v1 memory hierarchy for this process")
    child = parent / f"gwcompat-{os.getpid()}-{os.urandom(3).hex()}"
    child.mkdir()
    try:
        (child / "memory.limit_in_bytes").write_text(str(512 * MIB))
        code = textwrap.dedent(f"""
            import os
            with open({str(child / "cgroup.procs")!r}, "w") as procs:
                procs.write(str(os.getpid()))
            from sandboxrun.multiprocessing.memory_usage import get_available_memory_gib
            print(get_available_memory_gib())
        """)
        # The child imports exactly what this test imports (same sys.path, same site setting).
        flags = ["-S"] if sys.flags.no_site else []
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        done = subprocess.run(
            [sys.executable, *flags, "-c", code],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert done.returncode == 0, done.stderr
        reported = float(done.stdout)
    finally:
        cgroupfs.remove(child)
    assert not child.exists()
    assert 0.3 < reported <= 0.5, reported  # Glasswall's answer: the host's available memory
