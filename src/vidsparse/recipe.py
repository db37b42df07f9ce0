"""``Recipe``: one method per stage plus one ``Budget``. Round-trips through dict, YAML, JSON and CLI spec strings."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from .errors import InputError, SpecError
from .registry import parse_spec

STAGES = ("frames", "scorer", "tokens", "attention", "kv")


@dataclass(frozen=True)
class Budget:
    """The one budget every stage answers to.

    frames: frames the vision tower sees; tokens: visual tokens the LLM sees (None: frames x 256);
    density: fraction of causal attention blocks computed in prefill (None: dense);
    kv_bits: bits per cached KV element at decode (None: the model dtype)."""

    frames: int = 32
    tokens: int | None = None
    density: float | None = None
    kv_bits: float | None = None

    def __post_init__(self):
        if not isinstance(self.frames, int) or isinstance(self.frames, bool) or self.frames <= 0:
            raise InputError(f"budget.frames must be a positive integer, got {self.frames!r}")
        if self.tokens is not None and (not isinstance(self.tokens, int) or self.tokens <= 0):
            raise InputError(f"budget.tokens must be a positive integer, got {self.tokens!r}")
        if self.density is not None and not (0.0 < float(self.density) <= 1.0):
            raise InputError(f"budget.density must be in (0, 1], got {self.density!r}")
        if self.kv_bits is not None and not (0.0 < float(self.kv_bits) <= 32.0):
            raise InputError(f"budget.kv_bits must be in (0, 32], got {self.kv_bits!r}")

    @property
    def token_total(self) -> int:
        return self.tokens if self.tokens is not None else self.frames * 256


@dataclass(frozen=True)
class Recipe:
    """Method specs per stage (``None`` = the stage's default / no-op) and the budget."""

    frames: str | None = None
    scorer: str | None = None
    tokens: str | None = None
    attention: str | None = None
    kv: str | None = None
    budget: Budget = Budget()

    def __post_init__(self):
        for stage in STAGES:
            spec = getattr(self, stage)
            if spec is not None:
                parse_spec(spec)  # validates syntax early; names are checked when the stage runs

    def to_dict(self) -> dict[str, Any]:
        d = {s: getattr(self, s) for s in STAGES}
        d["budget"] = asdict(self.budget)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        if not isinstance(d, dict):
            raise SpecError(f"a recipe must be a mapping, got {type(d).__name__}")
        unknown = set(d) - set(STAGES) - {"budget"}
        if unknown:
            raise SpecError(f"unknown recipe keys {sorted(unknown)}; allowed: {', '.join(STAGES)}, budget")
        budget = d.get("budget") or {}
        if not isinstance(budget, dict):
            raise SpecError("recipe 'budget' must be a mapping such as {frames: 32, tokens: 8192}")
        bad = set(budget) - {f.name for f in fields(Budget)}
        if bad:
            raise SpecError(f"unknown budget keys {sorted(bad)}; allowed: frames, tokens, density, kv_bits")
        for s in STAGES:
            if d.get(s) is not None and not isinstance(d[s], str):
                raise SpecError(f"recipe '{s}' must be a spec string such as 'bolt:power=3'")
        return cls(**{s: d.get(s) for s in STAGES}, budget=Budget(**budget))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Recipe":
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SpecError(f"recipe is not valid JSON: {exc}") from None

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str) -> "Recipe":
        import yaml

        try:
            return cls.from_dict(yaml.safe_load(text))
        except yaml.YAMLError as exc:
            raise SpecError(f"recipe is not valid YAML: {str(exc).splitlines()[0]}") from None

    @classmethod
    def load(cls, path: str) -> "Recipe":
        """Read a recipe file (.json, .yaml or .yml)."""
        from pathlib import Path

        p = Path(path)
        if not p.is_file():
            raise InputError(f"recipe file {path} does not exist")
        text = p.read_text()
        return cls.from_json(text) if p.suffix == ".json" else cls.from_yaml(text)

    def to_cli(self) -> str:
        """The equivalent CLI flags, e.g. ``--frames bolt:power=3 --budget 32``."""
        parts = [f"--{s} {getattr(self, s)}" for s in STAGES if getattr(self, s) is not None]
        b = self.budget
        parts.append(f"--budget {b.frames}")
        for name in ("tokens", "density", "kv_bits"):
            value = getattr(b, name)
            if value is not None:
                parts.append(f"--budget-{name.replace('_', '-')} {value}")
        return " ".join(parts)

    @classmethod
    def from_cli(cls, argv: str | list[str]) -> "Recipe":
        """Parse the flags ``to_cli`` writes (a string or an argv list)."""
        import shlex

        args = shlex.split(argv) if isinstance(argv, str) else list(argv)
        if len(args) % 2:
            raise SpecError(f"every recipe flag needs a value: {' '.join(args)}")
        specs: dict[str, Any] = {}
        budget: dict[str, Any] = {}
        for flag, value in zip(args[::2], args[1::2]):
            key = flag.lstrip("-").replace("-", "_")
            if key in STAGES:
                specs[key] = value
            elif key == "budget":
                budget["frames"] = _num(value, int, flag)
            elif key in ("budget_tokens",):
                budget["tokens"] = _num(value, int, flag)
            elif key in ("budget_density", "budget_kv_bits"):
                budget[key[len("budget_"):]] = _num(value, float, flag)
            else:
                raise SpecError(f"unknown recipe flag {flag}")
        return cls(**specs, budget=Budget(**budget))

    def with_budget(self, **changes: Any) -> "Recipe":
        return replace(self, budget=replace(self.budget, **changes))


def _num(text: str, cast, flag: str):
    try:
        return cast(text)
    except ValueError:
        raise SpecError(f"{flag} expects a number, got {text!r}") from None
