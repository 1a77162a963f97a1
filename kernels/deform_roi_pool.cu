// Deformable RoI pooling and deformable position-sensitive RoI pooling: forward, and backward to
// the input (atomic, or gather over a sorted inverse index in deterministic mode) and to the
// offsets (per-bin values, reduced over channels and bins by the host: no atomics). Semantics: the
// released operator's (shared/notes/operator-semantics.md); the per-sample math is
// dcn::roi_geometry and dcn::roi_corners from dcn_math.h.
//
// Shapes:
//   input  (N, in_channels, height, width)
//   rois   (K, 5) [batch index, x1, y1, x2, y2] in the accumulation type
//   offset (K, 2 * classes, parts_h, parts_w), channel 2c = x and 2c+1 = y of offset class c; or null
//   output (K, out_channels, pooled_h, pooled_w)
// Output channel c uses offset class c / (out_channels / classes) and reads input channel
// (c * pooled_h + i) * pooled_w + j when position_sensitive, else c.
#include "dcn_cuda.cuh"

namespace dcn {

// Where the samples of bin (i, j) of RoI k under offset class cls lie.
template <typename A>
struct RoiBin {
  index_t batch;
  A x, y;            // first sample; sample (sy, sx) is at (y + sy * sub_h, x + sx * sub_w)
  A sub_w, sub_h;
  A dx_dt, dy_dt;    // d(sample x)/d(offset x) = gamma * roi_w; same for y
};

template <typename T, typename A>
DCN_DEVICE RoiBin<A> roi_bin(const A* rois, const T* offset, index_t k, index_t cls, index_t i, index_t j,
                             index_t classes, index_t pooled_h, index_t pooled_w, index_t parts_h, index_t parts_w,
                             index_t samples, double spatial_scale, double gamma) {
  const A* roi = rois + k * 5;
  RoiBin<A> bin;
  bin.batch = index_t(roi[0]);
  const RoiGeometry<A> g = roi_geometry<A>(roi[1], roi[2], roi[3], roi[4], A(spatial_scale), int(pooled_h),
                                           int(pooled_w));
  A shift_x = A(0), shift_y = A(0);
  if (offset != nullptr) {
    const index_t pi = i * parts_h / pooled_h, pj = j * parts_w / pooled_w;
    const index_t base = ((k * classes + cls) * 2 * parts_h + pi) * parts_w + pj;
    shift_x = A(gamma) * load<A>(offset, base) * g.roi_w;
    shift_y = A(gamma) * load<A>(offset, base + parts_h * parts_w) * g.roi_h;
  }
  bin.x = A(j) * g.bin_w + g.start_x + shift_x;
  bin.y = A(i) * g.bin_h + g.start_y + shift_y;
  bin.sub_w = g.bin_w / A(samples);
  bin.sub_h = g.bin_h / A(samples);
  bin.dx_dt = A(gamma) * g.roi_w;
  bin.dy_dt = A(gamma) * g.roi_h;
  return bin;
}

// Output element idx = ((k * out_channels + c) * pooled_h + i) * pooled_w + j: its bin, and through
// `channel` the input channel it reads.
template <typename T, typename A>
DCN_DEVICE RoiBin<A> output_bin(index_t idx, const A* rois, const T* offset, index_t out_channels, index_t classes,
                                index_t pooled_h, index_t pooled_w, index_t parts_h, index_t parts_w,
                                index_t samples, bool position_sensitive, double spatial_scale, double gamma,
                                index_t& channel) {
  const index_t j = idx % pooled_w;
  const index_t i = (idx / pooled_w) % pooled_h;
  const index_t c = (idx / (pooled_w * pooled_h)) % out_channels;
  const index_t k = idx / (pooled_w * pooled_h * out_channels);
  channel = position_sensitive ? (c * pooled_h + i) * pooled_w + j : c;
  return roi_bin<T, A>(rois, offset, k, c / (out_channels / classes), i, j, classes, pooled_h, pooled_w, parts_h,
                       parts_w, samples, spatial_scale, gamma);
}

template <typename A>
DCN_DEVICE index_t roi_valid_samples(const RoiBin<A>& bin, index_t samples, int height, int width) {
  index_t count = 0;
  Corners<A> cs;
  for (index_t sy = 0; sy < samples; ++sy) {
    for (index_t sx = 0; sx < samples; ++sx) {
      count += roi_corners<A>(bin.y + A(sy) * bin.sub_h, bin.x + A(sx) * bin.sub_w, height, width, cs) ? 1 : 0;
    }
  }
  return count;
}

}  // namespace dcn

