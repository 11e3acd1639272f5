"""Command line: ``python -m fastadv env | bench | gpucheck``.

``env``       versions, devices, which backends are usable on each, and which
              fastadv package and CUDA library this Python loads.
``bench``     for each op: check every implementation against the reference,
              count its launches / host syncs / bytes, time it (on a GPU), print
              one table, write ``<out>/<device>.json`` and ``<out>/<device>.png``
              (default ``<out>``: ./fastadv-bench).
``gpucheck``  on a GPU machine: a smoke tier (every backend x dtype on small
              tensors, sync debug mode on), the ``-m gpu`` tests, then the bench
              under a time budget; JSON, PNG and a log into ``--out``.
              ``--dry-run`` rehearses it on CPU.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

DEFAULT_OUT = "fastadv-bench"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastadv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{env,bench,gpucheck}")
    sub.add_parser("env", help="print versions, devices, usable backends, package and CUDA library paths")
    b = sub.add_parser("bench", help="check + count (+ time on a GPU) every op on this device",
                       description="Check each op against its reference, count launches, host syncs and "
                                   "bytes, time it on a GPU; print a table, write <out>/<device>.json "
                                   "(merged with earlier rows) and a PNG of the speedups. On a CPU-only "
                                   "machine the default is a quick check: the smallest size of every op, "
                                   "counted, not timed (CPU times say nothing about GPU speed).")
    b.add_argument("--ops", default="all",
                   help="comma-separated ops to run (default: all registered ops)")
    b.add_argument("--full", action="store_true",
                   help="on CPU: the full sweep, every case and implementation (torch.compile too), "
                        "timed (CPU wall times; speedups stay blank). On a GPU this is the default")
    b.add_argument("--real-sizes", action="store_true",
                   help="the sizes users meet even on CPU (slow: hours with the Triton interpreter)")
    b.add_argument("--quick", action="store_true",
                   help="only the smallest size of each op (the CPU default without --full)")
    b.add_argument("--out", default=DEFAULT_OUT,
                   help=f"results folder (default: ./{DEFAULT_OUT}, untracked); to commit a GPU run: "
                        "--out benchmarks/results")
    b.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    b.add_argument("--impls", default=None,
                   help="comma-separated implementations to run (default: all; on CPU without --full "
                        "all but compiled), e.g. reference,compiled,torch,triton,cuda")
    b.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    b.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 5 GPU, 2 CPU)")
    b.add_argument("--iters", type=int, default=None,
                   help="timed runs, median reported (default: 50 GPU, 5 CPU); on CPU it turns timing on")
    b.add_argument("--budget", type=float, default=None,
                   help="seconds the run may take: rows that would overrun it are not started "
                        "(marked 'not run' with the reason)")
    b.add_argument("--no-interpret", action="store_true",
                   help="on CPU, do not turn the Triton interpreter on (then no triton rows)")
    b.add_argument("--verbose", action="store_true", help="print the traceback of every row that errors")
    g = sub.add_parser("gpucheck", help="the GPU check: smoke tier, -m gpu tests, bench under a budget",
                       description="Meant for a freshly lent GPU machine: (a) smoke: every fastadv backend "
                                   "(triton, cuda, torch) x dtype (fp32, fp16, bf16) once on small tensors "
                                   "against the reference, each step under "
                                   "torch.cuda.set_sync_debug_mode('error'); then `python -m pytest -m gpu`; "
                                   "(b) the full bench under what is left of --budget. Writes "
                                   "<out>/<device>.json, .png, smoke.json, summary.json, pytest-gpu.log "
                                   "and gpucheck.log.")
    g.add_argument("--out", required=True, help="folder for the results and the log")
    g.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole check (default: 420 on a GPU, 90 with --dry-run)")
    g.add_argument("--dry-run", action="store_true",
                   help="rehearse on CPU: smoke tier with the torch backend and the Triton "
                        "interpreter, the pytest step only printed, the bench at CPU sizes (untimed) "
                        "under the budget")
    g.add_argument("--ops", default="all", help="comma-separated ops (default: all)")
    g.add_argument("--device", default=None, help="cuda, cuda:1 (default: the current CUDA device)")
    g.add_argument("--no-pytest", action="store_true", help="skip the `pytest -m gpu` step")
    g.add_argument("--pytest-timeout", type=float, default=None,
                   help="seconds for `pytest -m gpu` (default: 35%% of the budget, at most 180)")
    w = sub.add_parser("_gpucheck_worker", help=argparse.SUPPRESS)  # one phase of gpucheck, in a child
    w.add_argument("--phase", choices=("smoke", "bench"), required=True)
    w.add_argument("--out", required=True)
    w.add_argument("--ops", required=True)
    w.add_argument("--deadline", type=float, required=True)
    w.add_argument("--t0", type=float, required=True)
    w.add_argument("--device", default=None)
    w.add_argument("--dry-run", action="store_true")
    return p


def _interpreter_on(args, device_type: str) -> bool:
    """On CPU the triton rows run under the Triton interpreter, which must be on
    before Triton is imported.  Turn it on in this process when possible;
    False when the command must run again with it (Triton already imported)."""
    if getattr(args, "no_interpret", False) or "TRITON_INTERPRET" in os.environ or device_type != "cpu":
        return True
    if "triton" in sys.modules:
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    return True


def _device(arg):
    import torch

    device = torch.device(arg) if arg else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _ops(arg: str) -> list[str] | None:
    from fastadv import bench

    ops = list(bench.OPS) if arg in ("all", "") else [o.strip() for o in arg.split(",") if o.strip()]
    for op in ops:
        if op not in bench.OPS:
            print(f"unknown op {op!r}; known: {', '.join(bench.OPS)}", file=sys.stderr)
            return None
    return ops


def _bench(args) -> int:
    from fastadv.bench import run

    device = _device(args.device)
    ops = _ops(args.ops)
    if ops is None:
        return 2
    return run.main(args, device, ops)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "env":
        from fastadv import _env

        return _env.main()
    if args.command in ("bench", "gpucheck", "_gpucheck_worker"):
        import torch

        dry = args.command != "bench" and args.dry_run
        dev_type = "cpu" if dry else torch.device(args.device).type if args.device else (
            "cuda" if torch.cuda.is_available() else "cpu")
        if dev_type == "cuda" and not torch.cuda.is_available():
            print(f"--device {args.device}: no CUDA device here (torch {torch.__version__}, "
                  f"torch.cuda.is_available() is False)", file=sys.stderr)
            return 2
        if not _interpreter_on(args, dev_type):
            env = dict(os.environ, TRITON_INTERPRET="1")
            argv = sys.argv[1:] if argv is None else list(argv)
            return subprocess.call([sys.executable, "-m", "fastadv", *argv], env=env)
        if args.command == "bench":
            return _bench(args)
        from fastadv.bench import gpucheck

        return gpucheck.main(args) if args.command == "gpucheck" else gpucheck.worker(args)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
