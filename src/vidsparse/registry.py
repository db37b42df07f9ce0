"""One registry per stage. A method is a dataclass registered by decorator; specs look like ``name:k=v,k2=v2``.

Registries fill lazily: ``get``/``names`` import the stage's package the first time, so ``import vidsparse`` stays
light and adding a method touches only its own file.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import typing
from typing import Any, Callable, Generic, TypeVar

from .errors import SpecError

T = TypeVar("T")


def _parse_value(text: str) -> Any:
    low = text.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"bolt:power=3,seed=1"`` -> ``("bolt", {"power": 3, "seed": 1})``."""
    if not isinstance(spec, str) or not spec.strip():
        raise SpecError("empty method spec: write NAME or NAME:key=value,key=value")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise SpecError(f"malformed method spec {spec!r}: write NAME or NAME:key=value,key=value")
    params: dict[str, Any] = {}
    if rest.strip():
        for item in rest.split(","):
            key, eq, value = item.partition("=")
            key = key.strip()
            if not eq or not key or not key.isidentifier():
                raise SpecError(f"malformed parameter {item!r} in spec {spec!r}: write key=value")
            if key in params:
                raise SpecError(f"parameter {key!r} given twice in spec {spec!r}")
            params[key] = _parse_value(value.strip())
    return name, params


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Coerce a parsed spec value to a dataclass field's annotated type (int, float, bool, str, Optional)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Union or (origin is not None and str(origin) == "<class 'types.UnionType'>"):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except SpecError:
                continue
        raise SpecError(f"{where}: cannot use {value!r} here")
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise SpecError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise SpecError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise SpecError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        return str(value)
    return value


class Registry(Generic[T]):
    """Maps method names to dataclasses of one stage."""

    def __init__(self, stage: str, package: str):
        self.stage = stage
        self.package = package
        self._items: dict[str, type] = {}
        self._loaded = False

    def register(self, name: str, **capabilities: Any) -> Callable[[type], type]:
        """Class decorator. ``capabilities`` are small named facts (``query_required=True``) stored on the class."""

        def deco(cls: type) -> type:
            if name in self._items and self._items[name] is not cls:
                raise RuntimeError(f"{self.stage} method {name!r} registered twice")
            if not dataclasses.is_dataclass(cls):
                raise TypeError(f"{cls.__name__} must be a dataclass to be registered")
            cls.name = name
            cls.capabilities = dict(capabilities)
            self._items[name] = cls
            return cls

        return deco

    def _load(self) -> None:
        """Import the stage's package and every module in it: a new method is one new file, nothing else."""
        if not self._loaded:
            import pkgutil

            self._loaded = True
            pkg = importlib.import_module(self.package)
            for mod in pkgutil.iter_modules(pkg.__path__):
                if not mod.ispkg and not mod.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{mod.name}")

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def get(self, name: str) -> type:
        self._load()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise SpecError(
                f"unknown {self.stage} method {name!r}.{hint} Known: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def from_spec(self, spec: str, **overrides: Any) -> T:
        """Build a method from ``name:k=v,...``; ``overrides`` fill parameters the spec leaves out."""
        name, params = parse_spec(spec)
        cls = self.get(name)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        hints = typing.get_type_hints(cls)
        for key, value in overrides.items():
            params.setdefault(key, value)
        kwargs = {}
        for key, value in params.items():
            if key not in fields:
                valid = ", ".join(fields) or "none"
                raise SpecError(f"{self.stage} method {name!r} has no parameter {key!r} (parameters: {valid})")
            kwargs[key] = _coerce(value, hints.get(key, Any), f"{name}:{key}")
        try:
            return cls(**kwargs)
        except (ValueError, TypeError) as exc:
            raise SpecError(f"bad parameters for {self.stage} method {name!r}: {exc}") from None


def spec_of(method: Any) -> str:
    """Canonical spec string of a method instance: its name plus every parameter that differs from the default."""
    parts = []
    for f in dataclasses.fields(method):
        if not f.init:
            continue
        value = getattr(method, f.name)
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING
        )
        if value != default:
            parts.append(f"{f.name}={str(value).lower() if isinstance(value, bool) else value}")
    return method.name + (":" + ",".join(parts) if parts else "")


FRAMES: Registry = Registry("frame selection", "vidsparse.frames")
SCORERS: Registry = Registry("scorer", "vidsparse.scoring")
PATTERNS: Registry = Registry("attention pattern", "vidsparse.attention.patterns")
TOKENS: Registry = Registry("token reducer", "vidsparse.tokens")
INLLM: Registry = Registry("in-LLM reducer", "vidsparse.tokens.inllm")
KV: Registry = Registry("KV cache", "vidsparse.kv")
