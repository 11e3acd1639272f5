"""The wheel a user builds: built in a fresh copy of the sources, it carries
the package and only what its own build made (no library left in the source
tree by an earlier build), and its runtime requirements are what runs."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _sources(dst: Path) -> None:
    """The tracked files of the checkout (what a fresh clone holds)."""
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                               check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: the tracked files are unknown")
    for f in files:
        if (ROOT / f).is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, dst / f)


def test_wheel_without_cuda_has_no_stale_library(tmp_path):
    pytest.importorskip("setuptools")
    src, out = tmp_path / "src", tmp_path / "wheels"
    _sources(src)
    stale = src / "fastadv" / "_lib" / "libfastadv_cuda.so"  # as an earlier editable build leaves it
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"not a library")
    env = {**os.environ, "FASTADV_BUILD_CUDA": "0"}
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(out), str(src)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    wheels = list(out.glob("fastadv-*.whl"))
    assert len(wheels) == 1, wheels
    assert wheels[0].name.endswith("-py3-none-any.whl")  # pure: no library inside
    with zipfile.ZipFile(wheels[0]) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    assert "fastadv/__init__.py" in names and "fastadv/kernels/host.py" in names
    assert not [n for n in names if n.endswith(".so")], names
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert any(r.startswith("torch") for r in requires)
    assert not any(r.startswith("ninja") for r in requires), requires  # a build requirement only


FAKE_NVCC = """#!{python}
# Stands in for nvcc: writes each output it is asked for (and the depfile).
import sys
args = sys.argv[1:]
out = args[args.index("-o") + 1]
if "-MF" in args:
    with open(args[args.index("-MF") + 1], "w") as f:
        f.write(out + ":\\n")
with open(out, "wb") as f:
    f.write(b"built by the fake nvcc")
"""


def test_wheel_with_cuda_carries_the_library_it_built(tmp_path):
    """FASTADV_BUILD_CUDA=1: the wheel holds the library this build made (here by a
    stand-in nvcc, so no CUDA compile is needed), tagged for the platform, not py-any."""
    pytest.importorskip("ninja")
    src, out, cuda = tmp_path / "src", tmp_path / "wheels", tmp_path / "cuda"
    _sources(src)
    (cuda / "bin").mkdir(parents=True)
    nvcc = cuda / "bin" / "nvcc"
    nvcc.write_text(FAKE_NVCC.format(python=sys.executable))
    nvcc.chmod(0o755)
    env = {**os.environ, "FASTADV_BUILD_CUDA": "1", "CUDA_HOME": str(cuda)}
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                          "-q", "-w", str(out), str(src)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (wheel,) = out.glob("fastadv-*.whl")
    assert "-py3-none-linux" in wheel.name, wheel.name
    with zipfile.ZipFile(wheel) as z:
        assert z.read("fastadv/_lib/libfastadv_cuda.so") == b"built by the fake nvcc"
