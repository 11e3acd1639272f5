"""The case / implementation model every bench op module fills in.

An op module (``fastadv/bench/<op>.py``, listed in :data:`fastadv.bench.OPS`)
has ``cases(device, full)`` (objects with ``.name``, and ``.size`` for
``--quick``) and ``impls(case, device)``: a list of :class:`Impl`, whose
``setup()`` returns a :class:`Prepared` (the timed step, its check against
the reference, the design bytes) or raises :class:`Skip`.  A :class:`Unit`
is one (op, case, impl): one row to come; :func:`plan` lists them.
"""
from __future__ import annotations

import collections
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch


class CaseCache:
    """The data of one case, built by ``factory(case, device)`` on first use and
    kept only while that case runs (every implementation shares it; the previous
    case's tensors are freed first, so big cases never coexist)."""

    def __init__(self, factory: Callable[[Any, Any], Any]):
        self.factory = factory
        self.key = self.value = None

    def __call__(self, case, device):
        key = (case, str(device))
        if key != self.key:
            self.clear()
            if torch.device(device).type == "cuda":
                torch.cuda.empty_cache()
            self.value, self.key = self.factory(case, device), key
        return self.value

    def clear(self) -> None:
        self.key = self.value = None


class Skip(Exception):
    """An implementation that cannot run here; the message says why."""


# pip names of the optional dependencies a bench case may need
PIP_NAMES = {"opacus": "opacus (or fastadv[dp])", "matplotlib": "matplotlib", "triton": "triton"}


def missing_dependency(exc: BaseException) -> str | None:
    """The one-line reason for a row whose optional dependency is not installed
    (a ``ModuleNotFoundError`` of a module outside fastadv), else None."""
    name = getattr(exc, "name", None)
    if not isinstance(exc, ModuleNotFoundError) or not name:
        return None
    top = name.split(".")[0]
    if top == "fastadv":
        return None  # a missing fastadv module is a bug, not a missing dependency
    return f"needs {top}, not installed here (pip install {PIP_NAMES.get(top, top)})"


def require(module: str):
    """Import ``module`` or raise :class:`Skip` saying it is not installed."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise Skip(missing_dependency(exc) or f"{module} cannot be imported ({exc})") from exc


def real_sizes(device, full: bool | None = None) -> bool:
    """Whether a bench module uses the sizes users meet (True) or its small CPU
    stand-ins: ``full`` when given, else real sizes on CUDA, small on CPU."""
    if full is not None:
        return bool(full)
    return torch.device(device).type == "cuda"


@dataclass
class Prepared:
    """One implementation ready to run on one case.

    ``step`` is the timed call (e.g. FGM attack + restore).  ``check`` returns
    None when the implementation matches the reference, else what differs; it
    runs before timing.  ``design_bytes`` is what the op moves per ``step`` by
    design when fastadv kernels run (see :func:`fastadv.bench.count.count`).  ``counting`` is
    ``"dispatch"`` (exact, the dispatch mode) or ``"compiled"`` (for
    ``torch.compile`` output, which the dispatch mode sees only as the eager
    ops it replaces: on CUDA launches and syncs come from the profiler
    (:func:`fastadv.bench.count.count_profiled`), bytes stay the eager-equivalent count, an upper
    bound).  ``timed=False`` leaves ``ms``
    empty (the Triton interpreter: its times mean nothing).  ``extra`` keys go
    into the result row.  ``sync_free``: whether ``step`` must issue no host
    sync (the GPU check runs it under ``torch.cuda.set_sync_debug_mode("error")``);
    None: yes for the fastadv backends, not asserted for the others.  A step
    that also runs a model or Opacus's hooks says False.
    """
    step: Callable[[], Any]
    check: Callable[[], str | None] | None = None
    design_bytes: int | Callable[[collections.Counter], int] | None = None
    counting: str = "dispatch"
    timed: bool = True
    extra: dict = field(default_factory=dict)
    teardown: Callable[[], None] | None = None
    sync_free: bool | None = None


@dataclass
class Impl:
    """A named implementation; ``setup()`` builds its state for one case and
    returns a :class:`Prepared` (or raises :class:`Skip`)."""
    name: str
    setup: Callable[[], Prepared]


@dataclass
class Unit:
    """One implementation of one case of one op: a row to come."""
    op: str
    module: Any
    case: Any
    impl: Impl
    index: int = 0  # place in the natural order (op, case, impl)

    @property
    def key(self) -> tuple[str, str]:
        return (self.op, self.impl.name)

    @property
    def label(self) -> str:
        return f"{self.op} {self.case.name}: {self.impl.name}"


def select_cases(module, device, *, full: bool | None = None, quick: bool = False) -> list:
    """The cases of a bench module; ``quick``: those of its first (smallest) size."""
    all_cases = list(module.cases(device, full))
    if quick and all_cases:
        first = getattr(all_cases[0], "size", None)
        all_cases = [c for c in all_cases if getattr(c, "size", None) == first] if first else all_cases[:1]
    return all_cases


def units_of(op: str, module, device, *, full: bool | None = None, quick: bool = False,
             impls: Iterable[str] | None = None, exclude: Iterable[str] = (), start: int = 0) -> list[Unit]:
    """The units of one op module, in order: ``impls`` keeps only those names,
    ``exclude`` drops these (``full`` and ``quick`` as in :func:`select_cases`)."""
    only = set(impls) if impls else None
    drop = set(exclude)
    units: list[Unit] = []
    for case in select_cases(module, device, full=full, quick=quick):
        for impl in module.impls(case, device):
            if (only is None or impl.name in only) and impl.name not in drop:
                units.append(Unit(op, module, case, impl, start + len(units)))
    return units


def plan(ops: Iterable[str], device, *, full: bool | None = None, quick: bool = False,
         impls: Iterable[str] | None = None, exclude: Iterable[str] = ()) -> list[Unit]:
    """Every (op, case, impl) to run, op by op (keywords as :func:`units_of`)."""
    from fastadv import bench

    units: list[Unit] = []
    for op in ops:
        units += units_of(op, bench.load(op), device, full=full, quick=quick, impls=impls, exclude=exclude,
                          start=len(units))
    return units


def interleave(units: list[Unit]) -> list[Unit]:
    """The units round-robin over ops, case by case (the first case of every
    op, then the second, ...): under a budget every op gets its first rows."""
    by_op: dict = {}
    for u in units:
        by_op.setdefault(u.op, {}).setdefault(u.case, []).append(u)
    queues = [list(cases.values()) for cases in by_op.values()]
    out: list[Unit] = []
    while any(queues):
        for q in queues:
            if q:
                out += q.pop(0)
    return out
