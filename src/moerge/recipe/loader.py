"""Load a recipe from YAML (moerge or mergekit format) with line-numbered, human errors."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from moerge.errors import RecipeError, did_you_mean
from moerge.io.untrusted import read_regular
from moerge.recipe.schema import ModelEntry, Recipe, Slice, SliceSource, TokenizerSpec
from moerge.recipe.yaml_lines import MAX_BYTES, RecipeYAMLError, decode_recipe, load_with_lines

UNSUPPORTED_MERGEKIT_KEYS = {
    "modules": "multi-module recipes ('modules:') are not supported yet; use 'models' or 'slices'",
}


@dataclass
class LoadedRecipe:
    """A validated recipe, where it came from, and the line of every key (for later errors)."""

    recipe: Recipe
    source: str = "<recipe>"
    lines: dict[tuple[Any, ...], int] = field(default_factory=dict)
    text: str = ""
    format: str = "moerge"  # or "mergekit"

    def where(self, *path: Any) -> str:
        """'file:line' of the deepest known prefix of ``path``."""
        return where_in(self.source, self.lines, path)


def where_in(source: str, lines: dict[tuple[Any, ...], int], path: tuple[Any, ...]) -> str:
    """'file:line' of the deepest prefix of ``path`` whose line is known (the file alone when none is)."""
    p = tuple(path)
    while p and p not in lines:
        p = p[:-1]
    line = lines.get(p)
    return f"{source}:{line}" if line else source


_CHILDREN: dict[tuple[type[BaseModel], str], type[BaseModel]] = {
    (Recipe, "models"): ModelEntry, (Recipe, "slices"): Slice, (Slice, "sources"): SliceSource,
    (Recipe, "tokenizer"): TokenizerSpec,
}


def fields_at(root: type[BaseModel], children: dict[tuple[type[BaseModel], str], type[BaseModel]],
              loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, list[str]]:
    """The schema model at ``loc`` below ``root`` (list indices skipped) and the keys it allows."""
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        model = children.get((model, part))
    if model is None:
        return None, []
    return model, [f.alias or name for name, f in model.model_fields.items()]


def _fields_at(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, list[str]]:
    return fields_at(Recipe, _CHILDREN, loc)


def _loc_for_lines(loc: tuple[Any, ...], fmt: str) -> tuple[Any, ...]:
    if fmt == "mergekit" and loc[:1] == ("method",):
        return ("merge_method",) + loc[1:]
    return loc


def load_recipe(source: str | os.PathLike[str] | dict[str, Any] | Recipe) -> LoadedRecipe:
    """Read and validate a recipe from a YAML file path, a YAML string, a dict or a Recipe."""
    if isinstance(source, Recipe):
        return LoadedRecipe(source, format="mergekit" if source.conventions == "mergekit" else "moerge")
    name = "<recipe>"
    text = ""
    lines: dict[tuple[Any, ...], int] = {}
    if isinstance(source, dict):
        data: Any = source
    else:
        name, text, data, lines = read_yaml_source(source)
    if not isinstance(data, dict):
        raise RecipeError(f"{name}: a recipe is a YAML mapping with at least 'method' and 'models'")
    data = dict(data)
    fmt = "moerge"
    if "merge_method" in data:
        if "method" in data:
            raise RecipeError(f"{name}: give 'method' or 'merge_method', not both")
        fmt = "mergekit"
        data["method"] = data.pop("merge_method")
        data.setdefault("conventions", "mergekit")
    for key, why in UNSUPPORTED_MERGEKIT_KEYS.items():
        if key in data:
            raise RecipeError(f"{name}:{lines.get((key,), '?')}: {why}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(validation_message(e, lines, name, lambda loc: _loc_for_lines(loc, fmt),
                                             _fields_at)) from None
    return LoadedRecipe(recipe, name, lines, text, fmt)


def validation_message(e: ValidationError, lines: dict[tuple[Any, ...], int], name: str,
                       to_text: Callable[[tuple[Any, ...]], tuple[Any, ...]],
                       fields_at: Callable[[tuple[Any, ...]], tuple[type[BaseModel] | None, list[str]]]) -> str:
    """A pydantic validation error as one line per problem, each with the recipe line it is on.
    ``to_text`` maps a schema location to the key path as written (mergekit's spellings);
    ``fields_at`` gives the keys allowed at a location (for "did you mean")."""
    problems = []
    for err in e.errors():
        loc = tuple(err["loc"])
        where_loc = to_text(loc)
        prefix = where_in(name, lines, where_loc)
        dotted = _dotted(where_loc)
        if err["type"] == "extra_forbidden":
            _, allowed = fields_at(loc[:-1])
            key = str(loc[-1])
            msg = f"unknown key {key!r}{' in ' + _dotted(where_loc[:-1]) if loc[:-1] else ''}{did_you_mean(key, allowed)}"
        elif err["type"] == "missing":
            msg = f"missing required key {dotted!r}"
        else:
            text_ = err["msg"].removeprefix("Value error, ")
            msg = f"{dotted}: {text_}" if dotted else text_
        problems.append(f"{prefix}: {msg}")
    problems = list(dict.fromkeys(problems))
    return "invalid recipe:\n  " + "\n  ".join(problems[:12])


def read_yaml_source(source: str | os.PathLike[str], what: str = "recipe") -> tuple[str, str, Any, dict[tuple[Any, ...], int]]:
    """(name, text, data, lines) of a YAML path or YAML text, with line-numbered parse errors."""
    name = "<recipe>"
    s = str(source)
    if "\n" not in s and (Path(s).suffix in (".yaml", ".yml") or Path(s).exists()):
        name = s
        text = _read_recipe_file(Path(s))
    else:
        text = s
    try:
        data, lines = load_with_lines(text)
    except RecipeYAMLError as e:
        where = f"{name}:{e.line}" if e.line else name
        raise RecipeError(f"{where}: {e}") from None
    return name, text, data, lines


def _read_recipe_file(path: Path) -> str:
    """A recipe file's text: a regular file (a FIFO or device would block or never end), UTF-8, bounded."""
    if not path.exists():
        raise RecipeError(f"{path}: recipe file not found")
    data = read_regular(path, max_bytes=MAX_BYTES, error=RecipeError)
    try:
        return decode_recipe(data)
    except RecipeYAMLError as e:
        raise RecipeError(f"{path}:{e.line}: {e}" if e.line else f"{path}: {e}") from None


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (("." if out else "") + str(part))
    return out
