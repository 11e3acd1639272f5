"""Command line: ``python -m fastadv env`` and ``python -m fastadv bench``.

``env``    versions, devices, and which backends are usable on each.
``bench``  for each op: check every implementation against the reference,
           time it on this device, count its launches / host syncs / bytes,
           print one table, write ``<out>/<device>.json`` and ``<out>/<device>.png``.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fastadv", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print versions, devices and usable backends")
    b = sub.add_parser("bench", help="check + time + count every op on this device",
                       description="Check each op against its reference, time it on this device and "
                                   "count launches, host syncs and bytes; print a table, write "
                                   "<out>/<device>.json (merged with earlier rows) and a PNG plot.")
    b.add_argument("--ops", default="all",
                   help="comma-separated ops to run (default: all registered ops)")
    b.add_argument("--full", action="store_true",
                   help="real sizes even on CPU (on CUDA they are always used)")
    b.add_argument("--quick", action="store_true",
                   help="only the smallest size of each op (a smoke run)")
    b.add_argument("--out", default=os.path.join("benchmarks", "results"),
                   help="results folder (default: benchmarks/results)")
    b.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    b.add_argument("--impls", default=None,
                   help="comma-separated implementations to run (default: all), "
                        "e.g. reference,compiled,torch,triton,cuda")
    b.add_argument("--device", default=None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    b.add_argument("--warmup", type=int, default=None, help="untimed runs first (default: 5 GPU, 1 CPU)")
    b.add_argument("--iters", type=int, default=None, help="timed runs, median reported "
                                                          "(default: 50 GPU, 3 CPU)")
    b.add_argument("--no-interpret", action="store_true",
                   help="on CPU, do not turn the Triton interpreter on (then no triton rows)")
    return p


def _needs_interpreter_reexec(args) -> bool:
    """On CPU the triton rows run under the Triton interpreter, which must be on
    before any Triton kernel is defined; if it is not, run again with it."""
    if args.no_interpret or "TRITON_INTERPRET" in os.environ:
        return False
    import torch

    device = torch.device(args.device) if args.device else None
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device.type == "cpu"


def _bench(args) -> int:
    import torch

    from fastadv import _backend, _env, bench
    from fastadv.bench import core

    device = torch.device(args.device) if args.device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    ops = list(bench.OPS) if args.ops in ("all", "") else [o.strip() for o in args.ops.split(",") if o.strip()]
    for op in ops:
        if op not in bench.OPS:
            print(f"unknown op {op!r}; known: {', '.join(bench.OPS)}", file=sys.stderr)
            return 2
    impls = [i.strip() for i in args.impls.split(",")] if args.impls else None

    header = core.environment(device)
    print(f"device   {header['device']}")
    print(f"commit   {header['commit']}   date {header['date']}")
    print("versions " + ", ".join(f"{k} {v}" for k, v in header["versions"].items()))
    for name, why in _env.backends(device).items():
        if why is not None:
            print(f"backend {name}: not usable here: {why}")
    interp = device.type == "cpu" and _backend.triton_interpreter()
    if interp:
        print("note: TRITON_INTERPRET=1: triton rows run in the Triton interpreter; their timings mean "
              "nothing, their checks and counted columns (launches, syncs, bytes) are exact")
    if device.type == "cpu":
        print("note: CPU run with small sizes (--full for the real ones); timings need a GPU")
    copy_gbps = core.measure_copy_bandwidth(device)
    print(f"copy bandwidth {copy_gbps:.1f} GB/s (dst.copy_(src), bytes read + written)")
    print()

    t0 = time.perf_counter()
    rows = []
    for op in ops:
        module = bench.load(op)
        rows += core.run_op(op, module, device, full=args.full, quick=args.quick, impls=impls, warmup=args.warmup,
                            iters=args.iters)
        release = getattr(module, "release", None)
        if release:
            release()
    core.add_derived(rows, copy_gbps)
    print()
    print(core.format_table(rows))
    print()
    path = core.write_results(rows, args.out, device, copy_gbps, header=header)
    print(f"results  {path}")
    if not args.no_plot:
        try:
            png = core.plot(path, path.with_suffix(".png"))
            print(f"plot     {png}")
        except ImportError as exc:
            print(f"plot     skipped: {exc} (pip install matplotlib)")
    failed = [r for r in rows if r.get("check") == "FAIL" or r.get("error")]
    print(f"{len(rows)} rows in {time.perf_counter() - t0:.1f} s; "
          + (f"{len(failed)} FAILED: " + ", ".join(f"{r['case']} {r['impl']}" for r in failed)
             if failed else "all checks ok"))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "env":
        from fastadv import _env

        return _env.main()
    if args.command == "bench":
        if _needs_interpreter_reexec(args):
            env = dict(os.environ, TRITON_INTERPRET="1")
            argv = sys.argv[1:] if argv is None else list(argv)
            return subprocess.call([sys.executable, "-m", "fastadv", *argv], env=env)
        return _bench(args)
    return 2  # pragma: no cover


if __name__ == "__main__":
    sys.exit(main())
