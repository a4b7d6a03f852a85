"""JSON payloads: the types postroom encodes by itself, and the caller's hook for the rest.

:func:`encode_json` turns a payload into compact JSON. Beside JSON's own types it encodes
the values business code holds (the README's "Payload types" lists them and says how a
consumer gets them back):

- ``Decimal`` as a JSON string of its exact digits (``"19.90"``), never a float: a binary
  float cannot hold most decimal fractions, so ``0.1 + 0.2`` cents drift;
- ``datetime``, ``date`` and ``time`` in ISO 8601 (a naive value stays naive, as written);
- ``UUID`` as its canonical string;
- an ``Enum`` member as its value (encoded by the same rules);
- a dataclass instance as an object of its fields, in field order;
- a pydantic model (anything with ``model_dump``) as ``model_dump(mode="json")``.

Sets are refused: their order is not defined, so the same set could encode to different
bytes in two processes. A ``json_default`` callable is asked about every other value; it
returns something encodable (which is encoded by these same rules) or raises ``TypeError``.
What nobody can encode raises :class:`~postroom.errors.InvalidMessageError` naming the type
and where it sits in the payload (``$.lines[2].price``).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Final, TypeAlias

from postroom.errors import InvalidMessageError

JsonDefault: TypeAlias = Callable[[Any], Any]
"""Called with a value postroom cannot encode; returns an encodable stand-in for it, or
raises ``TypeError`` if it does not know the type either (the same contract as the
``default`` argument of :func:`json.dumps`)."""

#: How deep :func:`_locate` looks for the value that could not be encoded.
_MAX_SEARCH_DEPTH: Final = 200


class _Refused(Exception):
    """Raised inside the encoder's hook for ``value``, which nobody could encode."""

    def __init__(self, value: object) -> None:
        super().__init__(type(value).__name__)
        self.value = value


def encode_json(payload: Any, json_default: JsonDefault | None = None) -> str:
    """``payload`` as compact JSON text (``ensure_ascii=False``, no NaN or Infinity).

    Raises InvalidMessageError naming the value's type and its path for anything neither
    postroom nor ``json_default`` can encode; RecursionError propagates (the caller reports
    the depth).
    """
    hook = _hook(json_default)
    try:
        return json.dumps(
            payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=hook
        )
    except _Refused as exc:
        raise InvalidMessageError(_refusal(exc.value, _locate(payload, hook))) from None
    except (TypeError, ValueError) as exc:
        if "Circular reference" in str(exc):
            raise InvalidMessageError(
                "payload is not JSON-serializable: it contains a circular reference (a list, "
                "dict or object that contains itself, or a json_default that returns its "
                "input); break the cycle"
            ) from None
        if "keys must be" in str(exc):
            raise InvalidMessageError(
                f"payload is not JSON-serializable: {_subject(_locate(payload, hook))} has a "
                f"dict key that is not a str ({exc}); convert the keys with str()"
            ) from None
        raise InvalidMessageError(
            f"payload is not JSON-serializable ({exc}); pass JSON values, the types listed "
            "in the README's 'Payload types', or a json_default for your own"
        ) from None


def _known(value: Any) -> Any:
    """postroom's stand-in for a value JSON does not know (it may need encoding itself,
    like an Enum's value or a dataclass's fields), or TypeError."""
    if isinstance(value, Decimal):
        if not value.is_finite():
            raise _Refused(value)
        return str(value)
    if isinstance(value, dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    dump = getattr(value, "model_dump", None)
    if callable(dump) and not isinstance(value, type):
        return dump(mode="json")
    raise TypeError(type(value).__name__)


def _hook(json_default: JsonDefault | None) -> Callable[[Any], Any]:
    """json.dumps' ``default``: postroom's types, then ``json_default``, else refuse."""

    def default(value: Any) -> Any:
        try:
            return _known(value)
        except TypeError:
            pass
        if json_default is not None:
            try:
                return json_default(value)
            except TypeError:
                pass
        raise _Refused(value)

    return default


def _refusal(value: object, where: str | None) -> str:
    """The sentence for ``value`` (at ``where``), which nobody could encode."""
    name = f"{type(value).__module__}.{type(value).__qualname__}".removeprefix("builtins.")
    subject = _subject(where)
    if isinstance(value, Decimal):
        return (
            f"payload is not JSON-serializable: {subject} is Decimal({str(value)!r}), which "
            "is not a number JSON can carry; send None or a string of your own for it"
        )
    if isinstance(value, set | frozenset):
        return (
            f"payload is not JSON-serializable: {subject} has type {name}: a set has no "
            "defined order, so the same message could encode differently each time; send a "
            "sorted list (sorted(values)) instead"
        )
    return (
        f"payload is not JSON-serializable: {subject} has type {name}, which postroom "
        "cannot encode; convert it yourself, or pass json_default= (to enqueue or Outbox) a "
        "function that returns a JSON value for it"
    )


def _subject(where: str | None) -> str:
    if where is None:
        return "a value in it"
    return "the payload" if where == "$" else f"the value at {where}"


def _locate(payload: Any, hook: Callable[[Any], Any]) -> str | None:
    """The path (``$.a[0].b``) of the first value json.dumps would fail on, if found.

    Walks in the encoder's own order, converting values with ``hook`` as it does.
    """

    def walk(value: Any, path: str, depth: int) -> str | None:
        if depth > _MAX_SEARCH_DEPTH:
            return None
        if value is None or isinstance(value, str | int | float | bool):
            return None
        if isinstance(value, dict):
            for key, item in value.items():
                if not (key is None or isinstance(key, str | int | float | bool)):
                    return path
                found = walk(item, _child(path, key), depth + 1)
                if found is not None:
                    return found
            return None
        if isinstance(value, list | tuple):
            for index, item in enumerate(value):
                found = walk(item, f"{path}[{index}]", depth + 1)
                if found is not None:
                    return found
            return None
        try:
            stand_in = hook(value)
        except Exception:
            return path
        return walk(stand_in, path, depth + 1)

    return walk(payload, "$", 0)


def _child(path: str, key: object) -> str:
    text = str(key)
    if text.isidentifier():
        return f"{path}.{text}"
    return f"{path}[{json.dumps(text, ensure_ascii=True)}]"
