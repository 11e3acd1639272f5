"""Randomness inside fastadv's Triton kernels: Philox-4x32-10, keyed from the
PyTorch generator without a host sync.  Noise injection, SiFT and DP share it.

Key.  Every launch that draws random numbers reads a *key* from device memory:
an int64 tensor ``[seed, base]`` made by :func:`new_key` with
``torch.randint(..., generator=gen, device=dev)``.  So

* ``torch.manual_seed`` (or the ``generator`` passed) reproduces a run;
* each call advances the generator, so two calls never share a key (the 61-bit
  seed of the next call is a fresh draw);
* nothing is read back to the host, and under CUDA-graph capture PyTorch's own
  RNG bookkeeping makes each replay draw a new key (the kernel only loads it).

Counters.  One Philox-4x32-10 evaluation of counter ``k`` (``k = base + j``,
64 bits: Philox counter words ``(k lo, k hi, 0, 0)``, key ``(seed lo, seed hi)``;
split by :func:`philox4x`, never by ``tl.randint4x``, whose handling of int64
offsets changed in Triton 3.4) gives four 32-bit words.  A kernel splits its work
into chunks of ``4 * QUARTER`` elements; chunk ``c`` uses counters
``base + c * QUARTER + j`` (``j < QUARTER``) and element
``c * 4 * QUARTER + q * QUARTER + j`` takes word ``q`` of counter ``j``.  A
multi-tensor launch numbers its chunks across all its tensors, so different
tensors get disjoint counter ranges.  ``QUARTER`` is fixed (:data:`QUARTER`):
the noise an element gets depends on the key and its position only, not on
the GPU.  A launch over FSDP2 shards draws, for each element, the counter of
its global index in the unsharded launch (:func:`fastadv.kernels.host.shard_counters`,
``noise.shard_weight_noise``), so the split does not change the numbers.  csrc/rng.cuh implements the same counters and conversions, so the
CUDA backend draws the same 32-bit words for the same key (its normals agree
up to the last bits of ``log``/``sin``/``cos``).

Conversions (fp32).
* uniform in [0, 1): the top 24 bits of a word times 2^-24 (exact);
* normal: Box-Muller on two words, ``u1 = w1 * 2^-32 + 2^-33`` in (0, 1] (so
  ``log`` never sees 0 and the largest |z| is about 6.8), ``theta = 2 pi u2``.
"""
import torch
import triton
import triton.language as tl

from .. import count_launch

from ..host import KEY_HIGH, new_key  # noqa: F401  (the key is drawn on the host side, once)
from ..host import RNG_CHUNK as CHUNK
from ..host import RNG_QUARTER as QUARTER



def chunks(numel: int) -> int:
    """Chunks (programs of :data:`CHUNK` elements) covering ``numel`` elements."""
    return triton.cdiv(numel, CHUNK)


@triton.jit
def load_key(key_ptr):
    """(seed, base) of a key tensor."""
    return tl.load(key_ptr), tl.load(key_ptr + 1)


@triton.jit
def chunk_counters(base, chunk, QUARTER_: tl.constexpr):
    """The QUARTER_ Philox counters of chunk ``chunk`` (int64)."""
    return base + chunk.to(tl.int64) * QUARTER_ + tl.arange(0, QUARTER_).to(tl.int64)


@triton.jit
def philox4x(seed, counters):
    """Philox-4x32-10 of the int64 ``counters`` as (lo, hi, 0, 0) under the key
    (seed lo, seed hi): four blocks of uint32 words.

    The counter is split into its two 32-bit words here rather than handed to
    ``tl.randint4x``: before Triton 3.4 ``randint4x`` ran *64-bit* Philox on an
    int64 offset (other words, uint64 results: uniforms beyond 1, NaN normals).
    ``tl.philox`` on uint32 counters is the same 32-bit Philox in every Triton
    release (and ``csrc/rng.cuh``'s), so the stream does not depend on the version."""
    lo = counters.to(tl.uint32)                   # low 32 bits (truncation)
    hi = (counters >> 32).to(tl.uint32)           # counters are < 2^62: no sign bits
    zero = lo * 0
    return tl.philox(seed, lo, hi, zero, zero)


@triton.jit
def uniform01(w):
    """uint32 word -> fp32 uniform in [0, 1), 24 random bits, exact."""
    return (w >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24


@triton.jit
def normal_pair(w1, w2):
    """Two uint32 words -> two independent N(0, 1) fp32 (Box-Muller)."""
    u1 = w1.to(tl.float32) * 2.3283064365386963e-10 + 1.1641532182693481e-10  # (0, 1]
    r = tl.sqrt(-2.0 * tl.log(u1))
    theta = 6.283185307179586 * uniform01(w2)
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def normal4x(seed, counters):
    """Four blocks of N(0, 1) fp32 from one Philox evaluation per counter."""
    w0, w1, w2, w3 = philox4x(seed, counters)
    z0, z1 = normal_pair(w0, w1)
    z2, z3 = normal_pair(w2, w3)
    return z0, z1, z2, z3


@triton.jit
def uniform4x(seed, counters):
    """Four blocks of U[0, 1) fp32 from one Philox evaluation per counter."""
    w0, w1, w2, w3 = philox4x(seed, counters)
    return uniform01(w0), uniform01(w1), uniform01(w2), uniform01(w3)


# ---- a probe, for tests: the raw stream of a key -------------------------------------------------

@triton.jit
def _probe_kernel(key_ptr, words_ptr, normals_ptr, uniforms_ptr, n_chunks, QUARTER_: tl.constexpr):
    chunk = tl.program_id(0)
    seed, base = load_key(key_ptr)
    ctr = chunk_counters(base, chunk, QUARTER_)
    w0, w1, w2, w3 = philox4x(seed, ctr)
    z0, z1, z2, z3 = normal4x(seed, ctr)
    u0, u1, u2, u3 = uniform4x(seed, ctr)
    out = chunk.to(tl.int64) * 4 * QUARTER_ + tl.arange(0, QUARTER_)
    tl.store(words_ptr + out, w0.to(tl.int64))
    tl.store(words_ptr + out + QUARTER_, w1.to(tl.int64))
    tl.store(words_ptr + out + 2 * QUARTER_, w2.to(tl.int64))
    tl.store(words_ptr + out + 3 * QUARTER_, w3.to(tl.int64))
    tl.store(normals_ptr + out, z0)
    tl.store(normals_ptr + out + QUARTER_, z1)
    tl.store(normals_ptr + out + 2 * QUARTER_, z2)
    tl.store(normals_ptr + out + 3 * QUARTER_, z3)
    tl.store(uniforms_ptr + out, u0)
    tl.store(uniforms_ptr + out + QUARTER_, u1)
    tl.store(uniforms_ptr + out + 2 * QUARTER_, u2)
    tl.store(uniforms_ptr + out + 3 * QUARTER_, u3)


def probe(key: torch.Tensor, n_chunks: int = 1, quarter: int = QUARTER):
    """(words int64, normals fp32, uniforms fp32), each ``n_chunks * 4 * quarter``
    long, laid out per element as the noise kernels use them (tests and docs)."""
    n = n_chunks * 4 * quarter
    words = torch.empty(n, dtype=torch.int64, device=key.device)
    normals = torch.empty(n, dtype=torch.float32, device=key.device)
    uniforms = torch.empty(n, dtype=torch.float32, device=key.device)
    _probe_kernel[(n_chunks,)](key, words, normals, uniforms, n_chunks, QUARTER_=quarter)
    count_launch("triton.rng_probe")
    return words, normals, uniforms
