// The child network's batch norm + 2x2 max-pool + ReLU block as one pass forward and one
// backward (nos_gym/tasks/child_native.py is its Python side and documents it).
//
// Layout: channels-last (NHWC), contiguous. z, the convolution's output, and its gradient:
// (N, H, W, C); the pooled arrays (out, its gradient, argmax, zsel): (N, H/2, W/2, C).
// dtype 32: float, 16: bfloat16 (stored as uint16; the arithmetic is float, as torch's CPU
// kernels do it).
//
// Numbers: no contraction, no reassociation (-ffp-contract=off, no fast-math). Every
// per-channel sum runs over the pixels in order, in double, so a result is a fixed function
// of the inputs whatever vector width the compiler picks (vectors run across channels).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  uint32_t u = uint32_t(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {
  // round to nearest even, NaN to the canonical quiet NaN: c10::BFloat16's conversion, without a branch
  uint32_t u;
  std::memcpy(&u, &v, 4);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  p[i] = uint16_t(nan ? 0x7FC0u : rounded);
}

// v where t, else +0 (a select by bits: GCC keeps a float compare-and-select as a branch
// under -ftrapping-math, and a branch stops the loop from vectorising)
inline float keep_if(bool t, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u &= 0u - uint32_t(t);
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

constexpr int64_t STATS_RUN = 16;

struct Shape {
  int64_t N, H, W, C;
  int64_t pixels() const { return N * H * W; }
  int64_t pooled() const { return N * (H / 2) * (W / 2); }
  // offset of the top-left input pixel (times C) of pooled pixel q
  int64_t window(int64_t q) const {
    const int64_t Wo = W / 2, Ho = H / 2;
    const int64_t n = q / (Ho * Wo), r = q % (Ho * Wo);
    const int64_t oh = r / Wo, ow = r % Wo;
    return ((n * H + 2 * oh) * W + 2 * ow) * C;
  }
};

// y = z * a + b per channel, 2x2 max (first of ties; NaN wins, as ATen's max_pool2d), then
// ReLU (clamp_min(x, 0): NaN stays NaN); in training, the argmax (0..3, row-major in the
// window) and z there. Without branches in the channel loop, so that it vectorises.
template <typename T, bool TRAIN>
void affine_pool_relu(const T* __restrict z, const Shape& s, const float* __restrict a, const float* __restrict b,
                      T* __restrict out, uint8_t* __restrict argmax, T* __restrict zsel) {
  const int64_t C = s.C;
  for (int64_t q = 0; q < s.pooled(); ++q) {
    const T* __restrict z0 = z + s.window(q);
    const T* __restrict z1 = z0 + C;
    const T* __restrict z2 = z0 + s.W * C;
    const T* __restrict z3 = z2 + C;
    const int64_t at = q * C;
    T* __restrict o = out + at;
    for (int64_t c = 0; c < C; ++c) {
      const float x0 = load(z0, c), x1 = load(z1, c), x2 = load(z2, c), x3 = load(z3, c);
      float v0 = x0 * a[c], v1 = x1 * a[c], v2 = x2 * a[c], v3 = x3 * a[c];
      v0 = v0 + b[c];
      v1 = v1 + b[c];
      v2 = v2 + b[c];
      v3 = v3 + b[c];
      float m = v0, x = x0;
      int32_t k = 0;
      const bool t1 = (v1 > m) | (v1 != v1);
      m = t1 ? v1 : m;
      x = t1 ? x1 : x;
      k = t1 ? 1 : k;
      const bool t2 = (v2 > m) | (v2 != v2);
      m = t2 ? v2 : m;
      x = t2 ? x2 : x;
      k = t2 ? 2 : k;
      const bool t3 = (v3 > m) | (v3 != v3);
      m = t3 ? v3 : m;
      x = t3 ? x3 : x;
      k = t3 ? 3 : k;
      store(o, c, m < 0.0f ? 0.0f : m);
      if constexpr (TRAIN) {
        argmax[at + c] = uint8_t(k);
        store(zsel, at + c, x);  // exact: x is a value of type T
      }
    }
  }
}

template <typename T>
void forward_train(const T* z, const Shape& s, const float* gamma, const float* beta, float* running_mean,
                   float* running_var, double momentum, double eps, T* out, uint8_t* argmax, T* zsel,
                   float* save_mean, float* save_invstd) {
  const int64_t C = s.C, M = s.pixels();
  // float sums over runs of STATS_RUN pixels, added into double sums: the float work vectorises
  // twice as wide, and a run's sum is exact to float rounding of a few values
  std::vector<double> sum_(C, 0.0), sq_(C, 0.0);
  std::vector<float> run_sum_(C), run_sq_(C);
  double* __restrict sum = sum_.data();
  double* __restrict sq = sq_.data();
  float* __restrict rs = run_sum_.data();
  float* __restrict rq = run_sq_.data();
  for (int64_t p0 = 0; p0 < M; p0 += STATS_RUN) {
    const int64_t p1 = p0 + STATS_RUN < M ? p0 + STATS_RUN : M;
    for (int64_t c = 0; c < C; ++c) rs[c] = rq[c] = 0.0f;
    for (int64_t p = p0; p < p1; ++p) {
      const T* __restrict row = z + p * C;
      for (int64_t c = 0; c < C; ++c) {
        const float v = load(row, c);
        rs[c] = rs[c] + v;
        float v2 = v * v;
        rq[c] = rq[c] + v2;
      }
    }
    for (int64_t c = 0; c < C; ++c) {
      sum[c] = sum[c] + double(rs[c]);
      sq[c] = sq[c] + double(rq[c]);
    }
  }
  std::vector<float> a(C), b(C);
  for (int64_t c = 0; c < C; ++c) {
    const double mean = sum[c] / double(M);
    double var = sq[c] / double(M) - mean * mean;
    var = var < 0.0 ? 0.0 : var;
    const float invstd = float(1.0 / std::sqrt(var + eps));
    save_mean[c] = float(mean);
    save_invstd[c] = invstd;
    a[c] = gamma[c] * invstd;
    b[c] = beta[c] - save_mean[c] * a[c];
    if (running_mean) {
      const double unbiased = M > 1 ? var * double(M) / double(M - 1) : var;
      running_mean[c] = float((1.0 - momentum) * double(running_mean[c]) + momentum * mean);
      running_var[c] = float((1.0 - momentum) * double(running_var[c]) + momentum * unbiased);
    }
  }
  affine_pool_relu<T, true>(z, s, a.data(), b.data(), out, argmax, zsel);
}

template <typename T>
void forward_eval(const T* z, const Shape& s, const float* gamma, const float* beta, const float* running_mean,
                  const float* running_var, double eps, T* out) {
  const int64_t C = s.C;
  std::vector<float> a(C), b(C);
  for (int64_t c = 0; c < C; ++c) {
    const float invstd = float(1.0 / std::sqrt(double(running_var[c]) + eps));
    a[c] = gamma[c] * invstd;
    b[c] = beta[c] - running_mean[c] * a[c];
  }
  affine_pool_relu<T, false>(z, s, a.data(), b.data(), out, nullptr, nullptr);
}

// dL/dz, dL/dgamma, dL/dbeta from dL/dout. The gradient reaches one pixel of each window
// (the argmax) where the output is > 0 (ReLU's backward, threshold_backward); batch norm's
// training backward is ATen's: dz = (dy - mean(dy) - (z - mean) * k) * invstd * gamma with
// k = sum(dy * (z - mean)) * invstd^2 / M. The sums need only the pooled arrays (zsel is z
// at the argmax); the second pass writes every pixel.
template <typename T>
void backward(const T* __restrict z, const T* __restrict out, const uint8_t* __restrict argmax,
              const T* __restrict zsel, const T* __restrict grad_out, const Shape& s, const float* __restrict gamma,
              const float* __restrict save_mean, const float* __restrict save_invstd, T* __restrict grad_z,
              float* __restrict grad_gamma, float* __restrict grad_beta) {
  const int64_t C = s.C, M = s.pixels();
  std::vector<double> sum_(C, 0.0), dot_(C, 0.0);
  double* __restrict sum = sum_.data();
  double* __restrict dot = dot_.data();
  for (int64_t q = 0; q < s.pooled(); ++q) {
    const int64_t at = q * C;
    const T* __restrict o = out + at;
    const T* __restrict go = grad_out + at;
    const T* __restrict zs = zsel + at;
    for (int64_t c = 0; c < C; ++c) {
      const float oc = load(o, c), gc = load(go, c);
      const float dp = keep_if(oc > 0.0f, gc);
      const float xmu = load(zs, c) - save_mean[c];
      sum[c] = sum[c] + double(dp);
      dot[c] = dot[c] + double(xmu) * double(dp);
    }
  }
  std::vector<float> mean_dy_(C), k_(C), scale_(C);
  for (int64_t c = 0; c < C; ++c) {
    const float inv = save_invstd[c];
    mean_dy_[c] = float(sum_[c] / double(M));
    k_[c] = float(dot_[c] * double(inv) * double(inv) / double(M));
    scale_[c] = inv * gamma[c];
    grad_gamma[c] = float(dot_[c] * double(inv));
    grad_beta[c] = float(sum_[c]);
  }
  const float* __restrict mean_dy = mean_dy_.data();
  const float* __restrict kk = k_.data();
  const float* __restrict scale = scale_.data();
  for (int64_t q = 0; q < s.pooled(); ++q) {
    const int64_t base = s.window(q), at = q * C;
    const uint8_t* __restrict am = argmax + at;
    const T* __restrict o = out + at;
    const T* __restrict go = grad_out + at;
    const T* __restrict z0 = z + base;
    const T* __restrict z1 = z0 + C;
    const T* __restrict z2 = z0 + s.W * C;
    const T* __restrict z3 = z2 + C;
    T* __restrict d0 = grad_z + base;
    T* __restrict d1 = d0 + C;
    T* __restrict d2 = d0 + s.W * C;
    T* __restrict d3 = d2 + C;
    for (int64_t c = 0; c < C; ++c) {
      const float oc = load(o, c), gc = load(go, c);
      const float dp = keep_if(oc > 0.0f, gc);
      const int32_t k = am[c];
      const float dy0 = keep_if(k == 0, dp), dy1 = keep_if(k == 1, dp), dy2 = keep_if(k == 2, dp),
                  dy3 = keep_if(k == 3, dp);
      float t0 = load(z0, c) - save_mean[c], t1 = load(z1, c) - save_mean[c], t2 = load(z2, c) - save_mean[c],
            t3 = load(z3, c) - save_mean[c];
      t0 = t0 * kk[c];
      t1 = t1 * kk[c];
      t2 = t2 * kk[c];
      t3 = t3 * kk[c];
      float e0 = dy0 - mean_dy[c], e1 = dy1 - mean_dy[c], e2 = dy2 - mean_dy[c], e3 = dy3 - mean_dy[c];
      e0 = e0 - t0;
      e1 = e1 - t1;
      e2 = e2 - t2;
      e3 = e3 - t3;
      store(d0, c, e0 * scale[c]);
      store(d1, c, e1 * scale[c]);
      store(d2, c, e2 * scale[c]);
      store(d3, c, e3 * scale[c]);
    }
  }
}

}  // namespace

