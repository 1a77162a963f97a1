// Native CPU kernels of dcnbench: deformable convolution (v1 / modulated v2) and deformable
// (position-sensitive) RoI pooling, forward and backward, float32 and float64.
//
// Deformable convolution works per sample in tiles of output pixels:
//   1. the sample's input is copied channels-last (H, W, C) into a reused buffer, so the four
//      bilinear corners of a sampling point are four contiguous channel vectors;
//   2. a tile of output pixels is sampled into a reused column buffer laid out
//      (pixel, weight group, tap, channel-in-group) -- one vector loop per (pixel, tap);
//   3. one GEMM per weight group writes the tile straight into the NCHW output rows.
// The backward pass recomputes each tile's columns, gets the weight gradient and the column
// gradient from two GEMMs, then (a) per pixel, four dot products per sampling point give the offset
// and mask gradients, and (b) per channel range, the column gradient is scattered into a
// channels-last input-gradient buffer. Every output element is written by one thread in a fixed
// order (no atomics), so gradients are bitwise reproducible at a fixed thread count.
//
// The per-sample math (bilinear corners, RoI geometry) is dcn::* from kernels/dcn_math.h,
// shared with the CUDA kernels.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>

#include <algorithm>
#include <array>
#include <cstdlib>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include "dcn_math.h"

using at::Tensor;

namespace {

// at::parallel_for with the caller's thread-local state (inference mode, grad mode) in every worker:
// the workers write into tensors the caller made, which inference mode would otherwise refuse.
template <typename F>
void parallel_for(int64_t begin, int64_t end, int64_t grain, const F& f) {
  const at::ThreadLocalState state;
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    const at::ThreadLocalStateGuard guard(state);
    f(b, e);
  });
}

// D = the (cols, rows) transpose of the (rows, cols) matrix S, in 16 x 16 blocks; row strides ls
// and ld (default: contiguous).
template <typename T>
void transpose_into(const T* S, T* D, int64_t rows, int64_t cols, int64_t ls = -1, int64_t ld = -1) {
  constexpr int64_t B = 16;
  if (ls < 0) ls = cols;
  if (ld < 0) ld = rows;
  parallel_for(0, (cols + B - 1) / B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t c0 = b0 * B; c0 < std::min(cols, b1 * B); c0 += B) {
      const int64_t c1 = std::min(cols, c0 + B);
      for (int64_t r0 = 0; r0 < rows; r0 += B) {
        const int64_t r1 = std::min(rows, r0 + B);
        for (int64_t c = c0; c < c1; ++c) {
          T* __restrict d = D + c * ld;
          for (int64_t r = r0; r < r1; ++r) d[r] = S[r * ls + c];
        }
      }
    }
  });
}

// The (cols, rows) transpose of a contiguous (rows, cols) matrix.
template <typename T>
Tensor transposed(const Tensor& src, int64_t rows, int64_t cols) {
  Tensor dst = at::empty({cols, rows}, src.options());
  transpose_into(src.data_ptr<T>(), dst.data_ptr<T>(), rows, cols);
  return dst;
}

// Sample n of the contiguous (N, C, H, W) x into buf, channels-last (H, W, C), and back.
template <typename T>
void to_channels_last(const Tensor& x, int64_t n, Tensor& buf) {
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3);
  transpose_into(x.data_ptr<T>() + n * C * HW, buf.data_ptr<T>(), C, HW);
}

template <typename T>
void from_channels_last(const Tensor& buf, Tensor& x, int64_t n) {
  const int64_t C = x.size(1), HW = x.size(2) * x.size(3);
  transpose_into(buf.data_ptr<T>(), x.data_ptr<T>() + n * C * HW, HW, C);
}

// ------------------------------------------------------------------------------------------------
// Deformable convolution

struct ConvShape {
  int64_t N, C, H, W, O, Ho, Wo, L, kh, kw, taps, groups, Cg, Og, G, Cpg, Kg, Ktot;
  int64_t sh, sw, ph, pw, dh, dw;
  bool has_mask;
};

// a * b + c, fused where the CPU has FMA (only in the channel loops: the sample geometry keeps the
// reference's separate roundings, the file is compiled with -ffp-contract=off).
template <typename T>
inline T madd(T a, T b, T c) {
#ifdef __FMA__
  return std::fma(a, b, c);
#else
  return a * b + c;
#endif
}

// Channels [c0, c0 + len) lie in one offset group and one weight group g.
struct Segment {
  int64_t c0, len, g;
};

ConvShape conv_shape(const Tensor& input, const Tensor& offset, const Tensor& weight, at::IntArrayRef stride,
                     at::IntArrayRef padding, at::IntArrayRef dilation, bool has_mask) {
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "stride, padding and dilation must have 2 elements");
  ConvShape s;
  s.N = input.size(0);
  s.C = input.size(1);
  s.H = input.size(2);
  s.W = input.size(3);
  s.O = weight.size(0);
  s.Cg = weight.size(1);
  s.kh = weight.size(2);
  s.kw = weight.size(3);
  s.taps = s.kh * s.kw;
  s.groups = s.C / s.Cg;
  s.Og = s.O / s.groups;
  s.Ho = offset.size(2);
  s.Wo = offset.size(3);
  s.L = s.Ho * s.Wo;
  s.G = offset.size(1) / (2 * s.taps);
  s.Cpg = s.C / s.G;
  s.Kg = s.taps * s.Cg;
  s.Ktot = s.groups * s.Kg;
  s.sh = stride[0];
  s.sw = stride[1];
  s.ph = padding[0];
  s.pw = padding[1];
  s.dh = dilation[0];
  s.dw = dilation[1];
  s.has_mask = has_mask;
  return s;
}

std::vector<std::vector<Segment>> make_segments(const ConvShape& s) {
  std::vector<std::vector<Segment>> segs(s.G);
  for (int64_t og = 0; og < s.G; ++og) {
    int64_t c = og * s.Cpg;
    const int64_t end = c + s.Cpg;
    while (c < end) {
      const int64_t g = c / s.Cg;
      const int64_t e = std::min(end, (g + 1) * s.Cg);
      segs[og].push_back({c, e - c, g});
      c = e;
    }
  }
  return segs;
}

// Position of (segment, tap) in a column row laid out (weight group, tap, channel in group).
inline int64_t col_pos(const ConvShape& s, const Segment& seg, int64_t k) {
  return (seg.g * s.taps + k) * s.Cg + (seg.c0 - seg.g * s.Cg);
}

template <typename T>
struct Sample {
  dcn::Corners<T> c;
  T mask;
  bool ok;
};

// Fewest output pixels per tile: 256, or $DCNBENCH_NATIVE_TILE_MIN (tests force many tiles with it).
inline int64_t min_tile_pixels() {
  if (const char* env = std::getenv("DCNBENCH_NATIVE_TILE_MIN")) {
    const long long v = std::atoll(env);
    if (v > 0) return v;
  }
  return 256;
}

// Column bytes per tile: 1 MB, so that a tile's columns stay in L2 between the sampling that writes
// them and the GEMM that reads them (fwd+bwd against 4 MB tiles, in-process A/B: small shape -11% at
// 2 threads and -4% at 1, mid -7% / -4%; res5 and tiny keep their tiles: 256-pixel minimum, one
// tile). A sample whose tiles run in order (see split_sample_tiles) and whose columns fit in 16 MB
// is one tile, one wide GEMM (512 channels, 23x30, 12.7 MB: 1.40-1.44x F.conv2d at 2 threads and
// 1.42x at 1, against 1.62x and 1.59x in 4 MB tiles; larger samples, e.g. 38x63, were 1-2% slower
// in 16 MB tiles).
constexpr int64_t kTileBytes = 1 << 20;
constexpr int64_t kWholeSampleBytes = 16 << 20;

// Output pixels per tile: at least 256 (each GEMM call re-reads the whole weight matrix, so small
// tiles cost weight traffic) and up to `budget` bytes of columns ($DCNBENCH_NATIVE_TILE_BYTES
// overrides it), balanced over the sample; when `split` threads share the sample, the tile count
// is a multiple of it (3 tiles on 2 threads left one idle a third of the time). Tiles of 64 pixels
// or more are rounded up to a multiple of 16: MKL's GEMM of the (O, K) weight by a (K, tile) column
// block runs 5-15% slower when the tile is not (512 channels, 1 thread: 151 GFLOP/s at 238 pixels,
// 174 at 240; 160 at 599, 185 at 624); only the last tile of a sample keeps the remainder.
int64_t tile_pixels(const ConvShape& s, size_t elem, int64_t split, int64_t budget) {
  int64_t target = budget;
  if (const char* env = std::getenv("DCNBENCH_NATIVE_TILE_BYTES")) {
    const long long v = std::atoll(env);
    if (v > 0) target = v;
  }
  const int64_t min_pixels = min_tile_pixels();
  int64_t t = target / std::max<int64_t>(1, s.Ktot * static_cast<int64_t>(elem));
  t = std::max<int64_t>(min_pixels, t);
  int64_t n_tiles = (s.L + t - 1) / t;
  if (split > 1) n_tiles = std::min(s.L, (n_tiles + split - 1) / split * split);
  const int64_t tile = (s.L + n_tiles - 1) / n_tiles;
  return tile < 64 ? tile : std::min(s.L, (tile + 15) / 16 * 16);
}

// Row of the channels-last input a corner reads: its pixel, or for a corner off the map
// (dcn::kOffMap) the zero row after the H*W pixels (see input_buffer).
inline int64_t corner_row(const ConvShape& s, int index) {
  return index == dcn::kOffMap ? s.H * s.W : index;
}

