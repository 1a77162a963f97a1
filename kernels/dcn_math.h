// Per-sample math of the deformable operators, shared by the native CPU kernels
// (dcnbench/csrc) and the CUDA kernels (kernels/*.cu): every CPU test exercises the
// arithmetic the GPU runs. Semantics: shared/notes/operator-semantics.md.
//
// Plain C++ with no dependencies; functions are __host__ __device__ under nvcc/NVRTC.
#pragma once

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define DCN_HD __host__ __device__ __forceinline__
#else
#include <cmath>
#define DCN_HD inline
#endif

namespace dcn {

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
template <typename T> DCN_HD T floor_(T v) { return floor(v); }
template <typename T> DCN_HD T ceil_(T v) { return ceil(v); }
template <typename T> DCN_HD T round_(T v) { return round(v); }
#else
template <typename T> DCN_HD T floor_(T v) { return std::floor(v); }
template <typename T> DCN_HD T ceil_(T v) { return std::ceil(v); }
template <typename T> DCN_HD T round_(T v) { return std::round(v); }
#endif
template <typename T> DCN_HD T max_(T a, T b) { return a > b ? a : b; }
template <typename T> DCN_HD T min_(T a, T b) { return a < b ? a : b; }

// Four bilinear corners of a sample: flat index y*W + x into one H*W plane and weight; a corner
// off the map has index kOffMap (never read it: a NaN or inf there must not reach the result
// through a zero weight) and weight 0. dwdy/dwdx are the derivatives of each weight with respect
// to the sample's y and x. has_value is false where the value is 0 without reading any corner
// (torchvision's rule at y == -1 or x == -1 exactly), although the derivatives read them.
constexpr int kOffMap = -1;

template <typename T>
struct Corners {
  int index[4];
  T weight[4];
  T dwdy[4];
  T dwdx[4];
  bool has_value;
};

// Deformable convolution sampling (torchvision's rule): zero padding per corner, the floor
// corner weighted by 1 - frac. Order: (y0,x0), (y0,x0+1), (y0+1,x0), (y0+1,x0+1).
// Returns false when every corner is off the map (y or x outside [-1, size)): value and
// derivatives are zero. At y == -1 exactly the value is 0 (has_value false) but dw/dy is not
// (one-sided).
template <typename T>
DCN_HD bool conv_corners(T y, T x, int height, int width, Corners<T>& c) {
  if (!(y >= T(-1) && y < T(height) && x >= T(-1) && x < T(width))) return false;
  c.has_value = y > T(-1) && x > T(-1);
  const T fy = floor_(y), fx = floor_(x);
  const int y0 = int(fy), x0 = int(fx);
  const T ly = y - fy, lx = x - fx, hy = T(1) - ly, hx = T(1) - lx;
  const int ys[4] = {y0, y0, y0 + 1, y0 + 1};
  const int xs[4] = {x0, x0 + 1, x0, x0 + 1};
  const T wy[4] = {hy, hy, ly, ly};
  const T wx[4] = {hx, lx, hx, lx};
  const T sy[4] = {T(-1), T(-1), T(1), T(1)};
  const T sx[4] = {T(-1), T(1), T(-1), T(1)};
  for (int k = 0; k < 4; ++k) {
    const bool inside = ys[k] >= 0 && ys[k] < height && xs[k] >= 0 && xs[k] < width;
    c.index[k] = inside ? ys[k] * width + xs[k] : kOffMap;
    c.weight[k] = inside ? wy[k] * wx[k] : T(0);
    c.dwdy[k] = inside ? sy[k] * wx[k] : T(0);
    c.dwdx[k] = inside ? sx[k] * wy[k] : T(0);
  }
  return true;
}

// Geometry of one RoI for deformable (PS) RoI pooling, in feature-map pixels.
template <typename T>
struct RoiGeometry {
  T start_x, start_y, roi_w, roi_h, bin_w, bin_h;
};

template <typename T>
DCN_HD RoiGeometry<T> roi_geometry(T x1, T y1, T x2, T y2, T spatial_scale, int pooled_h, int pooled_w) {
  RoiGeometry<T> g;
  g.start_x = round_(x1) * spatial_scale - T(0.5);
  g.start_y = round_(y1) * spatial_scale - T(0.5);
  g.roi_w = max_((round_(x2) + T(1)) * spatial_scale - T(0.5) - g.start_x, T(0.1));
  g.roi_h = max_((round_(y2) + T(1)) * spatial_scale - T(0.5) - g.start_y, T(0.1));
  g.bin_w = g.roi_w / T(pooled_w);
  g.bin_h = g.roi_h / T(pooled_h);
  return g;
}

// One RoI-pooling sample (the released operator's rule): skipped (false) outside
// [-0.5, W-0.5] x [-0.5, H-0.5], NaN included; else clamped into the map and interpolated from the
// floor/ceil corners. Order: (y0,x0), (y0,x1), (y1,x0), (y1,x1). Derivatives are those of the
// clamped formula (zero at integer and clamped coordinates, where floor == ceil).
template <typename T>
DCN_HD bool roi_corners(T y, T x, int height, int width, Corners<T>& c) {
  if (!(x >= T(-0.5) && x <= T(width) - T(0.5) && y >= T(-0.5) && y <= T(height) - T(0.5))) return false;
  x = min_(max_(x, T(0)), T(width - 1));
  y = min_(max_(y, T(0)), T(height - 1));
  c.has_value = true;  // every corner on the map
  const T fy = floor_(y), fx = floor_(x);
  const int y0 = int(fy), x0 = int(fx), y1 = int(ceil_(y)), x1 = int(ceil_(x));
  const T ly = y - fy, lx = x - fx, hy = T(1) - ly, hx = T(1) - lx;
  const int ys[4] = {y0, y0, y1, y1};
  const int xs[4] = {x0, x1, x0, x1};
  const T wy[4] = {hy, hy, ly, ly};
  const T wx[4] = {hx, lx, hx, lx};
  const T sy[4] = {T(-1), T(-1), T(1), T(1)};
  const T sx[4] = {T(-1), T(1), T(-1), T(1)};
  for (int k = 0; k < 4; ++k) {
    c.index[k] = ys[k] * width + xs[k];
    c.weight[k] = wy[k] * wx[k];
    c.dwdy[k] = sy[k] * wx[k];
    c.dwdx[k] = sx[k] * wy[k];
  }
  return true;
}

}  // namespace dcn
