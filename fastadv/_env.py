"""What this machine offers fastadv: versions, devices, usable backends.

``python -m fastadv env`` prints :func:`report`; the benchmark records
:func:`versions`, :func:`device_name` and :func:`git_commit` with its results.
"""
from __future__ import annotations

import functools
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

ENV_VARS = ("FASTADV_BACKEND", "TRITON_INTERPRET", "FASTADV_BUILD_CUDA", "FASTADV_COMMIT",
            "CUDA_VISIBLE_DEVICES")


def _module_version(name: str) -> str | None:
    try:
        mod = __import__(name)
    except Exception:  # not installed, or broken
        return None
    return getattr(mod, "__version__", "unknown")


def versions() -> dict[str, str | None]:
    """torch / triton / CUDA (as built into torch) / numpy / python / fastadv."""
    import torch

    import fastadv

    return {
        "fastadv": fastadv.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _module_version("triton"),
        "cuda": torch.version.cuda,
        "numpy": _module_version("numpy"),
    }


@functools.lru_cache(maxsize=None)
def nvcc() -> tuple[str | None, str | None]:
    """(path, release) of nvcc, or (None, None)."""
    candidates = [shutil.which("nvcc")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(str(Path(os.environ[var]) / "bin" / "nvcc"))
    candidates.append("/usr/local/cuda/bin/nvcc")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            try:
                out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30).stdout
            except Exception:
                return path, None
            m = re.search(r"release ([0-9.]+)", out)
            return path, (m.group(1) if m else None)
    return None, None


