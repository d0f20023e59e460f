"""Read a YAML site file into plain values while remembering where every value came from.

PyYAML builds plain dicts and loses line numbers; we compose the node tree ourselves so that every
mistake can be reported as ``FILE:LINE: dotted.path: message``. Duplicate keys, which PyYAML would
silently overwrite, are reported too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sip_refuge.errors import ConfigError, Problem


@dataclass
class Source:
    """Plain values of one YAML file plus the line of every dotted path in it."""

    file: str
    data: Any
    lines: dict[str, int] = field(default_factory=dict)

    def line(self, path: str) -> int:
        """The line of ``path`` or of its nearest ancestor that is in the file (1 when none is)."""
        while path:
            if path in self.lines:
                return self.lines[path]
            cut = max(path.rfind("."), path.rfind("["))
            path = path[:cut] if cut > 0 else ""
        return self.lines.get("", 1)

    def problem(self, path: str, message: str) -> Problem:
        return Problem(self.file, self.line(path), path or "(top)", message)


def join(path: str, key: str | int) -> str:
    """Child path: ``a.b`` + ``c`` -> ``a.b.c``; ``a`` + 0 -> ``a[0]``."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def load_yaml(path: Path) -> Source:
    """Parse ``path``; raise :class:`ConfigError` naming the line for unreadable or invalid YAML."""
    name = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(name, 1, "(file)", f"cannot read: {exc.strerror or exc}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([Problem(name, 1, "(file)", "is not UTF-8 text")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        raise ConfigError([Problem(name, line, "(yaml)", f"{exc.problem or exc.context}")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(name, 1, "(yaml)", str(exc))]) from None
    src = Source(name, None, {"": 1})
    problems: list[Problem] = []
    if node is not None:
        src.data = _value(node, "", src, problems)
    if problems:
        raise ConfigError(problems)
    return src


def _value(node: yaml.Node, path: str, src: Source, problems: list[Problem]) -> Any:
    src.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(Problem(src.file, key_node.start_mark.line + 1, path or "(top)",
                                        "keys must be plain names"))
                continue
            key = str(key_node.value)
            child = join(path, key)
            if key in out:
                problems.append(Problem(src.file, key_node.start_mark.line + 1, child,
                                        f"duplicate key (first given on line {src.lines[child]})"))
                continue
            src.lines[child] = key_node.start_mark.line + 1
            out[key] = _value(value_node, child, src, problems)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_value(item, join(path, i), src, problems) for i, item in enumerate(node.value)]
    # Scalars: let PyYAML's resolver give ints, floats, bools and nulls their usual types.
    return _CONSTRUCTOR.construct_object(node)


_CONSTRUCTOR = yaml.SafeLoader("")
