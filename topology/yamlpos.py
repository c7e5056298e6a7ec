"""Reading a config file's YAML safely, and line numbers for YAML paths.

Whatever the bytes of a file, reading it ends in data or in one ``file:line: reason``
(`YamlRefused`): limits are checked before the step they protect. The size before
reading, the characters before parsing, and the nesting depth and the number of nodes
(aliases counted as the nodes they stand for) on libyaml's event stream, which has no
recursion, before the composer, which recurses once per level in C and so crashes the
process on deep nesting, and before the expanded data reaches the validators.

Scalars are resolved as in YAML 1.2's core schema: ``2020-12-05``, ``0755``, ``1:30``
and ``yes`` are strings, not timestamps, octal or base-60 numbers or booleans, so a
field that wants a number or a boolean refuses them instead of taking a coerced value.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.resolver import BaseResolver

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_DEPTH = 32  # collections inside collections; socknet's files need 5
MAX_NODES = 250_000  # scalars and collections, an alias counting as what it stands for
MAX_PROBLEMS = 50  # problems reported for one file; the rest are counted

try:
    from yaml.cyaml import CParser as _CParser  # libyaml when PyYAML has it
except ImportError:  # pragma: no cover
    _CParser = None
_BaseLoader = getattr(yaml, "CBaseLoader", yaml.BaseLoader)
# YAML 1.2 allows these characters in a stream; libyaml refuses the others with an
# error that has no position, so find them first and say where
_NOT_YAML = re.compile("[^\t\n\r\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_STR_TAGS = frozenset({None, "!", "tag:yaml.org,2002:str"})
_COLLECTION_TAGS = {
    yaml.SequenceStartEvent: frozenset({None, "!", "tag:yaml.org,2002:seq"}),
    yaml.MappingStartEvent: frozenset({None, "!", "tag:yaml.org,2002:map"}),
}


# control characters, and what str.splitlines() takes for a line break
_BREAKS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def _escaped(m: re.Match[str]) -> str:
    return m.group().encode("unicode_escape").decode("ascii")


class YamlRefused(yaml.YAMLError):
    """A file refused before or while parsing: the line and the reason."""

    def __init__(self, line: int, reason: str) -> None:
        super().__init__(reason)
        self.line = line
        self.reason = reason


class _CoreResolver(BaseResolver):
    """Implicit types of YAML 1.2's core schema (PyYAML resolves YAML 1.1's)."""


for _tag, _pattern, _first in (
    ("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
    ("int", r"[-+]?(?:0|[1-9][0-9]*)|0x[0-9a-fA-F]+", "-+0123456789"),
    ("float", r"[-+]?(?:\.[0-9]+|[0-9]+\.[0-9]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9]+[eE][-+]?[0-9]+",
     "-+.0123456789"),
    ("null", r"~|null|Null|NULL|", ["~", "n", "N", ""]),
    ("merge", r"<<", "<"),
):
    _CoreResolver.add_implicit_resolver(
        f"tag:yaml.org,2002:{_tag}", re.compile(f"^(?:{_pattern})$"), list(_first))


class _Constructor(SafeConstructor):
    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, OverflowError) as exc:  # e.g. an int of 5000 digits
            raise ConstructorError(None, None, f"cannot read this value: {exc}",
                                   node.start_mark) from None


if _CParser is not None:
    class _Loader(_CParser, _Constructor, _CoreResolver):  # type: ignore[misc,valid-type]
        def __init__(self, stream: str) -> None:
            _CParser.__init__(self, stream)
            _Constructor.__init__(self)
            _CoreResolver.__init__(self)
else:  # pragma: no cover - PyYAML without libyaml
    class _Loader(yaml.reader.Reader, yaml.scanner.Scanner, yaml.parser.Parser,  # type: ignore[no-redef]
                  yaml.composer.Composer, _Constructor, _CoreResolver):
        def __init__(self, stream: str) -> None:
            yaml.reader.Reader.__init__(self, stream)
            yaml.scanner.Scanner.__init__(self)
            yaml.parser.Parser.__init__(self)
            yaml.composer.Composer.__init__(self)
            _Constructor.__init__(self)
            _CoreResolver.__init__(self)


def read_config(path: str | Path) -> str:
    """The text of a config file: a regular file of at most MAX_FILE_BYTES, UTF-8.
    Raises OSError (cannot read) or YamlRefused (not a file, too big, not UTF-8)."""
    # O_NONBLOCK: opening a FIFO waits for a writer, forever in a reload thread
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise YamlRefused(1, "not a regular file")
        chunks, left = [], MAX_FILE_BYTES + 1  # the size as read: a file may still grow
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > MAX_FILE_BYTES:
        raise YamlRefused(1, f"file is larger than {MAX_FILE_BYTES} bytes (the limit)")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise YamlRefused(line, f"not UTF-8 text (byte 0x{data[exc.start]:02x} at "
                                f"offset {exc.start})") from None


def _check_characters(text: str) -> None:
    m = _NOT_YAML.search(text)
    if m is not None:
        line = text.count("\n", 0, m.start()) + 1
        raise YamlRefused(line, f"character U+{ord(m.group()):04X} is not allowed in YAML")


def _check_events(text: str) -> None:
    """Nesting depth, node count and tags, from the event stream alone."""
    # per open collection: [node count at its start, its anchor, depth below it]
    stack: list[list[Any]] = []
    anchors: dict[str, tuple[int, int]] = {}  # anchor -> (nodes, depth) of its node
    nodes = 0

    def placed(depth: int, ev: yaml.Event) -> None:
        """A node of ``depth`` levels goes into the innermost open collection."""
        if len(stack) + depth > MAX_DEPTH:
            raise YamlRefused(ev.start_mark.line + 1,
                              f"nested deeper than {MAX_DEPTH} levels (the limit)")
        if stack and depth > stack[-1][2]:
            stack[-1][2] = depth

    loader = _BaseLoader(text)
    try:
        while loader.check_event():
            ev = loader.get_event()
            kind = type(ev)
            if kind is yaml.ScalarEvent:
                nodes += 1
                if ev.tag not in _STR_TAGS:
                    raise YamlRefused(ev.start_mark.line + 1,
                                      f"YAML tag {ev.tag} is not supported")
                if ev.anchor is not None:
                    anchors[ev.anchor] = (1, 0)
            elif kind in _COLLECTION_TAGS:
                nodes += 1
                if ev.tag not in _COLLECTION_TAGS[kind]:
                    raise YamlRefused(ev.start_mark.line + 1,
                                      f"YAML tag {ev.tag} is not supported")
                placed(1, ev)
                stack.append([nodes - 1, ev.anchor, 0])
            elif kind is yaml.SequenceEndEvent or kind is yaml.MappingEndEvent:
                start, anchor, below = stack.pop()
                if anchor is not None:
                    anchors[anchor] = (nodes - start, below + 1)
                if stack and below + 1 > stack[-1][2]:
                    stack[-1][2] = below + 1
            elif kind is yaml.AliasEvent:
                # unknown anchors are left to the composer, which names them
                size, depth = anchors.get(ev.anchor, (1, 0))
                nodes += size
                placed(depth, ev)
            if nodes > MAX_NODES:
                raise YamlRefused(ev.start_mark.line + 1,
                                  f"more than {MAX_NODES} YAML nodes (the limit; an alias "
                                  "counts as the nodes it stands for)")
    finally:
        loader.dispose()


def load_with_lines(text: str) -> tuple[yaml.Node | None, object]:
    """Parse once (after the checks): the node tree (for line numbers) and the plain
    data built from it. Raises yaml.YAMLError (YamlRefused for a limit)."""
    _check_characters(text)
    _check_events(text)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data


def compose_with_lines(text: str) -> yaml.Node | None:
    return load_with_lines(text)[0]


class LineIndex:
    """line_of() for many paths of one document: each mapping's keys are indexed the
    first time a path goes through it (a linear search per lookup is quadratic for a
    file with thousands of tiers)."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.root = root
        self._keys: dict[int, dict[str, tuple[int, yaml.Node]]] = {}

    def _key(self, node: yaml.MappingNode, part: Any) -> tuple[int, yaml.Node] | None:
        keys = self._keys.get(id(node))
        if keys is None:
            keys = {}
            for key, value in node.value:
                keys.setdefault(str(key.value), (key.start_mark.line + 1, value))
            self._keys[id(node)] = keys
        return keys.get(str(part))

    def line(self, loc: Sequence[Any]) -> int:
        """1-based line of the deepest node along ``loc`` that exists in the document."""
        node = self.root
        line = (node.start_mark.line + 1) if node is not None else 1
        for part in loc:
            if isinstance(node, yaml.MappingNode):
                found = self._key(node, part)
                if found is None:
                    return line
                line, node = found
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
                if not 0 <= part < len(node.value):
                    return line
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                return line
        return line


