"""Results: derived columns, the JSON file, the printed table and the PNG.

* :func:`add_derived` -- speedup over the reference, GB/s, % of copy bandwidth;
* :func:`write_results` -- (merge into) ``<out>/<device>.json``: a header
  (device, date, commit, versions, copy_gbps) and one row per (op, case, impl);
* :func:`format_table` -- the plain-text table and one note per reason a row
  was skipped, not run or failed;
* :func:`plot` -- one panel per op, one bar per implementation.

Units: ``ms`` milliseconds, ``bytes`` bytes, ``gbps`` 1e9 bytes per second,
the table's ``MB`` 1e6 bytes.
"""
from __future__ import annotations

import datetime
import json
import math
import os
from pathlib import Path


def sig(x: float | None, digits: int = 6):
    if x is None or not math.isfinite(x):
        return None
    return float(f"{x:.{digits}g}")


def add_derived(rows: list[dict], copy_gbps: float | None, *, speedups: bool = True) -> list[dict]:
    """Fill ``speedup`` (reference ms / ms, same op and case), ``gbps`` (bytes
    / time), ``pct_copy_bw`` (gbps / copy_gbps * 100) and, for ops with a
    ``nonprivate`` row, ``vs_nonprivate`` (its ms / ms: throughput as a fraction
    of the non-private step) and, for a row naming its ``plain`` implementation
    (``dist_step``'s fsdp rows), ``vs_plain`` (ms / that row's ms: the cost of
    the distributed path) where defined.  ``speedups=False`` (a CPU run: its
    times say nothing about GPU speed) leaves them all empty."""
    ref = {(r["op"], r["case"]): r["ms"] for r in rows if r.get("impl") == "reference" and r.get("ms")}
    plain = {(r["op"], r["case"]): r["ms"] for r in rows if r.get("impl") == "nonprivate" and r.get("ms")}
    by_impl = {(r["op"], r["case"], r.get("impl")): r.get("ms") for r in rows}
    for r in rows:
        ms = r.get("ms") if speedups else None
        base = ref.get((r["op"], r["case"]))
        r["speedup"] = sig(base / ms, 4) if ms and base else None
        if (r["op"], r["case"]) in plain:
            r["vs_nonprivate"] = sig(plain[(r["op"], r["case"])] / ms, 4) if ms else None
        if r.get("plain") not in (None, r.get("impl")):
            plain_ms = by_impl.get((r["op"], r["case"], r["plain"]))
            r["vs_plain"] = sig(ms / plain_ms, 4) if ms and plain_ms else None
        nbytes = r.get("bytes")
        r["gbps"] = sig(nbytes / (ms * 1e-3) / 1e9, 5) if ms and nbytes else None
        r["pct_copy_bw"] = sig(100 * r["gbps"] / copy_gbps, 4) if r["gbps"] and copy_gbps else None
    return rows



def environment(device) -> dict:
    """device / date / commit / versions, the header of a results file (and
    ``extra_info`` of a pytest-benchmark run)."""
    from fastadv import _env

    v = _env.versions()
    return {
        "device": _env.device_name(device),
        "date": datetime.date.today().isoformat(),
        "commit": _env.git_commit(),
        "versions": {"torch": v["torch"], "triton": v["triton"], "cuda": v["cuda"]},
    }


ROW_KEY = ("op", "case", "impl")
REQUIRED_TOP = ("device", "date", "commit", "versions", "copy_gbps", "rows")
REQUIRED_ROW = ("op", "case", "impl", "ms", "gbps")


def merge_rows(old: list[dict], new: list[dict]) -> list[dict]:
    """``old`` with every row whose (op, case, impl) is in ``new`` replaced in
    place; rows only in ``new`` appended in their order."""
    fresh = {tuple(r[k] for k in ROW_KEY): r for r in new}
    out, used = [], set()
    for r in old:
        k = tuple(r.get(x) for x in ROW_KEY)
        if k in fresh:
            out.append(fresh[k])
            used.add(k)
        else:
            out.append(r)
    out += [r for r in new if tuple(r[k] for k in ROW_KEY) not in used]
    return out


