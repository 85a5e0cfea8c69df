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

from entrenar_cli.errors import ConfigError, shorten_path

Loc = tuple[typing.Union[str, int], ...]


def _node_marks(node: yaml.Node, prefix: Loc, marks: dict[Loc, tuple[int, int]]) -> None:
    """Record (line, column) of every value and key in a composed YAML tree, 1-based."""
    marks[prefix] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            key = key_node.value
            # an unknown key is best shown at the key itself
            marks[(*prefix, key, "__key__")] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _node_marks(value_node, (*prefix, key), marks)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _node_marks(item, (*prefix, i), marks)


# Bounds on what a config may be. A real config is a few KB, a handful of levels deep and a few
# hundred nodes; these limits are far above that and far below what hurts (a 1 KB file of nested
# aliases expands to billions of nodes, and deep nesting overflows the parser's recursion).
MAX_CONFIG_BYTES = 2**20
MAX_DEPTH = 64
MAX_NODES = 10_000
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(yaml.SafeLoader):
    """The pure-Python safe loader whose value errors carry a position.

    The C loader is not used on purpose: it composes recursively in C, where nesting cannot be
    caught as a RecursionError.
    """

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:  # noqa: N803 - PyYAML's name
        # checked while scanning: PyYAML's scanner is quadratic in flow depth, the composer recursive
        if self.flow_level >= MAX_DEPTH:
            raise _TooDeep(self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def add_indent(self, column: int) -> bool:
        if len(self.indents) >= MAX_DEPTH:
            raise _TooDeep(self.get_mark())
        return super().add_indent(column)

    def compose_node(self, parent: Any, index: Any) -> Any:
        # counted while composing: the pure-Python parser reads about 10k values a second
        self._composed = getattr(self, "_composed", 0) + 1
        if self._composed > MAX_NODES:
            raise _TooMany(self.peek_event().start_mark)
        return super().compose_node(parent, index)

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep=deep)
        except yaml.YAMLError:
            raise
        except (ValueError, TypeError, OverflowError) as exc:
            kind = node.tag.rsplit(":", 1)[-1]
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read this value as {kind}: {exc}", node.start_mark
            ) from None


class _TooDeep(Exception):
    """Nesting beyond MAX_DEPTH found while scanning, at ``mark``."""

    def __init__(self, mark: Any) -> None:
        super().__init__(mark)
        self.mark = mark


class _TooMany(_TooDeep):
    """More than MAX_NODES values, at ``mark``."""


class _SyntaxError(ConfigError):
    """Text that is not YAML at all (as opposed to YAML refused by a bound)."""


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _at(source: str, node: yaml.Node) -> str:
    return f"{source}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


def _too_many(where: str) -> ConfigError:
    return ConfigError(f"{where}: the YAML holds more than {MAX_NODES:,} values (counting each use of an *alias)",
                       hint="a configuration has a few hundred values; check that this is the file you meant")


