"""One way to declare the shape of outside input: msgspec structs, read with :func:`validate`.

The config file, the Alertmanager webhook body, the app's ``/status``, the GPU file and the
checkpoint are each a :class:`Schema` (or :class:`ForeignSchema`) subclass. A bound is
``Annotated[int, Meta(ge=..., le=...)]`` on the field; a rule msgspec cannot say is a
``__post_init__`` raising :func:`problem`. Every problem is reported at once, each with its
located path and what was expected::

    metrics.duration_buckets_s[0]: expected a number greater than 0.0, got -1
    gate.close_at: expected a value <= 1.0, got 1.5

msgspec rather than pydantic: pydantic's import alone would put the tailing sidecar over its
memory budget. msgspec stops at the first problem, so :func:`validate` then checks each key of
the document on its own to find the rest.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import yaml
from msgspec import Meta

# A rule's problem travels through msgspec as "key<SEP>message".
_SEP = "\x1f"


class Schema(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Frozen, strict (no ``"5"`` for 5, no 1 for true), unknown keys refused."""


class ForeignSchema(msgspec.Struct, frozen=True, kw_only=True):
    """Input another program writes (Alertmanager, the app): keys it adds later are ignored."""


# Every number has a bound; these keep a float finite (NaN fails every comparison).
Finite = Annotated[float, Meta(ge=-1e300, le=1e300)]
Amount = Annotated[float, Meta(ge=0, le=1e300)]


class InvalidInput(ValueError):
    """Input that does not fit its schema: ``problems`` lists (located path, expectation)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{key}: {text}" if key else text for key, text in problems))


def problem(key: str, message: str) -> ValueError:
    """What a ``__post_init__`` raises: ``key`` is the field, ``message`` what was expected."""
    return ValueError(f"{key}{_SEP}{message}")


def rules(**problems: str | None) -> None:
    """Raise the first of ``key=problem`` that is not None (a ``__post_init__`` helper)."""
    for key, text in problems.items():
        if text is not None:
            raise problem(key, text)


def increasing(values: list[float]) -> str | None:
    """Bucket bounds and thresholds: each one once, in order (a repeat would be two series
    with one ``le`` label)."""
    if any(b <= a for a, b in itertools.pairwise(values)):
        return f"expected increasing values, each once, got {shown(values)}"
    return None


S = TypeVar("S")

# A hostile document can hold thousands of bad items; a message names this many.
MAX_PROBLEMS = 20


def validate(schema: type[S], data: Any) -> S:
    """``data`` as a ``schema``, or :class:`InvalidInput` listing every problem."""
    try:
        return msgspec.convert(data, schema)
    except msgspec.ValidationError as exc:
        found = _every_problem(schema, data, "", exc)
        more = [("...", f"and {len(found) - MAX_PROBLEMS} more problems")] \
            if len(found) > MAX_PROBLEMS else []
        raise InvalidInput(found[:MAX_PROBLEMS] + more) from None
    except RecursionError:
        raise InvalidInput([("", "expected a document nested less deeply")]) from None


def _every_problem(tp: Any, value: Any, where: str, first: msgspec.ValidationError) \
        -> list[tuple[str, str]]:
    """Each key or item of ``value`` checked on its own; ``first`` (what msgspec found) when
    none fails alone (a rule across keys, or a bound on the container itself)."""
    found: list[tuple[str, str]] = []
    inner = _unwrap(tp, value)
    if isinstance(inner, type) and issubclass(inner, msgspec.Struct) and isinstance(value, dict):
        fields = {f.encode_name: f for f in msgspec.structs.fields(inner)}
        for key, item in value.items():
            field = fields.get(key)
            if field is not None:
                found += _check(field.type, item, _join(where, key))
            elif inner.__struct_config__.forbid_unknown_fields:
                found.append((_join(where, str(key)),
                              f"unknown key; expected one of {', '.join(sorted(fields))}"))
        found += [(_join(where, name), "missing") for name, field in fields.items()
                  if field.required and name not in value]
    elif typing.get_origin(inner) in (list, tuple) and isinstance(value, list) \
            and typing.get_args(inner)[1:] in ((), (...,)):
        item_tp = typing.get_args(inner)[0]
        for i, item in enumerate(value):
            found += _check(item_tp, item, f"{where}[{i}]")
    elif typing.get_origin(inner) is dict and isinstance(value, dict):
        value_tp = typing.get_args(inner)[1]
        for key, item in value.items():
            found += _check(value_tp, item, _join(where, str(key)))
    return found or [_located(first, where, inner, value)]


def _check(tp: Any, value: Any, where: str) -> list[tuple[str, str]]:
    try:
        msgspec.convert(value, tp)
    except msgspec.ValidationError as exc:
        return _every_problem(tp, value, where, exc)
    return []


_UNIONS = (typing.Union, types.UnionType)


def _unwrap(tp: Any, value: Any) -> Any:
    """The type that ``value`` is checked as: ``Annotated`` and ``X | None`` taken off."""
    if typing.get_origin(tp) is Annotated:
        return _unwrap(typing.get_args(tp)[0], value)
    # a union: the one member of the value's kind (the list of a ``str | list[...]``)
    kinds = [a for a in typing.get_args(tp) if isinstance(value, _kind(a))] \
        if typing.get_origin(tp) in _UNIONS else []
    return _unwrap(kinds[0], value) if len(kinds) == 1 else tp


def _kind(tp: Any) -> type:
    """The Python type a value of ``tp`` arrives as (a struct arrives as a dict)."""
    inner = _unwrap(tp, None)
    origin = typing.get_origin(inner) or inner
    if origin in (list, tuple):
        return list
    if isinstance(origin, type) and issubclass(origin, (msgspec.Struct, dict)):
        return dict
    return origin if isinstance(origin, type) else object


def _located(error: msgspec.ValidationError, where: str, tp: Any, value: Any) \
        -> tuple[str, str]:
    text, _, at = str(error).partition(" - at `$")
    at = at.rstrip("`")
    key, sep, rule = text.partition(_SEP)
    if sep:  # a rule's problem names its own key
        return _join(_join(where, at.lstrip(".")), key), rule
    where = where + at if at.startswith("[") else _join(where, at.lstrip("."))
    if isinstance(value, float) and not math.isfinite(value):
        return where, f"expected a finite number, got {shown(value)}"
    if typing.get_origin(tp) is Literal:
        choices = ", ".join(map(repr, typing.get_args(tp)))
        return where, f"expected one of {choices}, got {shown(value)}"
    return where, f"{_plain(text)}, got {shown(value)}" if not at else _plain(text)


_TYPES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
          "array": "a list", "object": "a mapping", "null": "nothing"}


def _plain(text: str) -> str:
    """msgspec's ``Expected `int` >= 1, got `str``` in this project's words."""
    if match := re.fullmatch(r"Expected `(\w+)` of length ([<>]=) (\d+)", text):
        unit = "characters" if match[1] == "str" else "entries"
        return f"expected {'at most' if match[2] == '<=' else 'at least'} {match[3]} {unit}"
    if match := re.fullmatch(r"Expected `\w+` (>=|<=|>|<) (\S+)", text):
        op, bound = match[1], match[2]
        return f"expected a number greater than {bound}" if op == ">" else \
            f"expected a value {op} {bound}"
    if match := re.fullmatch(r"Expected `([^`]+)`, got `\w+`", text):
        kinds = [_TYPES.get(kind, kind) for kind in match[1].split(" | ")]
        return "expected " + " or ".join(kinds)
    if text == "Number out of range":
        return "expected a number"
    return text[:1].lower() + text[1:]


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def shown(value: Any) -> str:
    """A value as an error message quotes it: long ones cut, long containers by type."""
    text = repr(value)
    if len(text) <= 40:
        return text
    return type(value).__name__ if isinstance(value, (dict, list, tuple)) else text[:40] + "..."


def listen_address(value: str, lowest_port: int) -> str | None:
    """What is wrong with ``HOST:PORT`` (None: nothing): a port from ``lowest_port`` to 65535
    and a host that is an IP address or a DNS name (``999.1.1.1`` is neither, and would fail
    only at bind time)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not lowest_port <= int(port) < 65536 \
            or not _is_host(host.strip("[]")):
        return (f"expected HOST:PORT (an IP address or DNS name, a port {lowest_port}-65535), "
                f"e.g. 127.0.0.1:8080, got {shown(value)}")
    return None