def line_of(root: yaml.Node | None, loc: Sequence[Any]) -> int:
    """1-based line of the deepest node along ``loc`` that exists in the document."""
    return LineIndex(root).line(loc)


def yaml_problem(path: str, exc: yaml.YAMLError) -> str:
    """``file:line: reason`` for a file refused while reading or parsing."""
    if isinstance(exc, YamlRefused):
        return f"{path}:{exc.line}: {exc.reason}"
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark else 1
    what = "" if isinstance(exc, ConstructorError) else "YAML syntax error: "
    return f"{path}:{line}: {what}{getattr(exc, 'problem', None) or exc}"


def capped(problems: list[str]) -> list[str]:
    """Each problem once, in order, each on one line (a key may hold a line break);
    at most MAX_PROBLEMS and a count of the rest."""
    unique = list(dict.fromkeys(_BREAKS.sub(_escaped, p) for p in problems))
    if len(unique) <= MAX_PROBLEMS + 1:  # a count line would take the last one's place
        return unique
    return [*unique[:MAX_PROBLEMS], f"... and {len(unique) - MAX_PROBLEMS} more problems"]


# pydantic names union members and validators in an error's location; not YAML keys
_NOT_KEYS = ("str", "int", "bool")


def validation_problems(path: str, root: yaml.Node | None,
                        errors: list[dict[str, Any]] | ValidationError,
                        aliases: dict[str, str] | None = None) -> list[str]:
    """pydantic errors as ``file:line: field.path: reason``, each once, in order: the
    first MAX_PROBLEMS of them and a count of the others (a list of 200k numbers where
    strings belong is 200k errors)."""
    if isinstance(errors, ValidationError):
        # the inputs stay out: each error would hold its own (maybe megabytes of) value
        errors = errors.errors(include_url=False, include_input=False, include_context=False)
    aliases = aliases or {}
    lines = LineIndex(root)
    problems: dict[str, None] = {}
    for seen, err in enumerate(errors):
        if len(problems) == MAX_PROBLEMS:
            problems[f"... and {len(errors) - seen} more errors"] = None
            break
        loc = tuple(aliases.get(p, p) if isinstance(p, str) else p for p in err["loc"])
        loc = tuple(p for p in loc if not (isinstance(p, str) and (
            p.startswith(("list[", "function-")) or p in _NOT_KEYS)))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required field is missing"
        where = ".".join(str(p) for p in loc) or "(top level)"
        problems[f"{path}:{lines.line(loc)}: {where}: {msg}"] = None
    return list(problems)
