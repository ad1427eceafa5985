"""Checks on what users pass in: user ids and properties (the table in docs/security.md).

A user id is a ``str`` (or an ``int``, stored as its decimal text) of 1 to
:data:`MAX_USER_ID_LENGTH` printable characters. Printable is :meth:`str.isprintable`: no
control characters (line breaks, NUL, escape...), no invisible format characters (bidi
overrides, zero-width joiners), no lone surrogates, no separators but the plain space. Ids
are stored verbatim: no trimming, case folding or Unicode normalisation, so two spellings
are two users. Property keys follow the same rule with at most :data:`MAX_PROPERTY_KEY_LENGTH`
characters and neither ``"`` nor ``\\``; values are ``str``, ``int``, ``float`` or ``bool``,
stored as their text (``str(value)``), at most :data:`MAX_PROPERTY_VALUE_LENGTH` printable
characters; at most :data:`MAX_PROPERTIES` keys at a time.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from ._internal import logger

MAX_USER_ID_LENGTH = 256
MAX_PROPERTY_KEY_LENGTH = 64
MAX_PROPERTY_VALUE_LENGTH = 256
#: Keys in one ``properties=`` / ``tag(...)`` / ``user(...)`` / properties() answer.
MAX_PROPERTIES = 64

PropertyValue = str | int | float | bool
_PRINTABLE = "no control, format or separator characters but the space"


def check_user_id(user_id: object, field: str = "user_id") -> str | None:
    """Return the user id as stored, or raise ValueError naming ``field``."""
    if user_id is None:
        return None
    if isinstance(user_id, bool) or not isinstance(user_id, str | int):
        raise ValueError(f"{field} must be a str (or int), got {type(user_id).__name__}")
    text = _text(user_id, field, MAX_USER_ID_LENGTH)
    if not text or len(text) > MAX_USER_ID_LENGTH:
        raise ValueError(f"{field} must be 1 to {MAX_USER_ID_LENGTH} characters, got {len(text)}")
    if not text.isprintable():
        raise ValueError(f"{field} must be printable, {_PRINTABLE}: {text!r}")
    return text


def _text(value: str | int | float, field: str, limit: int) -> str:
    try:
        return str(value)
    except ValueError:  # an int of more than sys.get_int_max_str_digits() digits
        raise ValueError(f"{field} must be at most {limit} characters, got a longer int") from None


def check_properties(properties: Mapping[str, object], field: str = "properties") -> dict[str, str]:
    """Return properties as ``str -> str``, or raise ValueError naming the bad key."""
    if len(properties) > MAX_PROPERTIES:
        raise ValueError(
            f"{field}: at most {MAX_PROPERTIES} properties at a time, got {len(properties)}"
        )
    checked: dict[str, str] = {}
    for key, value in properties.items():
        if not isinstance(key, str) or not key or len(key) > MAX_PROPERTY_KEY_LENGTH:
            raise ValueError(
                f"{field}: keys must be strings of 1 to {MAX_PROPERTY_KEY_LENGTH} characters, "
                f"got {key!r}"
            )
        if not key.isprintable() or '"' in key or "\\" in key:
            raise ValueError(
                f"{field}: key {key!r} must be printable ({_PRINTABLE}), without '\"' or '\\'"
            )
        if value is None:
            continue
        if not isinstance(value, str | int | float | bool):
            raise ValueError(
                f"{field}[{key!r}] must be a str, int, float or bool, got {type(value).__name__}"
            )
        text = _text(value, f"{field}[{key!r}]", MAX_PROPERTY_VALUE_LENGTH)
        if len(text) > MAX_PROPERTY_VALUE_LENGTH or not text.isprintable():
            raise ValueError(
                f"{field}[{key!r}] must be at most {MAX_PROPERTY_VALUE_LENGTH} printable "
                f"characters ({_PRINTABLE}), got {text[:40]!r}"
            )
        checked[key] = text
    return checked


# -- values from the app's code or from LLM requests: a bad one is ignored, never raised ----

_warned: set[str] = set()
_warned_lock = threading.Lock()


def warn_once(source: str, exc: BaseException) -> None:
    """Log a bad value from ``source`` the first time only: it may come with every request."""
    with _warned_lock:
        first = source not in _warned
        _warned.add(source)
    if first:
        logger.warning(
            "llm-tally: ignoring what %s gave (logged once): %s", source, exc, exc_info=exc
        )


def user_id_from(value: Any, source: str) -> str | None:
    """A user id from the app's code or a request: an id, or None; a bad one is ignored.

    Besides a ``str`` or an ``int``, any object's ``str()`` is taken (a UUID, a custom id
    type), but not bytes (their ``str()`` is ``"b'...'"``) and not a bool."""
    if value is None or value == "":
        return None
    if isinstance(value, bytes | bytearray | memoryview):
        warn_once(source, ValueError(f"{source} must give a str or int, got bytes: decode it"))
        return None
    try:
        return check_user_id(value if isinstance(value, str | int) else str(value), source)
    except ValueError as exc:
        warn_once(source, exc)
        return None


def properties_from(value: Any, source: str) -> dict[str, str]:
    """Properties from the app's code or a request; bad ones are ignored."""
    if not value:
        return {}
    if not isinstance(value, Mapping):
        warn_once(source, ValueError(f"{source} must give a dict, got {type(value).__name__}"))
        return {}
    try:
        return check_properties(value, source)
    except ValueError as exc:
        warn_once(source, exc)
        return {}
