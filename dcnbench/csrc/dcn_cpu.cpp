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

#include <algorithm>
#include <cstdlib>
#include <optional>
#include <tuple>
#include <vector>

#include "dcn_math.h"

using at::Tensor;

namespace {

// ------------------------------------------------------------------------------------------------
// Deformable convolution

struct ConvShape {
  int64_t N, C, H, W, O, Ho, Wo, L, kh, kw, taps, groups, Cg, Og, G, Cpg, Kg, Ktot;
  int64_t sh, sw, ph, pw, dh, dw;
  bool has_mask;
};

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

int64_t tile_pixels(const ConvShape& s, size_t elem) {
  int64_t target = 1 << 20;  // bytes of one column tile: stays in L2 with its GEMM operands
  if (const char* env = std::getenv("DCNBENCH_NATIVE_TILE_BYTES")) {
    const long long v = std::atoll(env);
    if (v > 0) target = v;
  }
  int64_t t = target / std::max<int64_t>(1, s.Ktot * static_cast<int64_t>(elem));
  t = std::max<int64_t>(16, t);
  if (t >= s.L) return s.L;
  // Balance the tiles over the sample.
  const int64_t n_tiles = (s.L + t - 1) / t;
  return (s.L + n_tiles - 1) / n_tiles;
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
          if (!sp.ok) {
            std::fill(dst, dst + seg.len, T(0));
            continue;
          }
          const T m = sp.mask;
          const T w0 = m * sp.c.weight[0], w1 = m * sp.c.weight[1], w2 = m * sp.c.weight[2],
                  w3 = m * sp.c.weight[3];
          const T* __restrict p0 = X + sp.c.index[0] * s.C + seg.c0;
          const T* __restrict p1 = X + sp.c.index[1] * s.C + seg.c0;
          const T* __restrict p2 = X + sp.c.index[2] * s.C + seg.c0;
          const T* __restrict p3 = X + sp.c.index[3] * s.C + seg.c0;
#pragma omp simd
          for (int64_t c = 0; c < seg.len; ++c) dst[c] = w0 * p0[c] + w1 * p1[c] + w2 * p2[c] + w3 * p3[c];
        }
      }
    }
  }
}

struct ConvBuffers {
  Tensor xbuf, col;
};

template <typename T>
void conv_forward_impl(const ConvShape& s, const Tensor& input, const Tensor& offset, const Tensor& weight,
                       const Tensor& mask, Tensor& out) {
  const auto segs = make_segments(s);
  const auto opts = input.options();
  const int64_t tile = tile_pixels(s, sizeof(T));
  Tensor wp = weight.permute({0, 2, 3, 1}).contiguous().view({s.O, s.Kg});  // (O, tap, Cg)
  Tensor xbuf = at::empty({s.H, s.W, s.C}, opts);
  Tensor col = at::empty({tile, s.Ktot}, opts);
  std::vector<Sample<T>> samples(static_cast<size_t>(tile * s.G * s.taps));
  const T* off = offset.data_ptr<T>();
  const T* msk = s.has_mask ? mask.data_ptr<T>() : nullptr;
  for (int64_t n = 0; n < s.N; ++n) {
    xbuf.copy_(input[n].permute({1, 2, 0}));
    const T* X = xbuf.data_ptr<T>();
    const T* off_n = off + n * 2 * s.G * s.taps * s.L;
    const T* mask_n = msk ? msk + n * s.G * s.taps * s.L : nullptr;
    Tensor out_n = out[n].view({s.O, s.L});
    for (int64_t l0 = 0; l0 < s.L; l0 += tile) {
      const int64_t tl = std::min(tile, s.L - l0);
      T* colp = col.data_ptr<T>();
      at::parallel_for(0, tl, 4, [&](int64_t r0, int64_t r1) {
        sample_rows<T>(s, segs, X, off_n, mask_n, l0, r0, r1, colp, samples.data());
      });
      Tensor ct = col.narrow(0, 0, tl);
      for (int64_t g = 0; g < s.groups; ++g) {
        Tensor dst = out_n.narrow(0, g * s.Og, s.Og).narrow(1, l0, tl);
        at::mm_out(dst, wp.narrow(0, g * s.Og, s.Og), ct.narrow(1, g * s.Kg, s.Kg).t());
      }
    }
  }
}