// One thread per output element (k, c, i, j): mean of the valid bilinear samples of the bin.
template <typename T>
__global__ void dcn_roi_pool_forward(const T* __restrict__ input, const typename dcn::Acc<T>::type* __restrict__ rois,
                                     const T* __restrict__ offset, T* __restrict__ output, long long num_rois,
                                     long long in_channels, long long height, long long width, long long out_channels,
                                     long long pooled_h, long long pooled_w, long long samples, long long classes,
                                     long long parts_h, long long parts_w, long long position_sensitive,
                                     double spatial_scale, double gamma) {
  using namespace dcn;
  typedef typename Acc<T>::type A;
  const index_t hw = height * width;
  DCN_KERNEL_LOOP(idx, num_rois * out_channels * pooled_h * pooled_w) {
    index_t channel;
    const RoiBin<A> bin = output_bin<T, A>(idx, rois, offset, out_channels, classes, pooled_h, pooled_w, parts_h,
                                           parts_w, samples, position_sensitive, spatial_scale, gamma, channel);
    const T* plane = input + (bin.batch * in_channels + channel) * hw;
    A sum = A(0);
    index_t count = 0;
    Corners<A> cs;
    for (index_t sy = 0; sy < samples; ++sy) {
      const A y = bin.y + A(sy) * bin.sub_h;
      for (index_t sx = 0; sx < samples; ++sx) {
        if (!roi_corners<A>(y, bin.x + A(sx) * bin.sub_w, int(height), int(width), cs)) continue;
        ++count;
        for (int q = 0; q < 4; ++q) sum += cs.weight[q] * load<A>(plane, cs.index[q]);
      }
    }
    store(output, idx, count > 0 ? sum / A(count) : A(0));
  }
}

// One thread per output element (k, c, i, j). Input gradient by atomics into grad_input (the
// accumulation type, zeroed) unless grad_input is null (deterministic mode gathers it instead);
// with offsets, grad_shift[idx, 0/1] = d loss / d offset_{x/y} of this bin alone (the host sums
// them over the class's channels and over the bins of each part).
template <typename T>
__global__ void dcn_roi_pool_backward(const T* __restrict__ grad_output, const T* __restrict__ input,
                                      const typename dcn::Acc<T>::type* __restrict__ rois,
                                      const T* __restrict__ offset, typename dcn::Acc<T>::type* __restrict__ grad_input,
                                      typename dcn::Acc<T>::type* __restrict__ grad_shift, long long num_rois,
                                      long long in_channels, long long height, long long width,
                                      long long out_channels, long long pooled_h, long long pooled_w,
                                      long long samples, long long classes, long long parts_h, long long parts_w,
                                      long long position_sensitive, double spatial_scale, double gamma) {
  using namespace dcn;
  typedef typename Acc<T>::type A;
  const index_t hw = height * width;
  DCN_KERNEL_LOOP(idx, num_rois * out_channels * pooled_h * pooled_w) {
    index_t channel;
    const RoiBin<A> bin = output_bin<T, A>(idx, rois, offset, out_channels, classes, pooled_h, pooled_w, parts_h,
                                           parts_w, samples, position_sensitive, spatial_scale, gamma, channel);
    const index_t count = roi_valid_samples<A>(bin, samples, int(height), int(width));
    A grad_x = A(0), grad_y = A(0);
    if (count > 0) {
      const T* plane = input + (bin.batch * in_channels + channel) * hw;
      A* grad_plane = grad_input != nullptr ? grad_input + (bin.batch * in_channels + channel) * hw : nullptr;
      const A grad = load<A>(grad_output, idx) / A(count);
      Corners<A> cs;
      for (index_t sy = 0; sy < samples; ++sy) {
        const A y = bin.y + A(sy) * bin.sub_h;
        for (index_t sx = 0; sx < samples; ++sx) {
          if (!roi_corners<A>(y, bin.x + A(sx) * bin.sub_w, int(height), int(width), cs)) continue;
          for (int q = 0; q < 4; ++q) {
            if (grad_plane != nullptr) atomicAdd(grad_plane + cs.index[q], cs.weight[q] * grad);
            if (offset != nullptr) {
              const A v = load<A>(plane, cs.index[q]);
              grad_x += cs.dwdx[q] * v;
              grad_y += cs.dwdy[q] * v;
            }
          }
        }
      }
      grad_x *= grad * bin.dx_dt;
      grad_y *= grad * bin.dy_dt;
    }
    if (offset != nullptr) {
      grad_shift[2 * idx] = grad_x;
      grad_shift[2 * idx + 1] = grad_y;
    }
  }
}