// Sample rows [r0, r1) of a tile starting at output pixel l0 into col (tile rows of Ktot), keeping
// each sampling point's corners in samples[(r * G + og) * taps + k].
template <typename T>
void sample_rows(const ConvShape& s, const std::vector<std::vector<Segment>>& segs, const T* __restrict X,
                 const T* __restrict off_n, const T* __restrict mask_n, int64_t l0, int64_t r0, int64_t r1,
                 T* __restrict col, Sample<T>* __restrict samples) {
  const int H = static_cast<int>(s.H), W = static_cast<int>(s.W);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t l = l0 + r;
    const int64_t ho = l / s.Wo, wo = l % s.Wo;
    T* row = col + r * s.Ktot;
    for (int64_t og = 0; og < s.G; ++og) {
      for (int64_t k = 0; k < s.taps; ++k) {
        const int64_t i = k / s.kw, j = k % s.kw;
        const int64_t ch = og * s.taps + k;
        const T dy = off_n[(2 * ch) * s.L + l];
        const T dx = off_n[(2 * ch + 1) * s.L + l];
        const T y = T(ho * s.sh - s.ph + i * s.dh) + dy;
        const T x = T(wo * s.sw - s.pw + j * s.dw) + dx;
        Sample<T>& sp = samples[(r * s.G + og) * s.taps + k];
        sp.mask = s.has_mask ? mask_n[ch * s.L + l] : T(1);
        sp.ok = dcn::conv_corners<T>(y, x, H, W, sp.c);
        for (const Segment& seg : segs[og]) {
          T* __restrict dst = row + col_pos(s, seg, k);
          if (!sp.ok || !sp.c.has_value) {  // value 0, times the mask (NaN * 0 is NaN, as torchvision's)
            std::fill(dst, dst + seg.len, sp.mask * T(0));
            continue;
          }
          const T m = sp.mask;
          const T w0 = m * sp.c.weight[0], w1 = m * sp.c.weight[1], w2 = m * sp.c.weight[2],
                  w3 = m * sp.c.weight[3];
          const T* __restrict p0 = X + corner_row(s, sp.c.index[0]) * s.C + seg.c0;
          const T* __restrict p1 = X + corner_row(s, sp.c.index[1]) * s.C + seg.c0;
          const T* __restrict p2 = X + corner_row(s, sp.c.index[2]) * s.C + seg.c0;
          const T* __restrict p3 = X + corner_row(s, sp.c.index[3]) * s.C + seg.c0;
#pragma omp simd
          for (int64_t c = 0; c < seg.len; ++c) dst[c] = madd(w0, p0[c], madd(w1, p1[c], madd(w2, p2[c], w3 * p3[c])));
        }
      }
    }
  }
}

// The weight (O, Cg, kh, kw) as the (O, tap * Cg) matrix the columns multiply: a view of a
// channels-last weight (DeformConv2d keeps its weight so), a copy of a standard one.
inline Tensor tap_major(const Tensor& weight, const ConvShape& s) {
  return weight.permute({0, 2, 3, 1}).contiguous().view({s.O, s.Kg});
}

// MKL's packed GEMM, where torch's MKL exports it (weak: absent, the GEMMs go through at::mm_out).
// LP64 CBLAS, enum values of mkl_cblas.h.
extern "C" {
size_t cblas_sgemm_pack_get_size(int identifier, int m, int n, int k) __attribute__((weak));
void cblas_sgemm_pack(int layout, int identifier, int trans, int m, int n, int k, float alpha, const float* src,
                      int ld, float* dest) __attribute__((weak));
void cblas_sgemm_compute(int layout, int transa, int transb, int m, int n, int k, const float* a, int lda,
                         const float* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}
constexpr int kCblasRowMajor = 101, kCblasNoTrans = 111, kCblasTrans = 112, kCblasPacked = 151, kCblasBMatrix = 162;

// Scratch buffers kept by each thread between calls, one per slot, each grown to its largest
// request (up to kScratchKeepBytes; larger ones are allocated per call). Allocated per call, a
// multi-megabyte buffer faults its pages in anew every time (a 512-channel 38x50 layer's forward
// took ~640 page faults per call). A thread holds at most one buffer per slot at a time; the split
// paths keep the sample's shared input in kShared (and the backward its per-chunk input- and
// weight-gradient partials in kSharedGrad and kWeightGradParts), so that their workers (the caller
// among them) can use kInput and the other per-worker slots.
enum ScratchSlot : int {
  kInput, kInputGrad, kCol, kColGrad, kSamples, kShared, kSharedGrad, kWeightGradParts, kPackedWeight, kGemmOut,
  kScratchSlots
};
constexpr int64_t kScratchKeepBytes = int64_t(64) << 20;

inline Tensor scratch_bytes(ScratchSlot slot, int64_t bytes) {
  thread_local std::array<Tensor, kScratchSlots> kept;
  if (bytes > kScratchKeepBytes) return at::empty({bytes}, at::kByte);
  Tensor& buf = kept[slot];
  if (!buf.defined() || buf.numel() < bytes) {
    buf = Tensor();  // free the smaller buffer first
    buf = at::empty({bytes}, at::kByte);
  }
  return buf.narrow(0, 0, bytes);
}

// An uninitialised (sizes) tensor of T in `slot`'s buffer.
template <typename T>
Tensor scratch(ScratchSlot slot, at::IntArrayRef sizes) {
  return scratch_bytes(slot, c10::multiply_integers(sizes) * int64_t(sizeof(T)))
      .view(c10::CppTypeToScalarType<T>::value)
      .view(sizes);
}

// A sample's channels-last input (to_channels_last fills the first H*W rows), with one more row
// of zeros: the pixel a corner off the map reads (corner_row), so that the channel loops stay
// branch-free and never read a real pixel at weight 0 (a NaN or inf there would spread).
template <typename T>
Tensor input_buffer(ScratchSlot slot, const ConvShape& s) {
  Tensor buf = scratch<T>(slot, {s.H * s.W + 1, s.C});
  buf[s.H * s.W].zero_();
  return buf;
}

// Per-thread working set: channels-last input (and input gradient) of one sample, column tiles,
// sampling points; `own_input` is false where the caller shares one input buffer between threads.
template <typename T>
struct ConvWork {
  Tensor xbuf, gxbuf, col, dcol;
  Tensor sample_buf;  // owns `samples` (a buffer over kScratchKeepBytes is not kept by its slot)
  Sample<T>* samples;
  ConvWork(const ConvShape& s, int64_t tile, bool backward, bool own_input) {
    if (own_input) xbuf = input_buffer<T>(kInput, s);
    if (own_input && backward) gxbuf = scratch<T>(kInputGrad, {s.H, s.W, s.C});
    col = scratch<T>(kCol, {tile, s.Ktot});
    if (backward) dcol = scratch<T>(kColGrad, {tile, s.Ktot});
    static_assert(std::is_trivially_copyable_v<Sample<T>>, "samples live in raw scratch memory");
    const int64_t n = tile * s.G * s.taps;
    sample_buf = scratch_bytes(kSamples, n * int64_t(sizeof(Sample<T>)));
    samples = reinterpret_cast<Sample<T>*>(sample_buf.data_ptr());
  }
};

// The forward GEMMs of one call: out rows (Og, tl) of weight group g = W_g (Og, Kg) x the tile's
// columns of group g, transposed. Where each thread runs several of them (tiles, samples), the
// weight is 1 MB or more per group, and torch's MKL exports the packed GEMM (float32), the caller
// packs W once, before the parallel region, and every thread's GEMMs read that one copy: unpacked,
// each GEMM packs the whole weight again (9.4 MB for a 512-channel 3x3 layer, whose 38x50 map runs
// as four 240-pixel tiles per thread at 2 threads). The packed GEMM computes columns x W^T, the
// (tl, Og) transpose of the output rows, into a scratch block that is then transposed into them:
// one thread's 4 x 240-pixel GEMMs ran at 220 GFLOP/s so, against 205 with W packed as the left
// operand and 185-195 unpacked (either way round); two threads at once, ~415 both packed ways.
// In-process A/B of the forward against unpacked GEMMs: 38x50 -6% at 2 threads and -11% at 1,
// 64x128 -5%, 256 channels 50x50 batch 2 -5% at 1 thread. A copy packed by each thread inside the
// region was 2-3% slower than none, and packing the 147 KB weight of 64 channels 8% slower (hence
// the 1 MB floor). W is packed anew in every call: nothing is cached across calls, so a changed
// weight can never meet a stale packed copy.
constexpr int64_t kPackMinBytes = 1 << 20;

template <typename T>
class WeightGemm {
 public:
  // `calls`: GEMMs per thread in this call. Construct it outside the parallel region.
  WeightGemm(const ConvShape& s, const Tensor& wp, int64_t tile, int64_t calls) : s_(s), wp_(wp) {
    if constexpr (std::is_same_v<T, float>) {
      if (calls < 2 || s.Og * s.Kg * int64_t(sizeof(float)) < kPackMinBytes) return;
      if (!cblas_sgemm_pack_get_size || !cblas_sgemm_pack || !cblas_sgemm_compute) return;
      if (std::max({s.Og, s.Kg, s.Ktot, s.L, tile}) > std::numeric_limits<int>::max()) return;
      group_bytes_ = int64_t(cblas_sgemm_pack_get_size(kCblasBMatrix, int(tile), int(s.Og), int(s.Kg)));
      packed_ = scratch_bytes(kPackedWeight, group_bytes_ * s.groups);
      for (int64_t g = 0; g < s.groups; ++g) {
        cblas_sgemm_pack(kCblasRowMajor, kCblasBMatrix, kCblasTrans, int(tile), int(s.Og), int(s.Kg), 1.0f,
                         wp.data_ptr<float>() + g * s.Og * s.Kg, int(s.Kg), packed_group(g));
      }
    }
  }

  // Output pixels [l0, l0 + tl) of out_n (O, L) from the columns ct (tl, Ktot).
  void operator()(Tensor& out_n, const Tensor& ct, int64_t l0, int64_t tl) const {
    for (int64_t g = 0; g < s_.groups; ++g) {
      Tensor dst = out_n.narrow(0, g * s_.Og, s_.Og).narrow(1, l0, tl);
      if constexpr (std::is_same_v<T, float>) {
        if (packed_.defined()) {
          Tensor tmp = scratch<float>(kGemmOut, {tl, s_.Og});
          cblas_sgemm_compute(kCblasRowMajor, kCblasNoTrans, kCblasPacked, int(tl), int(s_.Og), int(s_.Kg),
                              ct.data_ptr<float>() + g * s_.Kg, int(s_.Ktot), packed_group(g), int(s_.Kg), 0.0f,
                              tmp.data_ptr<float>(), int(s_.Og));
          transpose_into(tmp.data_ptr<float>(), dst.data_ptr<float>(), tl, s_.Og, s_.Og, s_.L);
          continue;
        }
      }
      at::mm_out(dst, wp_.narrow(0, g * s_.Og, s_.Og), ct.narrow(1, g * s_.Kg, s_.Kg).t());
    }
  }

 private:
  float* packed_group(int64_t g) const {
    return reinterpret_cast<float*>(static_cast<char*>(packed_.data_ptr()) + g * group_bytes_);
  }
  const ConvShape& s_;
  const Tensor& wp_;
  Tensor packed_;
  int64_t group_bytes_ = 0;
};

// Batch parallelism: with at least as many samples as threads, each thread takes a contiguous
// chunk of samples (single-threaded inner loops and GEMMs, one parallel region per call);
// otherwise samples run in order and each tile's loops are parallel.
inline int64_t sample_chunks(int64_t N) {
  const int64_t nt = std::max(1, at::get_num_threads());
  return (nt > 1 && N >= nt) ? nt : 1;
}

// Output pixels [l_begin, l_end) of sample n (tile-aligned), input X channels-last.
template <typename T>
void conv_forward_tiles(const ConvShape& s, const std::vector<std::vector<Segment>>& segs, int64_t tile,
                        const T* X, const T* off, const T* msk, const WeightGemm<T>& gemm, Tensor& out,
                        int64_t n, ConvWork<T>& wk, int64_t l_begin, int64_t l_end) {
  const T* off_n = off + n * 2 * s.G * s.taps * s.L;
  const T* mask_n = msk ? msk + n * s.G * s.taps * s.L : nullptr;
  Tensor out_n = out[n].view({s.O, s.L});
  T* colp = wk.col.template data_ptr<T>();
  Sample<T>* smp = wk.samples;
  for (int64_t l0 = l_begin; l0 < l_end; l0 += tile) {
    const int64_t tl = std::min(tile, l_end - l0);
    parallel_for(0, tl, 4, [&](int64_t r0, int64_t r1) {
      sample_rows<T>(s, segs, X, off_n, mask_n, l0, r0, r1, colp, smp);
    });
    gemm(out_n, wk.col.narrow(0, 0, tl), l0, tl);
  }
}

template <typename T>
void conv_forward_sample(const ConvShape& s, const std::vector<std::vector<Segment>>& segs, int64_t tile,
                         const Tensor& input, const T* off, const T* msk, const WeightGemm<T>& gemm, Tensor& out,
                         int64_t n, ConvWork<T>& wk) {
  to_channels_last<T>(input, n, wk.xbuf);
  conv_forward_tiles<T>(s, segs, tile, wk.xbuf.template data_ptr<T>(), off, msk, gemm, out, n, wk, 0, s.L);
}

// Forward with fewer samples than threads: split each sample's tiles over the threads, unless the
// sample is smaller than two minimum tiles per thread (e.g. 23x30). Then its tiles run in order,
// each with the sampling spread over the threads and one multithreaded GEMM: split, they would be
// small single-threaded GEMMs that each re-read the weights (512 channels, 23x30, dilation 2, 2
// threads: 1.44-1.62x F.conv2d in order against 1.69-1.83x split; res5 and mid sizes keep the split,
// which ties or wins there).
inline bool split_sample_tiles(const ConvShape& s) {
  const int64_t nt = std::max(1, at::get_num_threads());
  return nt > 1 && s.L >= 2 * min_tile_pixels() * nt;
}

// Tile chunks of one sample for the threads (used when the batch is smaller than the thread count).
inline int64_t tile_chunks(const ConvShape& s, int64_t tile) {
  const int64_t nt = std::max(1, at::get_num_threads());
  const int64_t n_tiles = (s.L + tile - 1) / tile;
  return std::max<int64_t>(1, std::min<int64_t>(nt, n_tiles));
}

template <typename T>
void conv_forward_impl(const ConvShape& s, const Tensor& input, const Tensor& offset, const Tensor& weight,
                       const Tensor& mask, Tensor& out) {
  const auto segs = make_segments(s);
  const int64_t chunks = sample_chunks(s.N);
  const bool split = chunks == 1 && split_sample_tiles(s);
  const bool in_order = chunks == 1 && !split;  // a sample's tiles in order, multithreaded inside
  const bool whole = in_order && s.L * s.Ktot * int64_t(sizeof(T)) <= kWholeSampleBytes;
  const int64_t tile = tile_pixels(s, sizeof(T), split ? at::get_num_threads() : 1,
                                   whole ? kWholeSampleBytes : kTileBytes);
  Tensor wp = tap_major(weight, s);
  const T* off = offset.data_ptr<T>();
  const T* msk = s.has_mask ? mask.data_ptr<T>() : nullptr;
  const int64_t n_tiles = (s.L + tile - 1) / tile;
  if (in_order) {
    ConvWork<T> wk(s, tile, false, true);
    const WeightGemm<T> gemm(s, wp, tile, s.N * n_tiles);
    for (int64_t n = 0; n < s.N; ++n) conv_forward_sample<T>(s, segs, tile, input, off, msk, gemm, out, n, wk);
    return;
  }
  if (chunks == 1) {
    // Few samples: threads split each sample's tiles (one parallel region per sample).
    const int64_t tc = tile_chunks(s, tile);
    const int64_t per_chunk = (n_tiles + tc - 1) / tc;
    Tensor xbuf = input_buffer<T>(kShared, s);
    const WeightGemm<T> gemm(s, wp, tile, s.N * per_chunk);
    for (int64_t n = 0; n < s.N; ++n) {
      to_channels_last<T>(input, n, xbuf);
      const T* X = xbuf.data_ptr<T>();
      parallel_for(0, tc, 1, [&](int64_t c0, int64_t c1) {
        ConvWork<T> wk(s, tile, false, false);
        for (int64_t ch = c0; ch < c1; ++ch) {
          const int64_t lb = std::min(s.L, ch * per_chunk * tile), le = std::min(s.L, (ch + 1) * per_chunk * tile);
          conv_forward_tiles<T>(s, segs, tile, X, off, msk, gemm, out, n, wk, lb, le);
        }
      });
    }
    return;
  }
  const int64_t per = (s.N + chunks - 1) / chunks;
  const WeightGemm<T> gemm(s, wp, tile, per * n_tiles);
  parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    ConvWork<T> wk(s, tile, false, true);
    for (int64_t ch = c0; ch < c1; ++ch) {
      for (int64_t n = ch * per; n < std::min(s.N, (ch + 1) * per); ++n)
        conv_forward_sample<T>(s, segs, tile, input, off, msk, gemm, out, n, wk);
    }
  });
}

