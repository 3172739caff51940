"""``--cmd``: split like a shell would (no shell runs), checked once, filled per argument.

Two ways a file name could steer the command, both closed here:
- a placeholder is plain substitution: no format spec, conversion, attribute or index
  (``{input:>99999999999}`` would allocate without bound, ``{input.attr}`` look up attributes);
- an argument that *starts* with a file's value never starts with ``-``: ``./`` goes first, so a
  file called ``--use-compress-program=touch INJ`` or ``-n`` reaches the tool as a path
  (``./--use-compress-program=touch INJ``), never as an option.
"""

from __future__ import annotations

import shlex
import string
from pathlib import Path

PLACEHOLDERS = ("input", "output", "name", "stem", "out_dir")
_FORMATTER = string.Formatter()


def parse_template(template: str) -> list[str]:
    """The template's argv; ``ValueError`` with a one-line reason when it is not usable."""
    try:
        argv = shlex.split(template)
    except ValueError as error:
        raise ValueError(f"--cmd: {error}") from None
    if not argv:
        raise ValueError("--cmd is empty")
    for arg in argv:
        _check_argument(arg)
    return argv


def _check_argument(arg: str) -> None:
    try:
        fields = list(_FORMATTER.parse(arg))
    except ValueError as error:  # a lone "{" or "}"
        raise ValueError(
            f"--cmd: {error} in {arg!r} (write {{{{ or }}}} for a literal brace)"
        ) from None
    for _, field, spec, conversion in fields:
        if field is None:
            continue
        bare = field.split(".", 1)[0].split("[", 1)[0]
        if bare in PLACEHOLDERS and (spec or conversion or field != bare):
            raise ValueError(
                f"--cmd: placeholders take no format spec, conversion, attribute or index:"
                f" write {{{bare}}} instead of {arg!r}"
            )
        if field not in PLACEHOLDERS:
            raise ValueError(
                f"--cmd: unknown placeholder {{{field}}}; use {', '.join(PLACEHOLDERS)}"
            )
        if spec or conversion:  # e.g. a spec that itself holds a nested placeholder
            raise ValueError(f"--cmd: placeholders take no format spec or conversion: {arg!r}")


def writes_output(template: list[str]) -> bool:
    """Whether the command is told where to write (``{output}`` or ``{out_dir}``): then a
    success that leaves no file there is not a success."""
    fields = {field for arg in template for _, field, _, _ in _FORMATTER.parse(arg)}
    return bool(fields & {"output", "out_dir"})


def command_for(template: list[str], input_dir: Path, out_dir: Path, relative: Path) -> list[str]:
    """One file's argv: each argument filled on its own, so a name can never add arguments.
    ``out_dir``: where the command writes (the batch passes the file's staging folder)."""
    values = {
        "input": str(input_dir / relative),
        "output": str(out_dir / relative),
        "name": relative.name,
        "stem": relative.stem,
        "out_dir": str(out_dir),
    }
    return [_fill(arg, values) for arg in template]


def _fill(arg: str, values: dict[str, str]) -> str:
    parts = []
    for literal, field, _, _ in _FORMATTER.parse(arg):
        parts.append(literal)
        if field is not None:
            value = values[field]
            if not "".join(parts) and value.startswith("-"):
                value = "./" + value  # the argument would start with "-": make it a path
            parts.append(value)
    return "".join(parts)
