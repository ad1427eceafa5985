"""Pseudonymous user ids: a keyed hash (HMAC-SHA256) stored instead of the id itself."""

from __future__ import annotations

import hashlib
import hmac
import os
import re

ENV_KEY = "LLM_TALLY_PSEUDONYMIZE_KEY"
PREFIX = "h:"
_SHAPE = re.compile(r"h:[0-9a-f]{32}")
_CACHE_SIZE = 100_000
_MIN_KEY_BYTES = 16


def is_pseudonym(user_id: str) -> bool:
    """Whether ``user_id`` is already a pseudonym (``h:`` and 32 hex digits)."""
    return len(user_id) == 34 and _SHAPE.fullmatch(user_id) is not None


class Pseudonyms:
    """Maps user ids to ``h:<32 hex digits>``: the first 128 bits of their HMAC-SHA256.

    The same id and key always give the same pseudonym, so totals, lookups and ``/api/me``
    work for whoever knows the id; without the key a pseudonym cannot be traced back, nor
    tested against a list of likely ids (e-mail addresses). An id that already has the
    shape of a pseudonym is taken as one (the dashboard links to users by pseudonym).
    """

    def __init__(self, key: str | bytes) -> None:
        secret = key.encode() if isinstance(key, str) else key
        if not isinstance(secret, bytes) or len(secret) < _MIN_KEY_BYTES:
            raise ValueError(
                f"pseudonymize_key must be a secret of at least {_MIN_KEY_BYTES} bytes "
                "(str or bytes), e.g. secrets.token_hex(32), kept like a password"
            )
        self._key = secret
        self._cache: dict[str, str] = {}

    @classmethod
    def configured(cls, key: str | bytes | None) -> Pseudonyms | None:
        """From ``key``, else ``$LLM_TALLY_PSEUDONYMIZE_KEY``; None when neither is set."""
        if key is None:
            key = os.environ.get(ENV_KEY) or None
        return cls(key) if key is not None else None

    def of(self, user_id: str | None) -> str | None:
        """The pseudonym stored for ``user_id`` (None stays None: calls without a user)."""
        if user_id is None:
            return None
        found = self._cache.get(user_id)
        if found is None:
            if is_pseudonym(user_id):
                return user_id
            digest = hmac.new(self._key, user_id.encode(), hashlib.sha256).hexdigest()
            found = PREFIX + digest[:32]
            if len(self._cache) >= _CACHE_SIZE:
                self._cache.clear()  # a bound, not an LRU: a miss only costs a hash
            self._cache[user_id] = found
        return found
