"""Name -> class registries, so YAML configs pick a backend by name with its init arguments."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def parse_spec(spec: str | Mapping[str, Any], kind: str = "component") -> tuple[str, dict[str, Any]]:
    """`"name"` or `{"name": ..., "init_args": {...}}` -> (name, init_args); other keys are an error."""
    if isinstance(spec, str):
        return spec, {}
    unknown = set(spec) - {"name", "init_args"}
    if "name" not in spec or unknown:
        raise ValueError(f"{kind} spec must be {{name, init_args}}, got keys {sorted(spec)}")
    return spec["name"], dict(spec.get("init_args") or {})


class Registry(Generic[T]):
    """A named set of factories of one kind (e.g. "identity encoder").

    >>> ENCODERS = Registry("identity encoder")
    >>> @ENCODERS.register("dlib")
    ... class DlibEncoder: ...
    >>> ENCODERS.build({"name": "dlib", "init_args": {}})  # or ENCODERS.build("dlib")
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorator(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories and self._factories[name] is not factory:
                raise KeyError(f"{self.kind} {name!r} is registered twice")
            self._factories[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._factories[name]
        except KeyError:
            raise KeyError(
                f"unknown {self.kind} {name!r}; registered: {', '.join(self.names()) or 'none'}"
            ) from None

    def name_of(self, factory: Callable[..., T]) -> str:
        """The name `factory` (e.g. a class) is registered under."""
        for name, registered in self._factories.items():
            if registered is factory:
                return name
        raise KeyError(
            f"{getattr(factory, '__qualname__', factory)} is not a registered {self.kind}; "
            f"registered: {', '.join(self.names()) or 'none'}"
        )

    def build(self, spec: str | Mapping[str, Any], **overrides: Any) -> T:
        """Build from `"name"` or `{"name": ..., "init_args": {...}}` (overrides win)."""
        name, init_args = parse_spec(spec, self.kind)
        return self.get(name)(**{**init_args, **overrides})

    def __contains__(self, name: object) -> bool:
        return name in self._factories


def spec_from_text(text: str | None) -> str | dict[str, Any] | None:
    """Command-line text -> a registry spec: a name, or JSON '{"name": ..., "init_args": {...}}' parsed to a dict
    (`emojidiff.registry.parse_spec` then splits a spec into name and init_args)."""
    if text is None:
        return None
    text = text.strip()
    if text.startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"cannot parse encoder spec {text!r} as JSON: {err}") from None
    return text
