"""The `emojidiff` command line (also `python -m emojidiff.cli`).

    emojidiff generate ...        identity reference + expression template -> portrait
    emojidiff probe-layers ...    which attention layers carry the expression
    emojidiff world-sample ...    demo inputs rendered by the embedded world
    emojidiff export ...          a training checkpoint -> a model folder
    emojidiff fit|validate|test|predict --config cfg.yaml ...   LightningCLI

The Lightning subcommands go to `LightningCLI` with `LightningModule` / `LightningDataModule`
subclass mode: the YAML picks the classes by `class_path`/`init_args` (e.g.
`datamodules.world_portraits.WorldPortraitDataModule`), resolved at run time, so this module
imports none of the top-level packages (datamodules, lightning_modules, ...).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence

from emojidiff.commands import COMMANDS
from emojidiff.errors import MissingWeightsError

LIGHTNING_COMMANDS = ("fit", "validate", "test", "predict")
#: Exceptions reported as one line ("emojidiff generate: error: ...") rather than a traceback;
#: set EMOJIDIFF_TRACEBACK=1 to see the traceback.
USER_ERRORS = (FileNotFoundError, ValueError, KeyError)


def lightning_cli(args: Sequence[str] | None = None):
    """Run LightningCLI on `args` (the subcommand first, e.g. ["fit", "--config", "cfg.yaml"]);
    None: on sys.argv[1:] (LightningCLI warns when given both)."""
    import lightning as L
    from lightning.pytorch.cli import LightningCLI

    return LightningCLI(
        model_class=L.LightningModule,
        datamodule_class=L.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        # OmegaConf mode: a value several parts share is declared once and interpolated (${...})
        parser_kwargs={"parser_mode": "omegaconf"},
        args=None if args is None else list(args),
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="emojidiff", description="EmojiDiff: expression control with identity preservation (arXiv 2412.01254).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=module.HELP, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(_module=module_name)
    for name in LIGHTNING_COMMANDS:  # listed for --help; main() hands them to LightningCLI
        sub.add_parser(name, help=f"LightningCLI {name} (see `emojidiff {name} --help`)", add_help=False)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error, reported in one line)."""
    from_sys = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in LIGHTNING_COMMANDS:
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
        return 0
    args = build_parser().parse_args(argv)
    args._argv = argv
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        importlib.import_module(args._module).run(args)
    except USER_ERRORS as err:
        if os.environ.get("EMOJIDIFF_TRACEBACK"):
            raise
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"emojidiff {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
