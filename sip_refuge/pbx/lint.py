"""Lint the dialplan Asterisk really loaded (``dialplan show``), not the file text.

Asterisk accepts a ``Goto`` into a context that does not exist and an application whose module is not
loaded; both only fail when a call reaches them, which for an emergency post is the worst moment. So
``asterisk check`` reads back what Asterisk parsed and follows every jump by itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_CONTEXT = re.compile(r"^\[ Context '(?P<name>[^']+)' created by '[^']*' \]$")
_EXTEN = re.compile(r"^\s+'(?P<exten>[^']*)'\s+(?:\(CID match '[^']*'\)\s+)?=>\s+(?P<rest>.*)$")
_LABEL = re.compile(r"^\s+\[(?P<label>[^\]]+)\]\s+(?P<rest>\d+\..*)$")
_CONTINUED = re.compile(r"^\s+(?P<rest>\d+\..*)$")
_INCLUDE = re.compile(r"^\s+Include =>\s+'(?P<name>[^']+)'")
_PRIORITY = re.compile(r"^(?P<number>\d+)\.\s+(?P<app>[A-Za-z0-9_]+)\((?P<args>.*)\)\s+\[(?P<where>[^\[\]]*)\]\s*$")
_APPLICATION = re.compile(r"^\s*([A-Za-z0-9_]+):\s")
_FUNCTION_LINE = re.compile(r"^([A-Z0-9_]+)\s+\S")
_FUNCTION_USE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\(")
_SET_FUNCTION = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\(")
_DIAL_JUMPS = "bBFU"  # Dial options that run dialplan: b/B/U gosubs, F continues the called party


@dataclass
class Priority:
    context: str
    exten: str
    number: int
    app: str
    args: str
    where: str  # file:line Asterisk read it from

    def __str__(self) -> str:
        return f"{self.where}: context '{self.context}', extension '{self.exten}', priority {self.number}"


@dataclass
class Extension:
    priorities: dict[int, Priority] = field(default_factory=dict)
    labels: dict[str, int] = field(default_factory=dict)


@dataclass
class Context:
    name: str
    extensions: dict[str, Extension] = field(default_factory=dict)
    includes: list[str] = field(default_factory=list)


def parse_dialplan(text: str) -> dict[str, Context]:
    """``dialplan show`` output -> contexts with their extensions, priorities, labels and includes."""
    contexts: dict[str, Context] = {}
    ctx: Context | None = None
    ext: Extension | None = None
    exten = ""
    for line in text.splitlines():
        if m := _CONTEXT.match(line):
            ctx = contexts.setdefault(m["name"], Context(m["name"]))
            ext = None
            continue
        if ctx is None:
            continue
        label = None
        if m := _INCLUDE.match(line):
            ctx.includes.append(m["name"])
            continue
        if m := _EXTEN.match(line):
            exten = m["exten"]
            ext = ctx.extensions.setdefault(exten, Extension())
            rest = m["rest"]
        elif (m := _LABEL.match(line)) and ext is not None:
            label, rest = m["label"], m["rest"]
        elif (m := _CONTINUED.match(line)) and ext is not None:
            rest = m["rest"]
        else:
            continue
        if ext is None or not (p := _PRIORITY.match(rest.strip())):
            continue  # a hint line, or an application with no argument list
        number = int(p["number"])
        ext.priorities[number] = Priority(ctx.name, exten, number, p["app"], p["args"], p["where"])
        if label:
            ext.labels[label] = number
    return contexts


def parse_applications(text: str) -> set[str]:
    """``core show applications`` -> lower-case application names."""
    return {m.group(1).lower() for line in text.splitlines() if (m := _APPLICATION.match(line))}


def parse_functions(text: str) -> set[str]:
    """``core show functions`` -> upper-case function names."""
    return {m.group(1).upper() for line in text.splitlines() if (m := _FUNCTION_LINE.match(line))}


def pattern_matches(pattern: str, exten: str) -> bool:
    """Asterisk extension matching: literal names, or ``_`` patterns with X Z N [..] . !"""
    if not pattern.startswith("_"):
        return pattern == exten
    regex, i, body = "", 0, pattern[1:]
    while i < len(body):
        c = body[i]
        if c in "xX":
            regex += "[0-9]"
        elif c in "zZ":
            regex += "[1-9]"
        elif c in "nN":
            regex += "[2-9]"
        elif c == ".":
            regex += ".+"
        elif c == "!":
            regex += ".*"
        elif c == "[" and "]" in body[i:]:
            end = body.index("]", i)
            regex += "[" + re.escape(body[i + 1:end]).replace("\\-", "-") + "]"
            i = end
        else:
            regex += re.escape(c)
        i += 1
    return re.fullmatch(regex, exten) is not None


def split_top(text: str, separators: str, limit: int = -1) -> list[str]:
    """Split on separators outside ${...}, $[...] and (...), as Asterisk's argument parser does."""
    parts: list[str] = []
    depth = start = 0
    for i, c in enumerate(text):
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth = max(0, depth - 1)
        elif c in separators and depth == 0 and (limit < 0 or len(parts) < limit):
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


