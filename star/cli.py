"""Command-line flags generated from a stage's settings dataclass: each setting is declared once.

A setting is a dataclass field declared with star/settings.py's `setting`. Its default, type, help text and
choices become the flag; validation lives in the dataclass (`__post_init__`, with `check`), so the library, the
demo, the study and the commands all get the same checks.

    @dataclass
    class SampleConfig:
        ckpt: str = setting(help="run folder or checkpoint")           # no default given: a required flag
        num_samples: int = setting(50, help="images to sample")
        weights: str = setting("student", choices=WEIGHT_CHOICES)
        progress: bool = setting(True, help="tqdm progress bars")       # --progress / --no-progress

    config = parse_config(SampleConfig, argv, description=__doc__)     # exit 2 with one line on a bad value

Nested dataclass fields (e.g. the ST-AR settings inside the trainer's) are flattened into the same flag
namespace; names must not collide. A library's settings dataclass that does not import this module (the
sampling settings of star/gpt) is nested with `setting(nested={field: flag_spec(help=...)})`: the command
that owns the flags gives their help. Why our own ~150 lines and not `tyro` or `simple_parsing`: both are good,
but each adds a dependency (and tyro its own help formatting and nested-prefix naming) for what the standard
library's argparse already does once it is fed from `dataclasses.fields`; this keeps LlamaGen's flag names
(`--cfg-scale`, `--no-star`) exactly and the error format of every other command.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import types
import typing
from typing import Any, Sequence, TypeVar

from star.settings import check, flag_spec, setting  # noqa: F401  (what a command's settings are declared with)

T = TypeVar("T")
_MISSING = dataclasses.MISSING


def _resolved_hints(cls: type) -> dict[str, Any]:
    module = sys.modules.get(cls.__module__)
    return typing.get_type_hints(cls, vars(module) if module else None)


def _scalar_type(annotation: Any) -> tuple[Any, bool]:
    """(the type argparse converts to, whether None is allowed) for `int`, `float | None`, ..."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) != 1:
            raise TypeError(f"unsupported settings type {annotation}")
        return members[0], True
    return annotation, False


def _none_or(convert):
    def parse(text: str):
        return None if text.lower() in ("none", "") else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _cli_fields(cls: type, specs: dict[str, dict[str, Any]] | None = None
                ) -> list[tuple[dataclasses.Field, Any, list[str], dict[str, Any]]]:
    """(field, type, path of attribute names, flag spec) for every command-line setting of cls, nested ones
    flattened; `specs` (a nesting field's `nested`) give the flag specs of fields declared without one."""
    found = []
    hints = _resolved_hints(cls)
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        spec = {**f.metadata, **(specs or {}).get(f.name, {})}
        if dataclasses.is_dataclass(annotation):
            found += [(inner, t, [f.name] + path, inner_spec)
                      for inner, t, path, inner_spec in _cli_fields(annotation, spec.get("nested"))]
        elif spec.get("cli", True):
            found.append((f, annotation, [f.name], spec))
    return found


def flag_name(f: dataclasses.Field, spec: dict[str, Any]) -> str:
    return "--" + (spec.get("flag") or f.name).replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, cls: type, exclude: Sequence[str] = ()) -> None:
    """Add one flag per setting of dataclass `cls` (and of its nested settings dataclasses)."""
    seen: dict[str, str] = {}
    for f, annotation, path, meta in _cli_fields(cls):
        if f.name in exclude:
            continue
        name = flag_name(f, meta)
        if name in seen:
            raise TypeError(f"{cls.__name__}: flag {name} declared twice ({seen[name]} and {'.'.join(path)})")
        seen[name] = ".".join(path)
        kwargs: dict[str, Any] = {"dest": "__".join(path), "help": meta.get("help") or None}
        has_default = f.default is not _MISSING or f.default_factory is not _MISSING
        default = f.default if f.default is not _MISSING else (
            f.default_factory() if f.default_factory is not _MISSING else None)
        scalar, optional = _scalar_type(annotation)
        if scalar is bool:
            kwargs.update(action=argparse.BooleanOptionalAction, default=default)
        elif typing.get_origin(scalar) is tuple:
            item_types = typing.get_args(scalar)
            kwargs.update(nargs=len(item_types), type=item_types[0], default=default,
                          metavar=meta.get("metavar") or f.name.upper())
        else:
            convert = _none_or(scalar) if optional else scalar
            kwargs.update(type=convert, default=default, metavar=meta.get("metavar") or f.name.upper())
            if meta.get("choices"):
                kwargs["choices"] = meta["choices"]
        if not has_default:
            kwargs["required"] = True
        if kwargs["help"] and has_default and scalar is not bool:
            kwargs["help"] += f" (default: {default})"
        parser.add_argument(name, **kwargs)


def config_from_namespace(cls: type[T], namespace: argparse.Namespace, **overrides: Any) -> T:
    """Build `cls` (and its nested settings) from parsed flags; `overrides` win. Runs the config's checks."""
    values = vars(namespace)

    def build(kind: type, prefix: list[str]):
        hints = _resolved_hints(kind)
        kwargs = {}
        for f in dataclasses.fields(kind):
            annotation = hints[f.name]
            if dataclasses.is_dataclass(annotation):
                kwargs[f.name] = build(annotation, prefix + [f.name])
                continue
            dest = "__".join(prefix + [f.name])
            if dest in values:
                value = values[dest]
                kwargs[f.name] = tuple(value) if isinstance(value, list) else value
        if not prefix:
            kwargs.update(overrides)
        return kind(**kwargs)

    return build(cls, [])


# Where launchers put a process's global rank: torchrun / accelerate launch, then the MPI launchers.
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


def launch_rank() -> int:
    """This process's rank in a multi-process launch, read from the launcher's environment (0 when launched alone)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.strip().isdigit():
            return int(value)
    return 0


class CommandParser(argparse.ArgumentParser):
    """argparse with one change: under a multi-process launch only rank 0 prints a flag error (every rank parses
    the same argv, so every rank finds the same error); the others exit 2 quietly."""

    def error(self, message: str):
        if launch_rank() != 0:
            self.exit(2)
        super().error(message)


def parse_config(cls: type[T], argv: Sequence[str] | None = None, description: str | None = None,
                 exclude: Sequence[str] = ()) -> T:
    """Parse argv into `cls`. A value the config rejects exits with status 2 and one line, as argparse does."""
    parser = CommandParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_flags(parser, cls, exclude)
    namespace = parser.parse_args(argv)
    return build_or_exit(parser, cls, namespace)


def build_or_exit(parser: argparse.ArgumentParser, cls: type[T], namespace: argparse.Namespace, **overrides) -> T:
    try:
        return config_from_namespace(cls, namespace, **overrides)
    except ValueError as error:
        parser.error(str(error))  # prints usage + "error: ...", exits 2


# Errors a user can cause (a bad path, a bad value, a folder in use): a command prints them as one line, exit 2.
USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError)


def run_command(work, config, summarise=None, user_errors: tuple[type[BaseException], ...] = ()) -> int:
    """The body every stage command shares: run `work(config)`; a user error is one line on stderr and exit 2
    (no line when another process of the launch reports it); otherwise print `summarise(result)` when it says
    something (other ranks of a data-parallel run do not)."""
    try:
        result = work(config)
    except USER_ERRORS + tuple(user_errors) as error:
        if not getattr(error, "quiet", False):  # quiet: another process of the launch reports it
            print(f"error: {error}", file=sys.stderr)
        return 2
    summary = summarise(result) if summarise is not None else None
    if summary:
        print(summary)
    return 0