@functools.lru_cache(maxsize=None)
def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device) -> str:
    """Human name of a torch device: the GPU's name, or ``CPU (<model>)``."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_name()})"


def device_slug(device) -> str:
    """File-name-safe name for results: ``nvidia-h100-80gb-hbm3``; ``cpu`` for any CPU."""
    import torch

    device = torch.device(device)
    if device.type == "cpu":
        return "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")
    return slug or device.type


def devices() -> list:
    """The devices fastadv can use here: the CPU and every visible CUDA device."""
    import torch

    out = [torch.device("cpu")]
    try:
        if torch.cuda.is_available():
            out += [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    except Exception:
        pass
    return out


def git_commit(path: str | os.PathLike | None = None) -> str:
    """The commit of the source tree fastadv runs from, ``-dirty`` when tracked
    files differ from it, or ``unknown`` (an installed wheel, no git).
    ``FASTADV_COMMIT`` overrides it (a copy of the tree without ``.git``, as on
    the GPU machines: ``FASTADV_COMMIT=$(git rev-parse HEAD)``)."""
    if os.environ.get("FASTADV_COMMIT"):
        return os.environ["FASTADV_COMMIT"].strip()
    path = Path(path) if path is not None else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=path, capture_output=True,
                             text=True, timeout=10)
        if sha.returncode != 0 or not sha.stdout.strip():
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=path,
                               capture_output=True, text=True, timeout=10)
        suffix = "-dirty" if dirty.returncode == 0 and dirty.stdout.strip() else ""
        return sha.stdout.strip() + suffix
    except Exception:
        return "unknown"


def package_dir() -> Path:
    """The folder of the fastadv package this Python imported."""
    return Path(__file__).resolve().parent


def _is_source_tree(pkg: Path) -> bool:
    parent = pkg.parent
    return (parent / "pyproject.toml").is_file() and (parent / "csrc").is_dir()


def installed_copies() -> list[dict]:
    """fastadv as pip installed it (``*.dist-info`` on ``sys.path``): for each,
    ``{"package": <folder of the package>, "editable": bool}``.  An
    ``*.egg-info`` left in a checkout by a build is not an install."""
    from importlib import metadata

    out, seen = [], set()
    try:
        dists = list(metadata.distributions(name="fastadv"))
    except Exception:  # a broken metadata folder: nothing to compare with
        return out
    for dist in dists:
        meta = getattr(dist, "_path", None)
        if meta is None or not str(meta).endswith(".dist-info"):
            continue
        pkg, editable = None, False
        try:
            direct = json.loads(dist.read_text("direct_url.json") or "null")
        except ValueError:
            direct = None
        if direct and direct.get("dir_info", {}).get("editable") and direct.get("url", "").startswith("file://"):
            from urllib.parse import unquote, urlparse

            pkg, editable = Path(unquote(urlparse(direct["url"]).path)) / "fastadv", True
        else:
            files = dist.files or []
            if any(f.parts[:1] == ("fastadv",) and f.name == "__init__.py" for f in files):
                pkg = Path(str(dist.locate_file("fastadv")))
        if pkg is None:
            continue
        pkg = pkg.resolve()
        if pkg not in seen:
            seen.add(pkg)
            out.append({"package": pkg, "editable": editable})
    return out


def cuda_library() -> dict:
    """The CUDA library fastadv loads: ``path`` (where it looks), ``exists``,
    ``loaded`` (it loaded and has the right ABI) and ``why`` (None when loaded)."""
    try:
        from .kernels import cuda as _cuda
    except Exception as exc:  # the binding itself fails to import
        return {"path": None, "exists": False, "loaded": False, "why": f"{type(exc).__name__}: {exc}"}
    path = _cuda.library_path()
    why = _cuda.load_error()
    return {"path": path, "exists": os.path.exists(path), "loaded": why is None, "why": why}


def _has_library(pkg: Path) -> bool:
    return any((pkg / "_lib").glob("*.so")) if (pkg / "_lib").is_dir() else False


def shadow_warning(imported: Path | None = None, installed: list[dict] | None = None) -> str | None:
    """A warning when the fastadv that was imported is not the installed one:
    typically ``python -m fastadv`` run inside a checkout, whose ``fastadv/``
    comes first on ``sys.path`` (the current directory) and shadows what
    ``pip install`` built (its CUDA library included).  None when they agree
    or nothing is installed."""
    imported = (imported or package_dir()).resolve()
    installed = installed_copies() if installed is None else installed
    others = [c for c in installed if Path(c["package"]).resolve() != imported]
    if not installed or len(others) < len(installed):
        return None  # nothing installed, or the imported copy is one of the installed ones
    other = Path(others[0]["package"])
    kind = "editable install of " + str(other.parent) if others[0].get("editable") else "install at " + str(other)
    lib_here, lib_there = _has_library(imported), _has_library(other)
    why = ""
    if lib_there and not lib_here:
        why = (" The installed copy has a built CUDA library and this one has none, so the cuda "
               "backend is missing here.")
    where = "a source tree" if _is_source_tree(imported) else "a folder"
    return (f"warning: fastadv was imported from {imported} ({where} on sys.path, e.g. the current "
            f"directory), not from the pip {kind}.{why} Run from another directory, or "
            f"`pip install -e .` this checkout to use it.")


def where(width: int = 9) -> list[str]:
    """Which package and which CUDA library this process uses (``package``,
    ``cuda lib`` lines, the key padded to ``width``), and a warning when a
    source tree shadows an installed build: printed by ``env`` and ``bench``."""
    pkg = package_dir()
    copies = installed_copies()
    match = next((c for c in copies if Path(c["package"]) == pkg), None)
    if match is None:
        how = "not pip installed: a source tree on sys.path" if _is_source_tree(pkg) else "not pip installed"
    else:
        how = "editable install" if match["editable"] else "installed"
    lines = [f"{'package':<{width}} {pkg} ({how})"]
    lib = cuda_library()
    if lib["loaded"]:
        text = f"{lib['path']} (loaded)"
    elif lib["path"] is None:
        text = f"none: {lib['why']}"
    elif lib["exists"]:
        text = f"{lib['path']} (found, not loaded: {lib['why']})"
    else:
        text = (f"none: {lib['path']} is not built (`pip install` builds it when nvcc is found; "
                f"the cuda backend needs it)")
    lines.append(f"{'cuda lib':<{width}} {text}")
    warn = shadow_warning(pkg, copies)
    if warn:
        lines.append(warn)
    return lines


def backends(device) -> dict[str, str | None]:
    """Each backend mapped to None (usable on ``device``) or why not."""
    from . import _backend

    out = {}
    for name in _backend.BACKENDS:
        try:
            out[name] = _backend.why_not(name, device)
        except Exception as exc:  # e.g. the CUDA binding itself fails to import
            out[name] = f"{type(exc).__name__}: {exc}"
    return out


def report() -> str:
    """The text ``python -m fastadv env`` prints."""
    import torch

    lines = []
    v = versions()
    width = 10
    for key in ("fastadv", "python", "torch", "triton", "numpy"):
        lines.append(f"{key:<{width}} {v[key] or 'not installed'}")
    lines.append(f"{'cuda':<{width}} {v['cuda'] or 'none (CPU build of torch)'}")
    path, release = nvcc()
    lines.append(f"{'nvcc':<{width}} " + (f"{path} (release {release or '?'})" if path else "not found"))
    lines.append(f"{'platform':<{width}} {platform.platform()}")
    lines += where(width)  # package path, CUDA library path, shadowing
    lines.append("")
    lines.append("environment:")
    for var in ENV_VARS:
        lines.append(f"  {var}={os.environ[var]!r}" if var in os.environ else f"  {var} (unset)")
    try:
        from . import _backend

        lines.append(f"  -> default backend: {_backend.default()}")
    except Exception as exc:
        lines.append(f"  -> default backend: invalid ({exc})")
    lines.append("")
    lines.append("devices and backends:")
    for dev in devices():
        desc = device_name(dev)
        if dev.type == "cuda":
            props = torch.cuda.get_device_properties(dev)
            desc += f", sm_{props.major}{props.minor}, {props.total_memory / 2**30:.0f} GiB"
        lines.append(f"  {dev}: {desc}")
        try:
            from . import _backend

            auto = _backend.resolve("auto", dev)
        except Exception as exc:
            auto = f"error: {exc}"
        for name, why in backends(dev).items():
            lines.append(f"    {name:<7} " + ("usable" if why is None else f"not usable: {why}"))
        lines.append(f"    auto -> {auto}")
    if not torch.cuda.is_available():
        lines.append("  (no CUDA device visible)")
    return "\n".join(lines)


def main() -> int:
    print(report())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
