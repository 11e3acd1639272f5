"""Build step for fastadv's CUDA library (the metadata is in pyproject.toml).

csrc/*.cu is compiled by nvcc, driven by ninja (build/cuda/build.ninja), into
fastadv/_lib/libfastadv_cuda.so: a plain C-ABI shared object loaded with
ctypes, with cudart linked statically and no PyTorch in the build.

FASTADV_BUILD_CUDA   1 = must build (fails with nvcc's error), 0 = skip,
                     unset = build when nvcc is found, else skip with a note.
FASTADV_CUDA_ARCHS   compute capabilities, e.g. "80;90" (the default); SASS for
                     each, plus PTX for the last one.
"""
import glob
import os
import shlex
import shutil
import subprocess
import sys

import time

from setuptools import Command, Distribution, setup
from setuptools.command.build import build
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

try:
    from setuptools.command.bdist_wheel import bdist_wheel
except ImportError:  # setuptools < 70.1
    from wheel.bdist_wheel import bdist_wheel

ROOT = os.path.dirname(os.path.abspath(__file__))
LIB = os.path.join("fastadv", "_lib", "libfastadv_cuda.so")
DEFAULT_ARCHS = "80;90"


def find_nvcc():
    homes = [os.environ.get(v) for v in ("CUDA_HOME", "CUDA_PATH")] + ["/usr/local/cuda"]
    candidates = [os.path.join(h, "bin", "nvcc") for h in homes if h] + [shutil.which("nvcc")]
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def cuda_mode():
    """'force', 'skip' or 'auto', from FASTADV_BUILD_CUDA."""
    value = os.environ.get("FASTADV_BUILD_CUDA", "").strip()
    modes = {"1": "force", "0": "skip", "": "auto"}
    if value not in modes:
        raise ValueError(f"FASTADV_BUILD_CUDA must be 1, 0 or unset, not {value!r}")
    if modes[value] == "auto" and find_nvcc() is None:
        return "skip"
    return modes[value]


