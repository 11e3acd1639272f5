"""Triton kernel of ghost clipping's per-sample norm of a Linear layer's weight
gradient, from its inputs ``a [B, T, I]`` and output gradients ``g [B, T, O]``
(the Gram form, ``||G_b||^2 = sum_{t,s} (a_t . a_s) (g_t . g_s)``, which is
``||a_b||^2 ||g_b||^2`` when ``T = 1``).

One program per sample: it walks the ``(t, s)`` tiles of ``BLOCK_T`` steps,
builds the two Gram tiles with ``tl.dot`` (fp32 accumulation; IEEE fp32
products for fp32 inputs, no TF32; bf16 through exact TF32, see ``PREC_*``)
and sums their product, in a fixed order:
deterministic, no atomics, one fp32 result per sample.  Reads ``a`` and ``g``
``T / BLOCK_T`` times each (they are small next to the weight gradient it
avoids).  The embedding norm (``_embedding_sq_norms``) is the same walk with
the ``a`` Gram tile replaced by the id-equality mask; a tied parameter's
cross term between two uses (``_cross_gram``) the same walk over ``(t, s)``
tiles of ``T_u x T_v``, its ``P^u P^v^T`` tile a Gram tile, ``P^u`` read at
the other use's ids, the id-equality mask or a precomputed tile, split over
``(16 steps of u, sample)`` programs whose partials one launch sums in
order.  Also here: the vector
terms of one backward in one launch (``_vector_sq_norms``), the clip factors
and book-keeping's clipped gradient (tiled per sample, or flattened over
``(b, t)`` for fp32 operands with ``T < 16``), and the per-sample-strategy
norms (``_linear_sq_norms_ps``; ``_pair_sq_norms_ps`` for two uses of one
matrix, ``_uses_sq_norms_ps`` for any number through a table of the uses),
each sample's gradient built tile by tile and never stored.  No
CUDA twin yet.
"""
import torch
import triton
import triton.language as tl

from .. import count_launch, host
from .multi_tensor import work_item

BLOCK_T = 16
BLOCK_K = 32


# how a Gram tile multiplies (a constexpr per operand): IEEE fp32 products for
# fp32; fp16 natively (exact products, fp32 accumulation); bf16 widened to fp32
# and multiplied in TF32, exact for bf16 values (their 8-bit significand fits
# TF32's 11 bits; the Triton interpreter, which tests this on CPU, has no bf16 dot)
PREC_IEEE, PREC_NATIVE, PREC_TF32 = 0, 1, 2


def precision(dtype: torch.dtype) -> int:
    return {torch.float32: PREC_IEEE, torch.float16: PREC_NATIVE}.get(dtype, PREC_TF32)


def pair_precision(x: torch.dtype, y: torch.dtype) -> int:
    """How a cross Gram tile ``X Y^T`` of two operands multiplies: one dtype as
    :func:`precision`; mixed (autocast), both widened to fp32: IEEE when one is
    fp32, else TF32 (fp16 and bf16 values are exact in TF32)."""
    if x == y:
        return precision(x)
    return PREC_IEEE if torch.float32 in (x, y) else PREC_TF32


