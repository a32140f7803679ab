"""Every method an evaluation config can name, by an explicit list: the built-in methods of
`methods.py` and the published baselines of `baselines/`, each of which registers itself in
`METHODS` on import (a baseline imports `methods`, never the other way round).
"""

from benchmarks.evaluation.baselines import ip_adapter_faceid
from benchmarks.evaluation.methods import METHODS

BASELINES = (ip_adapter_faceid,)

__all__ = ["BASELINES", "METHODS"]
