"""Who is being charged: the per-request scope, ``user()``, ``bind_user()`` and ``tag()``."""

from __future__ import annotations

import contextvars
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Protocol

from ._context import current_scope
from ._internal import guard
from ._validation import PropertyValue, check_properties, check_user_id

if TYPE_CHECKING:
    from ._tally import Tally


class OpenCall(Protocol):
    """A call still in flight when its scope ends (an unfinished stream)."""

    def abort(self) -> None: ...


class Scope:
    """Mutable state of one user context: read by every instrumented call made inside it.

    ``properties`` is replaced, never mutated, so a call can keep a reference to the
    dict it started with.
    """

    __slots__ = (
        "abort_open_calls_on_exit",
        "open_calls",
        "properties",
        "resolve_properties",
        "resolve_user",
        "tally",
        "user_id",
    )

    def __init__(
        self,
        user_id: str | None,
        properties: dict[str, str],
        tally: Tally | None,
        abort_open_calls_on_exit: bool = False,
    ) -> None:
        self.user_id = user_id
        self.properties = properties
        self.tally = tally
        self.abort_open_calls_on_exit = abort_open_calls_on_exit
        # Streams started in this scope and not finished yet; shared by threads of the scope.
        self.open_calls: set[OpenCall] = set()
        # Set by the web integrations: who the request's user is, asked only when a call
        # needs it (the app's own authentication has run by then).
        self.resolve_user: Callable[[], str | None] | None = None
        self.resolve_properties: Callable[[], dict[str, str]] | None = None

    def who(self) -> tuple[str | None, dict[str, str]]:
        """The user and properties a call made now is charged to.

        The resolvers are ours (they call the app's own callables safely): if one fails,
        the call is charged to no one rather than broken.
        """
        if self.resolve_properties is not None:
            resolve, self.resolve_properties = self.resolve_properties, None
            found = guard("resolve properties", resolve)
            if found:
                # Properties set explicitly with tag() win over the app's callable.
                self.properties = {**found, **self.properties}
        if self.user_id is None and self.resolve_user is not None:
            self.user_id = guard("resolve user", self.resolve_user)
        return self.user_id, self.properties

    def close(self) -> None:
        """End the scope: calls still streaming are recorded as aborted if so configured."""
        if self.open_calls and self.abort_open_calls_on_exit:
            for call in list(self.open_calls):
                call.abort()


class user:
    """Charge every LLM call made inside this block to ``user_id``.

    Works with ``with`` and ``async with``. Properties (``plan="pro"``) are attached to
    each call; a nested block inherits the outer block's properties (and, with
    ``user_id=None``, its user) and may override them. ``tally`` picks the Tally that
    records the calls (default: the outer block's, else the process default).
    """

    __slots__ = ("_scope", "_token")

    def __init__(
        self,
        user_id: str | int | None,
        *,
        tally: Tally | None = None,
        **properties: PropertyValue,
    ) -> None:
        checked_id = check_user_id(user_id)
        checked_properties = check_properties(properties)
        parent = current_scope.get()
        resolve_user = None
        if parent is not None:
            parent_user, parent_properties = parent.who()
            checked_properties = {**parent_properties, **checked_properties}
            if tally is None:
                tally = parent.tally
            if checked_id is None:
                checked_id, resolve_user = parent_user, parent.resolve_user
        self._scope = Scope(checked_id, checked_properties, tally)
        self._scope.resolve_user = resolve_user
        self._token: contextvars.Token[Scope | None] | None = None

    def __enter__(self) -> user:
        self._token = current_scope.set(self._scope)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            current_scope.reset(self._token)
            self._token = None
        self._scope.close()

    async def __aenter__(self) -> user:
        return self.__enter__()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.__exit__(exc_type, exc, tb)

    @property
    def user_id(self) -> str | None:
        return self._scope.user_id

    @property
    def properties(self) -> dict[str, str]:
        return dict(self._scope.properties)


def _require_scope(function: str) -> Scope:
    scope = current_scope.get()
    if scope is None:
        raise RuntimeError(
            f"llm_tally.{function}() was called outside any user context. Wrap the code in "
            "`with llm_tally.user(...)`, or install the llm-tally middleware so that every "
            "request has one."
        )
    return scope


def bind_user(user_id: str | int | None) -> None:
    """Set or replace the user of the current context (e.g. from an auth dependency)."""
    checked = check_user_id(user_id)
    _require_scope("bind_user").user_id = checked


def tag(**properties: PropertyValue | None) -> None:
    """Add or replace properties of the current context; a value of None removes the key."""
    scope = _require_scope("tag")
    merged = {**scope.properties, **check_properties(properties)}
    for key, value in properties.items():
        if value is None:
            merged.pop(key, None)
    scope.properties = merged


def current_user_id() -> str | None:
    """The user the current context charges calls to, if any."""
    scope = current_scope.get()
    return scope.who()[0] if scope is not None else None