template <typename T>
void conv_backward_impl(const ConvShape& s, const Tensor& grad_out, const Tensor& input, const Tensor& offset,
                        const Tensor& weight, const Tensor& mask, Tensor& grad_input, Tensor& grad_offset,
                        Tensor& grad_wp, Tensor& grad_mask) {
  const auto segs = make_segments(s);
  const auto opts = input.options();
  const int64_t tile = tile_pixels(s, sizeof(T));
  Tensor wp = weight.permute({0, 2, 3, 1}).contiguous().view({s.O, s.Kg});
  Tensor xbuf = at::empty({s.H, s.W, s.C}, opts);
  Tensor gxbuf = at::empty({s.H, s.W, s.C}, opts);
  Tensor col = at::empty({tile, s.Ktot}, opts);
  Tensor dcol = at::empty({tile, s.Ktot}, opts);
  std::vector<Sample<T>> samples(static_cast<size_t>(tile * s.G * s.taps));
  const T* off = offset.data_ptr<T>();
  const T* msk = s.has_mask ? mask.data_ptr<T>() : nullptr;
  T* goff = grad_offset.data_ptr<T>();
  T* gmsk = s.has_mask ? grad_mask.data_ptr<T>() : nullptr;
  const int64_t C = s.C;
  // Channel chunks for the scatter: at least 16 channels per thread.
  const int64_t c_grain = std::max<int64_t>(16, (C + at::get_num_threads() - 1) / std::max(1, at::get_num_threads()));

  for (int64_t n = 0; n < s.N; ++n) {
    xbuf.copy_(input[n].permute({1, 2, 0}));
    gxbuf.zero_();
    const T* X = xbuf.data_ptr<T>();
    T* GX = gxbuf.data_ptr<T>();
    const T* off_n = off + n * 2 * s.G * s.taps * s.L;
    const T* mask_n = msk ? msk + n * s.G * s.taps * s.L : nullptr;
    T* goff_n = goff + n * 2 * s.G * s.taps * s.L;
    T* gmask_n = gmsk ? gmsk + n * s.G * s.taps * s.L : nullptr;
    Tensor go_n = grad_out[n].view({s.O, s.L});
    for (int64_t l0 = 0; l0 < s.L; l0 += tile) {
      const int64_t tl = std::min(tile, s.L - l0);
      T* colp = col.data_ptr<T>();
      Sample<T>* smp = samples.data();
      at::parallel_for(0, tl, 4, [&](int64_t r0, int64_t r1) {
        sample_rows<T>(s, segs, X, off_n, mask_n, l0, r0, r1, colp, smp);
      });
      Tensor ct = col.narrow(0, 0, tl);
      Tensor dt = dcol.narrow(0, 0, tl);
      for (int64_t g = 0; g < s.groups; ++g) {
        Tensor go_t = go_n.narrow(0, g * s.Og, s.Og).narrow(1, l0, tl);  // (Og, tl)
        Tensor gw_g = grad_wp.narrow(0, g * s.Og, s.Og);
        gw_g.addmm_(go_t, ct.narrow(1, g * s.Kg, s.Kg));
        Tensor dst = dt.narrow(1, g * s.Kg, s.Kg);
        at::mm_out(dst, go_t.t(), wp.narrow(0, g * s.Og, s.Og));
      }
      const T* D = dcol.data_ptr<T>();
      // (a) offset and mask gradients: four dot products per sampling point.
      at::parallel_for(0, tl, 4, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t l = l0 + r;
          const T* drow = D + r * s.Ktot;
          for (int64_t og = 0; og < s.G; ++og) {
            for (int64_t k = 0; k < s.taps; ++k) {
              const Sample<T>& sp = smp[(r * s.G + og) * s.taps + k];
              const int64_t ch = og * s.taps + k;
              if (!sp.ok) {
                goff_n[(2 * ch) * s.L + l] = T(0);
                goff_n[(2 * ch + 1) * s.L + l] = T(0);
                if (gmask_n) gmask_n[ch * s.L + l] = T(0);
                continue;
              }
              T s0 = 0, s1 = 0, s2 = 0, s3 = 0;
              for (const Segment& seg : segs[og]) {
                const T* __restrict d = drow + col_pos(s, seg, k);
                const T* __restrict p0 = X + sp.c.index[0] * C + seg.c0;
                const T* __restrict p1 = X + sp.c.index[1] * C + seg.c0;
                const T* __restrict p2 = X + sp.c.index[2] * C + seg.c0;
                const T* __restrict p3 = X + sp.c.index[3] * C + seg.c0;
                T a0 = 0, a1 = 0, a2 = 0, a3 = 0;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
                for (int64_t c = 0; c < seg.len; ++c) {
                  a0 += d[c] * p0[c];
                  a1 += d[c] * p1[c];
                  a2 += d[c] * p2[c];
                  a3 += d[c] * p3[c];
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
                gmask_n[ch * s.L + l] = cr.weight[0] * s0 + cr.weight[1] * s1 + cr.weight[2] * s2 + cr.weight[3] * s3;
            }
          }
        }
      });
      // (b) input gradient: each thread owns a channel range and walks the tile in order.
      at::parallel_for(0, C, c_grain, [&](int64_t cb, int64_t ce) {
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
                  if (wq == T(0)) continue;
                  T* __restrict gq = GX + sp.c.index[q] * C + lo;
#pragma omp simd
                  for (int64_t c = 0; c < len; ++c) gq[c] += wq * d[c];
                }
              }
            }
          }
        }
      });
    }
    grad_input[n].copy_(gxbuf.permute({2, 0, 1}));
  }
}

