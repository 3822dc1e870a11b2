"""Strict, bounded CBOR codec for protocol messages.

Each message is a frozen dataclass whose fields declare a small integer CBOR key, a type
and bounds. Decoding refuses unknown keys, missing fields, wrong types and oversized
values, so a malformed message never reaches the logic.
"""
from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, get_type_hints

import cbor2

from .errors import MalformedMessage, MessageTooLarge

MAX_MESSAGE = 16 * 1024  # every protocol message, certificates included, fits well inside this
TYPE_KEY = 0


def loads_bounded(data: bytes, *, max_size: int = MAX_MESSAGE) -> Any:
    if not isinstance(data, (bytes, bytearray)):
        raise MalformedMessage("message must be bytes")
    if len(data) > max_size:
        raise MessageTooLarge(f"message of {len(data)} bytes exceeds the {max_size}-byte limit")
    if not data:
        raise MalformedMessage("empty message")
    fp = io.BytesIO(data)
    try:
        obj = cbor2.load(fp)
    except Exception:
        raise MalformedMessage("message is not valid CBOR") from None
    if fp.tell() != len(data):
        raise MalformedMessage("trailing bytes after CBOR item")
    return obj


def f(key: int, *, max_len: int = 4096, min_len: int = 0, optional: bool = False) -> Any:
    """Declare a message field: CBOR key and bounds (length for str/bytes/list)."""
    meta = {"key": key, "max_len": max_len, "min_len": min_len, "optional": optional}
    if optional:
        return field(default=None, metadata=meta)
    return field(metadata=meta)


M = TypeVar("M", bound="Message")

_SCALARS = (str, bytes, int, bool)


def _check_value(name: str, value: Any, typ: Any, meta: dict) -> None:
    origin = getattr(typ, "__origin__", None)
    if typ in (str, bytes):
        if not isinstance(value, typ):
            raise MalformedMessage(f"field '{name}' must be {typ.__name__}")
    elif typ is int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise MalformedMessage(f"field '{name}' must be an integer")
        if not -(2**63) <= value < 2**63:
            raise MalformedMessage(f"field '{name}' is out of range")
        return
    elif typ is bool:
        if not isinstance(value, bool):
            raise MalformedMessage(f"field '{name}' must be a boolean")
        return
    elif origin is list:
        (item,) = typ.__args__
        if not isinstance(value, list) or not all(isinstance(v, item) for v in value):
            raise MalformedMessage(f"field '{name}' must be a list of {item.__name__}")
        for v in value:
            if isinstance(v, (str, bytes)) and len(v) > MAX_MESSAGE:
                raise MalformedMessage(f"an item of field '{name}' is too long")
    elif typ is dict or origin is dict:
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, _SCALARS) for k, v in value.items()):
            raise MalformedMessage(f"field '{name}' must be a map of text to scalars")
    else:  # pragma: no cover - a programming error in a message declaration
        raise TypeError(f"unsupported field type {typ!r}")
    if not meta["min_len"] <= len(value) <= meta["max_len"]:
        raise MalformedMessage(
            f"field '{name}' has length {len(value)}, allowed {meta['min_len']}..{meta['max_len']}")


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[int] = -1

    @classmethod
    def _fields(cls) -> list[tuple[str, Any, dict]]:
        cache = cls.__dict__.get("_field_cache")
        if cache is None:
            hints = get_type_hints(cls)
            cache = []
            for fl in dataclasses.fields(cls):
                typ = hints[fl.name]
                if getattr(typ, "__origin__", None) is not None and type(None) in getattr(typ, "__args__", ()):
                    typ = next(a for a in typ.__args__ if a is not type(None))
                cache.append((fl.name, typ, dict(fl.metadata)))
            setattr(cls, "_field_cache", cache)
        return cache

    def __post_init__(self) -> None:
        for name, typ, meta in self._fields():
            value = getattr(self, name)
            if value is None and meta["optional"]:
                continue
            _check_value(name, value, typ, meta)

    def to_map(self) -> dict[int, Any]:
        out: dict[int, Any] = {TYPE_KEY: self.TYPE}
        for name, _typ, meta in self._fields():
            value = getattr(self, name)
            if value is not None:
                out[meta["key"]] = value
        return out

    def encode(self) -> bytes:
        return cbor2.dumps(self.to_map(), canonical=True)

    @classmethod
    def from_map(cls: type[M], obj: Any) -> M:
        if not isinstance(obj, dict):
            raise MalformedMessage(f"{cls.__name__} must be a CBOR map")
        # `==` would let True or 1.0 stand for 1: keys and the type must be real integers.
        if any(type(k) is not int for k in obj):
            raise MalformedMessage(f"{cls.__name__} keys must be integers")
        mtype = obj.get(TYPE_KEY)
        if type(mtype) is not int or mtype != cls.TYPE:
            raise MalformedMessage(f"expected a {cls.__name__} message")
        by_key = {meta["key"]: (name, meta) for name, _t, meta in cls._fields()}
        unknown = [k for k in obj if k != TYPE_KEY and k not in by_key]
        if unknown:
            raise MalformedMessage(f"{cls.__name__} has unknown fields {sorted(map(str, unknown))}")
        kwargs = {}
        for key, (name, meta) in by_key.items():
            if key not in obj:
                if not meta["optional"]:
                    raise MalformedMessage(f"{cls.__name__} is missing field '{name}'")
                continue
            kwargs[name] = obj[key]
        try:
            return cls(**kwargs)
        except MalformedMessage:
            raise
        except (TypeError, ValueError) as exc:
            raise MalformedMessage(f"{cls.__name__}: {exc}") from None

    @classmethod
    def decode(cls: type[M], data: bytes, *, max_size: int = MAX_MESSAGE) -> M:
        obj = loads_bounded(data, max_size=max_size)
        msg = cls.from_map(obj)
        # Only the canonical encoding is accepted, so two parsers can never read one message
        # differently (repeated keys, non-shortest integers, other key orders).
        if cbor2.dumps(obj, canonical=True) != bytes(data):
            raise MalformedMessage(f"{cls.__name__} is not canonically encoded (repeated or unordered keys?)")
        return msg
