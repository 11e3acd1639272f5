"""The names other code (tests of the ops) imports from ``fastadv.bench.core``.

The bench machinery lives in one module per concern: :mod:`.case` (the case
/ implementation model and the plan), :mod:`.count` (launches, syncs, bytes),
:mod:`.timing`, :mod:`.run` (the runner and ``python -m fastadv bench``),
:mod:`.report` (derived columns, JSON, table, PNG).  Import from those.
"""
from .case import Impl, Prepared, Skip
from .count import count
from .run import run_op

__all__ = ["Impl", "Prepared", "Skip", "count", "run_op"]