def _check_bounds(root: yaml.Node, source: str) -> None:
    """Refuse recursive aliases, nesting deeper than MAX_DEPTH and more than MAX_NODES nodes once
    every alias is expanded (the "billion laughs"); iterative and linear in the composed graph."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        nid = id(node)
        kids = _children(node)
        if finished:
            on_path.discard(nid)
            size[nid] = 1 + sum(size[id(k)] for k in kids)
            height[nid] = 1 + max((height[id(k)] for k in kids), default=0)
            if height[nid] > MAX_DEPTH:
                raise ConfigError(f"{_at(source, node)}: the YAML is nested more than {MAX_DEPTH} levels deep",
                                  hint="a configuration has a few levels of sections; check the file")
            if size[nid] > MAX_NODES:
                raise _too_many(_at(source, node))
            continue
        if nid in size:
            continue
        on_path.add(nid)
        stack.append((node, True))
        for kid in kids:
            if id(kid) in on_path:
                raise ConfigError(f"{_at(source, kid)}: an alias refers to a section that contains it "
                                  "(a recursive structure)", hint="remove the *alias inside its own &anchor")
            if id(kid) not in size:
                stack.append((kid, False))


def _duplicate_keys(loader: _Loader, root: yaml.Node, source: str) -> list[str]:
    """Every key given twice in one mapping (YAML would silently keep the last): where, and where first.

    Keys compare by value (``1`` and ``0x1`` are the same key); ``<<`` merge keys are not keys.
    """
    problems: list[str] = []
    seen_nodes: set[int] = set()

    def walk(node: yaml.Node, path: Loc) -> None:
        if id(node) in seen_nodes:
            return
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, value_node in node.value:
                scalar = isinstance(key_node, yaml.ScalarNode)
                name = key_node.value if scalar else "?"
                if scalar and key_node.tag != _MERGE_TAG:
                    try:
                        key = loader.construct_object(key_node)
                        earlier = first.setdefault(key, key_node)
                    except (yaml.YAMLError, TypeError):  # the constructor reports it with its position
                        earlier = key_node
                    if earlier is not key_node:
                        problems.append(
                            f"{_at(source, key_node)}: {_dotted((*path, name))}: duplicate key (lines "
                            f"{earlier.start_mark.line + 1} and {key_node.start_mark.line + 1}); "
                            "YAML would silently keep only the last one"
                        )
                walk(value_node, (*path, name))
        elif isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, (*path, i))

    walk(root, ())
    return problems


def _problem_where(exc: yaml.YAMLError, text: str, source: str) -> tuple[str, str]:
    """(``file:line:col``, what is wrong) of a PyYAML error."""
    if isinstance(exc, yaml.reader.ReaderError):
        pos = exc.position
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        what = (f"character U+{exc.character:04X} is not allowed in YAML"
                if isinstance(exc.character, int) else str(exc.reason))
        return f"{source}:{line}:{col}", what
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    problem = getattr(exc, "problem", None) or str(exc)
    context = getattr(exc, "context", None)
    return where, f"{context}, {problem}" if context and isinstance(exc, yaml.composer.ComposerError) else problem


def parse_value(text: str, source: str) -> Any:
    """Parse YAML text (a whole file or one ``--set`` value) into plain data, every bound checked."""
    return _parse(text, source)[0]


def _parse(text: str, source: str) -> tuple[Any, yaml.Node | None]:
    loader: _Loader | None = None
    try:
        loader = _Loader(text)
        try:
            node = loader.get_single_node()
        except _TooMany as exc:
            raise _too_many(f"{source}:{exc.mark.line + 1}:{exc.mark.column + 1}") from None
        except (RecursionError, _TooDeep) as exc:
            where = f"{source}:{exc.mark.line + 1}:{exc.mark.column + 1}" if isinstance(exc, _TooDeep) else source
            raise ConfigError(f"{where}: the YAML is nested more than {MAX_DEPTH} levels deep",
                              hint="a configuration has a few levels of sections; check the file") from None
        if node is None:
            return None, None
        _check_bounds(node, source)
        duplicates = _duplicate_keys(loader, node, source)
        if duplicates:
            count = len(duplicates)
            raise ConfigError(
                f"{source}: {count} duplicate key{'s' if count != 1 else ''}\n  " + "\n  ".join(duplicates),
                hint="give each key once; merge the two sections into one",
                problems=duplicates,
            )
        return loader.construct_document(node), node
    except yaml.YAMLError as exc:
        where, problem = _problem_where(exc, text, source)
        raise _SyntaxError(
            f"{where}: invalid YAML: {problem}",
            hint="check indentation and that every 'key: value' has a space after the colon",
        ) from None
    except RecursionError:
        raise ConfigError(f"{source}: the YAML is nested too deeply to read",
                          hint="a configuration has a few levels of sections; check the file") from None
    finally:
        if loader is not None:
            loader.dispose()


def parse_yaml(text: str, source: str) -> tuple[dict[str, Any], dict[Loc, tuple[int, int]]]:
    """Parse YAML text into a dict plus a map from key path to (line, column)."""
    data, node = _parse(text, source)
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
                f"--set {item[:80]!r}: expected dotted.key=value",
                hint="for example --set training.learning_rate=3e-4",
            )
        if key.count(".") >= MAX_DEPTH:
            raise ConfigError(f"--set {key[:80]!r}...: more than {MAX_DEPTH} levels of keys",
                              hint="a configuration has a few levels of sections, e.g. training.learning_rate")
        try:
            value = parse_value(raw, f"--set {key}") if raw.strip() else None
        except _SyntaxError:
            value = raw  # not YAML: the text itself (bounds and duplicate keys are still refused)
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


def _key_text(part: object) -> str:
    """A key as shown in a message: control characters escaped, a very long key cut short."""
    text = str(part)
    if not text.isprintable():
        text = repr(text)[1:-1]
    return text if len(text) <= 80 else text[:77] + "..."


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{_key_text(part)}" if out else _key_text(part))
    return out or "(top level)"


def _clean_loc(loc: tuple[Any, ...], data: Any = None) -> Loc:
    """The location without the union-branch tags pydantic inserts ("list[int]", "function-after[...]").

    A user's key can look like a tag (``"a[0]": 1``): a part that is a key of the input at that level
    is kept.
    """
    out: list[typing.Union[str, int]] = []
    cursor = data
    for part in loc:
        present = isinstance(cursor, dict) and part in cursor
        # a name cannot index a list or a scalar of the input: there it is a tag ("int", "str")
        tag_here = cursor is not None and not isinstance(cursor, dict) and not isinstance(part, int)
        if present or isinstance(part, int) or ("[" not in str(part) and str(part) != "literal" and not tag_here):
            out.append(part)
            if present:
                cursor = cursor[part]
            elif isinstance(part, int) and isinstance(cursor, list) and 0 <= part < len(cursor):
                cursor = cursor[part]
            else:
                cursor = None
    return tuple(out)


def format_problems(
    exc: ValidationError,
    model: type[BaseModel],
    source: str,
    marks: dict[Loc, tuple[int, int]],
    overridden: set[Loc],
    data: Any = None,
) -> list[str]:
    """One line per problem: where, dotted path, what is wrong, the bad value, what to do."""
    problems: list[str] = []
    seen: set[str] = set()
    for err in exc.errors():
        loc = _clean_loc(err["loc"], data)
        kind = err["type"]
        if kind == "extra_forbidden" and loc:
            where = marks.get((*loc, "__key__")) or marks.get(loc)
            valid = _fields_at(model, loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            msg = f"unknown key '{_key_text(loc[-1])}'"
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
            shown = repr(err.get("input"))
            shown = shown if len(shown) <= 80 else shown[:77] + "..."
            msg = f"{text} (got {shown})" if not isinstance(err.get("input"), dict) else text
        origin = "--set" if any(loc[: len(o)] == o for o in overridden) else source
        position = f"{origin}:{where[0]}:{where[1]}" if where and origin == source else origin
        line = f"{position}: {_dotted(loc)}: {msg}"
        if line not in seen:
            seen.add(line)
            problems.append(line)
    return problems


def read_config_text(path: str | Path) -> str:
    """The text of a config file, or a ConfigError saying why it cannot be one (exit code 2)."""
    import stat

    source = shorten_path(path)
    p = Path(path).expanduser()
    try:
        st = p.stat()
    except FileNotFoundError:
        raise ConfigError(
            f"config file not found: {source}",
            hint="pass the path to a YAML file; examples live in examples/configs/",
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {source}: {_os_reason(exc)}") from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{source} is a directory, not a config file", hint="pass the path to a YAML file")
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{source} is not a regular file", hint="pass the path to a YAML file")
    try:
        with open(p, "rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {source}: {_os_reason(exc)}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{source} is larger than {MAX_CONFIG_BYTES // 2**20} MiB: not a config file",
                          hint="pass the path to a YAML config (a few KB)")
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise ConfigError(f"{source} is UTF-16 text", hint="save the config as UTF-8")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        col = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"{source}:{line}:{col}: not UTF-8 text (byte 0x{raw[exc.start]:02x}): a config is a YAML text file",
            hint="save the config as UTF-8, and check that this is the YAML file you meant",
        ) from None


def _os_reason(exc: OSError) -> str:
    """``permission denied`` and friends: the operating system's reason in plain words."""
    return (exc.strerror or type(exc).__name__).lower()


def load_config(path: str | Path, model: type[BaseModel], overrides: list[str] | None = None) -> BaseModel:
    """Read, override and validate a config file; raise ConfigError listing every problem."""
    return validate_text(read_config_text(path), model, shorten_path(path), overrides)


def validate_text(
    text: str, model: type[BaseModel], source: str = "<config>", overrides: list[str] | None = None
) -> BaseModel:
    """Validate YAML text against ``model``; used by load_config and tests."""
    data, marks = parse_yaml(text, source)
    overridden = apply_overrides(data, overrides or [])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = format_problems(exc, model, source, marks, overridden, data)
        count = len(problems)
        header = f"{source}: {count} problem{'s' if count != 1 else ''} in the configuration"
        raise ConfigError(
            header + "\n  " + "\n  ".join(problems),
            hint="run 'entrenar schema' for every key, its type and its bounds",
            problems=problems,
        ) from None
