"""Checks on what users pass in: user ids and properties."""

from __future__ import annotations

from collections.abc import Mapping

MAX_USER_ID_LENGTH = 256
MAX_PROPERTY_KEY_LENGTH = 64
MAX_PROPERTY_VALUE_LENGTH = 256

PropertyValue = str | int | float | bool


def check_user_id(user_id: object, field: str = "user_id") -> str | None:
    """Return the user id as stored, or raise ValueError naming ``field``."""
    if user_id is None:
        return None
    if isinstance(user_id, bool) or not isinstance(user_id, str | int):
        raise ValueError(f"{field} must be a str (or int), got {type(user_id).__name__}")
    text = str(user_id)
    if not text or len(text) > MAX_USER_ID_LENGTH:
        raise ValueError(f"{field} must be 1 to {MAX_USER_ID_LENGTH} characters, got {len(text)}")
    if not text.isprintable():
        raise ValueError(f"{field} must not contain control characters: {text!r}")
    return text


def check_properties(properties: Mapping[str, object], field: str = "properties") -> dict[str, str]:
    """Return properties as ``str -> str``, or raise ValueError naming the bad key."""
    checked: dict[str, str] = {}
    for key, value in properties.items():
        if not isinstance(key, str) or not key or len(key) > MAX_PROPERTY_KEY_LENGTH:
            raise ValueError(
                f"{field}: keys must be strings of 1 to {MAX_PROPERTY_KEY_LENGTH} characters, "
                f"got {key!r}"
            )
        if not key.isprintable() or '"' in key or "\\" in key:
            raise ValueError(
                f"{field}: key {key!r} must not contain control characters, '\"' or '\\'"
            )
        if value is None:
            continue
        if not isinstance(value, str | int | float | bool):
            raise ValueError(
                f"{field}[{key!r}] must be a str, int, float or bool, got {type(value).__name__}"
            )
        text = str(value)
        if len(text) > MAX_PROPERTY_VALUE_LENGTH or not text.isprintable():
            raise ValueError(
                f"{field}[{key!r}] must be at most {MAX_PROPERTY_VALUE_LENGTH} printable "
                f"characters, got {text[:40]!r}"
            )
        checked[key] = text
    return checked
