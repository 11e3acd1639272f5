"""ctypes binding of fastadv's CUDA library (``csrc/`` -> ``fastadv/_lib/libfastadv_cuda.so``).

The library is a plain C ABI (see ``csrc/fastadv.h``): raw device pointers,
sizes, a dtype code and the ``cudaStream_t`` of PyTorch's current stream.  It is
loaded on first use; :func:`load_error` says why it cannot be (None when it
can).  ``FASTADV_CUDA_LIB`` points to another build of it.

One module per op (``fgm.py``, ...) declares its C signatures in
``SIGNATURES`` and holds its launchers; they mirror the Triton ones and count their kernel launches with
:func:`fastadv.kernels.count_launch` (``cuda.<name>``).
"""
from __future__ import annotations

import ctypes
import os
import threading

import torch

from .. import count_launch  # noqa: F401  (op modules use it)

ABI_VERSION = 4
DEFAULT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                            "_lib", "libfastadv_cuda.so")
BUILD_HINT = ("build it with `FASTADV_BUILD_CUDA=1 pip install --no-build-isolation -e .` "
              "from a checkout (needs nvcc), or set FASTADV_CUDA_LIB to a built copy")

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

_c_void_p, _c_int, _c_int64, _c_float = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_SIGNATURES = {  # name: (restype, argtypes), as in csrc/fastadv.h
    "fastadv_last_error": (ctypes.c_char_p, []),
    "fastadv_abi_version": (_c_int, []),
}

_lock = threading.Lock()
_state: dict = {}  # "lib" or "error" once loading was tried


def library_path() -> str:
    return os.environ.get("FASTADV_CUDA_LIB") or DEFAULT_PATH


def _load() -> None:
    path = library_path()
    if not os.path.exists(path):
        where = "FASTADV_CUDA_LIB" if os.environ.get("FASTADV_CUDA_LIB") else "fastadv's CUDA library"
        _state["error"] = f"{where} {path} was not found; {BUILD_HINT}"
        return
    try:
        lib = ctypes.CDLL(path)
        for name, (restype, argtypes) in _SIGNATURES.items():
            fn = getattr(lib, name)
            fn.restype, fn.argtypes = restype, argtypes
    except (OSError, AttributeError) as exc:
        _state["error"] = f"fastadv's CUDA library {path} cannot be loaded ({exc}); re{BUILD_HINT}"
        return
    version = lib.fastadv_abi_version()
    if version != ABI_VERSION:
        _state["error"] = (f"fastadv's CUDA library {path} has ABI version {version}, this fastadv "
                           f"needs {ABI_VERSION}; re{BUILD_HINT}")
        return
    _state["lib"] = lib


def load_error() -> str | None:
    """None when the library is loaded (loading it on first call), else why not and how to fix it."""
    if not _state:
        with _lock:
            if not _state:
                _load()
    return _state.get("error")


def lib() -> ctypes.CDLL:
    err = load_error()
    if err is not None:
        raise RuntimeError(err)
    return _state["lib"]


def _reset_for_tests() -> None:
    """Forget the loaded library (or the error), so the next use loads again."""
    with _lock:
        _state.clear()


# ---- helpers ------------------------------------------------------------------------------------

def dtype_code(dtype: torch.dtype) -> int:
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise TypeError(f"the cuda backend supports float32, float16 and bfloat16 tensors, "
                        f"not {dtype}") from None


def _check(t: torch.Tensor, what: str) -> None:
    if t.device.type != "cuda":
        raise ValueError(f"the cuda backend needs CUDA tensors; {what} is on {t.device}")
    if not t.is_contiguous():
        raise ValueError(f"the cuda backend needs contiguous tensors; {what} is not")


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _call(name: str, *args) -> None:
    lib_ = lib()
    rc = getattr(lib_, name)(*args)
    if rc != 0:
        msg = lib_.fastadv_last_error().decode(errors="replace")
        raise RuntimeError(f"{name} failed (cudaError {rc}): {msg}")


def _stream(t: torch.Tensor) -> int | None:
    return torch.cuda.current_stream(t.device).cuda_stream or None




def declare(signatures: dict) -> None:
    """An op module adds its C functions ``{name: (restype, argtypes)}``; they
    are typed at load time, or now if the library is already loaded."""
    _SIGNATURES.update(signatures)
    loaded = _state.get("lib")
    for name, (restype, argtypes) in signatures.items() if loaded is not None else ():
        fn = getattr(loaded, name)
        fn.restype, fn.argtypes = restype, argtypes


from . import fgm  # noqa: E402  (declares its signatures before any load)
from .fgm import fgm_norm, fgm_restore_rows, fgm_update, fgm_workspace_floats  # noqa: E402,F401
from . import pgd  # noqa: E402
from .pgd import pgd_restore_rows, pgd_step, pgd_workspace_floats  # noqa: E402,F401
from . import multi_tensor  # noqa: E402,F401  (multi-tensor reductions and copy)
from . import awp  # noqa: E402,F401  (AWP)
from . import sam  # noqa: E402,F401  (SAM's first step)
from . import ema  # noqa: E402,F401  (EMA / SWA lerp)
from . import noise  # noqa: E402,F401  (noise injection, weight noise)
from . import neftune  # noqa: E402,F401  (NEFTune's row scale)
from . import sift  # noqa: E402,F401  (SiFT)
from . import dp as _dp  # noqa: E402,F401  (DP-SGD clip + noise)
from . import attacks  # noqa: E402,F401  (declares the input-attack launchers)
from . import fgsm  # noqa: E402,F401  (embedding FGSM)

EXPORTS = tuple(_SIGNATURES)
