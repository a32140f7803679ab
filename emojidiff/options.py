"""Typed options of an entry point (every job that is not LightningCLI): one parser shape.

A job declares its options as a dataclass whose docstring documents each field; `parse_options`
builds the jsonargparse parser (`-c/--config file.yaml`, several stacking in order,
`--print_config`, `--help` from the docstring) and returns the dataclass, plus the resolved options
as YAML for the run's record. Fields named in `positional` are taken from the command line by
position (one or more values where the field is a list), as `merge PART [PART ...]`.

The program name defaults to `python -m MODULE` and the description to MODULE's docstring, MODULE
being where the dataclass is declared. A field named `threads` above 0 sets torch's intra-op thread
count once parsed (0 leaves torch's default), so no job repeats that step.
"""

from __future__ import annotations

import sys
import typing
from collections.abc import Sequence
from typing import TypeVar

from jsonargparse import ActionConfigFile, ArgumentParser, set_parsing_settings

T = TypeVar("T")


def field_docstrings_as_help() -> None:
    """An option's help is its dataclass field's docstring (a process-wide jsonargparse setting,
    read when a class is added to a parser)."""
    set_parsing_settings(docstring_parse_attribute_docstrings=True)


def _declaring_module(cls: type) -> tuple[str, str | None]:
    """(dotted name, docstring) of the module declaring `cls`, also when it runs as `python -m`."""
    module = sys.modules[cls.__module__]
    spec = getattr(module, "__spec__", None)
    name = spec.name if cls.__module__ == "__main__" and spec is not None else cls.__module__
    return name, module.__doc__


def options_parser(
    cls: type, positional: Sequence[str] = (), prog: str | None = None, description: str | None = None
) -> ArgumentParser:
    """The parser of `cls`'s fields (description: the first line of `description`)."""
    field_docstrings_as_help()
    module, doc = _declaring_module(cls)
    prog = prog or f"python -m {module}"
    description = doc if description is None else description
    parser = ArgumentParser(prog=prog, description=(description or "").strip().split("\n")[0] or None)
    parser.add_argument(
        "-c", "--config", action=ActionConfigFile, help="a YAML file of these options (see --print_config)"
    )
    hints = typing.get_type_hints(cls)
    for name in positional:  # a list field takes one or more values, any other field one
        many = typing.get_origin(hints[name]) is list
        kind = typing.get_args(hints[name])[0] if many else hints[name]
        parser.add_argument(
            name, nargs="+" if many else None, type=kind, help=f"{name} (see the options' docs below)"
        )
    parser.add_class_arguments(cls, nested_key=None, fail_untyped=False, skip=set(positional))
    return parser


def parse_options(
    cls: type[T],
    argv: Sequence[str] | None,
    positional: Sequence[str] = (),
    prog: str | None = None,
    description: str | None = None,
) -> tuple[T, str]:
    """(`cls` built from `argv`, the resolved options as YAML) for `python -m MODULE [options]`."""
    parser = options_parser(cls, positional, prog, description)
    ns = parser.parse_args(None if argv is None else list(argv))
    init = parser.instantiate_classes(ns)
    values = {k: v for k, v in vars(init).items() if k != "config" and not k.startswith("_")}
    record = ns.clone()
    del record["config"]
    options = cls(**values)
    if getattr(options, "threads", 0):
        import torch  # here: `emojidiff --help` imports this module and must not load torch (start-up time)

        torch.set_num_threads(options.threads)
    return options, parser.dump(record)