// Pixels [l_begin, l_end) of sample n: accumulates into GX (channels-last) and grad_wp, writes the
// offset / mask gradients of those pixels.
template <typename T>
void conv_backward_tiles(const ConvShape& s, const std::vector<std::vector<Segment>>& segs, int64_t tile,
                         const Tensor& grad_out, const T* X, T* GX, const T* off, const T* msk, const Tensor& wp,
                         T* goff, T* gmsk, Tensor& grad_wp, int64_t n, ConvWork<T>& wk, int64_t l_begin,
                         int64_t l_end) {
  const int64_t C = s.C;
  const int nt = at::in_parallel_region() ? 1 : std::max(1, at::get_num_threads());
  const int64_t c_grain = std::max<int64_t>(16, (C + nt - 1) / nt);
  const T* off_n = off + n * 2 * s.G * s.taps * s.L;
  const T* mask_n = msk ? msk + n * s.G * s.taps * s.L : nullptr;
  T* goff_n = goff + n * 2 * s.G * s.taps * s.L;
  T* gmask_n = gmsk ? gmsk + n * s.G * s.taps * s.L : nullptr;
  Tensor go_n = grad_out[n].view({s.O, s.L});
  T* colp = wk.col.template data_ptr<T>();
  Sample<T>* smp = wk.samples;
  const T* D = wk.dcol.template data_ptr<T>();
  for (int64_t l0 = l_begin; l0 < l_end; l0 += tile) {
    const int64_t tl = std::min(tile, l_end - l0);
    parallel_for(0, tl, 4, [&](int64_t r0, int64_t r1) {
      sample_rows<T>(s, segs, X, off_n, mask_n, l0, r0, r1, colp, smp);
    });
    Tensor ct = wk.col.narrow(0, 0, tl);
    Tensor dt = wk.dcol.narrow(0, 0, tl);
    for (int64_t g = 0; g < s.groups; ++g) {
      Tensor go_t = go_n.narrow(0, g * s.Og, s.Og).narrow(1, l0, tl);  // (Og, tl)
      Tensor gw_g = grad_wp.narrow(0, g * s.Og, s.Og);
      gw_g.addmm_(go_t, ct.narrow(1, g * s.Kg, s.Kg));
      Tensor dst = dt.narrow(1, g * s.Kg, s.Kg);
      at::mm_out(dst, go_t.t(), wp.narrow(0, g * s.Og, s.Og));
    }
    // (a) offset and mask gradients: four dot products per sampling point.
    parallel_for(0, tl, 4, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t l = l0 + r;
        const T* drow = D + r * s.Ktot;
        for (int64_t og = 0; og < s.G; ++og) {
          for (int64_t k = 0; k < s.taps; ++k) {
            const Sample<T>& sp = smp[(r * s.G + og) * s.taps + k];
            const int64_t ch = og * s.taps + k;
            if (!sp.ok) {  // no corner read: 0 times the mask (NaN for a NaN or inf mask, as torchvision's)
              goff_n[(2 * ch) * s.L + l] = sp.mask * T(0);
              goff_n[(2 * ch + 1) * s.L + l] = sp.mask * T(0);
              if (gmask_n) gmask_n[ch * s.L + l] = T(0);
              continue;
            }
            T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
            for (const Segment& seg : segs[og]) {
              const T* __restrict d = drow + col_pos(s, seg, k);
              const T* __restrict p0 = X + corner_row(s, sp.c.index[0]) * C + seg.c0;
              const T* __restrict p1 = X + corner_row(s, sp.c.index[1]) * C + seg.c0;
              const T* __restrict p2 = X + corner_row(s, sp.c.index[2]) * C + seg.c0;
              const T* __restrict p3 = X + corner_row(s, sp.c.index[3]) * C + seg.c0;
              T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
              for (int64_t c = 0; c < seg.len; ++c) {
                a0 = madd(d[c], p0[c], a0);
                a1 = madd(d[c], p1[c], a1);
                a2 = madd(d[c], p2[c], a2);
                a3 = madd(d[c], p3[c], a3);
              }
              s0 += a0;
              s1 += a1;
              s2 += a2;
              s3 += a3;
            }
            const auto& cr = sp.c;
            const T gy = cr.dwdy[0] * s0 + cr.dwdy[1] * s1 + cr.dwdy[2] * s2 + cr.dwdy[3] * s3;
            const T gx = cr.dwdx[0] * s0 + cr.dwdx[1] * s1 + cr.dwdx[2] * s2 + cr.dwdx[3] * s3;
            goff_n[(2 * ch) * s.L + l] = sp.mask * gy;
            goff_n[(2 * ch + 1) * s.L + l] = sp.mask * gx;
            if (gmask_n)
              gmask_n[ch * s.L + l] =
                  cr.has_value ? cr.weight[0] * s0 + cr.weight[1] * s1 + cr.weight[2] * s2 + cr.weight[3] * s3 : T(0);
          }
        }
      }
    });
    // (b) input gradient: each thread owns a channel range and walks the tile in order.
    parallel_for(0, C, c_grain, [&](int64_t cb, int64_t ce) {
      for (int64_t r = 0; r < tl; ++r) {
        const T* drow = D + r * s.Ktot;
        for (int64_t og = 0; og < s.G; ++og) {
          for (const Segment& seg : segs[og]) {
            const int64_t lo = std::max(seg.c0, cb), hi = std::min(seg.c0 + seg.len, ce);
            if (lo >= hi) continue;
            const int64_t len = hi - lo;
            for (int64_t k = 0; k < s.taps; ++k) {
              const Sample<T>& sp = smp[(r * s.G + og) * s.taps + k];
              if (!sp.ok) continue;
              const T* __restrict d = drow + col_pos(s, seg, k) + (lo - seg.c0);
              for (int q = 0; q < 4; ++q) {
                const T wq = sp.mask * sp.c.weight[q];
                if (sp.c.index[q] == dcn::kOffMap || wq == T(0)) continue;
                T* __restrict gq = GX + sp.c.index[q] * C + lo;
#pragma omp simd
                for (int64_t c = 0; c < len; ++c) gq[c] = madd(wq, d[c], gq[c]);
              }
            }
          }
        }
      }
    });
  }
}

