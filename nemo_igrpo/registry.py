"""One registry mechanism for every pluggable choice: losses, advantages, KL estimators, aggregations, tie-breaks,
importance corrections, rewards, backends, eval protocols, presets, loggers.

A ``Registry`` maps a config string to an object (usually a function or a class) and, when it backs a config key,
records itself in a directory that config validation reads. Validation therefore sees whatever is registered at the
time a config is loaded, including a user's own ``@register_*`` in their module: register first, then load.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator, Mapping
from typing import Generic, TypeVar

from nemo_igrpo.errors import ConfigError

T = TypeVar("T")

_BY_CONFIG_KEY: dict[str, "Registry"] = {}
_DECORATE = object()  # register(name) without an object: return a decorator (None is a valid entry)


class Registry(Mapping[str, T], Generic[T]):
    """``name → object`` for one kind of choice, e.g. ``Registry("policy loss", "algorithm.policy_loss")``.

    Read it like a dict (``REG[name]``, ``name in REG``, iteration in registration order); add to it with
    ``@REG.register("name")`` or ``REG.register("name", obj)``. A name can be registered once.
    """

    def __init__(self, kind: str, config_key: str | None = None) -> None:
        self.kind = kind
        self.config_key = config_key
        self._entries: dict[str, T] = {}
        if config_key is not None:
            if config_key in _BY_CONFIG_KEY:
                owner = _BY_CONFIG_KEY[config_key].kind
                raise ValueError(f"config key {config_key!r} is already backed by the {owner} registry")
            _BY_CONFIG_KEY[config_key] = self

    def register(self, name: str, obj: T | object = _DECORATE) -> Callable[[T], T] | T:
        """Decorator (``@REG.register("name")``) or direct call (``REG.register("name", obj)``)."""

        def add(value: T) -> T:
            if not isinstance(name, str) or not name:
                raise ValueError(f"a {self.kind} needs a non-empty string name, got {name!r}")
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = value
            return value

        return add if obj is _DECORATE else add(obj)  # type: ignore[arg-type]

    def __getitem__(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise KeyError(self.unknown(name)) from None

    def __delitem__(self, name: str) -> None:
        """Remove an entry (tests, or a user replacing a built-in: delete it, then register the new one)."""
        del self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}: {', '.join(self._entries)})"

    def unknown(self, name: object) -> str:
        """The message for a name that is not registered: the registered names and the closest one."""
        hint = difflib.get_close_matches(str(name), list(self._entries), n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        return f"unknown {self.kind} {name!r}{suggestion}; registered: {', '.join(self._entries)}"

    def lookup(self, name: str) -> T:
        """``self[name]``, raising ValueError with :meth:`unknown`'s message (for code paths, not configs)."""
        if name not in self._entries:
            raise ValueError(self.unknown(name))
        return self._entries[name]

    def check(self, name: object, key: str | None = None) -> None:
        """Raise ConfigError naming ``key`` (default: this registry's config key) unless ``name`` is registered."""
        if name not in self._entries:
            raise ConfigError(f"{key or self.config_key}: {self.unknown(name)}")


def config_registries() -> dict[str, Registry]:
    """Every registry that backs a config key, by that key (what config validation checks values against)."""
    return dict(_BY_CONFIG_KEY)
