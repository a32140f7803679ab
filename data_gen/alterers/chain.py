"""The "chain" IDI alterer: alterers applied in sequence, each to the previous one's templates.

E.g. a world-swap then an adapter generation: the first step alters the targets; each next step
sees a `Targets` whose images and masks are the previous templates', whose ground truth is the
previous templates' (None where unknown) and whose everything else (indices, references,
prompts, persons, meta, landmarks, ...) is the original targets'. Persons stay the targets', so
every step's donor is someone other than A.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np

from data_gen.base import ALTERERS, Alterer, Source, Targets, Templates


def as_targets(targets: Targets, templates: Templates) -> Targets:
    """The original `targets` with the images, masks and ground truth of `templates`.

    landmarks5 is dropped (a template's face need not sit where the target's did), so a next step
    that needs points detects them again.
    """
    return replace(
        targets,
        images=templates.images,
        masks=templates.masks,
        identity_params=templates.identity_params,
        expression_params=templates.expression_params,
        landmarks5=None,
        skipped=[],
    )


@ALTERERS.register("chain")
class Chain(Alterer):
    """Alterers in sequence (module docstring).

    alterers: the steps, each an `ALTERERS` spec ("name" or {"name", "init_args"}), at least one.

    A row is ok only when every step made it; meta holds the last step's fields, "alterer":
    "chain", "steps" (every step's meta) and, for a failed row, the first step's "alter_error".
    """

    name = "chain"

    def __init__(self, alterers: Sequence[str | Mapping[str, Any]]):
        if not alterers:
            raise ValueError("chain: give at least one alterer spec in `alterers`")
        self.specs = list(alterers)
        self.steps: list[Alterer] = [ALTERERS.build(spec) for spec in self.specs]
        self.world_only = any(step.world_only for step in self.steps)

    def setup(self, source: Source) -> None:
        super().setup(source)
        for step in self.steps:
            step.setup(source)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "steps": [step.describe() for step in self.steps]}

    def alter(self, targets: Targets, rng: np.random.Generator) -> Templates:
        current, ok = targets, np.ones(len(targets), bool)
        step_meta: list[list[dict[str, Any]]] = [[] for _ in range(len(targets))]
        errors: list[str | None] = [None] * len(targets)
        templates: Templates | None = None
        for k, step in enumerate(self.steps):
            templates = step.alter(current, rng)
            if len(templates) != len(targets):
                raise ValueError(
                    f"chain step {k} ({step.name}) made {len(templates)} templates for {len(targets)} targets"
                )
            for i, m in enumerate(templates.meta):
                step_meta[i].append(dict(m))
                if errors[i] is None and (not templates.ok[i] or "alter_error" in m):
                    errors[i] = f"step {k} ({step.name}): {m.get('alter_error', 'failed')}"
            ok &= np.asarray(templates.ok, bool)
            current = as_targets(targets, templates)
        assert templates is not None
        meta = []
        for i in range(len(targets)):
            row = {**step_meta[i][-1], "alterer": self.name, "steps": step_meta[i]}
            row.pop("alter_error", None)
            if not ok[i]:
                row["alter_error"] = errors[i] or "failed"
            meta.append(row)
        return replace(templates, ok=ok, meta=meta)
