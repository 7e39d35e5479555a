"""Config-file errors that name the file: which `--config` holds the bad YAML or the unknown key.

jsonargparse reports a YAML syntax error as being in "<unicode string>" and an unknown option by
its name only, after merging every `--config` file; with three files stacked, the user is left to
guess which one is wrong. `config_errors_named` catches the parse error and says it again with the
file (and, for an unknown option, the key path inside that file), then exits with status 2 as
argparse does.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

#: How jsonargparse names an option it does not accept.
_UNKNOWN = (
    re.compile(r"Option '([^']+)' is not accepted"),
    re.compile(r"does not accept option '([^']+)'"),
    re.compile(r'Key "([^"]+)" is not expected'),
    re.compile(r"No action for key \"([^\"]+)\""),
)


def config_files(args: Sequence[str] | None, defaults: Sequence[Path] = ()) -> list[Path]:
    """The config files a command line reads, in order: the defaults, then each `--config`."""
    args = list(sys.argv[1:] if args is None else args)
    files = [Path(p) for p in defaults]
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            files.append(Path(args[i + 1]))
        elif arg.startswith("--config="):
            files.append(Path(arg.split("=", 1)[1]))
    return files


def locate(message: str, files: Sequence[Path]) -> str:
    """Where in `files` the problem of a parse error `message` lies, as extra lines ('' if unknown)."""
    for path in files:
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
            return f"\n  config file {path} is not valid YAML{where}: {getattr(err, 'problem', err)}"
        except OSError:
            continue  # a missing file is jsonargparse's own, already clear, error
    names = [m.group(1).split(".")[-1] for pattern in _UNKNOWN for m in pattern.finditer(message)]
    lines = []
    for name in dict.fromkeys(names):
        for path in files:
            for key_path in _key_paths(_load(path), name):
                lines.append(f"\n  '{name}' is set in config file {path} at {key_path}")
    return "".join(lines)


@contextlib.contextmanager
def config_errors_named(args: Sequence[str] | None, defaults: Sequence[Path] = ()) -> Iterator[None]:
    """Around a CLI built with `exit_on_error=False`: a parse error printed with its config file, then exit 2."""
    try:
        yield
    except argparse.ArgumentError as exc:
        where = locate(str(exc), config_files(args, defaults))
        print(f"error: {exc}{where}", file=sys.stderr)
        print("tip: `--help` after the subcommand lists every option", file=sys.stderr, flush=True)
        raise SystemExit(2) from exc


def _load(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None


def _key_paths(tree: Any, name: str, prefix: str = "") -> Iterator[str]:
    if isinstance(tree, dict):
        for key, value in tree.items():
            here = f"{prefix}.{key}" if prefix else str(key)
            if key == name:
                yield here
            yield from _key_paths(value, name, here)
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            yield from _key_paths(value, name, f"{prefix}[{i}]")
