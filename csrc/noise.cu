// Noise injection kernels: the noise is drawn inside the kernel (Philox,
// rng.cuh), so each op reads its input once and writes its output once.  They
// mirror fastadv/kernels/triton/noise.py (same counters, so the same 32-bit
// random words for the same key); the ctypes launchers are in
// fastadv/kernels/cuda/noise.py and the C ABI is at the end.
//
// Random kernels run one block per chunk of rng::kChunk elements; thread j
// handles counters j, j + kThreads, ... of the chunk and, for each, the four
// elements q * kQuarter + j (q = 0..3): coalesced, and the layout of rng.py.
#include "common.cuh"
#include "multi_tensor.cuh"
#include "rng.cuh"

namespace fastadv {
namespace {

using rng::kChunk;
using rng::kQuarter;
using rng::chunk_grid;
using rng::div_index;
using rng::kMaxChunks;
using rng::null_arg;
using rng::too_big;

// ---- element-wise noise -----------------------------------------------------------

// out = x + r * s in fp32, rounded once; r ~ N(0,1) or U[-1,1); s = scale or row_scale[e / row_len].
// x and out may be the same buffer (in place).
template <typename Tr, bool UNIFORM, bool ROW_SCALE>
__global__ void __launch_bounds__(kThreads)
add_noise_kernel(const typename Tr::bits* x, typename Tr::bits* out, int64_t numel,
                 const int64_t* __restrict__ key, float scale, const float* __restrict__ row_scale,
                 int64_t row_len) {
  const int64_t start = int64_t(blockIdx.x) * kChunk;
  rng::chunk_draws<UNIFORM>(rng::load_key(key), blockIdx.x, [&](int64_t off, float r) {
    const int64_t e = start + off;
    if (UNIFORM) r = 2.0f * r - 1.0f;
    if (e < numel) {
      const float s = ROW_SCALE ? row_scale[div_index(e, row_len)] : scale;
      out[e] = Tr::from_float(__fadd_rn(Tr::to_float(x[e]), __fmul_rn(r, s)));
    }
  });
}

// The seed's token-id noise: clamp(long(float(id) + f * z), 0, vmax).
__global__ void __launch_bounds__(kThreads)
token_ids_kernel(const int64_t* __restrict__ ids, int64_t* __restrict__ out, int64_t numel,
                 const int64_t* __restrict__ key, float factor, int64_t vmax) {
  const int64_t start = int64_t(blockIdx.x) * kChunk;
  rng::chunk_draws(rng::load_key(key), blockIdx.x, [&](int64_t off, float z) {
    const int64_t e = start + off;
    if (e < numel) {
      // float(id) + f * z in fp32, then truncation toward zero (C's cast, like .long())
      int64_t v = static_cast<int64_t>(__fadd_rn(static_cast<float>(ids[e]), __fmul_rn(z, factor)));
      v = v < 0 ? 0 : (v > vmax ? vmax : v);
      out[e] = v;
    }
  });
}

// ---- multi-tensor weight noise ----------------------------------------------------------
// The work list is the shared multi-tensor table (multi_tensor.cuh, fastadv/kernels/host.py)
// with two lists, 0 = w (the weights), 1 = b (their backups), cut into chunks of kChunk
// elements.  One block per chunk; chunks are numbered across the tensors and chunk c draws
// Philox counters base + c * kQuarter + j, so no two tensors share counters.

template <typename Tr>
__global__ void __launch_bounds__(kThreads)
weight_noise_kernel(mt::Table tb, const int64_t* __restrict__ key, float std_) {
  using B = typename Tr::bits;
  const int64_t chunk = blockIdx.x;
  const mt::Chunk c = mt::chunk_of(tb, chunk);
  B* w = tb.ptr<B>(0, c.tensor);
  B* backup = tb.ptr<B>(1, c.tensor);
  rng::chunk_draws(rng::load_key(key), chunk, [&](int64_t off, float z) {
    const int64_t e = c.start + off;
    if (e < c.end) {
      const B v = w[e];
      backup[e] = v;
      w[e] = Tr::from_float(__fadd_rn(Tr::to_float(v), __fmul_rn(z, std_)));
    }
  });
}

// Weight noise on shards (FSDP2), the twin of triton/noise.py's _shard_weight_noise_kernel: the
// table lists the shards with their spans (fastadv/kernels/host.py shard_counters: each shard
// widened at the front to the global chunk boundary by `lead` elements) and
// place[2t], place[2t + 1] = (the unsharded launch's chunk of tensor t's first span chunk, lead).
// Each element draws the counter the unsharded launch gives it; span positions below lead
// belong to the previous shard and are skipped.
template <typename Tr>
__global__ void __launch_bounds__(kThreads)
shard_weight_noise_kernel(mt::Table tb, const int64_t* __restrict__ place, const int64_t* __restrict__ key,
                          float std_) {
  using B = typename Tr::bits;
  const mt::Chunk c = mt::chunk_of(tb, blockIdx.x);  // span coordinates
  B* w = tb.ptr<B>(0, c.tensor);
  B* backup = tb.ptr<B>(1, c.tensor);
  const int64_t chunk = place[2 * c.tensor] + c.start / kChunk;
  const int64_t lead = place[2 * c.tensor + 1];
  rng::chunk_draws(rng::load_key(key), chunk, [&](int64_t off, float z) {
    const int64_t s = c.start + off;
    if (s >= lead && s < c.end) {
      const int64_t e = s - lead;  // the shard's own element
      const B v = w[e];
      backup[e] = v;
      w[e] = Tr::from_float(__fadd_rn(Tr::to_float(v), __fmul_rn(z, std_)));
    }
  });
}

}  // namespace
}  // namespace fastadv

