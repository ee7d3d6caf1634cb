"""Closed vocabularies (datasets, models, attacks, defenses) as registries.

A registry maps a lower-case name to a factory. Unknown names and unknown
parameters fail at once, naming the valid choices, before any compute starts.
"""
from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Dict, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: Dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        key = name.lower()

        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            if key in self._items:
                raise ValueError(f"{self.kind} {key!r} is registered twice")
            self._items[key] = factory
            return factory

        return decorate

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> Callable[..., T]:
        key = str(getattr(name, "value", name)).lower()
        if key not in self._items:
            raise ValueError(
                f"unknown {self.kind} {name!r}; valid choices: {', '.join(self.names())}"
            )
        return self._items[key]

    def create(self, name: str, **params: Any) -> T:
        factory = self.get(name)
        check_params(factory, params, f"{self.kind} {name!r}")
        return factory(**params)


def valid_params(factory: Callable[..., Any]) -> list[str]:
    if dataclasses.is_dataclass(factory):
        return [f.name for f in dataclasses.fields(factory) if f.init]
    sig = inspect.signature(factory)
    return [p for p, v in sig.parameters.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]


def check_params(factory: Callable[..., Any], params: dict, what: str) -> None:
    valid = valid_params(factory)
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise TypeError(
            f"{what} got unknown parameter(s) {', '.join(unknown)}; valid parameters: {', '.join(valid) or '(none)'}"
        )
