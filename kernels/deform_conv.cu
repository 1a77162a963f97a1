// Deformable convolution (v1, and v2 with a mask): deformable im2col for the forward pass and the
// weight gradient, col2im for the input gradient (atomic, or gather over a sorted inverse index in
// deterministic mode), col2im-coord for the offset and mask gradients. The GEMMs run in torch
// (cuBLAS). Semantics: torchvision.ops.deform_conv2d (shared/notes/operator-semantics.md); the
// per-sample math is dcn::conv_corners from dcn_math.h.
//
// Shapes, for a chunk of `batch` images:
//   input   (batch, channels, height, width)
//   offset  (batch, offset_groups * taps * 2, out_h, out_w); tap k: channel 2k = dy, 2k+1 = dx
//   mask    (batch, offset_groups * taps, out_h, out_w), or null (v1)
//   columns (batch, channels, taps, out_h * out_w)   [= (batch, groups, C/groups * taps, L)]
// with taps = kernel_h * kernel_w, L = out_h * out_w. Sample of output l = (ho, wo), tap (i, j):
//   y = ho * stride_h - pad_h + i * dil_h + dy,  x = wo * stride_w - pad_w + j * dil_w + dx.
#include "dcn_cuda.cuh"

namespace dcn {

// Sampling position of (offset group block `off`, tap k, output l) in accumulation type.
template <typename T, typename A>
DCN_DEVICE void conv_sample(const T* off, index_t k, index_t l, index_t L, index_t kernel_w, index_t out_w,
                            index_t stride_h, index_t stride_w, index_t pad_h, index_t pad_w, index_t dil_h,
                            index_t dil_w, A& y, A& x) {
  const index_t i = k / kernel_w, j = k % kernel_w;
  const index_t ho = l / out_w, wo = l % out_w;
  y = A(ho * stride_h - pad_h + i * dil_h) + load<A>(off, (2 * k) * L + l);
  x = A(wo * stride_w - pad_w + j * dil_w) + load<A>(off, (2 * k + 1) * L + l);
}

}  // namespace dcn

// columns[b, c, k, l] = mask[b, g(c), k, l] * bilinear(input[b, c], y, x). One thread per (b, c, l).
template <typename T>
__global__ void dcn_im2col(const T* __restrict__ input, const T* __restrict__ offset, const T* __restrict__ mask,
                           T* __restrict__ columns, long long batch, long long channels, long long height,
                           long long width, long long offset_groups, long long kernel_h, long long kernel_w,
                           long long stride_h, long long stride_w, long long pad_h, long long pad_w, long long dil_h,
                           long long dil_w, long long out_h, long long out_w) {
  using namespace dcn;
  typedef typename Acc<T>::type A;
  const index_t L = out_h * out_w, taps = kernel_h * kernel_w, hw = height * width;
  const index_t per_group = channels / offset_groups;
  DCN_KERNEL_LOOP(idx, batch * channels * L) {
    const index_t l = idx % L;
    const index_t c = (idx / L) % channels;
    const index_t b = idx / (L * channels);
    const index_t bg = b * offset_groups + c / per_group;
    const T* plane = input + (b * channels + c) * hw;
    const T* off = offset + bg * taps * 2 * L;
    T* col = columns + (b * channels + c) * taps * L + l;
    for (index_t k = 0; k < taps; ++k) {
      A y, x;
      conv_sample<T, A>(off, k, l, L, kernel_w, out_w, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, y, x);
      A value = A(0);
      Corners<A> cs;
      if (conv_corners<A>(y, x, int(height), int(width), cs) && cs.has_value) {
        for (int q = 0; q < 4; ++q) {
          if (cs.index[q] != kOffMap) value += cs.weight[q] * load<A>(plane, cs.index[q]);
        }
      }
      if (mask != nullptr) value *= load<A>(mask, (bg * taps + k) * L + l);
      store(col, k * L, value);
    }
  }
}

