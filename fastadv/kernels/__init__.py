"""Kernel launchers.  ``LAUNCHES`` counts every fastadv kernel launch (Triton
and CUDA alike) so the benchmark and the tests can count them on any machine."""
import collections

LAUNCHES: collections.Counter = collections.Counter()


def count_launch(name: str, n: int = 1) -> None:
    LAUNCHES[name] += n


def device_guard(t):
    """Context making ``t``'s CUDA device current, so a Triton launch goes to
    that device and its current stream (Triton launches on the current device);
    a no-op for CPU tensors."""
    import contextlib

    import torch
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()
