"""Published baselines, run from their released weights in local files (nothing is downloaded)."""