class Linter:
    def __init__(self, dialplan: dict[str, Context], applications: set[str], functions: set[str] | None = None) -> None:
        self.dialplan, self.applications, self.functions = dialplan, applications, functions

    def lint(self, contexts: list[str] | None = None) -> list[str]:
        """One message per problem in ``contexts`` (every context when None)."""
        problems: list[str] = []
        for name in contexts if contexts is not None else sorted(self.dialplan):
            ctx = self.dialplan.get(name)
            if ctx is None:
                problems.append(f"dialplan: context '{name}' is missing from `dialplan show`")
                continue
            for include in ctx.includes:
                if include not in self.dialplan:
                    problems.append(f"dialplan: context '{name}' includes missing context '{include}'")
            for ext in ctx.extensions.values():
                for prio in ext.priorities.values():
                    problems += [f"{prio}: {p}" for p in self.priority(prio)]
        return problems

    def priority(self, prio: Priority) -> list[str]:
        app = prio.app.lower()
        if app not in self.applications:
            return [f"unknown application {prio.app}() (its module is not loaded)"]
        problems = self.functions_used(prio)
        if app in ("goto", "gosub"):
            problems += self.jump(prio, prio.args, app)
        elif app in ("gotoif", "gosubif"):
            condition_and_targets = split_top(prio.args, "?", 1)
            if len(condition_and_targets) == 2:
                for target in split_top(condition_and_targets[1], ":", 1):
                    if target.strip():
                        problems += self.jump(prio, target, app)
        elif app == "dial":
            args = split_top(prio.args, ",")
            if len(args) >= 3:
                for letter, value in _options(args[2]):
                    if letter in _DIAL_JUMPS and value:
                        if letter == "U":  # U(context[^args]): a gosub routine starting at s,1
                            problems += self.jump(prio, f"{value.split('^')[0]},s,1", "dial U()")
                        else:
                            problems += self.jump(prio, ",".join(value.split("^")), f"dial {letter}()")
        elif app == "queue":
            args = split_top(prio.args, ",")
            if len(args) >= 7 and args[6].strip():  # the gosub run on the answering desk's channel
                problems += self.jump(prio, args[6].strip(), "queue gosub")
        return problems

    def functions_used(self, prio: Priority) -> list[str]:
        if self.functions is None:
            return []
        names = _FUNCTION_USE.findall(prio.args)
        if prio.app.lower() in ("set", "mset") and (m := _SET_FUNCTION.match(prio.args)):
            names.append(m.group(1))
        return [f"unknown function {n}() (its module is not loaded)" for n in dict.fromkeys(names)
                if n.upper() not in self.functions]

    def jump(self, prio: Priority, target: str, how: str) -> list[str]:
        """Check one ``[[context,]exten,]priority`` target (gosub arguments in parentheses ignored)."""
        parts = [p.strip() for p in split_top(target.strip(), ",")]
        if parts and "(" in parts[-1] and how in ("gosub", "gosubif", "queue gosub", "dial b()", "dial B()"):
            parts[-1] = parts[-1][:parts[-1].index("(")]
        if how == "queue gosub" and len(parts) == 1:  # Queue's gosub argument is a context run at s,1
            parts = [parts[0], "s", "1"]
        if len(parts) == 1:
            context, exten, number = prio.context, prio.exten, parts[0]
        elif len(parts) == 2:
            context, (exten, number) = prio.context, parts
        elif len(parts) == 3:
            context, exten, number = parts
        else:
            return [f"{how} target {target!r} has too many parts"]
        if "$" in context:
            return []  # computed at call time; nothing to check before a call
        if context not in self.dialplan:
            return [f"{how} into missing context '{context}'"]
        if "$" in exten:
            return []
        found = self.find(context, exten, set())
        if not found:
            return [f"{how} into missing extension '{exten}' of context '{context}'"]
        if "$" in number:
            return []
        if number.isdigit():
            if not any(int(number) in ext.priorities for ext in found):
                return [f"{how} into missing priority {number} of '{context},{exten}'"]
        elif not any(number in ext.labels for ext in found):
            return [f"{how} into missing label '{number}' of '{context},{exten}'"]
        return []

    def find(self, context: str, exten: str, seen: set[str]) -> list[Extension]:
        """Extensions of ``context`` (and what it includes) that ``exten`` reaches."""
        ctx = self.dialplan.get(context)
        if ctx is None or context in seen:
            return []
        seen.add(context)
        found = [ext for pattern, ext in ctx.extensions.items() if pattern == exten or pattern_matches(pattern, exten)]
        for include in ctx.includes:
            found += self.find(include, exten, seen)
        return found


def _options(text: str) -> list[tuple[str, str]]:
    """Application options like ``b(ctx^s^1)U(x)r`` -> [(letter, argument)]."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(text):
        letter, value = text[i], ""
        i += 1
        if i < len(text) and text[i] == "(":
            depth, start = 0, i
            while i < len(text):
                depth += {"(": 1, ")": -1}.get(text[i], 0)
                i += 1
                if depth == 0:
                    break
            value = text[start + 1:i - 1]
        out.append((letter, value))
    return out


def lint(dialplan_text: str, applications_text: str, functions_text: str | None = None,
         contexts: list[str] | None = None) -> list[str]:
    """Lint ``dialplan show`` output against what ``core show applications``/``functions`` list."""
    functions = parse_functions(functions_text) if functions_text is not None else None
    return Linter(parse_dialplan(dialplan_text), parse_applications(applications_text), functions).lint(contexts)