template <typename T>
void conv_backward_sample(const ConvShape& s, const std::vector<std::vector<Segment>>& segs, int64_t tile,
                          const Tensor& grad_out, const Tensor& input, const T* off, const T* msk, const Tensor& wp,
                          Tensor& grad_input, T* goff, T* gmsk, Tensor& grad_wp, int64_t n, ConvWork<T>& wk) {
  to_channels_last<T>(input, n, wk.xbuf);
  wk.gxbuf.zero_();
  conv_backward_tiles<T>(s, segs, tile, grad_out, wk.xbuf.template data_ptr<T>(), wk.gxbuf.template data_ptr<T>(),
                         off, msk, wp, goff, gmsk, grad_wp, n, wk, 0, s.L);
  from_channels_last<T>(wk.gxbuf, grad_input, n);
}

template <typename T>
void conv_backward_impl(const ConvShape& s, const Tensor& grad_out, const Tensor& input, const Tensor& offset,
                        const Tensor& weight, const Tensor& mask, Tensor& grad_input, Tensor& grad_offset,
                        Tensor& grad_wp, Tensor& grad_mask) {
  const auto segs = make_segments(s);
  const auto opts = input.options();
  const int64_t chunks = sample_chunks(s.N);
  const int64_t tile = tile_pixels(s, sizeof(T), chunks == 1 ? at::get_num_threads() : 1, kTileBytes);
  Tensor wp = tap_major(weight, s);
  const T* off = offset.data_ptr<T>();
  const T* msk = s.has_mask ? mask.data_ptr<T>() : nullptr;
  T* goff = grad_offset.data_ptr<T>();
  T* gmsk = s.has_mask ? grad_mask.data_ptr<T>() : nullptr;
  if (chunks == 1) {
    const int64_t tc = tile_chunks(s, tile);
    if (tc == 1) {
      ConvWork<T> wk(s, tile, true, true);
      for (int64_t n = 0; n < s.N; ++n)
        conv_backward_sample<T>(s, segs, tile, grad_out, input, off, msk, wp, grad_input, goff, gmsk, grad_wp, n, wk);
      return;
    }
    // Few samples: threads split each sample's tiles; each chunk has its own input-gradient and
    // weight-gradient partials, summed in chunk order (reproducible at a thread count).
    const int64_t n_tiles = (s.L + tile - 1) / tile, per_chunk = (n_tiles + tc - 1) / tc;
    Tensor xbuf = input_buffer<T>(kShared, s);
    Tensor gx_parts = scratch<T>(kSharedGrad, {tc, s.H, s.W, s.C});
    Tensor gw_parts = scratch<T>(kWeightGradParts, {tc, s.O, s.Kg}).zero_();
    for (int64_t n = 0; n < s.N; ++n) {
      to_channels_last<T>(input, n, xbuf);
      const T* X = xbuf.data_ptr<T>();
      parallel_for(0, tc, 1, [&](int64_t c0, int64_t c1) {
        ConvWork<T> wk(s, tile, true, false);
        for (int64_t ch = c0; ch < c1; ++ch) {
          const int64_t lb = std::min(s.L, ch * per_chunk * tile), le = std::min(s.L, (ch + 1) * per_chunk * tile);
          Tensor gx = gx_parts[ch];
          gx.zero_();
          Tensor gw = gw_parts[ch];
          conv_backward_tiles<T>(s, segs, tile, grad_out, X, gx.data_ptr<T>(), off, msk, wp, goff, gmsk, gw, n, wk,
                                 lb, le);
        }
      });
      Tensor gx_sum = gx_parts[0];  // zeroed again by its chunk's worker for the next sample
      for (int64_t ch = 1; ch < tc; ++ch) gx_sum.add_(gx_parts[ch]);
      from_channels_last<T>(gx_sum, grad_input, n);
    }
    for (int64_t ch = 0; ch < tc; ++ch) grad_wp.add_(gw_parts[ch]);
    return;
  }
  // One weight-gradient partial per chunk, summed in chunk order: reproducible at a thread count.
  const int64_t per = (s.N + chunks - 1) / chunks;
  std::vector<Tensor> parts(chunks);
  parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    ConvWork<T> wk(s, tile, true, true);
    for (int64_t ch = c0; ch < c1; ++ch) {
      parts[ch] = at::zeros({s.O, s.Kg}, opts);
      for (int64_t n = ch * per; n < std::min(s.N, (ch + 1) * per); ++n)
        conv_backward_sample<T>(s, segs, tile, grad_out, input, off, msk, wp, grad_input, goff, gmsk, parts[ch], n,
                                wk);
    }
  });
  for (int64_t ch = 0; ch < chunks; ++ch) grad_wp.add_(parts[ch]);
}

void check_conv_args(const Tensor& input, const Tensor& offset, const Tensor& weight,
                     const std::optional<Tensor>& bias, const std::optional<Tensor>& mask) {
  TORCH_CHECK(input.device().is_cpu(), "dcnbench native kernels run on CPU tensors");
  TORCH_CHECK(input.dim() == 4 && offset.dim() == 4 && weight.dim() == 4, "input, offset, weight must be 4-D");
  TORCH_CHECK(input.is_contiguous() && offset.is_contiguous(), "input and offset must be contiguous");
  TORCH_CHECK(weight.is_contiguous() || weight.is_contiguous(at::MemoryFormat::ChannelsLast),
              "weight must be contiguous (standard or channels-last)");
  TORCH_CHECK(offset.scalar_type() == input.scalar_type() && weight.scalar_type() == input.scalar_type(),
              "dtypes must match");
  if (bias) TORCH_CHECK(bias->scalar_type() == input.scalar_type(), "bias dtype must match input");
  if (mask) {
    TORCH_CHECK(mask->is_contiguous() && mask->scalar_type() == input.scalar_type(),
                "mask must be contiguous and match input's dtype");
  }
}

Tensor deform_conv2d_forward(const Tensor& input, const Tensor& offset, const Tensor& weight,
                             const std::optional<Tensor>& bias, std::vector<int64_t> stride,
                             std::vector<int64_t> padding, std::vector<int64_t> dilation,
                             const std::optional<Tensor>& mask) {
  check_conv_args(input, offset, weight, bias, mask);
  const ConvShape s = conv_shape(input, offset, weight, stride, padding, dilation, mask.has_value());
  Tensor out = at::empty({s.N, s.O, s.Ho, s.Wo}, input.options());
  if (out.numel() == 0) return out;
  Tensor m = mask ? *mask : Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnbench_deform_conv2d_forward", [&] {
    conv_forward_impl<scalar_t>(s, input, offset, weight, m, out);
  });
  if (bias) out.add_(bias->view({1, s.O, 1, 1}));
  return out;
}

std::tuple<Tensor, Tensor, Tensor, std::optional<Tensor>, std::optional<Tensor>> deform_conv2d_backward(
    const Tensor& grad_out_in, const Tensor& input, const Tensor& offset, const Tensor& weight,
    const std::optional<Tensor>& bias, std::vector<int64_t> stride, std::vector<int64_t> padding,
    std::vector<int64_t> dilation, const std::optional<Tensor>& mask) {
  check_conv_args(input, offset, weight, bias, mask);
  const Tensor grad_out = grad_out_in.contiguous();
  const ConvShape s = conv_shape(input, offset, weight, stride, padding, dilation, mask.has_value());
  // The kernels write every element of the input, offset and mask gradients (each sample's input
  // gradient is copied back whole from its channels-last buffer), unless there is nothing to do.
  const bool work = s.N > 0 && s.L > 0;
  const auto like = [work](const Tensor& t) { return work ? at::empty_like(t) : at::zeros_like(t); };
  Tensor grad_input = like(input);
  Tensor grad_offset = like(offset);
  Tensor grad_mask = mask ? like(*mask) : Tensor();
  Tensor grad_wp = at::zeros({s.O, s.Kg}, weight.options());
  if (work) {
    Tensor m = mask ? *mask : Tensor();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnbench_deform_conv2d_backward", [&] {
      conv_backward_impl<scalar_t>(s, grad_out, input, offset, weight, m, grad_input, grad_offset, grad_wp,
                                   grad_mask);
    });
  }
  Tensor grad_weight = grad_wp.view({s.O, s.kh, s.kw, s.Cg}).permute({0, 3, 1, 2}).contiguous();
  std::optional<Tensor> grad_bias;
  if (bias) grad_bias = grad_out.sum({0, 2, 3});
  std::optional<Tensor> gm;
  if (mask) gm = grad_mask;
  return {grad_input, grad_offset, grad_weight, grad_bias, gm};
}

// ------------------------------------------------------------------------------------------------
// Deformable (PS) RoI pooling

// One axis of dcn::roi_corners (the sample rule factorises: valid = valid_x && valid_y, and each
// corner weight is a product of a y factor and an x factor). Same operations as roi_corners.
template <typename T>
struct Axis {
  int lo, hi;
  T frac;
};

template <typename T>
inline bool roi_axis(T v, int size, Axis<T>& a) {
  if (!(v >= T(-0.5) && v <= T(size) - T(0.5))) return false;  // NaN too, as ps_axis
  v = dcn::min_(dcn::max_(v, T(0)), T(size - 1));
  const T f = dcn::floor_(v);
  a.lo = int(f);
  a.hi = int(dcn::ceil_(v));
  a.frac = v - f;
  return true;
}

struct RoiArgs {
  int64_t N, Cin, H, W, K, Cout, ph, pw, S, n_cls, Ph, Pw;
  double spatial_scale, gamma;
  bool ps, has_offset;
};


RoiArgs roi_args(const Tensor& input, const Tensor& rois, const std::optional<Tensor>& offset,
                 const std::vector<int64_t>& output_size, double spatial_scale, int64_t sampling_ratio, double gamma,
                 bool ps) {
  TORCH_CHECK(input.device().is_cpu(), "dcnbench native kernels run on CPU tensors");
  TORCH_CHECK(input.is_contiguous() && rois.is_contiguous(), "input and rois must be contiguous");
  TORCH_CHECK(output_size.size() == 2, "output_size must have 2 elements");
  TORCH_CHECK(rois.scalar_type() == input.scalar_type(), "rois dtype must match input");
  RoiArgs a;
  a.N = input.size(0);
  a.Cin = input.size(1);
  a.H = input.size(2);
  a.W = input.size(3);
  a.K = rois.size(0);
  a.ph = output_size[0];
  a.pw = output_size[1];
  a.S = sampling_ratio;
  a.ps = ps;
  a.Cout = ps ? a.Cin / (a.ph * a.pw) : a.Cin;
  a.spatial_scale = spatial_scale;
  a.gamma = gamma;
  a.has_offset = offset.has_value();
  a.n_cls = 1;
  a.Ph = a.Pw = 1;
  if (offset) {
    TORCH_CHECK(offset->is_contiguous() && offset->scalar_type() == input.scalar_type(),
                "offset must be contiguous and match input's dtype");
    a.n_cls = offset->size(1) / 2;
    a.Ph = offset->size(2);
    a.Pw = offset->size(3);
  }
  return a;
}

