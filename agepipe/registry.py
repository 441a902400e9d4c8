"""Name-to-thing tables (detectors, crop geometries, runtimes, augmentations, ...) in timm's
`register_model`/`create_model` style: a decorator or a dict fills a `Registry`, and looking up a name
it does not hold raises the one error that lists the names it does."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """The things of one `kind` by name. `alternative` names what else a lookup's caller accepts
    (labels: "a .csv/.parquet table"), for the error."""

    def __init__(self, kind: str, entries: Mapping[str, T] | None = None, *, alternative: str = "") -> None:
        self.kind = kind
        self.alternative = alternative
        self._entries: dict[str, T] = dict(entries or {})

    def register(self, name: str) -> Callable[[T], T]:
        """A decorator that adds the decorated thing under `name`."""

        def add(thing: T) -> T:
            self._entries[name] = thing
            return thing

        return add

    def __getitem__(self, name: str) -> T:
        if name not in self._entries:
            names = ", ".join(sorted(self._entries))
            alternative = f", or {self.alternative}" if self.alternative else ""
            raise ValueError(f"unknown {self.kind} {name!r}: use one of {names}{alternative}")
        return self._entries[name]

    def check(self, name: str) -> None:
        """Raise the one error where `name` is not registered: a setting checked before any work starts."""
        self[name]

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Call the factory registered as `name` with these arguments."""
        return self[name](*args, **kwargs)  # type: ignore[operator]

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def __len__(self) -> int:
        return len(self._entries)
