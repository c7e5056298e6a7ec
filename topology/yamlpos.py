"""Line numbers for YAML paths, so validation errors can say where they are."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import yaml

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when PyYAML has it


def compose_with_lines(text: str) -> yaml.Node | None:
    return yaml.compose(text, Loader=_Loader)


def load_with_lines(text: str) -> tuple[yaml.Node | None, object]:
    """Parse once: the node tree (for line numbers) and the plain data built from it."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    finally:
        loader.dispose()
    return node, data


def line_of(root: yaml.Node | None, loc: Sequence[Any]) -> int:
    """1-based line of the deepest node along ``loc`` that exists in the document."""
    node = root
    line = (node.start_mark.line + 1) if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if str(key.value) == str(part):
                    line = key.start_mark.line + 1
                    node = value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def yaml_problem(path: str, exc: yaml.YAMLError) -> str:
    """``file:line: YAML syntax error: ...`` for a parse failure."""
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark else 1
    return f"{path}:{line}: YAML syntax error: {getattr(exc, 'problem', exc)}"


# pydantic names union members and validators in an error's location; not YAML keys
_NOT_KEYS = ("str", "int", "bool")


def validation_problems(path: str, root: yaml.Node | None, errors: list[dict[str, Any]],
                        aliases: dict[str, str] | None = None) -> list[str]:
    """pydantic errors as ``file:line: field.path: reason``, each once, in order."""
    aliases = aliases or {}
    problems: list[str] = []
    for err in errors:
        loc = tuple(aliases.get(p, p) if isinstance(p, str) else p for p in err["loc"])
        loc = tuple(p for p in loc if not (isinstance(p, str) and (
            p.startswith(("list[", "function-")) or p in _NOT_KEYS)))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "required field is missing"
        where = ".".join(str(p) for p in loc) or "(top level)"
        problem = f"{path}:{line_of(root, loc)}: {where}: {msg}"
        if problem not in problems:
            problems.append(problem)
    return problems
