"""Kernel launchers.  ``LAUNCHES`` counts every fastadv kernel launch (Triton
and CUDA alike) so the benchmark and the tests can count them on any machine."""
import collections

LAUNCHES: collections.Counter = collections.Counter()


def count_launch(name: str, n: int = 1) -> None:
    LAUNCHES[name] += n