_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        pass
    labels = host.rstrip(".").split(".")
    # all-numeric labels would be an IPv4 address, and that did not parse
    return 0 < len(host) <= 253 and all(map(_DNS_LABEL.fullmatch, labels)) \
        and not labels[-1].isdigit()


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (the last would silently win)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {shown(key)} (the last would win)",
                    key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def load_yaml(raw: bytes) -> Any:
    """Parse a YAML document, or raise :class:`InvalidInput` saying where it is broken."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput([("", f"expected UTF-8 text, got byte 0x{raw[exc.start]:02x} at "
                                 f"offset {exc.start}")]) from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise InvalidInput([("", f"{where}not valid YAML ({getattr(exc, 'problem', exc)})")]) \
            from None
    except ValueError as exc:  # an integer past Python's digit limit
        raise InvalidInput([("", f"not valid YAML ({exc})")]) from None
    except RecursionError:
        raise InvalidInput([("", "expected a document nested less deeply")]) from None


class ConfigError(Exception):
    """A configuration that cannot be used; the message says where and what was expected, one
    line per problem (``key``/``problem`` are the first; ``problems`` all of them)."""

    def __init__(self, file: str, key: str, problem: str, *more: tuple[str, str]) -> None:
        self.file, self.key, self.problem = file, key, problem
        self.problems = [(key, problem), *more]
        super().__init__("\n".join(f"{file}: {k}: {p}" if k else f"{file}: {p}"
                                   for k, p in self.problems))


def load_file(schema: type[S], path: str | os.PathLike[str]) -> S:
    """The YAML file ``path`` (empty: all defaults) as a ``schema``, or :class:`ConfigError`."""
    try:
        data = load_yaml(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read the file ({exc.strerror or exc})") \
            from None
    except InvalidInput as exc:
        raise ConfigError(str(path), *exc.problems[0], *exc.problems[1:]) from None
    return from_mapping(schema, {} if data is None else data, str(path))


def from_mapping(schema: type[S], data: Any, file: str) -> S:
    """An already-parsed document as a ``schema``, or :class:`ConfigError` naming ``file``."""
    try:
        return validate(schema, data)
    except InvalidInput as exc:
        located = [(key or "(top level)", text) for key, text in exc.problems]
        raise ConfigError(file, *located[0], *located[1:]) from None