void check_conv_args(const Tensor& input, const Tensor& offset, const Tensor& weight,
                     const std::optional<Tensor>& bias, const std::optional<Tensor>& mask) {
  TORCH_CHECK(input.device().is_cpu(), "dcnbench native kernels run on CPU tensors");
  TORCH_CHECK(input.dim() == 4 && offset.dim() == 4 && weight.dim() == 4, "input, offset, weight must be 4-D");
  TORCH_CHECK(input.is_contiguous() && offset.is_contiguous() && weight.is_contiguous(),
              "input, offset and weight must be contiguous");
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
  Tensor grad_input = at::zeros_like(input);
  Tensor grad_offset = at::zeros_like(offset);
  Tensor grad_mask = mask ? at::zeros_like(*mask) : Tensor();
  Tensor grad_wp = at::zeros({s.O, s.Kg}, weight.options());
  if (s.N > 0 && s.L > 0) {
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
  if (v < T(-0.5) || v > T(size) - T(0.5)) return false;
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

// Geometry of bin (i, j) of output channel c of roi r: valid axis samples and the offset cell.
template <typename T>
struct BinSamples {
  std::vector<Axis<T>> ay, ax;
  int ny = 0, nx = 0;
  int64_t plane = 0;     // flat index of the input plane read
  int64_t off_cell = -1;  // index of t_x in offset (t_y is + Ph*Pw); -1 without offsets
  T scale_x = 0, scale_y = 0;  // d x / d t_x = gamma * roi_w
};

template <typename T>
inline void bin_samples(const RoiArgs& a, const T* rois, const T* offset, int64_t r, int64_t c, int64_t i, int64_t j,
                        BinSamples<T>& b) {
  const T* roi = rois + r * 5;
  const int64_t batch = static_cast<int64_t>(roi[0]);
  const auto g = dcn::roi_geometry<T>(roi[1], roi[2], roi[3], roi[4], T(a.spatial_scale), static_cast<int>(a.ph),
                                      static_cast<int>(a.pw));
  T shift_x = 0, shift_y = 0;
  b.off_cell = -1;
  if (a.has_offset) {
    const int64_t cls = c / (a.Cout / a.n_cls);
    const int64_t pi = (i * a.Ph) / a.ph, pj = (j * a.Pw) / a.pw;
    b.off_cell = ((r * a.n_cls + cls) * 2 * a.Ph + pi) * a.Pw + pj;
    const T tx = offset[b.off_cell], ty = offset[b.off_cell + a.Ph * a.Pw];
    shift_x = T(a.gamma) * tx * g.roi_w;
    shift_y = T(a.gamma) * ty * g.roi_h;
    b.scale_x = T(a.gamma) * g.roi_w;
    b.scale_y = T(a.gamma) * g.roi_h;
  }
  const int64_t in_c = a.ps ? (c * a.ph + i) * a.pw + j : c;
  b.plane = (batch * a.Cin + in_c) * a.H * a.W;
  const T sub_w = g.bin_w / T(a.S), sub_h = g.bin_h / T(a.S);
  const T base_x = (T(j) * g.bin_w + g.start_x) + shift_x;
  const T base_y = (T(i) * g.bin_h + g.start_y) + shift_y;
  b.nx = b.ny = 0;
  for (int64_t u = 0; u < a.S; ++u) {
    if (roi_axis<T>(base_x + T(u) * sub_w, static_cast<int>(a.W), b.ax[b.nx])) ++b.nx;
    if (roi_axis<T>(base_y + T(u) * sub_h, static_cast<int>(a.H), b.ay[b.ny])) ++b.ny;
  }
}

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

template <typename T>
void roi_forward_impl(const RoiArgs& a, const Tensor& input, const Tensor& rois, const Tensor& offset, Tensor& out) {
  const T* X = input.data_ptr<T>();
  const T* R = rois.data_ptr<T>();
  const T* OFF = a.has_offset ? offset.data_ptr<T>() : nullptr;
  T* Y = out.data_ptr<T>();
  const int64_t W = a.W;
  at::parallel_for(0, a.K * a.Cout, 1, [&](int64_t b0, int64_t b1) {
    BinSamples<T> b;
    b.ax.resize(a.S);
    b.ay.resize(a.S);
    for (int64_t rc = b0; rc < b1; ++rc) {
      const int64_t r = rc / a.Cout, c = rc % a.Cout;
      for (int64_t i = 0; i < a.ph; ++i) {
        for (int64_t j = 0; j < a.pw; ++j) {
          bin_samples<T>(a, R, OFF, r, c, i, j, b);
          T total = 0;
          const T* P = X + b.plane;
          for (int v = 0; v < b.ny; ++v) {
            const Axis<T>& ay = b.ay[v];
            const T ly = ay.frac, hy = T(1) - ly;
            const T* r0 = P + ay.lo * W;
            const T* r1 = P + ay.hi * W;
            for (int u = 0; u < b.nx; ++u) {
              const Axis<T>& ax = b.ax[u];
              const T lx = ax.frac, hx = T(1) - lx;
              total += hy * hx * r0[ax.lo] + hy * lx * r0[ax.hi] + ly * hx * r1[ax.lo] + ly * lx * r1[ax.hi];
            }
          }
          const int count = b.nx * b.ny;
          Y[(rc * a.ph + i) * a.pw + j] = count > 0 ? total / T(count) : T(0);
        }
      }
    }
  });
}

template <typename T>
void roi_backward_impl(const RoiArgs& a, const Tensor& grad_out, const Tensor& input, const Tensor& rois,
                       const Tensor& offset, Tensor& grad_input, Tensor& grad_offset) {
  const T* X = input.data_ptr<T>();
  const T* R = rois.data_ptr<T>();
  const T* OFF = a.has_offset ? offset.data_ptr<T>() : nullptr;
  const T* GY = grad_out.data_ptr<T>();
  T* GX = grad_input.data_ptr<T>();
  const int64_t W = a.W;
  // Input gradient: output channel c writes only the input planes it reads (channel c, or the
  // ph*pw planes of c when position-sensitive), so threads split the output channels; each walks
  // the rois in order.
  at::parallel_for(0, a.Cout, 1, [&](int64_t c0, int64_t c1) {
    BinSamples<T> b;
    b.ax.resize(a.S);
    b.ay.resize(a.S);
    for (int64_t c = c0; c < c1; ++c) {
      for (int64_t r = 0; r < a.K; ++r) {
        for (int64_t i = 0; i < a.ph; ++i) {
          for (int64_t j = 0; j < a.pw; ++j) {
            const T g = GY[((r * a.Cout + c) * a.ph + i) * a.pw + j];
            bin_samples<T>(a, R, OFF, r, c, i, j, b);
            const int count = b.nx * b.ny;
            if (count == 0) continue;
            const T gc = g / T(count);
            T* P = GX + b.plane;
            for (int v = 0; v < b.ny; ++v) {
              const Axis<T>& ay = b.ay[v];
              const T ly = ay.frac, hy = T(1) - ly;
              T* r0 = P + ay.lo * W;
              T* r1 = P + ay.hi * W;
              for (int u = 0; u < b.nx; ++u) {
                const Axis<T>& ax = b.ax[u];
                const T lx = ax.frac, hx = T(1) - lx;
                r0[ax.lo] += gc * (hy * hx);
                r0[ax.hi] += gc * (hy * lx);
                r1[ax.lo] += gc * (ly * hx);
                r1[ax.hi] += gc * (ly * lx);
              }
            }
          }
        }
      }
    }
  });
  if (!a.has_offset) return;
  // Offset gradient: one roi's offsets are written by one thread.
  T* GO = grad_offset.data_ptr<T>();
  at::parallel_for(0, a.K, 1, [&](int64_t q0, int64_t q1) {
    BinSamples<T> b;
    b.ax.resize(a.S);
    b.ay.resize(a.S);
    for (int64_t r = q0; r < q1; ++r) {
      for (int64_t c = 0; c < a.Cout; ++c) {
        for (int64_t i = 0; i < a.ph; ++i) {
          for (int64_t j = 0; j < a.pw; ++j) {
            const T g = GY[((r * a.Cout + c) * a.ph + i) * a.pw + j];
            bin_samples<T>(a, R, OFF, r, c, i, j, b);
            const int count = b.nx * b.ny;
            if (count == 0) continue;
            const T* P = X + b.plane;
            T sx = 0, sy = 0;
            for (int v = 0; v < b.ny; ++v) {
              const Axis<T>& ay = b.ay[v];
              const T ly = ay.frac, hy = T(1) - ly;
              const T* r0 = P + ay.lo * W;
              const T* r1 = P + ay.hi * W;
              for (int u = 0; u < b.nx; ++u) {
                const Axis<T>& ax = b.ax[u];
                const T lx = ax.frac, hx = T(1) - lx;
                const T v00 = r0[ax.lo], v01 = r0[ax.hi], v10 = r1[ax.lo], v11 = r1[ax.hi];
                // dcn::roi_corners' derivatives: dw/dx = sx * wy, dw/dy = sy * wx.
                sx += hy * (v01 - v00) + ly * (v11 - v10);
                sy += hx * (v10 - v00) + lx * (v11 - v01);
              }
            }
            const T gc = g / T(count);
            GO[b.off_cell] += gc * sx * b.scale_x;
            GO[b.off_cell + a.Ph * a.Pw] += gc * sy * b.scale_y;
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
  Tensor out = at::zeros({a.K, a.Cout, a.ph, a.pw}, input.options());
  if (out.numel() == 0) return out;
  Tensor off = offset ? *offset : Tensor();
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnbench_roi_pool_forward", [&] {
    roi_forward_impl<scalar_t>(a, input, rois, off, out);
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
  Tensor grad_input = at::zeros_like(input);
  Tensor grad_offset = offset ? at::zeros_like(*offset) : Tensor();
  if (a.K > 0 && a.Cout > 0) {
    Tensor off = offset ? *offset : Tensor();
    AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "dcnbench_roi_pool_backward", [&] {
      roi_backward_impl<scalar_t>(a, grad_out, input, rois, off, grad_input, grad_offset);
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
}
