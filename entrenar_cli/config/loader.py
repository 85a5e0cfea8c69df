"""Load a YAML config into the schema, with errors that point at the file, line and column.

Every problem is collected and reported together: the dotted path (``distillation.temperature``),
where it is (``distill.yaml:14:16``), the bad value, and what is allowed. Unknown keys come with
the closest valid key. ``--set dotted.key=value`` overrides are applied before validation, so they
are typed and checked by the same schema.
"""

from __future__ import annotations

import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from entrenar_cli.errors import ConfigError

Loc = tuple[typing.Union[str, int], ...]


def _node_marks(node: yaml.Node, prefix: Loc, marks: dict[Loc, tuple[int, int]]) -> None:
    """Record (line, column) of every value and key in a composed YAML tree, 1-based."""
    marks[prefix] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = key_node.value
            # an unknown key is best shown at the key itself
            marks[(*prefix, key, "__key__")] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _node_marks(value_node, (*prefix, key), marks)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_marks(item, (*prefix, i), marks)


def parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[Loc, tuple[int, int]]]:
    """Parse YAML text into a dict plus a map from key path to (line, column)."""
    try:
        data = yaml.safe_load(text)
        node = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(
            f"{where}: invalid YAML: {problem}",
            hint="check indentation and that every 'key: value' has a space after the colon",
        ) from None
    if data is None:
        raise ConfigError(f"{source}: the file is empty", hint="see examples/configs/ for a starting point")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}:1:1: the top level must be a mapping of sections (teacher:, student:, ...), "
            f"not a {type(data).__name__}"
        )
    marks: dict[Loc, tuple[int, int]] = {}
    if node is not None:
        _node_marks(node, (), marks)
    return data, marks


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> set[Loc]:
    """Apply ``dotted.key=value`` overrides in place; values are parsed as YAML scalars/lists."""
    touched: set[Loc] = set()
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"--set {item!r}: expected dotted.key=value",
                hint="for example --set training.learning_rate=3e-4",
            )
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        parts = key.split(".")
        cursor: Any = data
        for depth, part in enumerate(parts[:-1]):
            nxt = cursor.get(part) if isinstance(cursor, dict) else None
            if nxt is None:
                nxt = {}
                cursor[part] = nxt
            elif not isinstance(nxt, dict):
                raise ConfigError(
                    f"--set {item!r}: {'.'.join(parts[: depth + 1])} is a value, not a section"
                )
            cursor = nxt
        cursor[parts[-1]] = value
        touched.add(tuple(parts))
    return touched


def _unwrap(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic model classes an annotation may hold (through Optional/Union/list)."""
    found: list[type[BaseModel]] = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    for arg in typing.get_args(annotation):
        found.extend(_unwrap(arg))
    return found


def _fields_at(model: type[BaseModel], loc: Loc) -> list[str]:
    """Valid keys of the section found by walking ``loc`` from ``model``."""
    current: list[type[BaseModel]] = [model]
    for part in loc:
        if isinstance(part, int):
            continue
        nxt: list[type[BaseModel]] = []
        for cls in current:
            field = cls.model_fields.get(str(part))
            if field is not None:
                nxt.extend(_unwrap(field.annotation))
        if not nxt:
            return []
        current = nxt
    keys: list[str] = []
    for cls in current:
        keys.extend(k for k in cls.model_fields if k not in keys)
    return keys


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _clean_loc(loc: tuple[Any, ...]) -> Loc:
    # pydantic inserts union-branch tags ("list[int]", "function-after[...]") into locations
    return tuple(p for p in loc if isinstance(p, int) or ("[" not in str(p) and str(p) != "literal"))


def format_problems(
    exc: ValidationError,
    model: type[BaseModel],
    source: str,
    marks: dict[Loc, tuple[int, int]],
    overridden: set[Loc],
) -> list[str]:
    """One line per problem: where, dotted path, what is wrong, the bad value, what to do."""
    problems: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        loc = _clean_loc(err["loc"])
        kind = err["type"]
        if kind == "extra_forbidden":
            where = marks.get((*loc, "__key__")) or marks.get(loc)
            valid = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            msg = f"unknown key '{loc[-1]}'"
            msg += f" (did you mean '{close[0]}'?)" if close else ""
            if valid:
                msg += f"; valid keys here: {', '.join(valid)}"
        elif kind == "missing":
            parent = loc[:-1]
            where = marks.get(parent) if parent else None
            msg = "required key is missing"
        else:
            where = marks.get(loc)
            text = err["msg"]
            if text.startswith("Value error, "):
                text = text[len("Value error, "):]
            msg = f"{text} (got {err.get('input')!r})" if not isinstance(err.get("input"), dict) else text
        origin = "--set" if any(loc[: len(o)] == o for o in overridden) else source
        position = f"{origin}:{where[0]}:{where[1]}" if where and origin == source else origin
        line = f"{position}: {_dotted(loc)}: {msg}"
        if line not in seen:
            seen.add(line)
            problems.append(line)
    return problems


def load_config(path: str | Path, model: type[BaseModel], overrides: list[str] | None = None) -> BaseModel:
    """Read, override and validate a config file; raise ConfigError listing every problem."""
    source = str(path)
    p = Path(path)
    if not p.is_file():
        raise ConfigError(
            f"config file not found: {source}",
            hint="pass the path to a YAML file; examples live in examples/configs/",
        )
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc}") from None
    return validate_text(text, model, source, overrides)


def validate_text(
    text: str, model: type[BaseModel], source: str = "<config>", overrides: list[str] | None = None
) -> BaseModel:
    """Validate YAML text against ``model``; used by load_config and tests."""
    data, marks = parse_yaml(text, source)
    overridden = apply_overrides(data, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = format_problems(exc, model, source, marks, overridden)
        count = len(problems)
        header = f"{source}: {count} problem{'s' if count != 1 else ''} in the configuration"
        raise ConfigError(
            header + "\n  " + "\n  ".join(problems),
            hint=f"run 'entrenar schema' for every key, its type and its bounds",
            problems=problems,
        ) from None