// Per-roi constants and the geometry of one bin. A bin's samples factorise: valid = valid_x &&
// valid_y, weights = y factor * x factor, so a bin is S x-axis and S y-axis entries.
template <typename T>
struct RoiCtx {
  RoiArgs a;
  std::vector<dcn::RoiGeometry<T>> geo;
  std::vector<int64_t> batch;
  const T* off = nullptr;
  int64_t cpc = 1;  // output channels per offset class

  RoiCtx(const RoiArgs& args, const T* rois, const T* offset) : a(args), off(offset) {
    geo.resize(a.K);
    batch.resize(a.K);
    for (int64_t r = 0; r < a.K; ++r) {
      const T* roi = rois + r * 5;
      batch[r] = static_cast<int64_t>(roi[0]);
      geo[r] = dcn::roi_geometry<T>(roi[1], roi[2], roi[3], roi[4], T(a.spatial_scale), static_cast<int>(a.ph),
                                    static_cast<int>(a.pw));
    }
    cpc = a.Cout / a.n_cls;
    images = batch;
    std::sort(images.begin(), images.end());
    images.erase(std::unique(images.begin(), images.end()), images.end());
  }
  std::vector<int64_t> images;  // distinct batch indices of the rois

  // Bin (i, j) of roi r for offset class cls: fills ax/ay (S entries each), returns the counts,
  // the index of t_x in the offset tensor (t_y is + Ph*Pw; -1 without offsets).
  inline void bin(int64_t r, int64_t cls, int64_t i, int64_t j, Axis<T>* ax, Axis<T>* ay, int& nx, int& ny,
                  int64_t& cell) const {
    const auto& g = geo[r];
    T shift_x = 0, shift_y = 0;
    cell = -1;
    if (off) {
      const int64_t pi = (i * a.Ph) / a.ph, pj = (j * a.Pw) / a.pw;
      cell = ((r * a.n_cls + cls) * 2 * a.Ph + pi) * a.Pw + pj;
      shift_x = T(a.gamma) * off[cell] * g.roi_w;
      shift_y = T(a.gamma) * off[cell + a.Ph * a.Pw] * g.roi_h;
    }
    const T sub_w = g.bin_w / T(a.S), sub_h = g.bin_h / T(a.S);
    const T base_x = (T(j) * g.bin_w + g.start_x) + shift_x;
    const T base_y = (T(i) * g.bin_h + g.start_y) + shift_y;
    nx = ny = 0;
    for (int64_t u = 0; u < a.S; ++u) {
      if (roi_axis<T>(base_x + T(u) * sub_w, static_cast<int>(a.W), ax[nx])) ++nx;
      if (roi_axis<T>(base_y + T(u) * sub_h, static_cast<int>(a.H), ay[ny])) ++ny;
    }
  }
  T scale_x(int64_t r) const { return T(a.gamma) * geo[r].roi_w; }
  T scale_y(int64_t r) const { return T(a.gamma) * geo[r].roi_h; }
};

// ---- position-sensitive: every (output channel, bin) reads its own input plane, so the kernels
// walk the input planes (one thread per plane, all rois in order: the plane stays in L1). For one
// plane the sample geometry of all rois is computed at once in vectorisable loops over the rois
// (structure of arrays, entry [u * K + r]): the samples' positions along each axis.

// Pull part `part` of `parts` of input plane ic of every image the rois use into cache (the kernels
// then read it at random); the parts spread the prefetches over the previous plane's work.
template <typename T>
inline void prefetch_planes(const RoiCtx<T>& ctx, const T* base, int64_t ic, bool write, int64_t part,
                            int64_t parts) {
  const int64_t bytes = ctx.a.H * ctx.a.W * static_cast<int64_t>(sizeof(T));
  const int64_t lines = (bytes + 63) / 64, l0 = lines * part / parts, l1 = lines * (part + 1) / parts;
  for (int64_t b : ctx.images) {
    const char* p = reinterpret_cast<const char*>(base + (b * ctx.a.Cin + ic) * ctx.a.H * ctx.a.W);
    for (int64_t l = l0; l < l1; ++l) {
      if (write) {
        __builtin_prefetch(p + l * 64, 1, 3);
      } else {
        __builtin_prefetch(p + l * 64, 0, 3);
      }
    }
  }
}

// A sample's bilinear weights along one axis are a tent: map index x gets max(0, 1 - |x - c|) from
// the sample at clamped position c, which is 1 - frac at floor(c), frac at ceil(c) and 0 elsewhere,
// as roi_axis. An invalid sample is stored at kNoSample, far left of every map index, so its tent is
// zero on any window and the sampling loops have no branches.
template <typename T>
constexpr T kNoSample = T(-8);

template <typename T>
struct PsAxes {
  std::vector<T> pos;                // [S * K]: clamped position of sample u of roi r, or kNoSample
  std::vector<int32_t> first, last;  // [K]: floor of sample 0's clamped position, ceil of sample S-1's
  std::vector<T> base, count;        // [K]
  void resize(int64_t n, int64_t k) {
    pos.resize(n);
    first.resize(k);
    last.resize(k);
    base.resize(k);
    count.resize(k);
  }
};

// One axis for all rois: sample u of roi r at base[r] + u * sub[r]; same rule as roi_axis.
template <typename T>
void ps_axis(PsAxes<T>& ax, const T* sub, int64_t K, int64_t S, int size) {
  const T lo_lim = T(-0.5), hi_lim = T(size) - T(0.5), top = T(size - 1);
  T* __restrict count = ax.count.data();
  const T* __restrict base = ax.base.data();
  std::fill(count, count + K, T(0));
  for (int64_t u = 0; u < S; ++u) {
    T* __restrict pos = ax.pos.data() + u * K;
    const T uu = T(u);
#pragma omp simd
    for (int64_t r = 0; r < K; ++r) {
      const T v = base[r] + uu * sub[r];
      const bool ok = (v >= lo_lim) & (v <= hi_lim);
      T c = v > T(0) ? v : T(0);
      c = c < top ? c : top;
      pos[r] = ok ? c : kNoSample<T>;
      count[r] += ok ? T(1) : T(0);
    }
  }
  // The window ends (positions increase with u): from the clamped positions, valid or not.
  for (int64_t r = 0; r < K; ++r) {
    const T v0 = base[r], v1 = base[r] + T(S - 1) * sub[r];
    ax.first[r] = static_cast<int32_t>(std::floor(std::min(std::max(v0, T(0)), top)));
    ax.last[r] = static_cast<int32_t>(std::ceil(std::min(std::max(v1, T(0)), top)));
  }
}

// roi_axis for a stored sample position: false for kNoSample.
template <typename T>
inline bool stored_axis(T c, Axis<T>& a) {
  if (c < T(0)) return false;
  const T f = std::floor(c);
  a.lo = int(f);
  a.hi = int(std::ceil(c));
  a.frac = c - f;
  return true;
}

template <typename T>
struct PsScratch {
  PsAxes<T> x, y;
  std::vector<T> sub_w, sub_h, bin_w, bin_h, start_x, start_y, roi_w, roi_h;
};

// Geometry of plane (c, i, j) for rois [r0, r0 + n) into s.x / s.y (entry [u * n + (r - r0)]).
template <typename T>
void ps_plane_geometry(const RoiCtx<T>& ctx, const T* off_t, int64_t cls, int64_t i, int64_t j, int64_t r0,
                       int64_t n, PsScratch<T>& s) {
  const auto& a = ctx.a;
  T* bx = s.x.base.data();
  T* by = s.y.base.data();
  for (int64_t k = 0; k < n; ++k) {
    bx[k] = T(j) * s.bin_w[r0 + k] + s.start_x[r0 + k];
    by[k] = T(i) * s.bin_h[r0 + k] + s.start_y[r0 + k];
  }
  if (off_t) {
    const int64_t cell = (cls * 2 * a.Ph + (i * a.Ph) / a.ph) * a.Pw + (j * a.Pw) / a.pw;
    const T* tx = off_t + cell * a.K + r0;
    const T* ty = tx + a.Ph * a.Pw * a.K;
    for (int64_t k = 0; k < n; ++k) {
      bx[k] = bx[k] + T(a.gamma) * tx[k] * s.roi_w[r0 + k];
      by[k] = by[k] + T(a.gamma) * ty[k] * s.roi_h[r0 + k];
    }
  }
  ps_axis<T>(s.x, s.sub_w.data() + r0, n, a.S, static_cast<int>(a.W));
  ps_axis<T>(s.y, s.sub_h.data() + r0, n, a.S, static_cast<int>(a.H));
}

// Rois per geometry chunk: the chunk's sample tables stay in L1 next to the plane.
constexpr int64_t kRoiChunk = 32;

template <typename T>
void ps_scratch_init(const RoiCtx<T>& ctx, PsScratch<T>& s) {
  const int64_t K = ctx.a.K, S = ctx.a.S, RC = std::min(K, kRoiChunk);
  s.x.resize(S * RC, RC);
  s.y.resize(S * RC, RC);
  for (auto* v : {&s.sub_w, &s.sub_h, &s.bin_w, &s.bin_h, &s.start_x, &s.start_y, &s.roi_w, &s.roi_h}) v->resize(K);
  for (int64_t r = 0; r < K; ++r) {
    const auto& g = ctx.geo[r];
    s.bin_w[r] = g.bin_w;
    s.bin_h[r] = g.bin_h;
    s.sub_w[r] = g.bin_w / T(S);
    s.sub_h[r] = g.bin_h / T(S);
    s.start_x[r] = g.start_x;
    s.start_y[r] = g.start_y;
    s.roi_w[r] = g.roi_w;
    s.roi_h[r] = g.roi_h;
  }
}

// A bin's bilinear weights are the outer product of a y profile and an x profile: the samples'
// corner weights summed per map row and per map column (qx / qy: their derivatives along x / y).
// Footprints up to kLanes columns use a window of exactly kLanes columns, moved inside the map, so
// the row loops are fixed-width vector code; wider ones (up to kMaxProfile) use their own width,
// and the rare wider bins the per-sample loops.
constexpr int64_t kLanes = 8;
constexpr int64_t kMaxProfile = 24;

