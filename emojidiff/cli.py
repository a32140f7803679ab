"""The `emojidiff` command line (also `python -m emojidiff.cli`).

    emojidiff generate ...        identity reference + expression template -> portrait
    emojidiff probe-layers ...    which attention layers carry the expression
    emojidiff world-sample ...    demo inputs rendered by the embedded world
    emojidiff export ...          a training checkpoint -> a model folder; a model -> diffusers IP-Adapters
    emojidiff package ...         a trained model folder -> its fp16 copy inside the package
    emojidiff demo ...            the main job: a scored grid of people wearing other people's expressions
    emojidiff app ...             the browser page on localhost (make app)
    emojidiff fit|validate|test|predict --config cfg.yaml ...   LightningCLI

Every subcommand is a jsonargparse parser, as LightningCLI's are: its options are the fields of its
option dataclasses (`emojidiff.commands`: `emojidiff generate --help` shows each field's docstring),
`-c/--config FILE` reads them from a YAML/JSON file (`--print_config` prints one, resolved) and
option names are spelled with underscores (`--out_dir`, `--mask_from`).

The Lightning subcommands go to `LightningCLI` with `LightningModule` / `LightningDataModule`
subclass mode: the YAML picks the classes by `class_path`/`init_args` (e.g.
`datamodules.world_portraits.WorldPortraitDataModule`), resolved at run time, so this module
imports none of the top-level packages (datamodules, lightning_modules, ...).
"""

from __future__ import annotations

import importlib
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path
from types import ModuleType
from typing import Any

from jsonargparse import (
    ActionConfigFile,
    ArgumentParser,
    DefaultHelpFormatter,
    Namespace,
)

from emojidiff.commands import COMMANDS
from emojidiff.commands.common import COMMAND_LINE
from emojidiff.errors import MissingWeightsError
from emojidiff.options import field_docstrings_as_help

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
#: Exceptions reported as one line ("emojidiff generate: error: ...") rather than a traceback;
#: set EMOJIDIFF_TRACEBACK=1 to see the traceback.
USER_ERRORS = (FileNotFoundError, ValueError, KeyError)


def lightning_cli(args: Sequence[str] | None = None, run: bool = True):
    """Run LightningCLI on `args` (the subcommand first, e.g. ["fit", "--config", "cfg.yaml"]);
    None: on sys.argv[1:] (LightningCLI warns when given both).

    run=False: only build what a config describes (`args` without a subcommand, e.g. ["-c", "cfg.yaml"]):
    the returned CLI holds `.model`, `.datamodule` and `.trainer` (without the callback that saves the
    config), for jobs that time or test a config's parts."""
    # here, not at module level: lightning imports torch, which `emojidiff --help` must not (start-up time)
    import lightning as L
    from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

    return LightningCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_callback=SaveConfigCallback if run else None,
        save_config_kwargs={"overwrite": True},
        # OmegaConf mode: a value several parts share is declared once and interpolated (${...})
        parser_kwargs={"parser_mode": "omegaconf"},
        args=None if args is None else list(args),
        run=run,
    )


def command_line() -> str:
    """The command being run, as one line to record: `python -m emojidiff.cli ...` with the arguments
    `main` was given (the process's own command line when it was not called through `main`)."""
    argv = COMMAND_LINE.get()
    if argv is None:
        return shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    return "python -m emojidiff.cli " + shlex.join(argv)


def fit_record(trainer: Any) -> dict[str, Any]:
    """What a module's export records of the run that trained it: the command line (`command_line`),
    the trainer's log folder and the resolved config LightningCLI saved there (None for a trainer
    without a logger or one built outside the CLI). Call it on every rank (`trainer.log_dir` is a
    collective under DDP)."""
    log_dir = trainer.log_dir if trainer.logger is not None else None
    saved = Path(log_dir) / "config.yaml" if log_dir else None
    config = None
    if saved is not None and saved.is_file():
        import yaml

        config = yaml.safe_load(saved.read_text())
    return {"command": command_line(), "log_dir": log_dir, "config": config}


class _KeepLayout(DefaultHelpFormatter):
    """Prints a command's description (its module docstring: usage lines, lists) as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        return "".join(indent + line for line in text.splitlines(keepends=True))


def command_parser(module: ModuleType) -> ArgumentParser:
    """The parser of one command: -c/--config, then the fields of each of its option dataclasses."""
    parser = ArgumentParser(description=module.__doc__, formatter_class=_KeepLayout)
    parser.add_argument(
        "-c", "--config", action=ActionConfigFile, help="a YAML/JSON file of options (see --print_config)"
    )
    for options in module.OPTIONS.values():
        parser.add_class_arguments(options, nested_key=None)
    parser.set_defaults(getattr(module, "DEFAULTS", {}))
    return parser


def build_parser() -> ArgumentParser:
    field_docstrings_as_help()
    parser = ArgumentParser(
        prog="emojidiff",
        description="EmojiDiff: expression control with identity preservation (arXiv 2412.01254).",
        formatter_class=_KeepLayout,  # add_subcommand gives it to every command's parser
    )
    sub = parser.add_subcommands(dest="command", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub.add_subcommand(name, command_parser(module), help=module.HELP)
    for name in LIGHTNING_COMMANDS:  # listed for --help; main() hands them to LightningCLI
        sub.add_subcommand(
            name, ArgumentParser(), help=f"LightningCLI {name} (see `emojidiff {name} --help`)"
        )
    return parser


def command_options(module: ModuleType, cfg: Namespace) -> dict[str, Any]:
    """`module.run`'s keyword arguments: each of its option dataclasses built from the parsed `cfg`."""
    return {
        key: options(**{f.name: cfg[f.name] for f in fields(options)})
        for key, options in module.OPTIONS.items()
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error, reported in one line)."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
        command_line = COMMAND_LINE.set(argv)  # what the modules' export records name
        try:
            lightning_cli(None if from_sys else argv)
        except (MissingWeightsError, ValueError) as err:
            # a local path to set in the config: one line, not a traceback (jsonargparse wraps the
            # MissingWeightsError of a class it instantiates into a ValueError that quotes it)
            lines = [ln.strip(" -") for ln in str(err).splitlines() if MissingWeightsError.PREFIX in ln]
            if not lines or os.environ.get("EMOJIDIFF_TRACEBACK"):
                raise
            print(f"emojidiff {argv[0]}: error: {lines[0]}", file=sys.stderr)
            return 2
        finally:
            COMMAND_LINE.reset(command_line)
        return 0
    cfg = build_parser().parse_args(argv)
    module = importlib.import_module(COMMANDS[cfg.command])
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    command_line = COMMAND_LINE.set(argv)
    try:
        module.run(**command_options(module, cfg[cfg.command]))
    except USER_ERRORS as err:
        if os.environ.get("EMOJIDIFF_TRACEBACK"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"emojidiff {cfg.command}: error: {message}", file=sys.stderr)
        return 2
    finally:
        COMMAND_LINE.reset(command_line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
