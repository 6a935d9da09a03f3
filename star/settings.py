"""How a stage's settings are declared and checked: each setting is a dataclass field whose metadata also
describes its command-line flag (star/cli.py turns a settings dataclass into flags), and each settings dataclass
checks its own values in `__post_init__` with `check`. Library modules declare settings with this module alone; only
commands need star/cli.py."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

_MISSING = dataclasses.MISSING


def flag_spec(*, help: str = "", choices: Sequence[Any] | None = None, flag: str | None = None,
              metavar: str | None = None, cli: bool = True) -> dict[str, Any]:
    """How a setting appears on the command line (the metadata `setting` stores in its field).

    flag: the flag's name without dashes when it is not the field's name with '-' for '_' (booleans get
    `--NAME` / `--no-NAME`). cli=False keeps a field out of the command line (library-only settings).
    """
    return {"help": help, "choices": tuple(choices) if choices is not None else None, "flag": flag,
            "metavar": metavar, "cli": cli}


def setting(default: Any = _MISSING, *, help: str = "", choices: Sequence[Any] | None = None,
            flag: str | None = None, metavar: str | None = None, cli: bool = True,
            default_factory: Any = _MISSING, nested: dict[str, dict[str, Any]] | None = None) -> Any:
    """A dataclass field that is also a command-line flag (see `flag_spec` for the flag's options).

    nested: for a field holding a settings dataclass that declares plain fields (a library dataclass that does
    not import this module), each inner field's `flag_spec` by name; its fields become flags either way.
    """
    metadata = flag_spec(help=help, choices=choices, flag=flag, metavar=metavar, cli=cli)
    if nested:
        metadata["nested"] = nested
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def check(condition: bool, message: str) -> None:
    """A settings check: raise ValueError(message) unless condition holds (NaN fails every comparison)."""
    if not condition:
        raise ValueError(message)


DEVICE_CHOICES = ("auto", "cpu", "cuda")  # and "cuda:N"


def check_device(name: str, flag: str = "--device") -> None:
    """The one rule for a device setting: auto, cpu, cuda or cuda:N (whether CUDA exists is pick_device's)."""
    check(name in DEVICE_CHOICES or (name.startswith("cuda:") and name[5:].isdigit()),
          f"{flag} {name!r}: use auto, cpu, cuda or cuda:N")