// Deterministic input gradient, step 1: one thread per sample position (k, cls, i, j) writes the
// four corner entries of each of its samples. Entry e = ((p * samples^2 + s) * 4 + q) for position
// p = ((k * classes + cls) * pooled_h + i) * pooled_w + j gets key
// ((batch * classes + cls) * bins + bin) * H * W + pixel, with bins = pooled_h * pooled_w and
// bin = i * pooled_w + j when position-sensitive (else bins = 1, bin = 0), or `sentinel` for an
// invalid sample; and coefficient weight_q / valid samples.
template <typename T>
__global__ void dcn_roi_pool_entries(const typename dcn::Acc<T>::type* __restrict__ rois,
                                     const T* __restrict__ offset, long long* __restrict__ keys,
                                     typename dcn::Acc<T>::type* __restrict__ coefs, long long num_rois,
                                     long long height, long long width, long long pooled_h, long long pooled_w,
                                     long long samples, long long classes, long long parts_h, long long parts_w,
                                     long long position_sensitive, double spatial_scale, double gamma,
                                     long long sentinel) {
  using namespace dcn;
  typedef typename Acc<T>::type A;
  const index_t hw = height * width;
  const index_t bins = position_sensitive ? pooled_h * pooled_w : 1;
  DCN_KERNEL_LOOP(idx, num_rois * classes * pooled_h * pooled_w) {
    const index_t j = idx % pooled_w;
    const index_t i = (idx / pooled_w) % pooled_h;
    const index_t cls = (idx / (pooled_w * pooled_h)) % classes;
    const index_t k = idx / (pooled_w * pooled_h * classes);
    const RoiBin<A> bin = roi_bin<T, A>(rois, offset, k, cls, i, j, classes, pooled_h, pooled_w, parts_h, parts_w,
                                        samples, spatial_scale, gamma);
    const index_t count = roi_valid_samples<A>(bin, samples, int(height), int(width));
    const index_t segment_base = ((bin.batch * classes + cls) * bins + (position_sensitive ? i * pooled_w + j : 0)) * hw;
    Corners<A> cs;
    for (index_t sy = 0; sy < samples; ++sy) {
      const A y = bin.y + A(sy) * bin.sub_h;
      for (index_t sx = 0; sx < samples; ++sx) {
        const index_t e = ((idx * samples + sy) * samples + sx) * 4;
        const bool valid = roi_corners<A>(y, bin.x + A(sx) * bin.sub_w, int(height), int(width), cs);
        for (int q = 0; q < 4; ++q) {
          keys[e + q] = valid ? segment_base + cs.index[q] : sentinel;
          coefs[e + q] = valid ? cs.weight[q] / A(count) : A(0);
        }
      }
    }
  }
}

// Deterministic input gradient, step 2: one thread per input element (b, channel, pixel) sums its
// segment's entries in sorted order (order[e]: entry index; starts: segment ranges).
template <typename T>
__global__ void dcn_roi_pool_gather(const T* __restrict__ grad_output, const long long* __restrict__ order,
                                    const long long* __restrict__ starts,
                                    const typename dcn::Acc<T>::type* __restrict__ coefs,
                                    typename dcn::Acc<T>::type* __restrict__ grad_input, long long batch,
                                    long long in_channels, long long height, long long width, long long out_channels,
                                    long long pooled_h, long long pooled_w, long long samples, long long classes,
                                    long long position_sensitive) {
  using namespace dcn;
  typedef typename Acc<T>::type A;
  const index_t hw = height * width;
  const index_t bins = position_sensitive ? pooled_h * pooled_w : 1;
  const index_t entries_per_position = samples * samples * 4;
  DCN_KERNEL_LOOP(idx, batch * in_channels * hw) {
    const index_t pixel = idx % hw;
    const index_t channel = (idx / hw) % in_channels;
    const index_t b = idx / (hw * in_channels);
    const index_t c = position_sensitive ? channel / (pooled_h * pooled_w) : channel;
    const index_t bin = position_sensitive ? channel % (pooled_h * pooled_w) : 0;
    const index_t cls = c / (out_channels / classes);
    const index_t segment = ((b * classes + cls) * bins + bin) * hw + pixel;
    A sum = A(0);
    for (index_t e = starts[segment]; e < starts[segment + 1]; ++e) {
      const index_t entry = order[e];
      const index_t position = entry / entries_per_position;  // ((k * classes + cls) * ph + i) * pw + j
      const index_t j = position % pooled_w;
      const index_t i = (position / pooled_w) % pooled_h;
      const index_t k = position / (pooled_w * pooled_h * classes);
      sum += coefs[entry] * load<A>(grad_output, ((k * out_channels + c) * pooled_h + i) * pooled_w + j);
    }
    grad_input[idx] = sum;
  }
}
