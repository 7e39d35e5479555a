"""A W&B sweep file, read for the offline runner: the edit command, the metric and the points to run.

The file is W&B's own format (`program`, `command`, `method`, `metric`, `parameters`), so the same
file serves `wandb sweep` and `python sweep.py`. Supported here: `method` grid or random (bayes needs
a W&B server's model; offline it is refused with a line saying so), parameters given by `value`,
`values`, or `min`/`max` with the distributions `uniform`, `int_uniform`, `log_uniform_values`
(random only). Errors name the file and the key.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

#: Placeholders of `command` that W&B fills in; the runner drops them and adds the point's arguments.
PLACEHOLDERS = ("${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}", "${args_json}")


class SweepSpecError(ValueError):
    """A sweep file the offline runner cannot run; the message names the file and the key."""


@dataclass(frozen=True)
class Point:
    """One setting of the swept parameters."""

    params: dict[str, Any]

    @property
    def key(self) -> str:
        """A short, stable name for the point (its results folder)."""
        text = json.dumps(self.params, sort_keys=True, default=str)
        return hashlib.sha1(text.encode()).hexdigest()[:10]

    def args(self) -> list[str]:
        """The point as `edit.py` arguments, as W&B's `${args}` writes them (`--key=value`)."""
        return [f"--{name}={value}" for name, value in sorted(self.params.items())]


@dataclass
class SweepSpec:
    path: Path
    method: str
    metric: str
    goal: str
    parameters: dict[str, dict[str, Any]]
    base_args: list[str]
    run_cap: int | None

    def points(self, count: int | None = None, seed: int = 0) -> list[Point]:
        """Every grid point in order, or `count` (else `run_cap`) random draws from a seeded generator."""
        if self.method == "grid":
            names = sorted(self.parameters)
            choices = [_grid_values(self.path, n, self.parameters[n]) for n in names]
            return [Point(dict(zip(names, combo, strict=True))) for combo in itertools.product(*choices)]
        n = count or self.run_cap
        if not n:
            raise SweepSpecError(f"{self.path}: method random needs run_cap in the file or --count")
        rng = random.Random(seed)
        drawn: dict[str, Point] = {}
        for _ in range(n * 20):  # draws may repeat on small discrete spaces; keep distinct points
            point = Point(
                {name: _draw(self.path, name, spec, rng) for name, spec in sorted(self.parameters.items())}
            )
            drawn.setdefault(point.key, point)
            if len(drawn) == n:
                break
        return list(drawn.values())


def read_spec(path: str | Path) -> SweepSpec:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise SweepSpecError(f"{path}: cannot read the sweep file ({exc})") from exc
    if not isinstance(raw, dict):
        raise SweepSpecError(f"{path}: a sweep file is a YAML mapping")
    method = raw.get("method", "grid")
    if method not in ("grid", "random"):
        raise SweepSpecError(
            f"{path}: method {method!r} needs W&B's server (bayes); the offline runner runs grid and random"
        )
    metric = raw.get("metric") or {}
    if not isinstance(metric, dict) or not str(metric.get("name", "")).startswith("test/"):
        raise SweepSpecError(
            f"{path}: metric.name must name a score edit.py logs, such as test/avg or test/rel"
        )
    goal = metric.get("goal", "maximize")
    if goal not in ("maximize", "minimize"):
        raise SweepSpecError(f"{path}: metric.goal must be maximize or minimize, got {goal!r}")
    parameters = raw.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise SweepSpecError(f"{path}: parameters must map each swept option to its values")
    for name, spec in parameters.items():
        if not isinstance(spec, dict) or not ({"value", "values"} & set(spec) or {"min", "max"} <= set(spec)):
            raise SweepSpecError(f"{path}: parameters.{name} needs value, values, or min and max")
    command = raw.get("command")
    if not isinstance(command, list) or "${args}" not in command:
        raise SweepSpecError(f"{path}: command must be a list holding ${{args}}, as W&B runs it")
    args = [str(c) for c in command if str(c) not in PLACEHOLDERS and str(c) not in ("python", "python3")]
    if not args or args[0] != "test":
        raise SweepSpecError(f"{path}: command must run `edit.py test` (got {args[:1]})")
    return SweepSpec(path, method, str(metric["name"]), goal, parameters, args[1:], raw.get("run_cap"))


def _grid_values(path: Path, name: str, spec: dict[str, Any]) -> list[Any]:
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec and isinstance(spec["values"], list) and spec["values"]:
        return list(spec["values"])
    raise SweepSpecError(f"{path}: parameters.{name}: a grid needs value or a non-empty values list")


def _draw(path: Path, name: str, spec: dict[str, Any], rng: random.Random) -> Any:
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(list(spec["values"]))
    low, high = spec["min"], spec["max"]
    kind = spec.get(
        "distribution", "int_uniform" if isinstance(low, int) and isinstance(high, int) else "uniform"
    )
    if kind == "int_uniform":
        return rng.randint(int(low), int(high))
    if kind == "uniform":
        return rng.uniform(float(low), float(high))
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(float(low)), math.log(float(high))))
    raise SweepSpecError(f"{path}: parameters.{name}: distribution {kind!r} is not supported offline")
