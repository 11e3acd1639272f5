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
import time

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


def print_header(device, header: dict, out=print) -> None:
    from fastadv import _env

    out(f"device   {header['device']}")
    out(f"commit   {header['commit']}   date {header['date']}")
    out("versions " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()))
    for line in _env.where():
        out(line)
    for name, why in _env.backends(device).items():
        if why is not None:
            out(f"backend {name}: not usable here: {why}")


def _bench(args) -> int:
    from pathlib import Path

    from fastadv import _backend
    from fastadv.bench import core

    device = _device(args.device)
    ops = _ops(args.ops)
    if ops is None:
        return 2
    impls = [i.strip() for i in args.impls.split(",") if i.strip()] if args.impls else None
    cpu = device.type == "cpu"
    quick = args.quick or (cpu and not args.full)
    timed = not cpu or args.full or args.iters is not None
    exclude = ("compiled",) if cpu and not args.full and impls is None else ()

    header = core.environment(device)
    print_header(device, header)
    if cpu and _backend.triton_interpreter():
        print("note: TRITON_INTERPRET=1: triton rows run in the Triton interpreter (checked and counted, "
              "never timed; no bf16/fp16 there)")
    if cpu:
        what = ("every op at its smallest size, without torch.compile (--full: every case and "
                "implementation)" if quick and not args.full else "the full CPU sweep")
        print(f"note: CPU run, {what}: CPU timings are not GPU speed, so the speedup, GB/s and %copy "
              f"columns stay blank" + ("; ms are CPU wall times" if timed else " and nothing is timed"))
    copy_gbps = core.measure_copy_bandwidth(device)
    print(f"copy bandwidth {copy_gbps:.1f} GB/s (dst.copy_(src), bytes read + written)")

    t0 = time.perf_counter()
    full = True if args.real_sizes else None
    units = core.plan(ops, device, full=full, quick=quick, impls=impls, exclude=exclude)
    print(f"{len(units)} rows to run ({len(ops)} ops){'' if args.budget is None else f', budget {args.budget:.0f} s'}")
    print()
    progress = core.Progress([u.key for u in units])
    budget = core.Budget(args.budget, reserve=5.0) if args.budget else None
    trace = progress.message if args.verbose else None
    rows = core.run_plan(units, device, warmup=args.warmup, iters=args.iters, timed=timed,
                         progress=progress, budget=budget, trace=trace)
    progress.close()
    core.add_derived(rows, copy_gbps, speedups=not cpu)
    print()
    print(core.format_table(rows))
    print()
    header["run"] = {"sizes": "real" if core.real_sizes(device, full) else "small", "quick": quick,
                     "timed": timed, "budget_s": args.budget}
    path = core.write_results(rows, args.out, device, copy_gbps, header=header).resolve()
    print(f"results  {path}")
    if not args.no_plot:
        try:
            png = core.plot(path, path.with_suffix(".png"))
            print(f"plot     {Path(png).resolve()}")
        except core.NothingToPlot as exc:
            print(f"plot     not drawn: {exc}")
        except ImportError as exc:
            print(f"plot     not drawn: {exc} (pip install matplotlib)")
    failed = [r for r in rows if r.get("check") == "FAIL" or r.get("error")]
    skipped = sum(1 for r in rows if r.get("skipped"))
    checked = sum(1 for r in rows if r.get("check") == "ok")
    print(f"{len(rows)} rows in {time.perf_counter() - t0:.1f} s: {checked} checked ok, {skipped} skipped, "
          + (f"{len(failed)} FAILED: " + ", ".join(f"{r['op']} {r['case']} {r['impl']}" for r in failed)
             if failed else "0 failed"))
    return 1 if failed else 0


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
