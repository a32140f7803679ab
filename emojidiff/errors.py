"""Errors shared across the library. Each names the thing a user has to fix."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class MissingWeightsError(FileNotFoundError):
    """A model's weights are not where the config says.

    Nothing is ever downloaded at run time, so the message names the config key to set and the
    files that must exist below it.
    """

    #: How every message starts (the CLI recognises it inside wrapped errors).
    PREFIX = "missing weights: config key"

    def __init__(self, key: str, path: str | Path | None, expected: Iterable[str], hint: str = ""):
        self.key = key
        self.path = None if path is None else Path(path)
        self.expected = list(expected)
        where = "is not set" if path is None else f"= {str(path)!r} does not hold them"
        msg = (
            f"{self.PREFIX} `{key}` {where}; expected "
            + ", ".join(self.expected)
            + (f". {hint}" if hint else "")
        )
        super().__init__(msg)


class FaceNotFoundError(ValueError):
    """No face was found in an image; `image` names it (path, shard key or index)."""

    def __init__(self, image: str, detail: str = ""):
        self.image = image
        super().__init__(f"no face found in {image}" + (f" ({detail})" if detail else ""))


class MissingInputsError(FileNotFoundError):
    """A job's inputs are missing: found up front, before any work, all at once.

    `lines` has one line per missing input (its config key, the path, and the command that makes
    it); a CLI prints them without a traceback, which stays for bugs.
    """

    def __init__(self, job: str, lines: Iterable[str]):
        self.job = job
        self.lines = list(lines)
        super().__init__(f"{job}: {len(self.lines)} missing input(s):\n" + "\n".join(self.lines))
