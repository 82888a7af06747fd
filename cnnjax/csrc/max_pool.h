// The max-pooling loops of onednn.cc (see there: PoolForward, PoolBackward), included there
// twice, in two namespaces, to compile them for two instruction sets. T is F32 or BF16; all
// arrays NHWC: x, dx [n, h, w, c], y, dy [n, ho, wo, c].
struct MaxPoolLoops {
  template <typename T>
  static void Forward(const typename T::Storage* x, typename T::Storage* y, int64_t n,
                      int64_t h, int64_t w, int64_t c, int64_t ho, int64_t wo, PoolWindow win) {
    const int64_t k = win.k;
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t b = 0; b < n; ++b) {
      for (int64_t i = 0; i < ho; ++i) {
        for (int64_t j = 0; j < wo; ++j) {
          typename T::Storage* out = y + ((b * ho + i) * wo + j) * c;
          const int64_t row = i * win.s - win.top, col = j * win.s - win.left;
          bool first = true;
          for (int64_t v = 0; v < k * k; ++v) {
            const int64_t r = row + v / k, cl = col + v % k;
            if (r < 0 || r >= h || cl < 0 || cl >= w) continue;
            const typename T::Storage* view = x + ((b * h + r) * w + cl) * c;
            if (first) {
              std::memcpy(out, view, c * sizeof *out);
              first = false;
              continue;
            }
#pragma omp simd
            for (int64_t ch = 0; ch < c; ++ch) {
              const float m = T::Get(out[ch]), a = T::Get(view[ch]);
              out[ch] = (a > m || a != a) ? view[ch] : out[ch];
            }
          }
          if (first) {  // a window wholly in the padding: -inf, as reduce_window's
            for (int64_t ch = 0; ch < c; ++ch) out[ch] = T::Put(-INFINITY);
          }
        }
      }
    }
  }

  template <typename T>
  static void BackwardFirst(const typename T::Storage* x, const typename T::Storage* y,
                            const typename T::Storage* dy, typename T::Storage* dx, int64_t n,
                            int64_t h, int64_t w, int64_t c, int64_t ho, int64_t wo,
                            PoolWindow win) {
    const int64_t k = win.k;
#pragma omp parallel
    {
      // One image's dx summed in float32 (windows overlap), and per output pixel which
      // channels have found their maximum.
      std::vector<float> sum(h * w * c), found(c), top(c), grad(c);
#pragma omp for schedule(static)
      for (int64_t b = 0; b < n; ++b) {
        std::fill(sum.begin(), sum.end(), 0.0f);
        for (int64_t i = 0; i < ho; ++i) {
          for (int64_t j = 0; j < wo; ++j) {
            const int64_t out = ((b * ho + i) * wo + j) * c;
#pragma omp simd
            for (int64_t ch = 0; ch < c; ++ch) {
              top[ch] = T::Get(y[out + ch]), grad[ch] = T::Get(dy[out + ch]), found[ch] = 0.0f;
            }
            const int64_t row = i * win.s - win.top, col = j * win.s - win.left;
            for (int64_t v = 0; v < k * k; ++v) {
              const int64_t r = row + v / k, cl = col + v % k;
              if (r < 0 || r >= h || cl < 0 || cl >= w) continue;
              const typename T::Storage* xp = x + ((b * h + r) * w + cl) * c;
              float* sp = sum.data() + (r * w + cl) * c;
#pragma omp simd
              for (int64_t ch = 0; ch < c; ++ch) {  // bitwise, not short-circuit: vectorised
                const float a = T::Get(xp[ch]), t = top[ch], g = grad[ch], f = found[ch];
                const bool hit = (f == 0.0f) & ((a == t) | ((a != a) & (t != t)));
                const float add = hit ? g : 0.0f, seen = hit ? 1.0f : 0.0f;
                sp[ch] = sp[ch] + add;
                found[ch] = f + seen;
              }
            }
          }
        }
        typename T::Storage* dxp = dx + b * h * w * c;
#pragma omp simd
        for (int64_t e = 0; e < h * w * c; ++e) dxp[e] = T::Put(sum[e]);
      }
    }
  }

  template <typename T>
  static void Backward(const typename T::Storage* x, const typename T::Storage* y,
                       const typename T::Storage* dy, void* dx_data, int64_t n, int64_t h,
                       int64_t w, int64_t c, int64_t k) {
    using S = typename T::Storage;
    using B = typename T::Bits;  // dx written as bits: a select the compiler vectorizes
    B* const dx = static_cast<B*>(dx_data);
    const int64_t ho = h / k, wo = w / k;
    if (ho * k != h || wo * k != w) std::memset(dx, 0, n * h * w * c * sizeof *dx);
#pragma omp parallel
    {
      std::vector<float> top(c), ties(c);  // per output pixel: y and its number of ties
      std::vector<B> share(c);  // dy / ties
#pragma omp for collapse(2) schedule(static)
      for (int64_t b = 0; b < n; ++b) {
        for (int64_t i = 0; i < ho; ++i) {
          for (int64_t j = 0; j < wo; ++j) {
            const S* yp = y + ((b * ho + i) * wo + j) * c;
            const S* dyp = dy + ((b * ho + i) * wo + j) * c;
            const int64_t corner = ((b * h + i * k) * w + j * k) * c;
#pragma omp simd
            for (int64_t ch = 0; ch < c; ++ch) top[ch] = T::Get(yp[ch]), ties[ch] = 0.0f;
            for (int64_t v = 0; v < k * k; ++v) {
              const S* xp = x + corner + (v / k * w + v % k) * c;
#pragma omp simd
              for (int64_t ch = 0; ch < c; ++ch) {
                ties[ch] += T::Get(xp[ch]) == top[ch] ? 1.0f : 0.0f;
              }
            }
#pragma omp simd
            for (int64_t ch = 0; ch < c; ++ch) {
              const S value = T::Put(T::Get(dyp[ch]) / ties[ch]);
              std::memcpy(&share[ch], &value, sizeof value);
            }
            for (int64_t v = 0; v < k * k; ++v) {
              const int64_t off = corner + (v / k * w + v % k) * c;
#pragma omp simd
              for (int64_t ch = 0; ch < c; ++ch) {
                dx[off + ch] = share[ch] & -static_cast<B>(T::Get(x[off + ch]) == top[ch]);
              }
            }
          }
        }
      }
    }
  }
};
