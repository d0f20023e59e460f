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
from yaml.composer import Composer, ComposerError

from sip_refuge.config.files import MAX_SITE_BYTES, control_character, printable, read_regular
from sip_refuge.errors import ConfigError, Problem, RefugeError

MAX_DEPTH = 32  # a site file nests 5 levels deep
MAX_ALIASES = 10_000  # a generated site file may share a block (gpio, location) between many posts
MAX_VALUES = 100_000  # every value, aliases expanded: the example site has about 250
_MAP, _SEQ = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq"


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
    """Parse ``path``; raise :class:`ConfigError` naming the line for unreadable or invalid YAML.

    The file is read only if it is a regular file of at most :data:`MAX_SITE_BYTES`, and the YAML is
    held to :data:`MAX_DEPTH` levels, :data:`MAX_ALIASES` aliases and :data:`MAX_VALUES` values (counted
    after aliases are expanded), so no file makes the reader recurse, hang or fill the memory.
    """
    name = printable(str(path))
    try:
        data = read_regular(path, limit=MAX_SITE_BYTES, what="site file", follow_link=True)
    except RefugeError as exc:
        raise ConfigError([Problem(name, 1, "(file)", str(exc))]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError([Problem(name, line, "(file)", "is not UTF-8 text")]) from None
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        problem = f"{exc.problem or exc.context}"
        if "maximum nesting depth" in problem:  # libyaml's own limit (1000) came before ours: say ours
            problem = f"nested deeper than {MAX_DEPTH} levels"
        raise ConfigError([Problem(name, line, "(yaml)", problem)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(name, 1, "(yaml)", str(exc))]) from None
    finally:
        loader.dispose()
    src = Source(name, None, {"": 1})
    problems: list[Problem] = []
    if node is not None:
        src.data = _Builder(src, loader, problems).value(node, "", 0)
    if problems:
        raise ConfigError(problems)
    return src


# libyaml's scanner and parser when PyYAML has them (its wheels do): the pure-Python ones took about 4 s of
# the 6 s a 1,000-post site file took to load. The node tree is still composed here, in Python, so the limits
# below hold whichever parser reads the file.
# Composer goes first so its Python compose_node (below) replaces libyaml's own composer; without libyaml,
# SafeLoader already has it (listing it again there would be an impossible method order).
_Parser: Any = getattr(yaml, "CSafeLoader", None)
_Base: Any = type("_Base", (Composer, _Parser), {}) if _Parser is not None else yaml.SafeLoader
_Parser = _Parser or yaml.SafeLoader


class _Loader(_Base):  # type: ignore[misc]
    """PyYAML's safe loader, held to the limits while it builds the node tree (it recurses per level)."""

    def __init__(self, text: str) -> None:
        _Parser.__init__(self, text)
        Composer.__init__(self)  # type: ignore[no-untyped-call]
        self.depth = self.nodes = self.aliases = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        mark = self.peek_event().start_mark  # type: ignore[no-untyped-call]
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > MAX_ALIASES:
                raise ComposerError(None, None, f"more than {MAX_ALIASES} aliases (*name) in one file", mark)
            alias: yaml.Node | None = super().compose_node(parent, index)
            return alias
        self.nodes += 1
        if self.nodes > MAX_VALUES:
            raise ComposerError(None, None, f"more than {MAX_VALUES} values in one file", mark)
        if self.depth >= MAX_DEPTH:
            raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", mark)
        self.depth += 1
        try:
            node: yaml.Node | None = super().compose_node(parent, index)
            return node
        finally:
            self.depth -= 1


class _Builder:
    """Plain values from the node tree; aliases are expanded here, so the limits are checked again."""

    def __init__(self, src: Source, loader: _Loader, problems: list[Problem]) -> None:
        self.src, self.loader, self.problems = src, loader, problems
        self.values = 0

    def fail(self, node: yaml.Node, path: str, message: str) -> None:
        self.problems.append(Problem(self.src.file, node.start_mark.line + 1, path or "(top)", message))

    def value(self, node: yaml.Node, path: str, depth: int) -> Any:
        self.values += 1
        if self.values > MAX_VALUES or depth > MAX_DEPTH:
            # Only aliases get here (the loader counted the rest): a "billion laughs" or a loop. An aliased
            # node's own line is its anchor's; the top-level key shows where the expansion was asked for.
            top = path.split(".", 1)[0].split("[", 1)[0]
            raise ConfigError([*self.problems, Problem(
                self.src.file, self.src.lines.get(top, node.start_mark.line + 1), path or "(top)",
                f"aliases expand to more than {MAX_VALUES} values or {MAX_DEPTH} levels")])
        self.src.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.CollectionNode) and node.tag not in (_MAP, _SEQ):
            self.fail(node, path, f"cannot read this value: the tag {node.tag} is not allowed in a site file")
            return None
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            return [self.value(item, join(path, i), depth + 1) for i, item in enumerate(node.value)]
        # Scalars: let PyYAML's resolver give ints, floats, bools and nulls their usual types.
        try:
            return self.loader.construct_object(node)  # type: ignore[no-untyped-call]
        except (yaml.YAMLError, ValueError, OverflowError) as exc:
            # An int of 5000 digits, a date like 2024-13-45, an unknown !tag: a mistake, not a crash.
            reason = exc.problem if isinstance(exc, yaml.MarkedYAMLError) else str(exc).split(";")[0]
            self.fail(node, path, f"cannot read this value: {reason}")
            return None

    def mapping(self, node: yaml.MappingNode, path: str, depth: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                self.fail(key_node, path, "keys must be plain names")
                continue
            key = str(key_node.value)
            bad = control_character(key)
            if bad:
                self.fail(key_node, path, f"a key holds a control character ({bad})")
                continue
            child = join(path, key)
            if key in out:
                self.fail(key_node, child, f"duplicate key (first given on line {self.src.lines[child]})")
                continue
            self.src.lines[child] = key_node.start_mark.line + 1
            out[key] = self.value(value_node, child, depth + 1)
        return out