@triton.jit
def _cross_tile(x_b, y_b, t0, s0, Tx, Ty, K, sx_t, sx_k, sy_t, sy_k,
                BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    # (x_t . y_s) for t in [t0, t0 + BLOCK_T), s in [s0, s0 + BLOCK_T), fp32, 0
    # outside [0, Tx) x [0, Ty); x, y: one sample's [T, K] rows through their strides
    rt = t0 + tl.arange(0, BLOCK_T)
    rs = s0 + tl.arange(0, BLOCK_T)
    acc = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        kmask = rk[None, :] < K
        xt = tl.load(x_b + rt[:, None].to(tl.int64) * sx_t + rk[None, :] * sx_k, mask=(rt[:, None] < Tx) & kmask,
                     other=0.0)
        ys = tl.load(y_b + rs[:, None].to(tl.int64) * sy_t + rk[None, :] * sy_k, mask=(rs[:, None] < Ty) & kmask,
                     other=0.0)
        if PREC == 0:  # widening an fp32 operand is a no-op; a mixed pair is exactly widened
            acc += tl.dot(xt.to(tl.float32), tl.trans(ys.to(tl.float32)), input_precision="ieee")
        elif PREC == 2:
            acc += tl.dot(xt.to(tl.float32), tl.trans(ys.to(tl.float32)), input_precision="tf32")
        else:
            acc += tl.dot(xt, tl.trans(ys))
    return acc


@triton.jit
def _gram_tile(x_ptr, t0, s0, T, K, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    # (x_t . x_s) of one contiguous [T, K] sample
    return _cross_tile(x_ptr, x_ptr, t0, s0, T, T, K, K, 1, K, 1, BLOCK_T, BLOCK_K, PREC)


@triton.jit
def _linear_sq_norms(a_ptr, g_ptr, out_ptr, T, I, O, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                     PREC_A: tl.constexpr, PREC_G: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    a_b = a_ptr + b * T * I
    g_b = g_ptr + b * T * O
    total = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        for s0 in range(0, T, BLOCK_T):
            aa = _gram_tile(a_b, t0, s0, T, I, BLOCK_T, BLOCK_K, PREC_A)
            gg = _gram_tile(g_b, t0, s0, T, O, BLOCK_T, BLOCK_K, PREC_G)
            total += aa * gg
    tl.store(out_ptr + b, tl.sum(tl.sum(total, axis=1), axis=0))


def linear_sq_norms(a: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> None:
    """``out[b] = ||g_b^T a_b||_F^2`` (fp32) for contiguous ``a [B, T, I]``,
    ``g [B, T, O]`` (each fp32, fp16 or bf16: the two Gram forms never mix them)."""
    batch, steps, cols = a.shape
    if batch == 0:
        return
    _linear_sq_norms[(batch,)](a, g, out, steps, cols, g.shape[2], BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K,
                               PREC_A=precision(a.dtype), PREC_G=precision(g.dtype), enable_fp_fusion=False)
    count_launch("triton.dp_ghost_linear_sq_norms")


# ---------------------------------------------------------------- embedding norms

@triton.jit
def _embedding_sq_norms(ids_ptr, g_ptr, out_ptr, T, D, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
                        PREC: tl.constexpr):
    # an embedding lookup's P is the one-hot of its ids: P P^T is the id-equality
    # mask, so ||G_b||^2 = sum_{t,s} [id_t == id_s] (g_t . g_s); the ids are only
    # compared, never used as addresses (an out-of-range id cannot read out of bounds)
    b = tl.program_id(0).to(tl.int64)
    ids_b = ids_ptr + b * T
    g_b = g_ptr + b * T * D
    total = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        it = tl.load(ids_b + rt, mask=rt < T, other=0)
        for s0 in range(0, T, BLOCK_T):
            rs = s0 + tl.arange(0, BLOCK_T)
            js = tl.load(ids_b + rs, mask=rs < T, other=0)
            gg = _gram_tile(g_b, t0, s0, T, D, BLOCK_T, BLOCK_K, PREC)  # 0 outside [0, T)^2
            # a 0/1 product, not a select: 0 * inf = NaN as in the reference's mask * Gram
            total += (it[:, None] == js[None, :]).to(tl.float32) * gg
    tl.store(out_ptr + b, tl.sum(tl.sum(total, axis=1), axis=0))


def embedding_sq_norms(ids: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> None:
    """``out[b] = sum_{t,s: ids[b,t] = ids[b,s]} g[b,t] . g[b,s]`` (fp32) for
    contiguous ``ids [B, T]`` (int32 / int64) and ``g [B, T, D]`` (fp32, fp16 or bf16)."""
    batch, steps, dim = g.shape
    if batch == 0:
        return
    _embedding_sq_norms[(batch,)](ids, g, out, steps, dim, BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K,
                                  PREC=precision(g.dtype), enable_fp_fusion=False)
    count_launch("triton.dp_ghost_embedding_sq_norms")


# ---------------------------------------------------------------- vector terms

VEC_BLOCK_B = 16   # samples per program
VEC_BLOCK_D = 128  # per-sample elements per loop step


@triton.jit
def _vector_sq_norms(table, n_tensors, B, like, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    # one program per (tensor, BLOCK_B samples): out_row[b] += ||v[b]||^2, the
    # sample's elements summed in a fixed order (each output cell has one owner:
    # deterministic, no atomics).  Table (fastadv.kernels.host.TensorTable, 2
    # lists): list 0 the [B, d] vectors, list 1 their rows of the fp32 buffer
    # (each B long), then the vectors' numels (B * d)
    pid = tl.program_id(0)
    n_blocks = tl.cdiv(B, BLOCK_B)
    t = pid // n_blocks
    rb = (pid % n_blocks).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    v = tl.load(table + t).to(like.dtype)
    o = tl.load(table + n_tensors + t).to(tl.pointer_type(tl.float32))
    d = tl.load(table + 2 * n_tensors + t) // B
    acc = tl.zeros((BLOCK_B, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        rk = k0 + tl.arange(0, BLOCK_D)
        x = tl.load(v + rb[:, None] * d + rk[None, :], mask=(rb[:, None] < B) & (rk[None, :] < d),
                    other=0.0).to(tl.float32)
        acc += x * x
    bmask = rb < B
    tl.store(o + rb, tl.load(o + rb, mask=bmask, other=0.0) + tl.sum(acc, axis=1), mask=bmask)


def vector_sq_norms(vecs: list[torch.Tensor], rows: list[int], out: torch.Tensor) -> None:
    """``out[rows[k], b] += ||vecs[k][b]||^2`` for contiguous ``[B, ...]``
    vectors of one dtype and distinct rows of the contiguous fp32 ``out [n_rows,
    B]``, in one launch.  The table is built here from the live tensors and used
    at once (not cached: the buffer is new at every backward)."""
    batch = out.shape[1]
    if batch == 0 or not vecs:
        return
    table = host.TensorTable.of([vecs, [out[r] for r in rows]])
    grid = (len(vecs) * triton.cdiv(batch, VEC_BLOCK_B),)
    _vector_sq_norms[grid](table.data, len(vecs), batch, host.witness(vecs[0].dtype, out.device),
                           BLOCK_B=VEC_BLOCK_B, BLOCK_D=VEC_BLOCK_D, enable_fp_fusion=False)
    count_launch("triton.dp_ghost_vector_sq_norms")


VEC_CHUNK = 128  # output elements per program of the clipped vector sums


@triton.jit
def _clipped_vector_grads(table, f_ptr, T, B, like, CHUNK: tl.constexpr, BLOCK_B: tl.constexpr):
    # one program per CHUNK elements of one output: out_k = sum_b f_b v_k[b],
    # the samples in a fixed order, a dropped sample (f_b = 0) never loaded (its
    # NaN cannot enter).  Table (2 lists): list 0 the fp32 outputs (d each, the
    # work list is cut over them), list 1 the [B, d] vectors
    t, start, end = work_item(table, tl.program_id(0), T, 2, CHUNK)
    o = tl.load(table + t).to(tl.pointer_type(tl.float32))
    v = tl.load(table + T + t).to(like.dtype)
    d = tl.load(table + 2 * T + t)
    offs = start + tl.arange(0, CHUNK)
    cmask = offs < end
    acc = tl.zeros((BLOCK_B, CHUNK), dtype=tl.float32)
    for b0 in range(0, B, BLOCK_B):
        rb = b0 + tl.arange(0, BLOCK_B).to(tl.int64)
        f = tl.load(f_ptr + rb, mask=rb < B, other=0.0)
        x = tl.load(v + rb[:, None] * d + offs[None, :], mask=(f != 0.0)[:, None] & cmask[None, :],
                    other=0.0).to(tl.float32)
        acc += f[:, None] * x
    tl.store(o + offs, tl.sum(acc, axis=0), mask=cmask)


def clipped_vector_grads(vecs: list[torch.Tensor], factors: torch.Tensor, outs: list[torch.Tensor]) -> None:
    """``outs[k] = sum_b f_b vecs[k][b]`` (dropped samples masked) for
    contiguous ``[B, ...]`` vectors of one dtype, fp32 ``factors [B]`` and
    contiguous fp32 ``outs`` (``vecs[k][0]``'s shape), in one launch; the
    table is built here from the live tensors and used at once."""
    table = host.TensorTable.of([outs, vecs], chunk=VEC_CHUNK)
    if table.n_chunks == 0:
        return
    _clipped_vector_grads[(table.n_chunks,)](table.data, factors, len(vecs), factors.shape[0],
                                             host.witness(vecs[0].dtype, factors.device), CHUNK=VEC_CHUNK,
                                             BLOCK_B=VEC_BLOCK_B, enable_fp_fusion=False)
    count_launch("triton.dp_ghost_clipped_vector_grads")


# ---------------------------------------------------------------- norm layers' per-sample gradients

@triton.jit
def _norm_layer_grads(a_ptr, g_ptr, w_ptr, b_ptr, T, D, eps, sa_b, sa_t, sa_d, sg_b, sg_t, sg_d,
                      BLOCK_D: tl.constexpr, RMS: tl.constexpr, WANT_W: tl.constexpr, WANT_B: tl.constexpr):
    # one program per sample: for each step t in order its row's statistics in
    # fp32 (biased variance, 1 / sqrt(var + eps), as the layer's forward), xhat,
    # then g * xhat and g added into the sample's two [D] sums: xhat and the
    # [B, T, D] products are never stored; a NaN stays in its own sample
    b = tl.program_id(0).to(tl.int64)
    rd = tl.arange(0, BLOCK_D).to(tl.int64)
    dmask = rd < D
    acc_w = tl.zeros((BLOCK_D,), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    a_t = a_ptr + b * sa_b  # step t's row, walked (pointer arithmetic is 64-bit: t * stride may pass 2^31)
    g_t = g_ptr + b * sg_b
    for t in range(0, T):
        gt = tl.load(g_t + rd * sg_d, mask=dmask, other=0.0).to(tl.float32)
        if WANT_W:
            x = tl.load(a_t + rd * sa_d, mask=dmask, other=0.0).to(tl.float32)
            if RMS:
                xhat = x / tl.sqrt_rn(tl.sum(x * x, axis=0) / D + eps)
            else:
                xc = tl.where(dmask, x - tl.sum(x, axis=0) / D, 0.0)
                xhat = xc / tl.sqrt_rn(tl.sum(xc * xc, axis=0) / D + eps)
            acc_w += gt * xhat
        acc_b += gt
        a_t += sa_t
        g_t += sg_t
    if WANT_W:
        tl.store(w_ptr + b * D + rd, acc_w, mask=dmask)
    if WANT_B:
        tl.store(b_ptr + b * D + rd, acc_b, mask=dmask)


def norm_layer_grads(a: torch.Tensor, g: torch.Tensor, eps: float, rms: bool, w_out, b_out) -> None:
    """``w_out[b] = sum_t g[b, t] * xhat[b, t]``, ``b_out[b] = sum_t g[b, t]``
    (contiguous fp32 ``[B, D]``, either may be None) for strided ``a``, ``g``
    ``[B, T, D]`` (fp32 / fp16 / bf16, mixed allowed), ``D`` at most
    ``fastadv.ops.dp_ghost.NORM_MAX_D`` (one row in registers per step): one
    launch, one program per sample, deterministic."""
    batch, steps, dim = a.shape
    if batch == 0 or dim == 0:
        return
    dummy = w_out if w_out is not None else b_out
    block = triton.next_power_of_2(dim)
    # more warps for a long row: a [BLOCK_D] fp32 vector is 4 arrays per thread (x, g, two sums)
    warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    _norm_layer_grads[(batch,)](a, g, w_out if w_out is not None else dummy, b_out if b_out is not None else dummy,
                                steps, dim, float(eps), *a.stride(), *g.stride(),
                                BLOCK_D=block, RMS=bool(rms), WANT_W=w_out is not None,
                                WANT_B=b_out is not None, num_warps=warps, enable_fp_fusion=False)
    count_launch("triton.dp_ghost_norm_layer_grads")


GN_BLOCK = 256  # positions per load of the group-norm kernel


@triton.jit
def _group_norm_grads(a_ptr, g_ptr, w_ptr, b_ptr, C, N, CPG, G, eps, sa_b, sa_c, sa_n, sg_b, sg_c, sg_n,
                      BLOCK: tl.constexpr, WANT_W: tl.constexpr, WANT_B: tl.constexpr):
    # one program per (sample, group of CPG channels): the group's mean, then its
    # biased variance (two passes over the input, fp32, as the layer's forward),
    # then per channel in order sum_n g * xhat and sum_n g; xhat and the
    # [B, C, N] products are never stored; a NaN stays in its own (sample, group)
    pid = tl.program_id(0)
    b = (pid // G).to(tl.int64)
    c0 = (pid % G).to(tl.int64) * CPG
    rn = tl.arange(0, BLOCK).to(tl.int64)
    a_g = a_ptr + b * sa_b + c0 * sa_c
    g_g = g_ptr + b * sg_b + c0 * sg_c
    count = 1.0 * CPG * N  # fp32: CPG * N may pass 2^31 (and either may be a specialised constant 1)
    # the channels' pointers are walked (64-bit pointer arithmetic: c * stride may pass 2^31); the
    # statistics only when the weight's gradient is asked for (the bias's is sum_n g)
    mean = 0.0
    rstd = 0.0
    if WANT_W:
        s = tl.zeros((BLOCK,), dtype=tl.float32)
        a_c = a_g
        for c in range(0, CPG):
            for n0 in range(0, N, BLOCK):
                s += tl.load(a_c + (n0 + rn) * sa_n, mask=n0 + rn < N, other=0.0).to(tl.float32)
            a_c += sa_c
        mean = tl.sum(s, axis=0) / count
        s = tl.zeros((BLOCK,), dtype=tl.float32)
        a_c = a_g
        for c in range(0, CPG):
            for n0 in range(0, N, BLOCK):
                x = tl.load(a_c + (n0 + rn) * sa_n, mask=n0 + rn < N, other=0.0).to(tl.float32)
                xc = tl.where(n0 + rn < N, x - mean, 0.0)
                s += xc * xc
            a_c += sa_c
        rstd = 1.0 / tl.sqrt_rn(tl.sum(s, axis=0) / count + eps)
    a_c = a_g
    g_c = g_g
    for c in range(0, CPG):
        acc_w = tl.zeros((BLOCK,), dtype=tl.float32)
        acc_b = tl.zeros((BLOCK,), dtype=tl.float32)
        for n0 in range(0, N, BLOCK):
            m = n0 + rn < N
            gv = tl.load(g_c + (n0 + rn) * sg_n, mask=m, other=0.0).to(tl.float32)
            if WANT_W:
                x = tl.load(a_c + (n0 + rn) * sa_n, mask=m, other=0.0).to(tl.float32)
                acc_w += gv * tl.where(m, (x - mean) * rstd, 0.0)
            acc_b += gv
        if WANT_W:
            tl.store(w_ptr + b * C + c0 + c, tl.sum(acc_w, axis=0))
        if WANT_B:
            tl.store(b_ptr + b * C + c0 + c, tl.sum(acc_b, axis=0))
        a_c += sa_c
        g_c += sg_c


def group_norm_grads(a: torch.Tensor, g: torch.Tensor, groups: int, eps: float, w_out, b_out) -> None:
    """``w_out[b, c] = sum_n g * xhat``, ``b_out[b, c] = sum_n g`` (contiguous
    fp32 ``[B, C]``, either may be None) for strided ``a``, ``g`` ``[B, C, N]``
    (fp32 / fp16 / bf16, mixed allowed), ``C`` a multiple of ``groups``: one
    launch, one program per (sample, group), deterministic."""
    batch, channels, n = a.shape
    if batch == 0 or channels == 0:
        return
    dummy = w_out if w_out is not None else b_out
    _group_norm_grads[(batch * groups,)](a, g, w_out if w_out is not None else dummy,
                                         b_out if b_out is not None else dummy, channels, n, channels // groups,
                                         groups, float(eps), *a.stride(), *g.stride(), BLOCK=GN_BLOCK,
                                         WANT_W=w_out is not None, WANT_B=b_out is not None,
                                         enable_fp_fusion=False)
    count_launch("triton.dp_ghost_group_norm_grads")


# ---------------------------------------------------------------- bk's clipped embedding gradient

EMB_BLOCK_D = 128


@triton.jit
def _clipped_embedding_grad(sorted_ptr, ends_ptr, perm_ptr, g_ptr, f_ptr, out_ptr, T, D, V,
                            BLOCK_D: tl.constexpr):
    # one program per (position of the stably sorted ids, BLOCK_D columns): the
    # first position of each run of equal ids sums the run's f_b g[b, t] in
    # (b, t) order into its table row (one owner per row: deterministic, no
    # atomics); the other positions do nothing.  A dropped sample (f_b = 0) is
    # never loaded.  The ids are the embedding's own (ghost.py checks they were
    # not modified since the forward); an id outside [0, V) is not written
    i = tl.program_id(0).to(tl.int64)
    rd = tl.program_id(1).to(tl.int64) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = rd < D
    row = tl.load(sorted_ptr + i).to(tl.int64)
    prev = tl.load(sorted_ptr + i - 1, mask=i > 0, other=-1).to(tl.int64)
    if row != prev:  # the run's first position (ids are >= 0 in range, the sentinel is -1)
        acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
        for j in range(i, tl.load(ends_ptr + i)):
            k = tl.load(perm_ptr + j)
            f = tl.zeros((BLOCK_D,), dtype=tl.float32) + tl.load(f_ptr + k // T)  # per lane: a vector mask
            x = tl.load(g_ptr + k * D + rd, mask=dmask & (f != 0.0), other=0.0).to(tl.float32)
            acc += f * x
        rows = tl.zeros((BLOCK_D,), dtype=tl.int64) + row  # per lane: a vector mask
        ok = dmask & (rows >= 0) & (rows < V)
        ptrs = out_ptr + row * D + rd
        tl.store(ptrs, tl.load(ptrs, mask=ok, other=0.0) + acc, mask=ok)


def clipped_embedding_grad(ids: torch.Tensor, g: torch.Tensor, factors: torch.Tensor, out: torch.Tensor) -> None:
    """``out[v] += sum_{(b, t): ids[b, t] = v} f_b g[b, t]`` for contiguous
    ``ids [B, T]``, ``g [B, T, D]``, fp32 ``factors [B]`` and a contiguous fp32
    ``out [V, D]``: a stable sort of the ids and the end of each run of equal
    ids (two torch ops, no host sync), then one launch."""
    batch, steps, dim = g.shape
    n = batch * steps
    if n == 0 or dim == 0:
        return
    sorted_ids, perm = torch.sort(ids.reshape(n), stable=True)  # deterministic: (b, t) order within a row
    ends = torch.searchsorted(sorted_ids, sorted_ids, right=True)  # where each position's run ends
    grid = (n, triton.cdiv(dim, EMB_BLOCK_D))
    _clipped_embedding_grad[grid](sorted_ids, ends, perm, g, factors, out, steps, dim, out.shape[0],
                                  BLOCK_D=EMB_BLOCK_D, enable_fp_fusion=False)
    count_launch("triton.dp_ghost_clipped_embedding_grad")


# ---------------------------------------------------------------- clip factors

BLOCK_B = 128


@triton.jit
def _clip_factors(rows_ptr, factors_ptr, finite_ptr, norms_ptr, n_rows, B, max_grad_norm,
                  BLOCK_B: tl.constexpr):
    # one program per BLOCK_B samples: the rows summed in row order (fixed: deterministic)
    cols = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    mask = cols < B
    sq = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for r in range(0, n_rows):
        sq += tl.load(rows_ptr + r * B + cols, mask=mask, other=0.0)
    norm = tl.sqrt_rn(sq)
    finite = (norm == norm) & (norm != float("inf"))
    # Opacus 1.6: (C / (norm + 1e-6)).clamp(max=1); torch evaluates scalar / tensor
    # as reciprocal(tensor) * scalar, each correctly rounded: the same here, to the bit
    f = tl.minimum(tl.div_rn(tl.zeros_like(norm) + 1.0, norm + 1e-6) * max_grad_norm, 1.0)
    tl.store(factors_ptr + cols, tl.where(finite, f, 0.0), mask=mask)
    tl.store(finite_ptr + cols, finite.to(tl.int8), mask=mask)
    tl.store(norms_ptr + cols, norm, mask=mask)


def clip_factors(rows: torch.Tensor, max_grad_norm: float, factors: torch.Tensor, finite: torch.Tensor,
                 norms: torch.Tensor) -> None:
    """From contiguous fp32 ``rows [n_rows, B]``: ``norms = sqrt(sum of rows)``,
    Opacus's clip factors and the finite flag (bool, written as bytes)."""
    n_rows, batch = rows.shape
    if batch == 0:
        return
    _clip_factors[(triton.cdiv(batch, BLOCK_B),)](rows, factors, finite.view(torch.int8), norms, n_rows, batch,
                                                  float(max_grad_norm), BLOCK_B=BLOCK_B, enable_fp_fusion=False)
    count_launch("triton.dp_ghost_clip_factors")


# ---------------------------------------------------------------- book-keeping's clipped gradient

BLOCK_O = 32
BLOCK_I = 32


@triton.jit
def _store_tile(out_ptr, ro, ri, O, I, acc, ADD: tl.constexpr):
    # out tile += acc (ADD), or = acc: the first use of a parameter writes its
    # buffer, which then needs no zero fill and is not read
    omask = (ro[:, None] < O) & (ri[None, :] < I)
    ptrs = out_ptr + ro[:, None] * I + ri[None, :]
    if ADD:
        acc += tl.load(ptrs, mask=omask, other=0.0)
    tl.store(ptrs, acc, mask=omask)


@triton.jit
def _sample_tile(p_b, q_b, ro, ri, t_end, T, O, I, sp_t, sp_o, sq_t, sq_i,
                 BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                 IEEE: tl.constexpr, WIDEN: tl.constexpr):
    # one sample's [BLOCK_O, BLOCK_I] tile of P_b^T Q_b over its steps t < t_end,
    # in fp32 (the clipped GEMM and the per-sample-strategy norm share it)
    part = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        tmask = rt < t_end
        p = tl.load(p_b + rt[:, None].to(tl.int64) * sp_t + ro[None, :] * sp_o,
                    mask=tmask[:, None] & (ro[None, :] < O), other=0.0)
        q = tl.load(q_b + rt[:, None].to(tl.int64) * sq_t + ri[None, :] * sq_i,
                    mask=tmask[:, None] & (ri[None, :] < I), other=0.0)
        if WIDEN:  # mixed dtypes (autocast) or bf16: both exactly widened to fp32
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        if IEEE:  # an fp32 operand: IEEE fp32 products
            part += tl.dot(tl.trans(p), q, input_precision="ieee")
        elif WIDEN:  # fp16 / bf16 values fit tf32's 11-bit significand: tf32 products are exact
            part += tl.dot(tl.trans(p), q, input_precision="tf32")
        else:  # fp16: exact products, fp32 accumulation
            part += tl.dot(tl.trans(p), q)
    return part


@triton.jit
def _clipped_linear_grad(p_ptr, q_ptr, f_ptr, out_ptr, B, T, O, I,
                         sp_b, sp_t, sp_o, sq_b, sq_t, sq_i,
                         BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                         IEEE: tl.constexpr, WIDEN: tl.constexpr, ADD: tl.constexpr):
    # one program per [BLOCK_O, BLOCK_I] tile of out; the (b, t) reduction in a fixed order
    ro = tl.program_id(0).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    ri = tl.program_id(1).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    p_b, q_b = p_ptr, q_ptr  # sample b's base pointers, walked (pointer arithmetic is 64-bit)
    for b in range(0, B):
        f = tl.load(f_ptr + b)
        t_end = tl.where(f != 0.0, T, 0)  # a dropped sample is never read: a NaN in it cannot enter
        part = _sample_tile(p_b, q_b, ro, ri, t_end, T, O, I, sp_t, sp_o, sq_t, sq_i,
                            BLOCK_T, BLOCK_O, BLOCK_I, IEEE, WIDEN)
        p_b += sp_b
        q_b += sq_b
        acc += f * part  # f_b (P_b^T Q_b): the scale after the fp32 sum, no rounding of P to its dtype
    _store_tile(out_ptr, ro, ri, O, I, acc, ADD)


@triton.jit
def _clipped_linear_grad_flat(p_ptr, q_ptr, f_ptr, out_ptr, n, T, O, I,
                              sp_b, sp_t, sp_o, sq_b, sq_t, sq_i,
                              BLOCK_R: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                              ADD: tl.constexpr):
    # fp32 products, T < BLOCK_R: the (b, t) rows flattened into one reduction
    # axis, each row of P scaled by its sample's f_b before an IEEE fp32 dot
    # (the reference's (f P)^T Q, and no tile padded to BLOCK_R per sample);
    # a dropped sample's rows are never loaded; the order is fixed (n = B * T)
    ro = tl.program_id(0).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    ri = tl.program_id(1).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for r0 in range(0, n, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R).to(tl.int64)
        b, t = r // T, r % T
        f = tl.load(f_ptr + b, mask=r < n, other=0.0)
        keep = f != 0.0
        p = tl.load(p_ptr + (b * sp_b + t * sp_t)[:, None] + ro[None, :] * sp_o,
                    mask=keep[:, None] & (ro[None, :] < O), other=0.0).to(tl.float32)
        q = tl.load(q_ptr + (b * sq_b + t * sq_t)[:, None] + ri[None, :] * sq_i,
                    mask=keep[:, None] & (ri[None, :] < I), other=0.0).to(tl.float32)
        acc += tl.dot(tl.trans(p * f[:, None]), q, input_precision="ieee")
    _store_tile(out_ptr, ro, ri, O, I, acc, ADD)


def flat(p_dtype: torch.dtype, q_dtype: torch.dtype, steps: int) -> bool:
    """Whether :func:`clipped_linear_grad` runs the flattened ``(b, t)`` kernel:
    an fp32 operand (IEEE products: scaling P by ``f_b`` first rounds like the
    reference) and fewer steps than one tile."""
    return torch.float32 in (p_dtype, q_dtype) and steps < BLOCK_T


def clipped_linear_grad(p: torch.Tensor, q: torch.Tensor, factors: torch.Tensor, out: torch.Tensor,
                        accumulate: bool = True) -> None:
    """``out += sum_b f_b P_b^T Q_b`` (``accumulate``; else ``out = ...``, its
    old values never read) for strided ``p [B, T, O]``, ``q [B, T, I]``, fp32
    ``factors [B]`` and a contiguous fp32 ``out [O, I]``."""
    batch, steps, rows = p.shape
    cols = q.shape[2]
    if rows == 0 or cols == 0:
        return
    if batch == 0 or steps == 0:
        if not accumulate:
            out.zero_()  # an empty sum
        return
    ieee = torch.float32 in (p.dtype, q.dtype)
    # bf16 goes through fp32 + tf32 (exact): one path on the GPU and under the
    # interpreter, which has no bf16 dot
    widen = p.dtype != q.dtype or torch.bfloat16 in (p.dtype, q.dtype)
    grid = (triton.cdiv(rows, BLOCK_O), triton.cdiv(cols, BLOCK_I))
    if flat(p.dtype, q.dtype, steps):
        _clipped_linear_grad_flat[grid](p, q, factors, out, batch * steps, steps, rows, cols, *p.stride(), *q.stride(),
                                        BLOCK_R=BLOCK_T, BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I, ADD=bool(accumulate),
                                        enable_fp_fusion=False)
        count_launch("triton.dp_ghost_clipped_linear_grad")
        return
    _clipped_linear_grad[grid](p, q, factors, out, batch, steps, rows, cols, *p.stride(), *q.stride(),
                               BLOCK_T=BLOCK_T, BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I, IEEE=ieee,
                               WIDEN=widen, ADD=bool(accumulate), enable_fp_fusion=False)
    count_launch("triton.dp_ghost_clipped_linear_grad")


# ---------------------------------------------------------------- per-sample-strategy norm

PS_BLOCK_B = 128  # samples per program of the partials' sum


@triton.jit
def _linear_sq_norms_ps(p_ptr, q_ptr, part_ptr, T, O, I, n_ti, n_tiles,
                        sp_b, sp_t, sp_o, sq_b, sq_t, sq_i,
                        BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                        IEEE: tl.constexpr, WIDEN: tl.constexpr):
    # one program per (sample b, [BLOCK_O, BLOCK_I] tile of G_b = P_b^T Q_b): the
    # tile built over T with tl.dot (the products of _clipped_linear_grad), then
    # ||tile||^2 into part[b, tile].  G_b is never written: memory B * n_tiles
    tile = tl.program_id(0)  # axis 0: the tiles may outnumber axis 1's limit (65535)
    b = tl.program_id(1).to(tl.int64)
    ro = (tile // n_ti).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    ri = (tile % n_ti).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    p_b = p_ptr + b * sp_b
    q_b = q_ptr + b * sq_b
    acc = _sample_tile(p_b, q_b, ro, ri, T, T, O, I, sp_t, sp_o, sq_t, sq_i,
                       BLOCK_T, BLOCK_O, BLOCK_I, IEEE, WIDEN)
    # the padding is zeroed before squaring: a real inf in Q times a padded 0 of
    # P is NaN there, and must not enter (the reference's G_b has no padding)
    inside = (ro[:, None] < O) & (ri[None, :] < I)
    acc = tl.where(inside, acc, 0.0)
    tl.store(part_ptr + b * n_tiles + tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


@triton.jit
def _sum_partials(part_ptr, out_ptr, B, n_tiles, scale, BLOCK_B: tl.constexpr, ADD: tl.constexpr):
    # out[b] = scale * (sum of part[b, :] in tile order: fixed, deterministic),
    # or out[b] += that (ADD: a tied parameter's terms into its row)
    rb = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    bmask = rb < B
    s = tl.zeros((BLOCK_B,), dtype=tl.float32)
    for k in range(0, n_tiles):
        s += tl.load(part_ptr + rb * n_tiles + k, mask=bmask, other=0.0)
    s = s * scale
    if ADD:
        s = tl.load(out_ptr + rb, mask=bmask, other=0.0) + s
    tl.store(out_ptr + rb, s, mask=bmask)


def sum_partials(part: torch.Tensor, out: torch.Tensor, scale: float = 1.0, accumulate: bool = False) -> None:
    """``out = scale * part.sum(1)`` (``accumulate``: ``out += ...``), the
    partials ``[B, n]`` summed in order; one launch (not counted here)."""
    batch, n = part.shape
    _sum_partials[(triton.cdiv(batch, PS_BLOCK_B),)](part, out, batch, n, float(scale), BLOCK_B=PS_BLOCK_B,
                                                     ADD=bool(accumulate), enable_fp_fusion=False)


def linear_sq_norms_ps(a: torch.Tensor, g: torch.Tensor, out: torch.Tensor) -> None:
    """``out[b] = ||g_b^T a_b||_F^2`` (fp32) for strided ``a [B, T, I]``,
    ``g [B, T, O]`` (fp32 / fp16 / bf16, mixed allowed), each sample's gradient
    built tile by tile and never stored: two launches (the per-(sample, tile)
    partials, then their sum in tile order)."""
    batch, steps, cols = a.shape
    rows = g.shape[2]
    if batch == 0:
        return
    if rows == 0 or cols == 0 or steps == 0:
        out.zero_()  # an empty gradient
        return
    n_ti = triton.cdiv(cols, BLOCK_I)
    n_tiles = triton.cdiv(rows, BLOCK_O) * n_ti
    part = torch.empty(batch, n_tiles, dtype=torch.float32, device=a.device)
    ieee = torch.float32 in (a.dtype, g.dtype)
    widen = a.dtype != g.dtype or torch.bfloat16 in (a.dtype, g.dtype)
    _linear_sq_norms_ps[(n_tiles, batch)](g, a, part, steps, rows, cols, n_ti, n_tiles, *g.stride(), *a.stride(),
                                          BLOCK_T=BLOCK_T, BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I, IEEE=ieee,
                                          WIDEN=widen, enable_fp_fusion=False)
    count_launch("triton.dp_ghost_linear_sq_norms_ps")
    sum_partials(part, out)
    count_launch("triton.dp_ghost_linear_sq_norms_ps")


@triton.jit
def _lookup_tile(ids_b, q_b, ro, ri, T, I, sid_t, sq_t, sq_i,
                 BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr):
    # one sample's [BLOCK_O, BLOCK_I] tile of a lookup's table gradient: row o is
    # sum_{t: id_t = o} q_t, in t order, fp32.  A chunk of BLOCK_T steps with no id
    # in the tile's rows is skipped after one vector compare; a hit step is a
    # select into its own row only, so a NaN / inf of q_t stays in row id_t (a
    # one-hot dot would spread 0 * inf = NaN over the tile)
    o0 = tl.min(ro, axis=0)
    part = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        rt = t0 + tl.arange(0, BLOCK_T)
        ids = tl.load(ids_b + rt.to(tl.int64) * sid_t, mask=rt < T, other=-1).to(tl.int64)
        hit = (ids >= o0) & (ids < o0 + BLOCK_O)
        if tl.sum(hit.to(tl.int32), axis=0) > 0:
            for j in range(0, BLOCK_T):
                t = t0 + j
                if t < T:
                    i_t = tl.load(ids_b + t.to(tl.int64) * sid_t).to(tl.int64)
                    if (i_t >= o0) & (i_t < o0 + BLOCK_O):
                        q = tl.load(q_b + t.to(tl.int64) * sq_t + ri * sq_i, mask=ri < I, other=0.0)
                        part += tl.where(ro[:, None] == i_t, q[None, :].to(tl.float32), 0.0)
    return part


@triton.jit
def _use_tile(p_b, ids_b, q_b, ro, ri, T, O, I, sp_t, sp_o, sid_t, sq_t, sq_i,
              BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
              LOOKUP: tl.constexpr, IEEE: tl.constexpr, WIDEN: tl.constexpr):
    # one use's tile of G_b: a lookup's rows, or a Linear's P_b^T Q_b
    if LOOKUP:
        part = _lookup_tile(ids_b, q_b, ro, ri, T, I, sid_t, sq_t, sq_i, BLOCK_T, BLOCK_O, BLOCK_I)
    else:
        part = _sample_tile(p_b, q_b, ro, ri, T, T, O, I, sp_t, sp_o, sq_t, sq_i, BLOCK_T, BLOCK_O, BLOCK_I, IEEE,
                            WIDEN)
    return part


@triton.jit
def _pair_sq_norms_ps(pu_ptr, idu_ptr, qu_ptr, pv_ptr, idv_ptr, qv_ptr, part_ptr, Tu, Tv, O, I, n_ti, n_tiles,
                      spu_b, spu_t, spu_o, sidu_b, sidu_t, squ_b, squ_t, squ_i,
                      spv_b, spv_t, spv_o, sidv_b, sidv_t, sqv_b, sqv_t, sqv_i,
                      BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                      LOOKUP_U: tl.constexpr, IEEE_U: tl.constexpr, WIDEN_U: tl.constexpr,
                      LOOKUP_V: tl.constexpr, IEEE_V: tl.constexpr, WIDEN_V: tl.constexpr):
    # one program per (sample b, [BLOCK_O, BLOCK_I] tile of G_b = G_b^u + G_b^v, two
    # uses of one matrix): the tile of each use built in registers, summed, then
    # ||tile||^2 into part[b, tile] (as _linear_sq_norms_ps: G_b is never written)
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ro = (tile // n_ti).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    ri = (tile % n_ti).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = _use_tile(pu_ptr + b * spu_b, idu_ptr + b * sidu_b, qu_ptr + b * squ_b, ro, ri, Tu, O, I,
                    spu_t, spu_o, sidu_t, squ_t, squ_i, BLOCK_T, BLOCK_O, BLOCK_I, LOOKUP_U, IEEE_U, WIDEN_U)
    acc += _use_tile(pv_ptr + b * spv_b, idv_ptr + b * sidv_b, qv_ptr + b * sqv_b, ro, ri, Tv, O, I,
                     spv_t, spv_o, sidv_t, sqv_t, sqv_i, BLOCK_T, BLOCK_O, BLOCK_I, LOOKUP_V, IEEE_V, WIDEN_V)
    inside = (ro[:, None] < O) & (ri[None, :] < I)  # the padding zeroed before squaring (see above)
    acc = tl.where(inside, acc, 0.0)
    tl.store(part_ptr + b * n_tiles + tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


def _use_args(p, ids, q, like_ids):
    """A use's pointers / strides / constexprs for _pair_sq_norms_ps (the absent
    operand: a stand-in never read)."""
    lookup = p is None
    p = q if lookup else p
    ids = like_ids if ids is None else ids
    ieee = torch.float32 in (p.dtype, q.dtype)
    widen = p.dtype != q.dtype or torch.bfloat16 in (p.dtype, q.dtype)
    return (p, ids, q), (*p.stride(), *ids.stride(), *q.stride()), (lookup, ieee, widen)


def pair_sq_norms_ps(qu: torch.Tensor, qv: torch.Tensor, pu: torch.Tensor | None, pv: torch.Tensor | None,
                     ids_u: torch.Tensor | None, ids_v: torch.Tensor | None, rows: int, out: torch.Tensor) -> None:
    """``out[b] = ||G_b^u + G_b^v||_F^2`` (fp32) of two uses of one ``[rows, I]``
    matrix, each a Linear (``p [B, T, rows]``, ``q [B, T, I]``) or a lookup
    (``ids [B, T]``, ``q``), strided, fp32 / fp16 / bf16: each sample's
    gradient built tile by tile and never stored; two launches (the partials,
    then their sum in tile order)."""
    batch, t_u, cols = qu.shape
    if batch == 0:
        return
    if rows == 0 or cols == 0:
        out.zero_()  # an empty gradient
        return
    stand_in = out.new_zeros(batch, 1, dtype=torch.int32)
    ptr_u, str_u, ce_u = _use_args(pu, ids_u, qu, stand_in)
    ptr_v, str_v, ce_v = _use_args(pv, ids_v, qv, stand_in)
    n_ti = triton.cdiv(cols, BLOCK_I)
    n_tiles = triton.cdiv(rows, BLOCK_O) * n_ti
    part = torch.empty(batch, n_tiles, dtype=torch.float32, device=qu.device)
    _pair_sq_norms_ps[(n_tiles, batch)](*ptr_u, *ptr_v, part, t_u, qv.shape[1], rows, cols, n_ti, n_tiles,
                                        *str_u, *str_v, BLOCK_T=BLOCK_T, BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I,
                                        LOOKUP_U=ce_u[0], IEEE_U=ce_u[1], WIDEN_U=ce_u[2],
                                        LOOKUP_V=ce_v[0], IEEE_V=ce_v[1], WIDEN_V=ce_v[2], enable_fp_fusion=False)
    count_launch("triton.dp_ghost_pair_sq_norms_ps")
    sum_partials(part, out)
    count_launch("triton.dp_ghost_pair_sq_norms_ps")


# uses_sq_norms_ps's device table: one int64 row per use, Linear uses first
USE_FIELDS = 9  # data (p or ids), q, T, then the strides: data b, t, o (0 for ids), q b, t, i


@triton.jit
def _uses_sq_norms_ps(table, n_lin, n_uses, part_ptr, O, I, n_ti, n_tiles, like_p, like_q, like_ids, like_lq,
                      BLOCK_T: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr,
                      IEEE: tl.constexpr, WIDEN: tl.constexpr, FIELDS: tl.constexpr):
    # _pair_sq_norms_ps for any number of uses: one program per (sample b, tile of
    # G_b = sum_u G_b^u), the uses read from the table in order (its Linear uses
    # first, one dtype pair for all of them; then the lookups, one ids and one q
    # dtype), each use's tile built in registers and added; then ||tile||^2
    tile = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    ro = (tile // n_ti).to(tl.int64) * BLOCK_O + tl.arange(0, BLOCK_O)
    ri = (tile % n_ti).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    for u in range(0, n_uses):
        row = table + u * FIELDS
        steps = tl.load(row + 2)
        sq_b, sq_t, sq_i = tl.load(row + 6), tl.load(row + 7), tl.load(row + 8)
        # (each branch has its own names: a variable set in both must have one type in Triton)
        if u < n_lin:
            lin_p = tl.load(row).to(like_p.dtype) + b * tl.load(row + 3)
            lin_q = tl.load(row + 1).to(like_q.dtype) + b * sq_b
            acc += _sample_tile(lin_p, lin_q, ro, ri, steps, steps, O, I, tl.load(row + 4), tl.load(row + 5), sq_t,
                                sq_i, BLOCK_T, BLOCK_O, BLOCK_I, IEEE, WIDEN)
        else:
            look_ids = tl.load(row).to(like_ids.dtype) + b * tl.load(row + 3)
            look_q = tl.load(row + 1).to(like_lq.dtype) + b * sq_b
            acc += _lookup_tile(look_ids, look_q, ro, ri, steps, I, tl.load(row + 4), sq_t, sq_i, BLOCK_T, BLOCK_O,
                                BLOCK_I)
    inside = (ro[:, None] < O) & (ri[None, :] < I)  # the padding zeroed before squaring (see above)
    acc = tl.where(inside, acc, 0.0)
    tl.store(part_ptr + b * n_tiles + tile, tl.sum(tl.sum(acc * acc, axis=1), axis=0))


def _use_row(data: torch.Tensor, q: torch.Tensor, lookup: bool) -> list[int]:
    sd = data.stride()
    return [data.data_ptr(), q.data_ptr(), q.shape[1], sd[0], sd[1], 0 if lookup else sd[2], *q.stride()]


def uses_sq_norms_ps(qs: list[torch.Tensor], ps: list, ids: list, rows: int, out: torch.Tensor) -> None:
    """``out[b] = ||sum_u G_b^u||_F^2`` (fp32) of any number of uses of one
    ``[rows, I]`` matrix, each a Linear (``ps[u] [B, T_u, rows]``, ``qs[u] [B,
    T_u, I]``) or a lookup (``ids[u] [B, T_u]``, ``qs[u]``), strided; the
    Linear uses share one (p, q) dtype pair, the lookups one ids and one q
    dtype (the op checks).  Each sample's gradient is built tile by tile and
    never stored; a table of the uses (built here from the live tensors, used
    at once: one pinned non-blocking copy) and two launches (the partials, then
    their sum in tile order), deterministic."""
    batch, cols = qs[0].shape[0], qs[0].shape[2]
    if batch == 0:
        return
    if rows == 0 or cols == 0:
        out.zero_()  # an empty gradient
        return
    lin = [u for u in range(len(qs)) if ps[u] is not None]
    look = [u for u in range(len(qs)) if ps[u] is None]
    table_rows = [_use_row(ps[u], qs[u], False) for u in lin] + [_use_row(ids[u], qs[u], True) for u in look]
    table = torch.empty(len(table_rows) * USE_FIELDS, dtype=torch.int64, device=out.device)
    host.to_device(torch.tensor(table_rows, dtype=torch.int64).reshape(-1), table)
    f32 = host.witness(torch.float32, out.device)
    like_p, like_q = (host.witness(ps[lin[0]].dtype, out.device), host.witness(qs[lin[0]].dtype, out.device)) \
        if lin else (f32, f32)
    like_ids, like_lq = (host.witness(ids[look[0]].dtype, out.device), host.witness(qs[look[0]].dtype, out.device)) \
        if look else (host.witness(torch.int64, out.device), f32)
    ieee = torch.float32 in (like_p.dtype, like_q.dtype)
    widen = like_p.dtype != like_q.dtype or torch.bfloat16 in (like_p.dtype, like_q.dtype)
    n_ti = triton.cdiv(cols, BLOCK_I)
    n_tiles = triton.cdiv(rows, BLOCK_O) * n_ti
    part = torch.empty(batch, n_tiles, dtype=torch.float32, device=out.device)
    _uses_sq_norms_ps[(n_tiles, batch)](table, len(lin), len(qs), part, rows, cols, n_ti, n_tiles, like_p, like_q,
                                        like_ids, like_lq, BLOCK_T=BLOCK_T, BLOCK_O=BLOCK_O, BLOCK_I=BLOCK_I,
                                        IEEE=ieee, WIDEN=widen, FIELDS=USE_FIELDS, enable_fp_fusion=False)
    count_launch("triton.dp_ghost_uses_sq_norms_ps")
    sum_partials(part, out)
    count_launch("triton.dp_ghost_uses_sq_norms_ps")


# ---------------------------------------------------------------- cross terms of a tied parameter

# where a cross term's P^u P^v^T tile comes from (a constexpr): two dense P (Linear x Linear), P^u
# gathered at v's ids (Linear x lookup: p_u[t, id_s], no [T_u, T_v] buffer), the id-equality mask
# (lookup x lookup), or a precomputed P^u P^v^T (ghost mode's tied head: ref.gather_pp, kept in place of P^u)
CROSS_DENSE, CROSS_GATHER, CROSS_IDS, CROSS_PP = 0, 1, 2, 3


@triton.jit
def _pp_tile(pu_b, pv_b, idu_b, idv_b, t0, s0, Tu, Tv, O, spu_t, spu_k, spv_t, spv_k, sid_u, sid_v,
             BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr, PREC: tl.constexpr):
    # (P^u P^v^T)_{ts} for one [BLOCK_T, BLOCK_T] tile, fp32, 0 outside [0, Tu) x [0, Tv)
    rt = t0 + tl.arange(0, BLOCK_T)
    rs = s0 + tl.arange(0, BLOCK_T)
    inside = (rt[:, None] < Tu) & (rs[None, :] < Tv)
    if MODE == 0:
        pp = _cross_tile(pu_b, pv_b, t0, s0, Tu, Tv, O, spu_t, spu_k, spv_t, spv_k, BLOCK_T, BLOCK_K, PREC)
    elif MODE == 1:
        # the lookup's one-hot row s picks column id_s of P^u; an id outside [0, O) (the
        # forward's embedding would have raised) reads nothing
        js = tl.load(idv_b + rs.to(tl.int64) * sid_v, mask=rs < Tv, other=0).to(tl.int64)
        ok = inside & ((js >= 0) & (js < O))[None, :]
        pp = tl.load(pu_b + rt[:, None].to(tl.int64) * spu_t + js[None, :] * spu_k, mask=ok,
                     other=0.0).to(tl.float32)
    elif MODE == 2:
        it = tl.load(idu_b + rt.to(tl.int64) * sid_u, mask=rt < Tu, other=0)
        js = tl.load(idv_b + rs.to(tl.int64) * sid_v, mask=rs < Tv, other=0)
        pp = ((it[:, None] == js[None, :]) & inside).to(tl.float32)
    else:  # pu_b: the precomputed [Tu, Tv] P^u P^v^T, strides (spu_t, spu_k)
        pp = tl.load(pu_b + rt[:, None].to(tl.int64) * spu_t + rs[None, :].to(tl.int64) * spu_k, mask=inside,
                     other=0.0).to(tl.float32)
    return pp


@triton.jit
def _cross_gram(qu_ptr, qv_ptr, pu_ptr, pv_ptr, idu_ptr, idv_ptr, part_ptr, Tu, Tv, I, O, n_tu,
                squ_b, squ_t, squ_k, sqv_b, sqv_t, sqv_k, spu_b, spu_t, spu_k, spv_b, spv_t, spv_k,
                sidu_b, sidu_t, sidv_b, sidv_t,
                BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, MODE: tl.constexpr,
                PREC_Q: tl.constexpr, PREC_P: tl.constexpr):
    # one program per (BLOCK_T steps t of use u, sample b): sum over the s tiles of
    # (P^u P^v^T) * (Q^u Q^v^T), in a fixed order, into part[b, t-tile]
    i = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    t0 = i * BLOCK_T
    qu_b, qv_b = qu_ptr + b * squ_b, qv_ptr + b * sqv_b
    pu_b, pv_b = pu_ptr + b * spu_b, pv_ptr + b * spv_b
    idu_b, idv_b = idu_ptr + b * sidu_b, idv_ptr + b * sidv_b
    total = tl.zeros((BLOCK_T, BLOCK_T), dtype=tl.float32)
    for s0 in range(0, Tv, BLOCK_T):
        qq = _cross_tile(qu_b, qv_b, t0, s0, Tu, Tv, I, squ_t, squ_k, sqv_t, sqv_k, BLOCK_T, BLOCK_K, PREC_Q)
        pp = _pp_tile(pu_b, pv_b, idu_b, idv_b, t0, s0, Tu, Tv, O, spu_t, spu_k, spv_t, spv_k, sidu_t, sidv_t,
                      BLOCK_T, BLOCK_K, MODE, PREC_P)
        total += pp * qq  # both 0 outside [0, Tu) x [0, Tv): no padded inf * 0
    tl.store(part_ptr + b * n_tu + i, tl.sum(tl.sum(total, axis=1), axis=0))


def cross_gram(qu: torch.Tensor, qv: torch.Tensor, pu: torch.Tensor | None, pv: torch.Tensor | None,
               ids_u: torch.Tensor | None, ids_v: torch.Tensor | None, pp: torch.Tensor | None,
               scale: float, out: torch.Tensor, accumulate: bool) -> None:
    """``out[b] (+)= scale * sum_{t,s} (P^u P^v^T)_{ts} (Q^u Q^v^T)_{ts}`` for
    strided ``qu [B, Tu, I]``, ``qv [B, Tv, I]`` and one of: ``pp [B, Tu, Tv]``;
    ``pu [B, Tu, O]`` with ``pv [B, Tv, O]`` or with ``ids_v [B, Tv]``;
    ``ids_u`` with ``ids_v`` (fp32 / fp16 / bf16, mixed allowed; a contiguous
    fp32 ``out [B]``).  Two launches: the per-(sample, ``BLOCK_T`` steps of u)
    partials, then their sum in order, scaled (and added)."""
    batch, t_u, cols = qu.shape
    t_v = qv.shape[1]
    if batch == 0:
        return
    if t_u == 0 or t_v == 0:  # an empty sum
        if not accumulate:
            out.zero_()
        return
    if pp is not None:
        mode, p1, p2, rows = CROSS_PP, pp, pp, 0
    elif pv is not None:
        mode, p1, p2, rows = CROSS_DENSE, pu, pv, pu.shape[2]
    elif pu is not None:
        mode, p1, p2, rows = CROSS_GATHER, pu, pu, pu.shape[2]
    else:
        mode, p1, p2, rows = CROSS_IDS, qu, qu, 0
    id1 = ids_u if ids_u is not None else (ids_v if ids_v is not None else out.new_zeros(1, 1, dtype=torch.int32))
    id2 = ids_v if ids_v is not None else id1
    prec_p = pair_precision(p1.dtype, p2.dtype) if mode == CROSS_DENSE else PREC_IEEE
    n_tu = triton.cdiv(t_u, BLOCK_T)
    part = torch.empty(batch, n_tu, dtype=torch.float32, device=qu.device)
    _cross_gram[(n_tu, batch)](qu, qv, p1, p2, id1, id2, part, t_u, t_v, cols, rows, n_tu,
                               *qu.stride(), *qv.stride(), *p1.stride(), *p2.stride(), *id1.stride(), *id2.stride(),
                               BLOCK_T=BLOCK_T, BLOCK_K=BLOCK_K, MODE=mode,
                               PREC_Q=pair_precision(qu.dtype, qv.dtype), PREC_P=prec_p, enable_fp_fusion=False)
    count_launch("triton.dp_ghost_cross_gram")
    sum_partials(part, out, scale, accumulate)
    count_launch("triton.dp_ghost_cross_gram")