def results_path(out_dir: str | os.PathLike, device) -> Path:
    from fastadv import _env

    return Path(out_dir) / f"{_env.device_slug(device)}.json"


def write_results(rows: list[dict], out_dir: str | os.PathLike, device, copy_gbps: float | None,
                  header: dict | None = None, path: str | os.PathLike | None = None) -> Path:
    """Write (merge into) ``<out_dir>/<device-slug>.json`` and return its path.

    The header (device, date, commit, versions, copy_gbps) is the newest run's;
    rows with the same (op, case, impl) are replaced, others kept."""
    path = Path(path) if path is not None else results_path(out_dir, device)
    path.parent.mkdir(parents=True, exist_ok=True)
    old_rows: list[dict] = []
    if path.exists():
        try:
            old_rows = json.loads(path.read_text()).get("rows", [])
        except (OSError, ValueError):
            old_rows = []
    doc = dict(header or environment(device))
    doc["copy_gbps"] = sig(copy_gbps, 5) if copy_gbps else 0.0
    doc["rows"] = merge_rows(old_rows, rows)
    doc = {k: doc[k] for k in REQUIRED_TOP} | {k: v for k, v in doc.items() if k not in REQUIRED_TOP}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(doc, indent=1) + "\n")
    tmp.replace(path)
    return path


COLUMNS = ("op", "case", "impl", "ms", "speedup", "GB/s", "%copy", "launches", "syncs", "MB", "check")


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _status(r: dict) -> str | None:
    if r.get("error"):
        return "ERROR"
    if r.get("budget"):
        return "not run"
    if r.get("skipped"):
        return "skipped"
    return None


def _cells(r: dict) -> tuple:
    mb = None if r.get("bytes") is None else r["bytes"] / 1e6
    return (r["op"], r["case"], r["impl"], _fmt(r.get("ms"), ".3f"),
            _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
            _fmt(r.get("gbps"), ".1f"), _fmt(r.get("pct_copy_bw"), ".0f"),
            _fmt(r.get("launches"), "d"), _fmt(r.get("syncs"), "d"), _fmt(mb, ".1f"),
            r.get("check", "-"))


def _reason(r: dict, status: str, reasons: dict) -> tuple:
    """The note a row without results goes under: its status and why; every
    row over the budget shares the first one's note."""
    if r.get("budget"):
        shared = next((g for g in reasons if g[1].startswith("over the budget")), None)
        return shared or (status, f"over the budget (first: {r.get('skipped')})")
    return (status, r.get("error") or r.get("skipped"))


def _notes(reasons: dict, per_reason: int) -> list[str]:
    out = []
    for (status, why), names in reasons.items():
        shown = "; ".join(names[:per_reason])
        more = f" (+{len(names) - per_reason} more)" if len(names) > per_reason else ""
        n = f"{len(names)} rows" if len(names) > 1 else "1 row"
        out.append(f"{status}, {n}: {why}  [{shown}{more}]")
    return out


def format_table(rows: list[dict], *, notes_per_reason: int = 3) -> str:
    """Plain-text table: op, case, impl, ms, speedup vs reference, GB/s, % of
    copy bandwidth, launches, syncs, MB moved, check; then one note per reason
    a row was skipped, not run or failed (naming up to ``notes_per_reason`` rows)."""
    body = []
    reasons: dict = {}
    for r in rows:
        status = _status(r)
        if status is None:
            body.append(_cells(r))
            continue
        body.append((r["op"], r["case"], r["impl"], status) + ("",) * (len(COLUMNS) - 4))
        reasons.setdefault(_reason(r, status, reasons), []).append(f"{r['op']} {r['case']} {r['impl']}")
    widths = [max(len(c), *(len(str(b[i])) for b in body)) if body else len(c)
              for i, c in enumerate(COLUMNS)]
    left = {0, 1, 2, 10}

    def line(cells):
        return "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    out = [line(COLUMNS), line(["-" * w for w in widths])] + [line(b) for b in body]
    collectives = _collectives(rows)
    if collectives:
        out += [""] + collectives
    if reasons:
        out += [""] + _notes(reasons, notes_per_reason)
    return "\n".join(out)