// ---- C ABI (declared in fastadv.h) ---------------------------------------------------------

using namespace fastadv;

// The Philox counters per chunk (rng.py QUARTER must equal it).
extern "C" FASTADV_API int64_t fastadv_rng_quarter(void) { return kQuarter; }

// Host evaluation of what chunk `chunk` of a launch with key {seed, base} (host
// memory) draws, in element order: 4 * kQuarter words, normals and uniforms
// (each output may be NULL).  For tests: the same code the kernels run.
extern "C" FASTADV_API int fastadv_rng_host_chunk(const int64_t* key, int64_t chunk, uint32_t* words,
                                                  float* normals, float* uniforms) {
  if (key == nullptr) return null_arg("fastadv_rng_host_chunk", "key");
  const uint64_t seed = static_cast<uint64_t>(key[0]);
  for (int64_t j = 0; j < kQuarter; ++j) {
    const rng::Words w = rng::philox4x32_10(uint64_t(key[1] + chunk * kQuarter + j), seed);
    float z[4], u[4];
    rng::normal4(w, z);
    rng::uniform4(w, u);
    for (int q = 0; q < 4; ++q) {
      const int64_t e = q * kQuarter + j;
      if (words) words[e] = w.w[q];
      if (normals) normals[e] = z[q];
      if (uniforms) uniforms[e] = u[q];
    }
  }
  return 0;
}

// out = x + r * s (out may be x): r ~ N(0, 1) (uniform == 0) or U[-1, 1) (uniform != 0),
// s = scale, or row_scale[e / row_len] when row_scale != NULL.  Contiguous, numel elements.
extern "C" FASTADV_API int fastadv_noise_add(const void* x, void* out, int dtype, int64_t numel,
                                             const int64_t* key, float scale, const float* row_scale,
                                             int64_t row_len, int uniform, void* stream) {
  static const char* fn = "fastadv_noise_add";
  if (numel < 0) return bad_sizes(fn, 1, numel);
  if (numel == 0) return 0;
  if (key == nullptr) return null_arg(fn, "key");
  if (row_scale != nullptr && row_len <= 0) return fail(int(cudaErrorInvalidValue), "%s: row_len must be > 0", fn);
  if (ceil_div(numel, kChunk) > kMaxChunks) return too_big(fn, numel);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    using Tr = decltype(tr);
    using B = typename Tr::bits;
    const B* xi = static_cast<const B*>(x);
    B* o = static_cast<B*>(out);
    const unsigned grid = chunk_grid(numel);
    if (uniform && row_scale)
      add_noise_kernel<Tr, true, true><<<grid, kThreads, 0, s>>>(xi, o, numel, key, scale, row_scale, row_len);
    else if (uniform)
      add_noise_kernel<Tr, true, false><<<grid, kThreads, 0, s>>>(xi, o, numel, key, scale, row_scale, 1);
    else if (row_scale)
      add_noise_kernel<Tr, false, true><<<grid, kThreads, 0, s>>>(xi, o, numel, key, scale, row_scale, row_len);
    else
      add_noise_kernel<Tr, false, false><<<grid, kThreads, 0, s>>>(xi, o, numel, key, scale, row_scale, 1);
    return check_launch(fn);
  });
}