template <typename T>
struct BinProfile {
  int64_t x0, y0, nx, ny;  // window origin in the plane, columns, rows
  T px[kMaxProfile], py[kMaxProfile], qx[kMaxProfile], qy[kMaxProfile];
};

// One sample's share of a window entry at distance t = entry - position: its tent in p, its
// derivative in q (DERIV).
template <typename T, bool DERIV>
inline void add_tent(T t, T& p, T& q) {
  const T a = std::abs(t);
  p += std::max(T(1) - a, T(0));
  if (DERIV) q += ((a < T(1)) & (t > T(0)) ? T(1) : T(0)) - ((a < T(1)) & (t < T(0)) ? T(1) : T(0));
}

// A sample's window position d as the derivative's tents read it: d in (0, ulp(1)), where 1 - d
// rounds to exactly 1 and the +1 at ceil(d) = 1 would drop out, moved up to ulp(1) (the tents'
// values change by less than ulp(1)). Only there: a position of 1 or more is at least ulp(1) from
// its floor, and the window starts at or below the position's floor.
template <typename T>
inline T derivative_position(T d) {
  constexpr T eps = std::numeric_limits<T>::epsilon();
  return d > T(0) && d < eps ? eps : d;
}

// Profile of bin k (entries [u * n + k] of ax) over the window [o, o + len): the sum of its
// samples' tents; DERIV also fills q, their derivatives along the axis (+1 at ceil(c), -1 at
// floor(c), 0 when c is a map index, as dcn::roi_corners). Evaluated over the whole window per
// sample, not scattered: consecutive samples often share a column, and scattered read-modify-writes
// of one entry wait on each other's stores.
// SS: the sample count when known at compile time (unrolled), else 0.
template <typename T, int L, bool DERIV, int SS>
inline void axis_profile_fixed(const PsAxes<T>& ax, int64_t k, int64_t n, int64_t S, int64_t o, T* p, T* q) {
  T lp[L] = {}, lq[L] = {};  // accumulated in registers, stored once
  const int64_t samples = SS > 0 ? SS : S;
  for (int64_t u = 0; u < samples; ++u) {
    T d = ax.pos[u * n + k] - T(o);  // exact: o is an integer at most the position (or kNoSample)
    if (DERIV) d = derivative_position(d);
#pragma omp simd
    for (int32_t x = 0; x < L; ++x) add_tent<T, DERIV>(T(x) - d, lp[x], lq[x]);
  }
  std::copy_n(lp, L, p);
  if (DERIV) std::copy_n(lq, L, q);
}

template <typename T, bool DERIV>
inline void axis_profile(const PsAxes<T>& ax, int64_t k, int64_t n, int64_t S, int64_t o, int64_t len, T* p, T* q) {
  if (len <= kLanes) {
    if (S == 4) return axis_profile_fixed<T, kLanes, DERIV, 4>(ax, k, n, S, o, p, q);  // the paper's setting
    return axis_profile_fixed<T, kLanes, DERIV, 0>(ax, k, n, S, o, p, q);
  }
  if (len <= 2 * kLanes) return axis_profile_fixed<T, 2 * kLanes, DERIV, 0>(ax, k, n, S, o, p, q);
  axis_profile_fixed<T, kMaxProfile, DERIV, 0>(ax, k, n, S, o, p, q);
}

// Both profiles of a bin whose windows are kLanes columns and at most kLanes rows, S = 4: the x
// window in lanes [0, kLanes), the y window in [kLanes, 2 kLanes) of one loop.
template <typename T, bool DERIV>
inline void both_profiles_s4(const PsScratch<T>& s, int64_t k, int64_t n, BinProfile<T>& b) {
  constexpr int32_t L2 = 2 * kLanes;
  T p[L2] = {}, q[L2] = {};
  for (int64_t u = 0; u < 4; ++u) {
    T dx = s.x.pos[u * n + k] - T(b.x0), dy = s.y.pos[u * n + k] - T(b.y0);
    if (DERIV) dx = derivative_position(dx), dy = derivative_position(dy);
#pragma omp simd
    for (int32_t l = 0; l < L2; ++l) add_tent<T, DERIV>(T(l % kLanes) - (l < kLanes ? dx : dy), p[l], q[l]);
  }
  std::copy_n(p, kLanes, b.px);
  std::copy_n(p + kLanes, kLanes, b.py);
  if (DERIV) {
    std::copy_n(q, kLanes, b.qx);
    std::copy_n(q + kLanes, kLanes, b.qy);
  }
}

// The profiles of bin k; false when its footprint exceeds kMaxProfile on an axis.
template <typename T, bool DERIV>
inline bool bin_profile(const PsScratch<T>& s, int64_t k, int64_t n, int64_t S, int64_t W, BinProfile<T>& b) {
  const int64_t xmin = s.x.first[k], xmax = s.x.last[k];
  const int64_t ymin = s.y.first[k], ymax = s.y.last[k];
  b.nx = xmax - xmin + 1;
  b.ny = ymax - ymin + 1;
  if (b.nx > kMaxProfile || b.ny > kMaxProfile) return false;
  b.x0 = xmin;
  b.y0 = ymin;
  if (b.nx <= kLanes && W >= kLanes) {
    b.x0 = std::min(xmin, W - kLanes);
    b.nx = kLanes;
    if (b.ny <= kLanes && S == 4) {  // the common case, and the paper's sampling
      both_profiles_s4<T, DERIV>(s, k, n, b);
      return true;
    }
  }
  axis_profile<T, DERIV>(s.x, k, n, S, b.x0, b.nx, b.px, b.qx);
  axis_profile<T, DERIV>(s.y, k, n, S, b.y0, b.ny, b.py, b.qy);
  return true;
}

// acc[x] = sum over the window rows y of w[y] * P[y0 + y][x0 + x] (NX columns, or b.nx when 0).
// The fixed width keeps its sums in registers (a one-loop version for both widths was 3-4% slower
// in the R-FCN forward).
template <typename T, int NX>
inline void weighted_rows(const BinProfile<T>& b, const T* P, int64_t W, const T* w, T* acc) {
  if constexpr (NX > 0) {
    T a[NX] = {};
    for (int64_t y = 0; y < b.ny; ++y) {
      const T* __restrict row = P + (b.y0 + y) * W + b.x0;
      const T wy = w[y];
#pragma omp simd
      for (int64_t x = 0; x < NX; ++x) a[x] += wy * row[x];
    }
    std::copy_n(a, NX, acc);
  } else {
    for (int64_t x = 0; x < b.nx; ++x) acc[x] = T(0);
    for (int64_t y = 0; y < b.ny; ++y) {
      const T* __restrict row = P + (b.y0 + y) * W + b.x0;
      const T wy = w[y];
#pragma omp simd
      for (int64_t x = 0; x < b.nx; ++x) acc[x] += wy * row[x];
    }
  }
}

// Dot product of acc and p over a window of b.nx columns (windows other than the fixed kLanes).
template <typename T>
inline T window_dot(const BinProfile<T>& b, const T* acc, const T* p) {
  T t = 0;
#pragma omp simd reduction(+ : t)
  for (int64_t x = 0; x < b.nx; ++x) t += acc[x] * p[x];
  return t;
}

// Sum of a bin's kLanes deferred terms (see ps_forward).
template <typename T>
inline T lane_sum(const T* terms) {
  T t = 0;
  for (int64_t x = 0; x < kLanes; ++x) t += terms[x];
  return t;
}

// Sum of bin k's valid samples in plane P, sample by sample (any footprint).
template <typename T>
inline T sample_sum(const PsScratch<T>& s, const T* P, int64_t W, int64_t k, int64_t n, int64_t S) {
  T total = 0;
  Axis<T> ay, ax;
  for (int64_t v = 0; v < S; ++v) {
    if (!stored_axis(s.y.pos[v * n + k], ay)) continue;
    const T* r0 = P + ay.lo * W;
    const T* r1 = P + ay.hi * W;
    T t0 = 0, t1 = 0;
    for (int64_t u = 0; u < S; ++u) {
      if (!stored_axis(s.x.pos[u * n + k], ax)) continue;
      t0 += (T(1) - ax.frac) * r0[ax.lo] + ax.frac * r0[ax.hi];
      t1 += (T(1) - ax.frac) * r1[ax.lo] + ax.frac * r1[ax.hi];
    }
    total += (T(1) - ay.frac) * t0 + ay.frac * t1;
  }
  return total;
}

// Calls body(plane ic, first roi r0, rois n, scratch) for every input plane and chunk of rois, one
// thread per range of planes, after computing the chunk's sample geometry; each chunk prefetches
// its share of the next plane of `prefetch` (and of `prefetch_write`).
template <typename T, typename Body>
void for_each_plane_chunk(const RoiCtx<T>& ctx, const T* prefetch, const T* prefetch_write, Body body) {
  const auto& a = ctx.a;
  const int64_t bins = a.ph * a.pw;
  // The offsets cell-major, (n_cls * 2 * Ph * Pw, K): a plane reads one contiguous row per axis
  // instead of one value per roi, 2 * n_cls * Ph * Pw values apart.
  Tensor off_t;
  if (ctx.off) {
    const Tensor off = at::from_blob(const_cast<T*>(ctx.off), {a.K, 2 * a.n_cls * a.Ph * a.Pw},
                                     at::TensorOptions(c10::CppTypeToScalarType<T>::value));
    off_t = transposed<T>(off, a.K, 2 * a.n_cls * a.Ph * a.Pw);
  }
  const T* off_cells = ctx.off ? off_t.data_ptr<T>() : nullptr;
  parallel_for(0, a.Cout * bins, 1, [&](int64_t p0, int64_t p1) {
    PsScratch<T> s;
    ps_scratch_init(ctx, s);
    for (int64_t ic = p0; ic < p1; ++ic) {
      const int64_t c = ic / bins, i = (ic / a.pw) % a.ph, j = ic % a.pw;
      const int64_t chunks = (a.K + kRoiChunk - 1) / kRoiChunk;
      for (int64_t q0 = 0; q0 < a.K; q0 += kRoiChunk) {
        const int64_t n = std::min(kRoiChunk, a.K - q0);
        if (ic + 1 < p1) {
          if (prefetch) prefetch_planes(ctx, prefetch, ic + 1, false, q0 / kRoiChunk, chunks);
          if (prefetch_write) prefetch_planes(ctx, prefetch_write, ic + 1, true, q0 / kRoiChunk, chunks);
        }
        ps_plane_geometry(ctx, off_cells, c / ctx.cpc, i, j, q0, n, s);
        body(ic, q0, n, s);
      }
    }
  });
}

