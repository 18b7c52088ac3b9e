"""Safe YAML loading that remembers the line of every mapping key and list item.

    text ──SafeLoader (no object tags)──▶ plain dict/list/scalars
                                  └──▶ LineMap: ("cuts", "width") -> 7

Anchors and aliases are allowed but expansion is bounded, so a "billion laughs"
document is refused instead of exhausting memory.
"""

from __future__ import annotations

from typing import Any

import yaml

from ..errors import SpecError

MAX_BYTES = 1_000_000
MAX_NODES = 200_000
MAX_DEPTH = 64
SCALAR_TAGS = frozenset(f"tag:yaml.org,2002:{t}"
                        for t in ("str", "int", "float", "bool", "null", "timestamp", "binary"))
MAX_INT_BITS = 1000  # ~300 digits; sexagesimal ints (1:2:3...) could otherwise grow without bound

Path_ = tuple[Any, ...]


class LineMap(dict):
    """Maps a field path (tuple of keys / list indices) to its 1-based YAML line."""

    def line_of(self, path: Path_) -> int | None:
        """Return the line of ``path`` or of its closest recorded ancestor."""
        path = tuple(path)
        while path:
            if path in self:
                return self[path]
            path = path[:-1]
        return self.get((), None)


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys."""


def _construct(node: yaml.Node, path: Path_, lines: LineMap, budget: list[int], depth: int) -> Any:
    budget[0] += 1
    if budget[0] > MAX_NODES:
        raise SpecError(f"the YAML document expands to more than {MAX_NODES} nodes "
                        "(anchors/aliases repeated too often?); write a smaller spec")
    if depth > MAX_DEPTH:
        raise SpecError(f"the YAML document is nested deeper than {MAX_DEPTH} levels", line=node.start_mark.line + 1)
    lines.setdefault(path, node.start_mark.line + 1)
    plain = {yaml.MappingNode: "tag:yaml.org,2002:map", yaml.SequenceNode: "tag:yaml.org,2002:seq"}
    if type(node) in plain and node.tag != plain[type(node)]:
        raise SpecError(f"YAML tag '{node.tag}' is not allowed in a spec (specs hold plain data only); "
                        "remove the tag", line=node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                raise SpecError("YAML merge keys ('<<') are not supported in specs; write the keys out",
                                line=key_node.start_mark.line + 1)
            key = _construct(key_node, path, LineMap(), budget, depth + 1)
            if isinstance(key, (dict, list)):
                raise SpecError("a mapping key must be a plain scalar", line=key_node.start_mark.line + 1)
            if not isinstance(key, str):  # every key of a spec is a field name (YAML 1.1 reads `on:` as True)
                kind = {bool: "a boolean", int: "a number", float: "a number", bytes: "binary data",
                        type(None): "null"}.get(type(key), "a date")
                raise SpecError(f"mapping key '{key_node.value}' is read as {kind}, not a field name; spec keys are "
                                "names such as 'model' or 'cuts' (quote the key to make it text)",
                                path=".".join(map(str, path)), line=key_node.start_mark.line + 1)
            if key in out:
                raise SpecError(f"duplicate key '{key}'", path=".".join(map(str, path + (key,))),
                                line=key_node.start_mark.line + 1)
            lines[path + (key,)] = key_node.start_mark.line + 1
            out[key] = _construct(value_node, path + (key,), lines, budget, depth + 1)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_construct(v, path + (i,), lines, budget, depth + 1) for i, v in enumerate(node.value)]
    if node.tag in SCALAR_TAGS:
        return _scalar(node)
    raise SpecError(f"YAML tag '{node.tag}' is not allowed in a spec (specs hold plain data only)",
                    line=node.start_mark.line + 1)


def _scalar(node: yaml.ScalarNode) -> Any:
    """Construct one plain scalar (str, int, float, bool, null, timestamp, binary)."""
    line = node.start_mark.line + 1
    kind = node.tag.replace("tag:yaml.org,2002:", "!!")
    shown = repr(node.value) if len(node.value) <= 40 else repr(node.value[:37]) + "..."
    try:
        value = _Loader("").construct_object(node)
    except Exception as exc:  # PyYAML's constructors raise ValueError, KeyError, IndexError, AttributeError, ...
        why = getattr(exc, "problem", None) or (str(exc) if isinstance(exc, ValueError) else "")
        raise SpecError(f"the YAML value {shown} is not a valid {kind}" + (f" ({why})" if why else "") +
                        f"; write a valid {kind[2:]} or a quoted string", line=line) from None
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise SpecError(f"the YAML integer {shown} has more than 300 digits; no spec value is that large", line=line)
    return value


def load_yaml(text: str | bytes, file: str | None = None) -> tuple[Any, LineMap]:
    """Parse a YAML document safely, keeping line numbers.

    Args:
        text: the document (bytes must be UTF-8).
        file: file name for error messages.

    Returns:
        ``(data, lines)``: plain Python data and a :class:`LineMap`.

    Raises:
        SpecError: on invalid UTF-8, YAML syntax errors, non-plain tags, oversized
            or too deeply nested documents.
    """
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise SpecError(f"the spec is larger than {MAX_BYTES // 1000} kB; is this really a spec?", file=file)
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise SpecError(f"the spec is not valid UTF-8 text (byte {exc.start}); save it as UTF-8",
                            file=file) from None
    if len(text) > MAX_BYTES:
        raise SpecError(f"the spec is larger than {MAX_BYTES // 1000} kB; is this really a spec?", file=file)
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise SpecError(f"YAML syntax error: {exc.problem or exc}", line=line, file=file) from None
    except yaml.YAMLError as exc:
        raise SpecError(f"YAML error: {exc}", file=file) from None
    except RecursionError:
        raise SpecError(f"the YAML document is nested deeper than {MAX_DEPTH} levels", file=file) from None
    lines = LineMap()
    if node is None:
        raise SpecError("the spec is empty; it needs at least 'name' and 'model'", file=file)
    try:
        data = _construct(node, (), lines, [0], 0)
    except SpecError as err:
        err.file = file
        raise SpecError(err.message, err.path, err.line, file) from None
    except (yaml.YAMLError, ValueError, TypeError) as exc:
        raise SpecError(f"YAML value error: {exc}", file=file) from None
    except RecursionError:
        raise SpecError(f"the YAML document is nested deeper than {MAX_DEPTH} levels", file=file) from None
    return data, lines
