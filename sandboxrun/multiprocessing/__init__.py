"""``glasswall.multiprocessing``'s names at the same path under sandboxrun.

Changing ``from glasswall.multiprocessing import GlasswallProcessManager, Task`` to
``from sandboxrun.multiprocessing import GlasswallProcessManager, Task`` is the whole migration;
``sandboxrun.multiprocessing.memory_usage.get_available_memory_gib`` is there too.

This subpackage does not shadow the standard library's ``multiprocessing`` for sandboxrun's own
modules: they use absolute imports, which resolve ``multiprocessing`` from ``sys.path``, never
from a sibling package.
"""

from .. import GlasswallProcessManager, ProcessManager, Task, TaskResult

__all__ = ["GlasswallProcessManager", "ProcessManager", "Task", "TaskResult"]