// Yt: the output plane-major (Cin, K), so that a plane's writes are contiguous.
template <typename T>
void ps_forward(const RoiCtx<T>& ctx, const T* X, T* Yt) {
  const auto& a = ctx.a;
  const int64_t HW = a.H * a.W, W = a.W;
  for_each_plane_chunk<T>(ctx, X, nullptr, [&](int64_t ic, int64_t q0, int64_t n, const PsScratch<T>& s) {
    BinProfile<T> b;
    T acc[kMaxProfile];
    // Bins on the fixed-width path leave their kLanes products in prod and are summed together
    // after the chunk (one vectorised pass instead of a horizontal sum per bin); the others leave
    // their sum in prod[k * kLanes] and zeros.
    T prod[kRoiChunk * kLanes];
    for (int64_t k = 0; k < n; ++k) {
      const int64_t r = q0 + k;
      T* pk = prod + k * kLanes;
      std::fill_n(pk, kLanes, T(0));
      if (!(s.x.count[k] * s.y.count[k] > 0)) continue;
      const T* P = X + (ctx.batch[r] * a.Cin + ic) * HW;
      if (!bin_profile<T, false>(s, k, n, a.S, W, b)) {
        pk[0] = sample_sum(s, P, W, k, n, a.S);
      } else if (b.nx == kLanes) {
        weighted_rows<T, kLanes>(b, P, W, b.py, acc);
#pragma omp simd
        for (int64_t x = 0; x < kLanes; ++x) pk[x] = acc[x] * b.px[x];
      } else {
        weighted_rows<T, 0>(b, P, W, b.py, acc);
        pk[0] = window_dot<T>(b, acc, b.px);
      }
    }
    for (int64_t k = 0; k < n; ++k) {
      const T count = s.x.count[k] * s.y.count[k];
      Yt[ic * a.K + q0 + k] = count > 0 ? lane_sum(prod + k * kLanes) / count : T(0);
    }
  });
}

// Bin k's share of the backward pass over its profile window, in one pass over the rows: adds
// gc * py[y] * px[x] into the input gradient G and, with offsets, leaves d sum / d shift_x and
// d sum / d shift_y as kLanes terms each in sx, sy (NX = kLanes: the per-column products, summed
// later; else the sums in entry 0).
template <typename T, int NX>
inline void window_backward(const BinProfile<T>& b, const T* P, T* G, int64_t W, T gc, bool offsets, T* sx, T* sy) {
  const int64_t L = NX > 0 ? NX : b.nx;
  T acc_p[kMaxProfile] = {}, acc_q[kMaxProfile] = {};
  for (int64_t y = 0; y < b.ny; ++y) {
    const int64_t at = (b.y0 + y) * W + b.x0;
    T* __restrict grow = G + at;
    const T* __restrict row = P + at;
    const T gy = gc * b.py[y], wp = b.py[y], wq = b.qy[y];
    if (offsets) {
      // The input row is read before the gradient row is written: the two planes usually lie a
      // multiple of 4 KiB apart, and a load behind a store to the same address bits waits for it.
#pragma omp simd
      for (int64_t x = 0; x < L; ++x) {
        const T v = row[x];
        acc_p[x] += wp * v;
        acc_q[x] += wq * v;
        grow[x] += gy * b.px[x];
      }
    } else {
#pragma omp simd
      for (int64_t x = 0; x < L; ++x) grow[x] += gy * b.px[x];
    }
  }
  if (!offsets) return;
  if constexpr (NX == kLanes) {
#pragma omp simd
    for (int64_t x = 0; x < kLanes; ++x) {
      sx[x] = acc_p[x] * b.qx[x];
      sy[x] = acc_q[x] * b.px[x];
    }
  } else {
    sx[0] = window_dot<T>(b, acc_p, b.qx);
    sy[0] = window_dot<T>(b, acc_q, b.px);
  }
}

// The same, sample by sample (any footprint).
template <typename T>
inline void sample_backward(const PsScratch<T>& s, const T* P, T* G, int64_t W, int64_t k, int64_t n, int64_t S,
                            T gc, bool offsets, T& sx, T& sy) {
  Axis<T> ay, ax;
  for (int64_t v = 0; v < S; ++v) {
    if (!stored_axis(s.y.pos[v * n + k], ay)) continue;
    const int64_t y0 = ay.lo * W, y1 = ay.hi * W;
    const T hy = T(1) - ay.frac, ly = ay.frac, g0 = gc * hy, g1 = gc * ly;
    T dx0 = 0, dx1 = 0, dy = 0;
    for (int64_t u = 0; u < S; ++u) {
      if (!stored_axis(s.x.pos[u * n + k], ax)) continue;
      const int64_t xl = ax.lo, xh = ax.hi;
      const T hx = T(1) - ax.frac, lx = ax.frac;
      G[y0 + xl] += g0 * hx;
      G[y0 + xh] += g0 * lx;
      G[y1 + xl] += g1 * hx;
      G[y1 + xh] += g1 * lx;
      if (!offsets) continue;
      // dcn::roi_corners' derivatives: dw/dx = sx * wy, dw/dy = sy * wx.
      const T v00 = P[y0 + xl], v01 = P[y0 + xh], v10 = P[y1 + xl], v11 = P[y1 + xh];
      dx0 += v01 - v00;
      dx1 += v11 - v10;
      dy += hx * (v10 - v00) + lx * (v11 - v01);
    }
    sx += hy * dx0 + ly * dx1;
    sy += dy;
  }
}

// GO[cell of (r, c, i, j)] = sum of gs{x,y}[(c, i, j), r] * gamma * roi size over the outputs of
// the cell, each roi by one thread (GO need not be zeroed).
template <typename T>
void ps_offset_reduce(const RoiCtx<T>& ctx, const T* gsx, const T* gsy, T* GO) {
  const auto& a = ctx.a;
  const int64_t per_roi = a.Cout * a.ph * a.pw, cells = a.Ph * a.Pw;
  std::vector<int64_t> cell(per_roi);  // offset cell (t_x) of output (c, i, j) within its roi's offsets
  for (int64_t c = 0; c < a.Cout; ++c)
    for (int64_t i = 0; i < a.ph; ++i)
      for (int64_t j = 0; j < a.pw; ++j)
        cell[(c * a.ph + i) * a.pw + j] = ((c / ctx.cpc) * 2 * a.Ph + (i * a.Ph) / a.ph) * a.Pw + (j * a.Pw) / a.pw;
  parallel_for(0, a.K, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const T kx = ctx.scale_x(r), ky = ctx.scale_y(r);
      T* go = GO + r * a.n_cls * 2 * cells;
      std::fill_n(go, a.n_cls * 2 * cells, T(0));
      for (int64_t o = 0; o < per_roi; ++o) {
        go[cell[o]] += gsx[o * a.K + r] * kx;
        go[cell[o] + cells] += gsy[o * a.K + r] * ky;
      }
    }
  });
}

// GYt: the output gradient plane-major (Cin, K). GX need not be zeroed: each plane is zeroed by the
// thread that owns it.
template <typename T>
void ps_backward(const RoiCtx<T>& ctx, const T* X, const T* GYt, T* GX, T* GO) {
  const auto& a = ctx.a;
  const int64_t HW = a.H * a.W, W = a.W;
  const bool offsets = GO != nullptr;
  // d out / d shift per output element, plane-major (Cin, K) so that a plane's writes are contiguous;
  // reduced into the offsets per roi afterwards.
  const Tensor gs = at::empty({offsets ? 2 * a.Cin : 0, a.K}, at::TensorOptions(c10::CppTypeToScalarType<T>::value));
  T* gsx = offsets ? gs.data_ptr<T>() : nullptr;
  T* gsy = offsets ? gsx + a.K * a.Cin : nullptr;
  for_each_plane_chunk<T>(ctx, offsets ? X : nullptr, GX, [&](int64_t ic, int64_t q0, int64_t n,
                                                                     const PsScratch<T>& s) {
    if (q0 == 0) {
      for (int64_t img = 0; img < a.N; ++img) std::fill_n(GX + (img * a.Cin + ic) * HW, HW, T(0));
    }
    BinProfile<T> b;
    // d sum / d shift of the chunk's bins as kLanes terms each, summed after the chunk (as in
    // ps_forward); gcs: each bin's output gradient / sample count.
    T terms_x[kRoiChunk * kLanes], terms_y[kRoiChunk * kLanes], gcs[kRoiChunk];
    for (int64_t k = 0; k < n; ++k) {
      const int64_t r = q0 + k;
      const T count = s.x.count[k] * s.y.count[k];
      T* tx = terms_x + k * kLanes;
      T* ty = terms_y + k * kLanes;
      std::fill_n(tx, kLanes, T(0));
      std::fill_n(ty, kLanes, T(0));
      gcs[k] = T(0);
      if (!(count > 0)) continue;
      const T gc = GYt[ic * a.K + r] / count;
      gcs[k] = gc;
      const int64_t plane = (ctx.batch[r] * a.Cin + ic) * HW;
      if (!(offsets ? bin_profile<T, true>(s, k, n, a.S, W, b) : bin_profile<T, false>(s, k, n, a.S, W, b))) {
        sample_backward(s, X + plane, GX + plane, W, k, n, a.S, gc, offsets, tx[0], ty[0]);
      } else if (b.nx == kLanes) {
        window_backward<T, kLanes>(b, X + plane, GX + plane, W, gc, offsets, tx, ty);
      } else {
        window_backward<T, 0>(b, X + plane, GX + plane, W, gc, offsets, tx, ty);
      }
    }
    if (!offsets) return;
    for (int64_t k = 0; k < n; ++k) {
      gsx[ic * a.K + q0 + k] = gcs[k] * lane_sum(terms_x + k * kLanes);
      gsy[ic * a.K + q0 + k] = gcs[k] * lane_sum(terms_y + k * kLanes);
    }
  });
  if (!offsets) return;
  ps_offset_reduce<T>(ctx, gsx, gsy, GO);
}

// ---- plain (not position-sensitive): all channels of a bin share its samples, so the input is
// read channels-last and each sample blends four channel vectors.