def gencode_flags(archs):
    archs = [a.replace(".", "") for a in archs.replace(",", ";").replace(" ", ";").split(";") if a]
    if not archs:
        raise ValueError("FASTADV_CUDA_ARCHS names no architecture")
    flags = [f"-gencode arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def find_ninja():
    try:
        import ninja
        return os.path.join(ninja.BIN_DIR, "ninja")
    except ImportError:
        path = shutil.which("ninja")
        if path is None:
            raise RuntimeError("ninja is needed to build the CUDA library: pip install ninja")
        return path


def compile_cuda(out, build_dir, nvcc, archs=None):
    """Compile csrc/*.cu into the shared library ``out`` (ninja: incremental)."""
    def esc(path):  # a path in a ninja build line
        return path.replace("$", "$$").replace(" ", "$ ").replace(":", "$:")

    archs = archs or os.environ.get("FASTADV_CUDA_ARCHS") or DEFAULT_ARCHS
    csrc = os.path.join(ROOT, "csrc")
    cflags = ["-O3", "-std=c++17", "--threads 0", "-Xcompiler -fPIC", "-Xcompiler -fvisibility=hidden",
              "-I" + shlex.quote(csrc), *gencode_flags(archs)]
    lines = [
        f"nvcc = {shlex.quote(nvcc)}",
        f"cflags = {' '.join(cflags)}",
        "rule cu",
        "  command = $nvcc $cflags -MD -MF $out.d -c $in -o $out",
        "  depfile = $out.d",
        "  deps = gcc",
        "  description = nvcc $in",
        "rule link",  # cudart is static (nvcc's default); export only the fastadv_* API
        "  command = $nvcc -shared -Xlinker --exclude-libs,ALL $in -o $out",
        "  description = link $out",
    ]
    objects = []
    for src in sorted(glob.glob(os.path.join(csrc, "*.cu"))):
        obj = os.path.splitext(os.path.basename(src))[0] + ".o"
        lines.append(f"build {esc(obj)}: cu {esc(src)}")
        objects.append(esc(obj))
    lines.append(f"build {esc(os.path.abspath(out))}: link {' '.join(objects)}")
    os.makedirs(build_dir, exist_ok=True)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(os.path.join(build_dir, "build.ninja"), "w") as f:
        f.write("\n".join(lines) + "\n")
    if os.path.exists(out):  # maybe a stale copy (build_py copies package data): always relink
        os.remove(out)
    subprocess.run([find_ninja(), "-C", build_dir], check=True)


class build_cuda(Command):
    """A ``build`` sub-command: the CUDA library (a shared object, no Python extension)."""

    description = "compile csrc/*.cu into fastadv/_lib/libfastadv_cuda.so with nvcc and ninja"
    user_options = []

    def initialize_options(self):
        self.build_lib = None
        self.editable_mode = False  # set by setuptools for `pip install -e`
        self.outputs = []

    def finalize_options(self):
        self.set_undefined_options("build", ("build_lib", "build_lib"))

    def run(self):
        mode = cuda_mode()
        if mode == "skip":
            print("fastadv: not building the CUDA library (FASTADV_BUILD_CUDA=0, or no nvcc found); "
                  "the triton and torch backends still work", file=sys.stderr)
            return
        nvcc = find_nvcc()
        if nvcc is None:
            raise RuntimeError("FASTADV_BUILD_CUDA=1 but nvcc was not found "
                               "(looked in $CUDA_HOME/bin, /usr/local/cuda/bin and PATH)")
        out = os.path.join(ROOT if self.editable_mode else self.build_lib, LIB)
        archs = os.environ.get("FASTADV_CUDA_ARCHS") or DEFAULT_ARCHS
        print(f"fastadv: compiling the CUDA library (csrc/*.cu) with {nvcc} for compute capabilities "
              f"{archs}; this takes several minutes on a small machine (FASTADV_BUILD_CUDA=0 skips it)",
              file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            compile_cuda(out, os.path.join(ROOT, "build", "cuda"), nvcc)
        except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:  # RuntimeError: no ninja
            if mode == "force":
                raise RuntimeError(f"building fastadv's CUDA library failed: {exc}") from exc
            print(f"fastadv: WARNING: the CUDA library was not built ({exc}); "
                  "set FASTADV_BUILD_CUDA=1 to make this an error", file=sys.stderr)
            return
        print(f"fastadv: CUDA library built in {time.monotonic() - t0:.0f} s: {out}", file=sys.stderr,
              flush=True)
        self.outputs = [out]

    def get_source_files(self):  # so that the sdist carries csrc/
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*")))

    def get_outputs(self):
        return self.outputs

    def get_output_mapping(self):
        return {}


class build_with_cuda(build):
    sub_commands = build.sub_commands + [("build_cuda", None)]


class build_py_no_stale_library(build_py):
    """Never copy a library an earlier build left in the source tree: the only
    library a wheel carries is the one build_cuda built for it (none when
    FASTADV_BUILD_CUDA=0)."""

    def find_data_files(self, package, src_dir):
        files = super().find_data_files(package, src_dir)
        return [f for f in files if not f.endswith(".so")]


class sdist_sources_only(sdist):
    def make_release_tree(self, base_dir, files):  # no prebuilt .so (package data) in the sdist
        super().make_release_tree(base_dir, [f for f in files if not f.endswith(".so")])


class CudaDistribution(Distribution):
    def has_ext_modules(self):  # a platform-specific wheel when it carries the .so
        return cuda_mode() != "skip"


class bdist_wheel_py3(bdist_wheel):
    def get_tag(self):  # the .so does not depend on the Python version: py3-none-<platform>
        python, abi, plat = super().get_tag()
        return (python, abi, plat) if self.root_is_pure else ("py3", "none", plat)


if __name__ == "__main__":
    setup(distclass=CudaDistribution,
          cmdclass={"build": build_with_cuda, "build_cuda": build_cuda, "build_py": build_py_no_stale_library,
                    "sdist": sdist_sources_only, "bdist_wheel": bdist_wheel_py3})