def _collectives(rows: list[dict]) -> list[str]:
    """One line per row that counted its ``all_reduce`` calls (``dist_step``):
    calls and bytes per call and, against its ``plain`` row, the launches more
    and the time ratio (GPU)."""
    launches = {(r["op"], r["case"], r.get("impl")): r.get("launches") for r in rows}
    out = []
    for r in rows:
        if "all_reduces" not in r or _status(r) is not None:
            continue
        line = (f"{r['op']} {r['case']} {r['impl']}: {r['all_reduces']} all_reduce per call, "
                f"{r['all_reduce_bytes']} bytes")
        plain = launches.get((r["op"], r["case"], r.get("plain")))
        if r.get("plain") != r.get("impl") and plain is not None and r.get("launches") is not None:
            line += f"; {r['launches'] - plain:+d} launches vs {r['plain']}"
        if r.get("vs_plain"):
            line += f", {r['vs_plain']:.2f}x its ms"
        out.append(line)
    return out


class NothingToPlot(Exception):
    """A results file without speedups (e.g. a CPU run): no plot is drawn."""


def _bars(ax, op_rows: list[dict], cases: list, impls: list) -> tuple[float, float]:
    """One bar per (case, impl), growing from 1x (up: faster than the
    reference, down: slower); the lowest and highest speedup drawn."""
    width = 0.8 / max(1, len(impls))
    lo, hi = 1.0, 1.0
    for j, impl in enumerate(impls):
        xs, ys = [], []
        for i, case in enumerate(cases):
            r = next((r for r in op_rows if r["case"] == case and r["impl"] == impl), None)
            if r is not None:
                xs.append(i + (j - (len(impls) - 1) / 2) * width)
                ys.append(r["speedup"])
        bars = ax.bar(xs, [y - 1.0 for y in ys], width, bottom=1.0, label=impl)
        for b, y in zip(bars, ys):
            ax.annotate(f"{y:.2g}x", (b.get_x() + b.get_width() / 2, y), ha="center",
                        va="bottom" if y >= 1 else "top", fontsize=7)
        lo, hi = min([lo] + ys), max([hi] + ys)
    return lo, hi


def _panel(ax, op: str, op_rows: list[dict], doc: dict) -> None:
    import matplotlib.ticker

    cases = list(dict.fromkeys(r["case"] for r in op_rows))
    lo, hi = _bars(ax, op_rows, cases, list(dict.fromkeys(r["impl"] for r in op_rows)))
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_ylim(lo / 1.6, hi * 1.6)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(range(len(cases)))
    ax.set_xticklabels(cases, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speedup over reference")
    ax.set_title(f"{op}: {doc.get('device', '?')}  ({doc.get('date', '?')}, "
                 f"{str(doc.get('commit', '?'))[:12]}, torch {doc.get('versions', {}).get('torch')})",
                 fontsize=10)
    ax.legend(fontsize=8)


def plot(results_json: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """Bar chart of the speedup over the reference of every (case, impl) that
    has one in a results file, one panel per op (bars for every impl: compiled,
    torch, triton, cuda, ...); writes and returns ``png_path``.  Raises
    :class:`NothingToPlot` when no row has a speedup (a CPU run leaves them empty)."""
    doc = json.loads(Path(results_json).read_text())
    rows = [r for r in doc["rows"] if r.get("speedup") and r.get("impl") != "reference"]
    if not rows:
        raise NothingToPlot("no speedups in the results (a CPU run leaves them empty: they need GPU timings)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in rows))
    fig, axes = plt.subplots(len(ops), 1, figsize=(12, 4.5 * len(ops)), squeeze=False)
    for ax, op in zip(axes[:, 0], ops):
        _panel(ax, op, [r for r in rows if r["op"] == op], doc)
    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