// grad_input[b, c] += mask * weight_q * grad_columns[b, c, k, l] at the four corners (atomics).
// One thread per (b, c, k, l). grad_input is in the accumulation type and must be zeroed.
template <typename T>
__global__ void dcn_col2im(const T* __restrict__ grad_columns, const T* __restrict__ offset, const T* __restrict__ mask,
                           typename dcn::Acc<T>::type* __restrict__ grad_input, long long batch, long long channels,
                           long long height, long long width, long long offset_groups, long long kernel_h,
                           long long kernel_w, long long stride_h, long long stride_w, long long pad_h, long long pad_w,
                           long long dil_h, long long dil_w, long long out_h, long long out_w) {
  using namespace dcn;
  typedef typename Acc<T>::type A;
  const index_t L = out_h * out_w, taps = kernel_h * kernel_w, hw = height * width;
  const index_t per_group = channels / offset_groups;
  DCN_KERNEL_LOOP(idx, batch * channels * taps * L) {
    const index_t l = idx % L;
    const index_t k = (idx / L) % taps;
    const index_t c = (idx / (L * taps)) % channels;
    const index_t b = idx / (L * taps * channels);
    const index_t bg = b * offset_groups + c / per_group;
    A y, x;
    conv_sample<T, A>(offset + bg * taps * 2 * L, k, l, L, kernel_w, out_w, stride_h, stride_w, pad_h, pad_w, dil_h,
                      dil_w, y, x);
    Corners<A> cs;
    if (!conv_corners<A>(y, x, int(height), int(width), cs)) continue;
    A grad = load<A>(grad_columns, idx);
    if (mask != nullptr) grad *= load<A>(mask, (bg * taps + k) * L + l);
    A* plane = grad_input + (b * channels + c) * hw;
    for (int q = 0; q < 4; ++q) {
      if (cs.weight[q] != A(0)) atomicAdd(plane + cs.index[q], cs.weight[q] * grad);
    }
  }
}

// Offset and mask gradients: one thread per sample (b, g, k, l) sums over the group's channels;
// every output element is written by exactly one thread (no atomics). grad_offset (like offset)
// and grad_mask (like mask; may be null) are in the accumulation type.
template <typename T>
__global__ void dcn_col2im_coord(const T* __restrict__ grad_columns, const T* __restrict__ input,
                                 const T* __restrict__ offset, const T* __restrict__ mask,
                                 typename dcn::Acc<T>::type* __restrict__ grad_offset,
                                 typename dcn::Acc<T>::type* __restrict__ grad_mask, long long batch,
                                 long long channels, long long height, long long width, long long offset_groups,
                                 long long kernel_h, long long kernel_w, long long stride_h, long long stride_w,
                                 long long pad_h, long long pad_w, long long dil_h, long long dil_w, long long out_h,
                                 long long out_w) {
  using namespace dcn;
  typedef typename Acc<T>::type A;
  const index_t L = out_h * out_w, taps = kernel_h * kernel_w, hw = height * width;
  const index_t per_group = channels / offset_groups;
  DCN_KERNEL_LOOP(idx, batch * offset_groups * taps * L) {
    const index_t l = idx % L;
    const index_t k = (idx / L) % taps;
    const index_t bg = idx / (L * taps);  // b * offset_groups + g
    const index_t b = bg / offset_groups, g = bg % offset_groups;
    A y, x;
    conv_sample<T, A>(offset + bg * taps * 2 * L, k, l, L, kernel_w, out_w, stride_h, stride_w, pad_h, pad_w, dil_h,
                      dil_w, y, x);
    A grad_y = A(0), grad_x = A(0), grad_m = A(0);
    Corners<A> cs;
    if (conv_corners<A>(y, x, int(height), int(width), cs)) {
      for (index_t cc = 0; cc < per_group; ++cc) {
        const index_t c = g * per_group + cc;
        const T* plane = input + (b * channels + c) * hw;
        const A grad = load<A>(grad_columns, ((b * channels + c) * taps + k) * L + l);
        A value = A(0), dvdy = A(0), dvdx = A(0);
        for (int q = 0; q < 4; ++q) {
          if (cs.index[q] == kOffMap) continue;
          const A v = load<A>(plane, cs.index[q]);
          value += cs.weight[q] * v;
          dvdy += cs.dwdy[q] * v;
          dvdx += cs.dwdx[q] * v;
        }
        grad_y += grad * dvdy;
        grad_x += grad * dvdx;
        if (cs.has_value) grad_m += grad * value;
      }
    }
    const A m = mask != nullptr ? load<A>(mask, idx) : A(1);
    A* goff = grad_offset + bg * taps * 2 * L;
    goff[(2 * k) * L + l] = grad_y * m;
    goff[(2 * k + 1) * L + l] = grad_x * m;
    if (grad_mask != nullptr) grad_mask[idx] = grad_m;
  }
}

