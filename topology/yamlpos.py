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
