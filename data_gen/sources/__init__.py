"""IDI sources: where targets come from ("world": the embedded world; "folder": real portraits)."""

from data_gen.sources import folder, world  # noqa: F401  (imported so the sources register)
