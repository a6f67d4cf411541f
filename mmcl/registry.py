"""A tiny name -> builder registry, so towers and losses are chosen by exact config names."""

from __future__ import annotations

from typing import Callable, Dict, Generic, List, TypeVar

from mmcl.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: Dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(entry: T) -> T:
            if name in self._entries:
                raise KeyError(f"{self.kind} {name!r} is already registered")
            self._entries[name] = entry
            return entry

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._entries[name]

    def check(self, name: str, key: str) -> None:
        """A ConfigError naming the config `key` when `name` is not registered."""
        if name not in self._entries:
            raise ConfigError(f"config key {key!r}: unknown {self.kind} {name!r}; known: {', '.join(self.names())}")

    def names(self) -> List[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries
