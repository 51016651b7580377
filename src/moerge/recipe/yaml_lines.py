"""YAML recipes read as untrusted text: plain data only, bounded, with the line of every key and item.

What a recipe may hold is JSON-like data: mappings with plain keys, lists, strings,
numbers, booleans and null, with YAML's anchors, aliases and merge keys
(``<<: *defaults``, as mergekit's loader allows). Everything else is an error
with its line, never a Python exception from deep inside a library:

- text that is not UTF-8, or larger than :data:`MAX_BYTES`;
- tags other than the plain ones (``!!python/object``, ``!foo``, ``!!binary``, timestamps, sets);
- a key that is not a plain value (a list or mapping as key);
- nesting deeper than :data:`MAX_DEPTH`, or an alias that contains itself;
- more than :data:`MAX_NODES` values once aliases are expanded (a few hundred bytes of nested aliases
  expand into billions of values: the "billion laughs");
- integers longer than :data:`MAX_DIGITS` digits, and numbers that are not finite.
"""

from __future__ import annotations

import math
from typing import Any

import yaml

Path_ = tuple[Any, ...]

MAX_BYTES = 1 << 20  # no real recipe comes near a megabyte
MAX_DEPTH = 64
MAX_NODES = 200_000  # values built, aliases expanded
MAX_DIGITS = 30

_PLAIN = {
    "tag:yaml.org,2002:str", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool", "tag:yaml.org,2002:null",
}
_MAP, _SEQ, _MERGE = "tag:yaml.org,2002:map", "tag:yaml.org,2002:seq", "tag:yaml.org,2002:merge"


class RecipeYAMLError(ValueError):
    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.line = line


def decode_recipe(data: bytes) -> str:
    """Recipe bytes as text: UTF-8 (a byte-order mark allowed), at most :data:`MAX_BYTES`."""
    if len(data) > MAX_BYTES:
        raise RecipeYAMLError(f"{len(data):,} bytes; a recipe is at most {MAX_BYTES:,} bytes", None)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise RecipeYAMLError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})", line) from None


def load_with_lines(text: str) -> tuple[Any, dict[Path_, int]]:
    """Parse YAML as plain data; return the data and a map from key path to 1-based line number."""
    if len(text) > MAX_BYTES:
        raise RecipeYAMLError(f"{len(text):,} characters; a recipe is at most {MAX_BYTES:,} bytes", None)
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        problem = getattr(e, "problem", None) or str(e)
        raise RecipeYAMLError(f"invalid YAML: {problem}", line) from e
    except RecursionError:
        raise RecipeYAMLError(f"nested deeper than {MAX_DEPTH} levels", None) from None
    lines: dict[Path_, int] = {}
    if node is None:
        return None, lines
    return _Builder(lines).build(node, ()), lines


def _line(node: yaml.Node) -> int:
    return node.start_mark.line + 1


class _Builder:
    """Plain values from a composed node graph, within the budgets above."""

    def __init__(self, lines: dict[Path_, int]) -> None:
        self.lines = lines
        self.count = 0
        self.active: set[int] = set()  # nodes being built: meeting one again is an alias of itself

    def build(self, node: yaml.Node, path: Path_) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise RecipeYAMLError(f"more than {MAX_NODES:,} values once aliases are expanded (nested aliases?)",
                                  _line(node))
        if len(path) > MAX_DEPTH:
            raise RecipeYAMLError(f"nested deeper than {MAX_DEPTH} levels", _line(node))
        if id(node) in self.active:
            raise RecipeYAMLError("an alias refers to the value that contains it", _line(node))
        self.lines.setdefault(path, _line(node))
        if isinstance(node, yaml.ScalarNode):
            return _scalar(node)
        if node.tag not in (_MAP, _SEQ):
            raise RecipeYAMLError(f"unsupported YAML tag {node.tag!r} (a recipe holds plain values)", _line(node))
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.SequenceNode):
                return [self.build(child, path + (i,)) for i, child in enumerate(node.value)]
            return self._mapping(node, path)
        finally:
            self.active.discard(id(node))

    def _mapping(self, node: yaml.MappingNode, path: Path_) -> dict[Any, Any]:
        merged: dict[Any, Any] = {}  # from merge keys: explicit keys override them
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE:
                merged.update(self._merge(value_node, path))
                continue
            if not isinstance(key_node, yaml.ScalarNode):
                raise RecipeYAMLError("a key must be a plain value, not a list or mapping", _line(key_node))
            key = _scalar(key_node)
            if key in out:
                raise RecipeYAMLError(f"key {key!r} appears twice", _line(key_node))
            self.lines[path + (key,)] = _line(key_node)
            out[key] = self.build(value_node, path + (key,))
            self.lines[path + (key,)] = _line(key_node)
        return {**{k: v for k, v in merged.items() if k not in out}, **out}

    def _merge(self, value_node: yaml.Node, path: Path_) -> dict[Any, Any]:
        """The mappings a merge key brings (``<<: *a`` or ``<<: [*a, *b]``, earlier ones winning)."""
        sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
        merged: dict[Any, Any] = {}
        for source in reversed(sources):
            if not isinstance(source, yaml.MappingNode):
                raise RecipeYAMLError("a merge key (<<) takes a mapping or a list of mappings", _line(source))
            merged.update(self.build(source, path))
        return merged


def _scalar(node: yaml.Node) -> Any:
    if node.tag not in _PLAIN:
        raise RecipeYAMLError(f"unsupported YAML tag {node.tag!r} (a recipe holds plain values)", _line(node))
    text = str(node.value)
    if node.tag == "tag:yaml.org,2002:int" and sum(c.isdigit() for c in text) > MAX_DIGITS:
        raise RecipeYAMLError(f"an integer of {sum(c.isdigit() for c in text)} digits is not a recipe value",
                              _line(node))
    loader = yaml.SafeLoader("")
    try:
        value = loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, OverflowError) as e:
        raise RecipeYAMLError(f"cannot read {text[:40]!r} as a value ({e})", _line(node)) from None
    finally:
        loader.dispose()
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeYAMLError(f"{text[:40]!r} is not a finite number", _line(node))
    return value
