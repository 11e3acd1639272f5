"""``python -m fastadv bench``: check, time and count every op on this device.

Each op is one module here with ``cases(device, full)`` and
``impls(case, device)`` (see :mod:`fastadv.bench.fgm` and
:mod:`fastadv.bench.case`); add it to :data:`OPS` with one line and the CLI,
``gpucheck``, ``benchmarks/`` (pytest-benchmark), the results file and the
plot pick it up.  ``eager`` is no op of its own: the eager cost of one
registered op call by the path it takes (wrapper, dispatcher, direct).
"""
from __future__ import annotations

import importlib

OPS: dict[str, str] = {
    "fgm": "fastadv.bench.fgm",
    "pgd": "fastadv.bench.pgd",
    "pgd_train": "fastadv.bench.pgd_train",
    "attacks": "fastadv.bench.attacks",
    "awp": "fastadv.bench.awp",
    "ema": "fastadv.bench.ema",
    "noise": "fastadv.bench.noise",
    "neftune": "fastadv.bench.neftune",
    "dp": "fastadv.bench.dp",
    "dp_step": "fastadv.bench.dp_ghost",
    "dist_step": "fastadv.bench.dist",
    "fgsm": "fastadv.bench.fgsm",
    "sam": "fastadv.bench.sam",
    "sift": "fastadv.bench.sift",
    "eager": "fastadv.bench.eager",
}


def load(op: str):
    """The bench module of ``op``."""
    if op not in OPS:
        raise KeyError(f"no benchmark for op {op!r}; known: {', '.join(OPS)}")
    return importlib.import_module(OPS[op])