// Deterministic input gradient, step 1: the four corner entries of every sample (b, g, k, l).
// Entry e = 4 * sample + q gets key (b * offset_groups + g) * H * W + pixel (or `sentinel` when the
// corner is off the map or has weight 0) and coefficient mask * weight_q. The host sorts the keys
// (stable) into segments, one per (b, g, pixel).
template <typename T>
__global__ void dcn_col2im_entries(const T* __restrict__ offset, const T* __restrict__ mask,
                                   long long* __restrict__ keys, typename dcn::Acc<T>::type* __restrict__ coefs,
                                   long long batch, long long height, long long width, long long offset_groups,
                                   long long kernel_h, long long kernel_w, long long stride_h, long long stride_w,
                                   long long pad_h, long long pad_w, long long dil_h, long long dil_w,
                                   long long out_h, long long out_w, long long sentinel) {
  using namespace dcn;
  typedef typename Acc<T>::type A;
  const index_t L = out_h * out_w, taps = kernel_h * kernel_w, hw = height * width;
  DCN_KERNEL_LOOP(idx, batch * offset_groups * taps * L) {
    const index_t l = idx % L;
    const index_t k = (idx / L) % taps;
    const index_t bg = idx / (L * taps);
    A y, x;
    conv_sample<T, A>(offset + bg * taps * 2 * L, k, l, L, kernel_w, out_w, stride_h, stride_w, pad_h, pad_w, dil_h,
                      dil_w, y, x);
    Corners<A> cs;
    const bool any = conv_corners<A>(y, x, int(height), int(width), cs);
    const A m = mask != nullptr ? load<A>(mask, idx) : A(1);
    for (int q = 0; q < 4; ++q) {
      const bool used = any && cs.weight[q] != A(0);
      keys[4 * idx + q] = used ? bg * hw + cs.index[q] : sentinel;
      coefs[4 * idx + q] = used ? cs.weight[q] * m : A(0);
    }
  }
}

// Deterministic input gradient, step 2: one thread per input element (b, c, pixel) sums, in the
// sorted order, the entries of its segment (b, g(c), pixel): order[e] is the entry index and
// starts[s]..starts[s+1] the range of segment s. Writes every element of grad_input.
template <typename T>
__global__ void dcn_col2im_gather(const T* __restrict__ grad_columns, const long long* __restrict__ order,
                                  const long long* __restrict__ starts,
                                  const typename dcn::Acc<T>::type* __restrict__ coefs,
                                  typename dcn::Acc<T>::type* __restrict__ grad_input, long long batch,
                                  long long channels, long long height, long long width, long long offset_groups,
                                  long long kernel_h, long long kernel_w, long long out_h, long long out_w) {
  using namespace dcn;
  typedef typename Acc<T>::type A;
  const index_t L = out_h * out_w, taps = kernel_h * kernel_w, hw = height * width;
  const index_t per_group = channels / offset_groups;
  DCN_KERNEL_LOOP(idx, batch * channels * hw) {
    const index_t pixel = idx % hw;
    const index_t c = (idx / hw) % channels;
    const index_t b = idx / (hw * channels);
    const index_t segment = (b * offset_groups + c / per_group) * hw + pixel;
    const T* grad_col = grad_columns + (b * channels + c) * taps * L;
    A sum = A(0);
    for (index_t e = starts[segment]; e < starts[segment + 1]; ++e) {
      const index_t entry = order[e];
      const index_t sample = entry / 4;  // (bg * taps + k) * L + l
      sum += coefs[entry] * load<A>(grad_col, sample % (taps * L));
    }
    grad_input[idx] = sum;
  }
}
