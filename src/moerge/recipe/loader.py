"""Load a recipe from YAML (moerge or mergekit format) with line-numbered, human errors."""

from __future__ import annotations

import os
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
        p = tuple(path)
        while p and p not in self.lines:
            p = p[:-1]
        line = self.lines.get(p)
        return f"{self.source}:{line}" if line else self.source


def _fields_at(loc: tuple[Any, ...]) -> tuple[type[BaseModel] | None, list[str]]:
    model: type[BaseModel] | None = Recipe
    children = {
        (Recipe, "models"): ModelEntry,
        (Recipe, "slices"): Slice,
        (Slice, "sources"): SliceSource,
        (Recipe, "tokenizer"): TokenizerSpec,
    }
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        model = children.get((model, part))
    if model is None:
        return None, []
    names = []
    for name, f in model.model_fields.items():
        names.append(f.alias or name)
    return model, names


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
        s = str(source)
        if "\n" not in s and (Path(s).suffix in (".yaml", ".yml") or Path(s).exists()):
            path = Path(s)
            name = str(path)
            text = _read_recipe_file(path)
        else:
            text = s
        try:
            data, lines = load_with_lines(text)
        except RecipeYAMLError as e:
            where = f"{name}:{e.line}" if e.line else name
            raise RecipeError(f"{where}: {e}") from None
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
        problems = []
        for err in e.errors():
            loc = tuple(err["loc"])
            where_loc = _loc_for_lines(loc, fmt)
            p = where_loc
            while p and p not in lines:
                p = p[:-1]
            line = lines.get(p)
            prefix = f"{name}:{line}" if line else name
            dotted = _dotted(where_loc)
            if err["type"] == "extra_forbidden":
                _, allowed = _fields_at(loc[:-1])
                key = str(loc[-1])
                msg = f"unknown key {key!r}{' in ' + _dotted(where_loc[:-1]) if loc[:-1] else ''}{did_you_mean(key, allowed)}"
            elif err["type"] == "missing":
                msg = f"missing required key {dotted!r}"
            else:
                text_ = err["msg"].removeprefix("Value error, ")
                msg = f"{dotted}: {text_}" if dotted else text_
            problems.append(f"{prefix}: {msg}")
        problems = list(dict.fromkeys(problems))
        raise RecipeError("invalid recipe:\n  " + "\n  ".join(problems[:12])) from None
    return LoadedRecipe(recipe, name, lines, text, fmt)


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