extern "C" {

int nos_child_abi_version() { return 2; }

static bool bad_shape(int64_t N, int64_t H, int64_t W, int64_t C) {
  return N < 1 || H < 2 || W < 2 || C < 1 || H % 2 || W % 2;
}

// training: batch statistics (saved), running statistics updated (if running_mean is not
// null), argmax and zsel saved; eval (training == 0): running statistics, nothing saved.
int nos_bn_pool_forward(const void* z, int dtype, int64_t N, int64_t H, int64_t W, int64_t C,
                        const float* gamma, const float* beta, float* running_mean, float* running_var,
                        double momentum, double eps, int training, void* out, uint8_t* argmax, void* zsel,
                        float* save_mean, float* save_invstd) {
  if (bad_shape(N, H, W, C)) return 1;
  const Shape s{N, H, W, C};
  if (dtype == 32) {
    if (training)
      forward_train((const float*)z, s, gamma, beta, running_mean, running_var, momentum, eps, (float*)out, argmax,
                    (float*)zsel, save_mean, save_invstd);
    else
      forward_eval((const float*)z, s, gamma, beta, running_mean, running_var, eps, (float*)out);
  } else if (dtype == 16) {
    if (training)
      forward_train((const uint16_t*)z, s, gamma, beta, running_mean, running_var, momentum, eps, (uint16_t*)out,
                    argmax, (uint16_t*)zsel, save_mean, save_invstd);
    else
      forward_eval((const uint16_t*)z, s, gamma, beta, running_mean, running_var, eps, (uint16_t*)out);
  } else {
    return 2;
  }
  return 0;
}

int nos_bn_pool_backward(const void* z, const void* out, const uint8_t* argmax, const void* zsel, const void* grad_out,
                         int dtype, int64_t N, int64_t H, int64_t W, int64_t C, const float* gamma,
                         const float* save_mean, const float* save_invstd, void* grad_z, float* grad_gamma,
                         float* grad_beta) {
  if (bad_shape(N, H, W, C)) return 1;
  const Shape s{N, H, W, C};
  if (dtype == 32)
    backward((const float*)z, (const float*)out, argmax, (const float*)zsel, (const float*)grad_out, s, gamma,
             save_mean, save_invstd, (float*)grad_z, grad_gamma, grad_beta);
  else if (dtype == 16)
    backward((const uint16_t*)z, (const uint16_t*)out, argmax, (const uint16_t*)zsel, (const uint16_t*)grad_out, s,
             gamma, save_mean, save_invstd, (uint16_t*)grad_z, grad_gamma, grad_beta);
  else
    return 2;
  return 0;
}

}  // extern "C"
