"""matplotlib for files, never a screen: the one place that picks the Agg backend."""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """`matplotlib.pyplot` on the Agg backend (chosen before pyplot is first imported; matplotlib
    is imported here, not at module level, so importing a module that plots stays cheap)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