// out = clamp(long(float(ids) + factor * z), 0, vocab_size - 1), int64.
extern "C" FASTADV_API int fastadv_noise_token_ids(const int64_t* ids, int64_t* out, int64_t numel,
                                                   const int64_t* key, float factor, int64_t vocab_size,
                                                   void* stream) {
  static const char* fn = "fastadv_noise_token_ids";
  if (numel < 0) return bad_sizes(fn, 1, numel);
  if (vocab_size < 1) return fail(int(cudaErrorInvalidValue), "%s: vocab_size must be >= 1", fn);
  if (numel == 0) return 0;
  if (key == nullptr) return null_arg(fn, "key");
  if (ceil_div(numel, kChunk) > kMaxChunks) return too_big(fn, numel);
  token_ids_kernel<<<chunk_grid(numel), kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      ids, out, numel, key, factor, vocab_size - 1);
  return check_launch(fn);
}

// Every tensor of the two-list table `table` (w, backup; n_tensors tensors of `dtype`,
// n_chunks chunks of rng::kChunk elements): backup <- w, w <- w + std * z, in one launch.
// The restore is fastadv_mt_copy (list 0 <- list 1) on a table of the live tensors.
extern "C" FASTADV_API int fastadv_mt_weight_noise(const int64_t* table, int64_t n_tensors, int64_t n_chunks,
                                                   int dtype, const int64_t* key, float std_, void* stream) {
  static const char* fn = "fastadv_mt_weight_noise";
  if (int e = mt::check_table(fn, table, 2, n_tensors, n_chunks, kChunk)) return e;
  if (n_chunks == 0) return 0;
  if (key == nullptr) return null_arg(fn, "key");
  if (n_chunks > kMaxChunks) return too_big(fn, n_chunks * kChunk);
  const mt::Table tb{table, n_tensors, 2, kChunk};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    using Tr = decltype(tr);
    weight_noise_kernel<Tr><<<unsigned(n_chunks), kThreads, 0, s>>>(tb, key, std_);
    return check_launch(fn);
  });
}

// fastadv_mt_weight_noise on shards: `table` lists the shards and their backups with the spans
// of host.shard_counters as sizes, `place` (device int64, 2 * n_tensors) their place in the
// unsharded launch; every element gets the number the unsharded launch with `key` gives it.
extern "C" FASTADV_API int fastadv_mt_shard_weight_noise(const int64_t* table, int64_t n_tensors,
                                                         int64_t n_chunks, const int64_t* place, int dtype,
                                                         const int64_t* key, float std_, void* stream) {
  static const char* fn = "fastadv_mt_shard_weight_noise";
  if (int e = mt::check_table(fn, table, 2, n_tensors, n_chunks, kChunk)) return e;
  if (n_chunks == 0) return 0;
  if (key == nullptr) return null_arg(fn, "key");
  if (place == nullptr) return null_arg(fn, "place");
  if (n_chunks > kMaxChunks) return too_big(fn, n_chunks * kChunk);
  const mt::Table tb{table, n_tensors, 2, kChunk};
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  return dispatch_dtype(fn, dtype, [&](auto tr) {
    using Tr = decltype(tr);
    shard_weight_noise_kernel<Tr><<<unsigned(n_chunks), kThreads, 0, s>>>(tb, place, key, std_);
    return check_launch(fn);
  });
}
