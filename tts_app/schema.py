"""The app's one way to declare the shape of its config: pydantic models, read with
:func:`validate`; every problem is reported at once with its located path::

    admission.queue_size: expected a value >= 0, got -1

(``tts_app`` never imports ``exporter``, so this is the app's own copy of the sidecar's
``exporter/schema.py``, one schema helper per package.)
"""

from __future__ import annotations

import ipaddress
import os
import re
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic_core import ErrorDetails, PydanticCustomError


class Schema(BaseModel):
    """Frozen, strict (no ``"5"`` for 5, no 1 for true), unknown keys refused, finite numbers."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class InvalidInput(ValueError):
    """Input that does not fit its schema: ``problems`` lists (located path, expectation)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{key}: {text}" if key else text for key, text in problems))


def problem(message: str) -> PydanticCustomError:
    """What a validator raises: ``message`` says what was expected (the value is appended)."""
    return PydanticCustomError("expected", message)


def listen_address(lowest_port: int) -> Callable[[str], str]:
    """A check of ``HOST:PORT``: a port from ``lowest_port`` to 65535 and a host that is an IP
    address or a DNS name (``999.1.1.1`` is neither, and would fail only at bind time)."""
    def check(value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not port.isdigit() or not lowest_port <= int(port) < 65536 \
                or not _is_host(host.strip("[]")):
            raise problem(f"expected HOST:PORT (an IP address or DNS name, a port "
                          f"{lowest_port}-65535), e.g. 127.0.0.1:8080")
        return value
    return check


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


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: Any) -> M:
    """``data`` as a ``model``, or :class:`InvalidInput` listing every problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise InvalidInput([(path(error["loc"]), describe(model, error))
                            for error in exc.errors(include_url=False)]) from None
    except RecursionError:
        raise InvalidInput([("", "expected a document nested less deeply")]) from None


def path(loc: tuple[int | str, ...]) -> str:
    """``("logs", "sources", 0, "format")`` as ``logs.sources[0].format``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else f".{part}" if text else str(part)
    return text


_EXPECTED = {
    "int_type": "expected an integer", "float_type": "expected a number",
    "bool_type": "expected true or false", "string_type": "expected a string",
    "list_type": "expected a list", "tuple_type": "expected a list",
    "dict_type": "expected a mapping", "model_type": "expected a mapping",
    "finite_number": "expected a finite number", "missing": "missing",
    "greater_than": "expected a number greater than {gt}",
    "greater_than_equal": "expected a value >= {ge}",
    "less_than": "expected a value < {lt}", "less_than_equal": "expected a value <= {le}",
    "too_short": "expected at least {min_length} entries",
    "too_long": "expected at most {max_length} entries",
    "string_too_short": "expected at least {min_length} characters",
    "string_too_long": "expected at most {max_length} characters",
    "literal_error": "expected one of {expected}",
}


def describe(model: type[BaseModel], error: ErrorDetails) -> str:
    """What was expected, and what came instead."""
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "extra_forbidden":
        known = _model_at(model, error["loc"][:-1])
        names = f"; expected one of {', '.join(sorted(known.model_fields))}" if known else ""
        return f"unknown key{names}"
    if kind == "literal_error":
        ctx = {"expected": str(ctx["expected"]).replace(" or ", ", ")}
    template = _EXPECTED.get(kind)
    text = template.format(**ctx) if template else error["msg"]
    return text if kind == "missing" else f"{text}, got {shown(error['input'])}"


def shown(value: Any) -> str:
    """A value as an error message quotes it: long ones cut, long containers by type."""
    text = repr(value)
    if len(text) <= 40:
        return text
    return type(value).__name__ if isinstance(value, (dict, list, tuple)) else text[:40] + "..."


def _model_at(model: Any, loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that the mapping at ``loc`` is validated as."""
    current = _inner_model(model)
    for part in loc:
        if current is not None and isinstance(part, str) and part in current.model_fields:
            current = _inner_model(current.model_fields[part].annotation)
    return current


def _inner_model(tp: Any) -> type[BaseModel] | None:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    return next(filter(None, map(_inner_model, typing.get_args(tp))), None)


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


def load_file(model: type[M], path: str | os.PathLike[str]) -> M:
    """The YAML file ``path`` (empty: all defaults) as a ``model``, or :class:`ConfigError`."""
    try:
        data = load_yaml(Path(path).read_bytes())
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot read the file ({exc.strerror or exc})") \
            from None
    except InvalidInput as exc:
        raise ConfigError(str(path), *exc.problems[0], *exc.problems[1:]) from None
    return from_mapping(model, {} if data is None else data, str(path))


def from_mapping(model: type[M], data: Any, file: str) -> M:
    """An already-parsed document as a ``model``, or :class:`ConfigError` naming ``file``."""
    try:
        return validate(model, data)
    except InvalidInput as exc:
        located = [(key or "(top level)", text) for key, text in exc.problems]
        raise ConfigError(file, *located[0], *located[1:]) from None