template <typename T>
void plain_forward(const RoiCtx<T>& ctx, const T* XL, T* Y) {
  const auto& a = ctx.a;
  const int64_t C = a.Cin, bins = a.ph * a.pw;
  parallel_for(0, a.K, 1, [&](int64_t q0, int64_t q1) {
    std::vector<Axis<T>> ax(a.S), ay(a.S);
    std::vector<T> acc(ctx.cpc);
    for (int64_t r = q0; r < q1; ++r) {
      const T* Xb = XL + ctx.batch[r] * a.H * a.W * C;
      for (int64_t cls = 0; cls < a.n_cls; ++cls) {
        const int64_t c0 = cls * ctx.cpc, len = ctx.cpc;
        for (int64_t i = 0; i < a.ph; ++i) {
          for (int64_t j = 0; j < a.pw; ++j) {
            int nx, ny;
            int64_t cell;
            ctx.bin(r, cls, i, j, ax.data(), ay.data(), nx, ny, cell);
            const int count = nx * ny;
            T* __restrict s = acc.data();
            std::fill(s, s + len, T(0));
            for (int v = 0; v < ny; ++v) {
              const T ly = ay[v].frac, hy = T(1) - ly;
              for (int u = 0; u < nx; ++u) {
                const T lx = ax[u].frac, hx = T(1) - lx;
                const T w0 = hy * hx, w1 = hy * lx, w2 = ly * hx, w3 = ly * lx;
                const T* __restrict p0 = Xb + (ay[v].lo * a.W + ax[u].lo) * C + c0;
                const T* __restrict p1 = Xb + (ay[v].lo * a.W + ax[u].hi) * C + c0;
                const T* __restrict p2 = Xb + (ay[v].hi * a.W + ax[u].lo) * C + c0;
                const T* __restrict p3 = Xb + (ay[v].hi * a.W + ax[u].hi) * C + c0;
#pragma omp simd
                for (int64_t c = 0; c < len; ++c) s[c] = madd(w0, p0[c], madd(w1, p1[c], madd(w2, p2[c], madd(w3, p3[c], s[c]))));
              }
            }
            T* y = Y + (r * a.Cout + c0) * bins + i * a.pw + j;
            for (int64_t c = 0; c < len; ++c) y[c * bins] = count > 0 ? s[c] / T(count) : T(0);
          }
        }
      }
    }
  });
}

// Bin (i, j) of roi r for offset class cls: its sample axes (ax, ay, nx, ny, offset cell) and
// g[c] = GY[r, lo + c, i, j] / sample count for c < len; false when the bin has no valid sample.
template <typename T>
inline bool bin_output_grad(const RoiCtx<T>& ctx, const T* GY, int64_t r, int64_t cls, int64_t i, int64_t j,
                            int64_t lo, int64_t len, Axis<T>* ax, Axis<T>* ay, int& nx, int& ny, int64_t& cell, T* g) {
  const auto& a = ctx.a;
  const int64_t bins = a.ph * a.pw;
  ctx.bin(r, cls, i, j, ax, ay, nx, ny, cell);
  const int count = nx * ny;
  if (count == 0) return false;
  const T* gy = GY + (r * a.Cout + lo) * bins + i * a.pw + j;
  for (int64_t c = 0; c < len; ++c) g[c] = gy[c * bins] / T(count);
  return true;
}

template <typename T>
void plain_backward(const RoiCtx<T>& ctx, const T* XL, const T* GY, T* GXL, T* GO) {
  const auto& a = ctx.a;
  const int64_t C = a.Cin;
  const int nt = std::max(1, at::get_num_threads());
  const int64_t grain = std::max<int64_t>(16, (C + nt - 1) / nt);
  // Input gradient: each thread owns a channel range and walks the rois in order.
  parallel_for(0, C, grain, [&](int64_t cb, int64_t ce) {
    std::vector<Axis<T>> ax(a.S), ay(a.S);
    std::vector<T> gbuf(ce - cb);
    for (int64_t r = 0; r < a.K; ++r) {
      T* Gb = GXL + ctx.batch[r] * a.H * a.W * C;
      for (int64_t cls = 0; cls < a.n_cls; ++cls) {
        const int64_t lo = std::max(cb, cls * ctx.cpc), hi = std::min(ce, (cls + 1) * ctx.cpc);
        if (lo >= hi) continue;
        const int64_t len = hi - lo;
        for (int64_t i = 0; i < a.ph; ++i) {
          for (int64_t j = 0; j < a.pw; ++j) {
            int nx, ny;
            int64_t cell;
            const T* g = gbuf.data();
            if (!bin_output_grad(ctx, GY, r, cls, i, j, lo, len, ax.data(), ay.data(), nx, ny, cell, gbuf.data())) continue;
            for (int v = 0; v < ny; ++v) {
              const T ly = ay[v].frac, hy = T(1) - ly;
              for (int u = 0; u < nx; ++u) {
                const T lx = ax[u].frac, hx = T(1) - lx;
                const T w[4] = {hy * hx, hy * lx, ly * hx, ly * lx};
                const int64_t idx[4] = {ay[v].lo * a.W + ax[u].lo, ay[v].lo * a.W + ax[u].hi,
                                        ay[v].hi * a.W + ax[u].lo, ay[v].hi * a.W + ax[u].hi};
                for (int q = 0; q < 4; ++q) {
                  T* __restrict d = Gb + idx[q] * C + lo;
                  const T wq = w[q];
#pragma omp simd
                  for (int64_t c = 0; c < len; ++c) d[c] = madd(g[c], wq, d[c]);
                }
              }
            }
          }
        }
      }
    }
  });
  if (!GO) return;
  // Offset gradient: one thread per roi.
  parallel_for(0, a.K, 1, [&](int64_t q0, int64_t q1) {
    std::vector<Axis<T>> ax(a.S), ay(a.S);
    std::vector<T> gbuf(ctx.cpc);
    for (int64_t r = q0; r < q1; ++r) {
      const T* Xb = XL + ctx.batch[r] * a.H * a.W * C;
      const T kx = ctx.scale_x(r), ky = ctx.scale_y(r);
      for (int64_t cls = 0; cls < a.n_cls; ++cls) {
        const int64_t c0 = cls * ctx.cpc, len = ctx.cpc;
        for (int64_t i = 0; i < a.ph; ++i) {
          for (int64_t j = 0; j < a.pw; ++j) {
            int nx, ny;
            int64_t cell;
            const T* g = gbuf.data();
            if (!bin_output_grad(ctx, GY, r, cls, i, j, c0, len, ax.data(), ay.data(), nx, ny, cell, gbuf.data())) continue;
            T sx = 0, sy = 0;
            for (int v = 0; v < ny; ++v) {
              const T ly = ay[v].frac, hy = T(1) - ly;
              for (int u = 0; u < nx; ++u) {
                const T lx = ax[u].frac, hx = T(1) - lx;
                const T* __restrict p0 = Xb + (ay[v].lo * a.W + ax[u].lo) * C + c0;
                const T* __restrict p1 = Xb + (ay[v].lo * a.W + ax[u].hi) * C + c0;
                const T* __restrict p2 = Xb + (ay[v].hi * a.W + ax[u].lo) * C + c0;
                const T* __restrict p3 = Xb + (ay[v].hi * a.W + ax[u].hi) * C + c0;
                T ax_ = 0, ay_ = 0;
#pragma omp simd reduction(+ : ax_, ay_)
                for (int64_t c = 0; c < len; ++c) {
                  ax_ += g[c] * (hy * (p1[c] - p0[c]) + ly * (p3[c] - p2[c]));
                  ay_ += g[c] * (hx * (p2[c] - p0[c]) + lx * (p3[c] - p1[c]));
                }
                sx += ax_;
                sy += ay_;
              }
            }
            GO[cell] += sx * kx;
            GO[cell + a.Ph * a.Pw] += sy * ky;
          }
        }
      }
    }
  });
}


Tensor roi_pool_forward(const Tensor& input, const Tensor& rois, const std::optional<Tensor>& offset,
                        std::vector<int64_t> output_size, double spatial_scale, int64_t sampling_ratio, double gamma,
                        bool position_sensitive) {
  const RoiArgs a = roi_args(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, position_sensitive);
  // Every element is written (a bin without valid samples gives 0).
  Tensor out = at::empty({a.K, a.Cout, a.ph, a.pw}, input.options());
  if (out.numel() == 0) return out;
  Tensor off = offset ? *offset : Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnbench_roi_pool_forward", [&] {
    const RoiCtx<scalar_t> ctx(a, rois.data_ptr<scalar_t>(), a.has_offset ? off.data_ptr<scalar_t>() : nullptr);
    if (a.ps) {
      const Tensor yt = at::empty({a.Cin, a.K}, input.options());
      ps_forward<scalar_t>(ctx, input.data_ptr<scalar_t>(), yt.data_ptr<scalar_t>());
      out = transposed<scalar_t>(yt, a.Cin, a.K).view({a.K, a.Cout, a.ph, a.pw});
    } else {
      const Tensor xl = input.permute({0, 2, 3, 1}).contiguous();
      plain_forward<scalar_t>(ctx, xl.data_ptr<scalar_t>(), out.data_ptr<scalar_t>());
    }
  });
  return out;
}

std::tuple<Tensor, std::optional<Tensor>> roi_pool_backward(const Tensor& grad_out_in, const Tensor& input,
                                                            const Tensor& rois, const std::optional<Tensor>& offset,
                                                            std::vector<int64_t> output_size, double spatial_scale,
                                                            int64_t sampling_ratio, double gamma,
                                                            bool position_sensitive) {
  const RoiArgs a = roi_args(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma, position_sensitive);
  const Tensor grad_out = grad_out_in.contiguous();
  // The position-sensitive kernel zeroes each input-gradient plane and each roi's offset gradient.
  const bool kernel_zeroes = position_sensitive && a.K > 0 && a.Cout > 0;
  Tensor grad_input = kernel_zeroes ? at::empty_like(input) : at::zeros_like(input);
  Tensor grad_offset;
  if (offset) grad_offset = kernel_zeroes ? at::empty_like(*offset) : at::zeros_like(*offset);
  if (a.K > 0 && a.Cout > 0) {
    Tensor off = offset ? *offset : Tensor();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnbench_roi_pool_backward", [&] {
      const RoiCtx<scalar_t> ctx(a, rois.data_ptr<scalar_t>(), a.has_offset ? off.data_ptr<scalar_t>() : nullptr);
      scalar_t* go = a.has_offset ? grad_offset.data_ptr<scalar_t>() : nullptr;
      if (a.ps) {
        const Tensor gyt = transposed<scalar_t>(grad_out, a.K, a.Cin);
        ps_backward<scalar_t>(ctx, input.data_ptr<scalar_t>(), gyt.data_ptr<scalar_t>(),
                              grad_input.data_ptr<scalar_t>(), go);
      } else {
        const Tensor xl = input.permute({0, 2, 3, 1}).contiguous();
        Tensor gxl = at::zeros_like(xl);
        plain_backward<scalar_t>(ctx, xl.data_ptr<scalar_t>(), grad_out.data_ptr<scalar_t>(),
                                 gxl.data_ptr<scalar_t>(), go);
        grad_input.copy_(gxl.permute({0, 3, 1, 2}));
      }
    });
  }
  std::optional<Tensor> go;
  if (offset) go = grad_offset;
  return {grad_input, go};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dcnbench native CPU kernels";
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("deform_conv2d_forward", &deform_conv2d_forward, nogil);
  m.def("deform_conv2d_backward", &deform_conv2d_backward, nogil);
  m.def("roi_pool_forward", &roi_pool_forward, nogil);
  m.def("roi_pool_backward", &roi_pool_backward, nogil);
  m.def("num_threads", []() { return at::get_num_threads(); });
  m.def("packed_gemm", []() { return cblas_sgemm_pack_get_size && cblas_sgemm_pack && cblas_sgemm_compute; },
        "whether the forward can pack float32 weights for MKL's packed GEMM");
}
