"""The names other code (tests of the ops) imports from ``fastadv.bench.core``.

The bench machinery lives in one module per concern: :mod:`.case` (the case
/ implementation model and the plan), :mod:`.count` (launches, syncs, bytes),
:mod:`.timing`, :mod:`.run` (the runner and ``python -m fastadv bench``),
:mod:`.report` (derived columns, JSON, table, PNG).  Import from those.
"""
from .case import Impl, Prepared, Skip  # noqa: F401
from .count import count  # noqa: F401
from .run import run_op  # noqa: F401
