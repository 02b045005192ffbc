// The Rosenbrock task's whole run as one native call: every rule instance (a program and
// its draw) trains its learning-rate rows for all iterations inside this function.
//
// Why: the rows of the Rosenbrock task never interact, so the time loop can live inside
// the kernel. Torch's executors (nos_gym.rules.BatchedRule) run each step as ~65-100
// separate passes over 12k rows of 2 numbers; here a work item's state (about 20 arrays
// of 8 or 32 numbers) stays in L1 for all 4,000 steps, and the rule is interpreted from
// its opcode table once per step for all of its learning rates (and draws) at once.
//
// Arithmetic (see nos_gym/native.py for the contract, tests/test_native.py for checks):
// - + - * / sqrt, compares and selects are IEEE 754 operations, rounded the same on every
//   x86-64 vector width, in scalar code and SIMD alike. The build turns off contraction
//   (-ffp-contract=off) and never uses -ffast-math, so no multiply-add is fused behind our
//   back; where torch's vectorised CPU kernels fuse one (lerp, addcmul, add with alpha),
//   std::fma does it here explicitly (one rounding, the same on every CPU).
// - exp and log are our own (below): Cody-Waite reduction and a polynomial, written with
//   the operations above and integer bit moves only, so they too give the same bits on
//   every CPU (libm's and torch's SIMD exp/log differ by an ulp between builds and
//   vector widths). Accuracy: within 1 ulp (exp) and 2 ulp (log) of the exact value
//   (checked against long double references in the tests).
// - random draws: splitmix64 and the Box-Muller polynomials of nos_gym/random_streams.py,
//   operation for operation (float32): drop masks are bit-identical to torch's executors';
//   noise values too, except where torch's sqrt (not correctly rounded) is 1 ulp off.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

constexpr uint64_t GAMMA = 0x9E3779B97F4A7C15ULL;

inline uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xBF58476D1CE4E5B9ULL;
  z ^= z >> 27;
  z *= 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

inline uint64_t hash64(uint64_t key, uint64_t counter) { return mix64(key + (counter + 1) * GAMMA); }

inline float uniform24(uint64_t bits) { return (float)((bits >> 40) & 0xFFFFFFULL) * (1.0f / 16777216.0f); }

// random_streams.normal, op for op in float32 (constants as torch rounds Python floats)
inline float horner_f(float x, const float* c, int n) {
  float acc = c[n - 1];
  for (int k = n - 2; k >= 0; --k) acc = acc * x + c[k];
  return acc;
}

const float LOG_COEFFS[5] = {(float)(2.0 / 1), (float)(2.0 / 3), (float)(2.0 / 5), (float)(2.0 / 7), (float)(2.0 / 9)};
const float COS_COEFFS[7] = {(float)(1.0 / 1), (float)(-1.0 / 2), (float)(1.0 / 24), (float)(-1.0 / 720),
                             (float)(1.0 / 40320), (float)(-1.0 / 3628800), (float)(1.0 / 479001600)};

inline float normal_f(uint64_t bits, float std_) {
  float a = (float)(int64_t)(((bits >> 40) & 0xFFFFFFULL) + 1);
  // frexp(a) by its bits: a is an integer in [1, 2^24], a normal float (no libm call)
  uint32_t ab;
  std::memcpy(&ab, &a, 4);
  const int e = (int)((ab >> 23) & 0xFF) - 126;
  const uint32_t mb = (ab & 0x007FFFFFu) | (126u << 23);
  float m;
  std::memcpy(&m, &mb, 4);  // a = m 2^e, m in [1/2, 1)
  bool small = m < (float)0.7071067811865476;
  if (small) m = m * 2.0f;
  float ef = ((float)e - (small ? 1.0f : 0.0f)) - 24.0f;
  float s = (m - 1.0f) / (m + 1.0f);
  float log_u = horner_f(s * s, LOG_COEFFS, 5) * s + ef * (float)0.6931471805599453;
  float radius = std::sqrt(log_u * -2.0f);
  int64_t b = (int64_t)((bits >> 16) & 0xFFFFFFULL);
  float sign = (float)(b & 1) * -2.0f + 1.0f;
  float angle = ((float)(b >> 1) + 0.5f) * (float)(3.141592653589793 / 2 / 8388608.0);
  float c = horner_f(angle * angle, COS_COEFFS, 7);
  return ((radius * c) * sign) * std_;
}

// ------------------------------------------------------------------ exp and log, portable
inline int64_t bits_of(double x) { int64_t i; std::memcpy(&i, &x, 8); return i; }
inline double from_bits(int64_t i) { double x; std::memcpy(&x, &i, 8); return x; }

// exp(x): k = round(x / ln 2), r = x - k ln 2 (Cody-Waite, fdlibm's split of ln 2),
// exp(r) = 1 + (r + r^2/2! + ... + r^13/13!) on |r| <= 0.347, times 2^k in two exact halves.
inline double nexp(double x) {
  const double SHIFT = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  const double INV_LN2 = 1.4426950408889634;
  const double LN2_HI = 6.93147180369123816490e-01, LN2_LO = 1.90821492927058770002e-10;
  double xc = x > 709.8 ? 709.8 : (x < -745.2 ? -745.2 : x);  // NaN passes through the compares as NaN
  double t = xc * INV_LN2 + SHIFT;
  int64_t k = bits_of(t) - bits_of(SHIFT);
  double kd = t - SHIFT;
  double r = (xc - kd * LN2_HI) - kd * LN2_LO;
  double p = 1.0 / 6227020800.0;  // 1/13!
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  double er = 1.0 + (r + (r * r) * p);
  int64_t k1 = k >> 1, k2 = k - k1;  // 2^k as two normal powers: exact, one rounding at most
  double y = (er * from_bits((int64_t)((uint64_t)(k1 + 1023) << 52))) * from_bits((int64_t)((uint64_t)(k2 + 1023) << 52));
  y = x > 709.782712893384 ? INFINITY : y;
  y = x < -745.1332191019412 ? 0.0 : y;
  return x != x ? x : y;
}

// log(x) for x >= 0 (the language only takes log|x|): x = 2^e m, m in [sqrt(1/2), sqrt(2)),
// log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716, by its series to s^21.
inline double nlog(double x) {
  const double LN2_HI = 6.93147180369123816490e-01, LN2_LO = 1.90821492927058770002e-10;
  const double sub = x < 2.2250738585072014e-308 ? 54.0 : 0.0;  // subnormal (or zero): scale up by 2^54 first
  const double xs = sub != 0.0 ? x * 18014398509481984.0 : x;
  const int64_t ib = bits_of(xs);
  // (selects on doubles only: they keep the loop free of branches, so it vectorises)
  double ed = (double)((ib >> 52) & 0x7FF) - 1023.0 - sub;
  double m = from_bits((ib & 0x000FFFFFFFFFFFFFLL) | 0x3FF0000000000000LL);  // [1, 2)
  const bool big = m > 1.4142135623730951;
  m = big ? m * 0.5 : m;
  ed = big ? ed + 1.0 : ed;
  const double f = m - 1.0;
  const double s = f / (m + 1.0);
  const double z = s * s;
  double p = 2.0 / 21;
  p = p * z + 2.0 / 19;
  p = p * z + 2.0 / 17;
  p = p * z + 2.0 / 15;
  p = p * z + 2.0 / 13;
  p = p * z + 2.0 / 11;
  p = p * z + 2.0 / 9;
  p = p * z + 2.0 / 7;
  p = p * z + 2.0 / 5;
  p = p * z + 2.0 / 3;
  // log m = 2s + s z p = f - s f + s z p  (2s = f - s f exactly in real numbers: keeps f's bits)
  const double lm = f - (s * f - (s * z) * p);
  double y = ed * LN2_HI + (lm + ed * LN2_LO);
  y = x == 0.0 ? -INFINITY : y;
  y = x == INFINITY ? INFINITY : y;
  y = x < 0.0 ? NAN : y;
  return x != x ? x : y;
}

template <typename T> inline T exp_t(T x) { return (T)nexp((double)x); }
template <typename T> inline T log_t(T x) { return (T)nlog((double)x); }

// ------------------------------------------------------------------ the opcodes
// as nos_gym/fused_batched.py numbers them (OPERAND_CODES, UNARY_CODES, BINARY_CODES)
enum Operand { G, G2, G3, M, V, Y, SIGN_G, SIGN_M, ONE, NOISE, W4, W3, W2, W1, ADAM, RMSPROP, RESULT0 };
enum Unary { U_ID, U_NEG, U_EXP, U_LOG, U_SIGN, U_SQRT, U_CLIP, U_DROP };
enum Binary { B_ADD, B_SUB, B_MUL, B_DIV, B_KEEP };
constexpr int NUM_BASE = RESULT0;
const double W_SCALES[4] = {1e-4, 1e-3, 1e-2, 1e-1};

struct Args {
  int64_t groups, lrs_per_group, depth, steps;
  const double* lrs;        // [L]
  const int64_t* codes;     // [G, 5 depth]
  const double* level;      // [G, 2 depth]  clip levels
  const float* rate;        // [G, 2 depth]  drop rates (float32)
  const int64_t* drop_keys;   // [G, 2 depth]  the drop's site key K_s
  const int64_t* noise_keys;  // [G, 2 depth]  the noise read's site key K_s
  const double* corrections;  // [steps, 3]  1 - beta^t for t = 1..steps (as Python computes them)
  const int64_t* checkpoints; int64_t n_checkpoints;
  double beta1, beta2, beta3, eps, noise_std;
  int64_t bias_correction;
  double start_x, start_y, a, b;
  double* out;     // [G, L, 2] final parameters (NaN for a row not finite at the end or at a checkpoint)
  double* trace;   // [steps + 1, G, L, 2] or null
};

// One work item: S instances of one program (its draws: the same opcodes, other stream keys)
// at up to 4 of their learning rates. Rows never interact (a draw depends on the instance
// and the column, x or y, not on the learning rate), so instances and learning rates can be
// packed into items freely. The lanes: x of (slot 0, lr 0..3), (slot 1, lr 0..3), ..., then
// y likewise: 8 S numbers; S = 1 (a deterministic rule: one AVX-512 register of doubles)
// or 4 (a stochastic rule's 4 draws side by side: the interpretation is shared by 32
// lanes). Every loop has a fixed trip count and restrict-qualified arrays, so it compiles
// to straight vector code.
constexpr int LRS = 4;

template <typename T, int LANES, typename F>
inline void map1(T* __restrict out, const T* __restrict a, F f) {
#pragma omp simd
  for (int i = 0; i < LANES; ++i) out[i] = f(a[i]);
}
template <typename T, int LANES, typename F>
inline void map2(T* __restrict out, const T* __restrict a, const T* __restrict b, F f) {
#pragma omp simd
  for (int i = 0; i < LANES; ++i) out[i] = f(a[i], b[i]);
}
template <typename T>
inline T sign_of(T x) { return (T)((T(0) < x) - (x < T(0))); }  // torch.sign: 0 for 0 and NaN

struct Item {
  int64_t first, count, r0;  // instances first .. first + count - 1 (one program), learning rates from r0
};

template <typename T, int S>
struct Group {
  static constexpr int ROWS = S * LRS, LANES = 2 * ROWS;
  const Args& A;
  alignas(64) T w[LANES], g[LANES], m[LANES], v[LANES], y[LANES], lr[LANES], g2[LANES], g3[LANES], mh[LANES],
      vh[LANES], yh[LANES], den[LANES], adam[LANES], rms[LANES], sg[LANES], sm[LANES], one[LANES], nz[LANES],
      a0[LANES], a1[LANES], ws[4][LANES];
  alignas(64) T zero[LANES];  // 1 where this step's drop zeroes the lane
  std::vector<T> results;     // depth arrays of LANES
  Item it{0, 0, 0};
  int64_t rows = 0, next_check = 0;
  bool dead = false, keep_m = false, keep_v = false, keep_y = false, need_g2 = false, need_g3 = false;
  uint32_t need = 0;
  const int64_t* codes = nullptr;
  const double* level = nullptr;
  const float* rate = nullptr;
  const int64_t* dkeys[S];
  const int64_t* nkeys[S];

  explicit Group(const Args& args) : A(args), results((size_t)args.depth * LANES) {}

  bool reads(int op) const { return (need >> op) & 1u; }
  // the lane of (slot s, learning rate r, column c)
  static int lane(int s, int r, int c) { return c * ROWS + s * LRS + r; }

  void record(int64_t t) const {
    if (!A.trace) return;
    for (int64_t s = 0; s < it.count; ++s) {
      double* row = A.trace + ((t * A.groups + it.first + s) * A.lrs_per_group + it.r0) * 2;
      for (int64_t r = 0; r < rows; ++r) {
        row[2 * r] = (double)w[lane(s, r, 0)];
        row[2 * r + 1] = (double)w[lane(s, r, 1)];
      }
    }
  }

  void start(const Item& item) {
    it = item;
    const int64_t L = A.lrs_per_group, D = A.depth;
    rows = std::min<int64_t>(LRS, L - it.r0);
    codes = A.codes + it.first * 5 * D;
    level = A.level + it.first * 2 * D;
    rate = A.rate + it.first * 2 * D;
    for (int s = 0; s < S; ++s) {  // slots past count repeat the last instance
      const int64_t gi = it.first + std::min<int64_t>(s, it.count - 1);
      dkeys[s] = A.drop_keys + gi * 2 * D;
      nkeys[s] = A.noise_keys + gi * 2 * D;
    }
    // what this rule reads (the right side of a keep group is never computed)
    need = 0;
    for (int64_t k = 0; k < D; ++k) {
      need |= 1u << std::min<int64_t>(codes[5 * k], 31);
      if (codes[5 * k + 4] != B_KEEP) need |= 1u << std::min<int64_t>(codes[5 * k + 1], 31);
    }
    keep_m = reads(M) || reads(SIGN_M) || reads(ADAM);
    keep_v = reads(V) || reads(ADAM) || reads(RMSPROP);
    keep_y = reads(Y);
    need_g3 = reads(G3) || keep_y;
    need_g2 = reads(G2) || need_g3;
    for (int i = 0; i < LANES; ++i) {
      const int64_t r = it.r0 + std::min<int64_t>(i % LRS, rows - 1);  // lanes past L repeat the last
      w[i] = (T)(i < ROWS ? A.start_x : A.start_y);
      lr[i] = (T)A.lrs[r];
      m[i] = v[i] = y[i] = T(0);
      one[i] = T(1);
    }
    next_check = 0;
    dead = false;
    record(0);
  }

  // step t (0-based); false once the item has stopped (every row diverged at a checkpoint)
  bool step(int64_t t) {
    if (dead) return false;
    if (next_check < A.n_checkpoints && A.checkpoints[next_check] == t) {
      ++next_check;
      bool any = false;
      for (int s = 0; s < it.count; ++s)
        for (int r = 0; r < rows; ++r)
          any |= std::isfinite((double)w[lane(s, r, 0)]) && std::isfinite((double)w[lane(s, r, 1)]);
      if (!any) { dead = true; return false; }  // non-finite parameters never come back
    }
    const int64_t D = A.depth;
    const T a = (T)A.a, two_b = (T)(2.0 * A.b), b1w = (T)(1.0 - A.beta1), b2 = (T)A.beta2, b2w = (T)(1.0 - A.beta2),
            b3 = (T)A.beta3, b3w = (T)(1.0 - A.beta3), eps = (T)A.eps;
    // df/dy = 2b (y - x^2);  df/dx = 2 (x - a) - 2 x df/dy, as RosenbrockTask._loop computes them
    for (int i = 0; i < ROWS; ++i) {
      const T x = w[i];
      const T gy = std::fma(-x, x, w[ROWS + i]) * two_b;  // torch.addcmul(y, x, x, value=-1) * 2b
      g[ROWS + i] = gy;
      g[i] = ((x - x * gy) - a) * T(2);
    }
    const uint64_t count = (uint64_t)t + 1;  // the step count the draws are keyed by
    if (need_g2) map2<T, LANES>(g2, g, g, [](T p, T q) { return p * q; });
    if (need_g3) map2<T, LANES>(g3, g2, g, [](T p, T q) { return p * q; });
    // the running averages, as nos_gym.rules.advance_averages computes them with torch's
    // vectorised CPU kernels (AVX2/AVX-512), which fuse the multiply-adds of lerp, addcmul
    // and add(alpha=): std::fma rounds once, as they do, on every CPU
    if (keep_m) for (int i = 0; i < LANES; ++i) m[i] = std::fma(b1w, g[i] - m[i], m[i]);
    if (keep_v) for (int i = 0; i < LANES; ++i) v[i] = std::fma(b2w * g[i], g[i], v[i] * b2);
    if (keep_y) for (int i = 0; i < LANES; ++i) y[i] = std::fma(g3[i], b3w, y[i] * b3);
    const T* M_hat = m;
    const T* V_hat = v;
    const T* Y_hat = y;
    if (A.bias_correction) {
      const double* c = A.corrections + 3 * t;
      if (keep_m) { const T d = (T)c[0]; map1<T, LANES>(mh, m, [d](T p) { return p / d; }); M_hat = mh; }
      if (keep_v) { const T d = (T)c[1]; map1<T, LANES>(vh, v, [d](T p) { return p / d; }); V_hat = vh; }
      if (keep_y) { const T d = (T)c[2]; map1<T, LANES>(yh, y, [d](T p) { return p / d; }); Y_hat = yh; }
    }
    if (reads(ADAM) || reads(RMSPROP)) map1<T, LANES>(den, V_hat, [eps](T p) { return std::sqrt(p) + eps; });
    if (reads(ADAM)) map2<T, LANES>(adam, M_hat, den, [](T p, T q) { return p / q; });
    if (reads(RMSPROP)) map2<T, LANES>(rms, g, den, [](T p, T q) { return p / q; });
    if (reads(SIGN_G)) map1<T, LANES>(sg, g, sign_of<T>);
    if (reads(SIGN_M)) map1<T, LANES>(sm, m, sign_of<T>);  // the sign of m-hat is the sign of the raw average
    for (int q = 0; q < 4; ++q)
      if (reads(W4 + q)) { const T c = (T)W_SCALES[q]; map1<T, LANES>(ws[q], w, [c](T p) { return p * c; }); }

    for (int64_t k = 0; k < D; ++k) {
      const int64_t bin = codes[5 * k + 4];
      for (int sd = 0; sd < (bin == B_KEEP ? 1 : 2); ++sd) {
        const int64_t j = 2 * k + sd, op = codes[5 * k + sd], un = codes[5 * k + 2 + sd];
        T* out = sd == 0 ? a0 : a1;
        const T* src;
        switch (op) {
          case G: src = g; break;
          case G2: src = g2; break;
          case G3: src = g3; break;
          case M: src = M_hat; break;
          case V: src = V_hat; break;
          case Y: src = Y_hat; break;
          case SIGN_G: src = sg; break;
          case SIGN_M: src = sm; break;
          case ONE: src = one; break;
          case NOISE: {  // each instance's stream at this step and site, columns 0 (x) and 1 (y)
            const float std_ = (float)A.noise_std;
            for (int s = 0; s < S; ++s) {
              const uint64_t key = hash64((uint64_t)nkeys[s][j], count);
              for (int c = 0; c < 2; ++c) {
                const T n = (T)normal_f(hash64(key, (uint64_t)c), std_);
                for (int r = 0; r < LRS; ++r) nz[lane(s, r, c)] = n;
              }
            }
            src = nz;
            break;
          }
          case W4: case W3: case W2: case W1: src = ws[op - W4]; break;
          case ADAM: src = adam; break;
          case RMSPROP: src = rms; break;
          default: src = &results[(op - RESULT0) * LANES]; break;
        }
        switch (un) {
          case U_ID: map1<T, LANES>(out, src, [](T p) { return p; }); break;
          case U_NEG: map1<T, LANES>(out, src, [](T p) { return -p; }); break;
          case U_EXP: map1<T, LANES>(out, src, exp_t<T>); break;
          case U_LOG: map1<T, LANES>(out, src, [](T p) { return log_t<T>(std::fabs(p)); }); break;
          case U_SIGN: map1<T, LANES>(out, src, sign_of<T>); break;
          case U_SQRT: map1<T, LANES>(out, src, [](T p) { return std::sqrt(std::fabs(p)); }); break;
          case U_CLIP: {  // torch.clamp(x, -l, l): NaN stays NaN
            const T hi = (T)level[j], lo = -hi;
            map1<T, LANES>(out, src, [lo, hi](T p) { T c = p < lo ? lo : p; c = c > hi ? hi : c; return p != p ? p : c; });
            break;
          }
          case U_DROP: {  // zero where the instance's float32 uniform for the column < p
            const float p = rate[j];
            for (int s = 0; s < S; ++s) {
              const uint64_t key = hash64((uint64_t)dkeys[s][j], count);
              for (int c = 0; c < 2; ++c) {
                const T z = uniform24(hash64(key, (uint64_t)c)) < p ? T(1) : T(0);
                for (int r = 0; r < LRS; ++r) zero[lane(s, r, c)] = z;
              }
            }
            map2<T, LANES>(out, src, zero, [](T q, T z) { return z != T(0) ? T(0) : q; });
            break;
          }
          default: break;
        }
      }
      T* r = &results[k * LANES];
      switch (bin) {
        case B_ADD: map2<T, LANES>(r, a0, a1, [](T p, T q) { return p + q; }); break;
        case B_SUB: map2<T, LANES>(r, a0, a1, [](T p, T q) { return p - q; }); break;
        case B_MUL: map2<T, LANES>(r, a0, a1, [](T p, T q) { return p * q; }); break;
        case B_DIV: map2<T, LANES>(r, a0, a1, [eps](T p, T q) { return p / (q + eps); }); break;
        default: map1<T, LANES>(r, a0, [](T p) { return p; }); break;
      }
    }
    const T* d = &results[(D - 1) * LANES];
    // params.addcmul_(lr, d, value=-1)
#pragma omp simd
    for (int i = 0; i < LANES; ++i) w[i] = std::fma(-lr[i], d[i], w[i]);  // params.addcmul_(lr, d, value=-1)
    record(t + 1);
    return true;
  }

  void finish() const {
    for (int64_t s = 0; s < it.count; ++s) {
      double* o = A.out + ((it.first + s) * A.lrs_per_group + it.r0) * 2;
      for (int64_t r = 0; r < rows; ++r) {
        const double x = (double)w[lane(s, r, 0)], yv = (double)w[lane(s, r, 1)];
        const bool ok = !dead && std::isfinite(x) && std::isfinite(yv);
        o[2 * r] = ok ? x : NAN;
        o[2 * r + 1] = ok ? yv : NAN;
      }
    }
  }
};

//: items trained side by side, a step of each in turn (independent dependency chains for
//: the core's out-of-order window)
constexpr int INTERLEAVE = 4;

template <typename T, int S>
void run_items(const Args& A, const std::vector<Item>& items, std::atomic<int64_t>& next) {
  std::vector<Group<T, S>> grp;
  for (int k = 0; k < INTERLEAVE; ++k) grp.emplace_back(A);
  const int64_t n_items = (int64_t)items.size();
  for (;;) {
    const int64_t first = next.fetch_add(INTERLEAVE);
    if (first >= n_items) break;
    const int n = (int)std::min<int64_t>(INTERLEAVE, n_items - first);
    for (int k = 0; k < n; ++k) grp[k].start(items[first + k]);
    for (int64_t t = 0; t < A.steps; ++t) {
      bool any = false;
      for (int k = 0; k < n; ++k) any |= grp[k].step(t);
      if (!any) break;
    }
    for (int k = 0; k < n; ++k) grp[k].finish();
  }
}

template <typename T>
void run_all(const Args& A, int threads) {
  // runs of consecutive instances with one program (a stochastic rule's draws) become packs of
  // up to 4; the rest are singles
  constexpr int PACK = 4;
  const int64_t D = A.depth;
  std::vector<Item> packs, singles;
  for (int64_t gi = 0; gi < A.groups;) {
    int64_t n = 1;
    while (n < PACK && gi + n < A.groups &&
           std::memcmp(A.codes + gi * 5 * D, A.codes + (gi + n) * 5 * D, 5 * D * sizeof(int64_t)) == 0)
      ++n;
    for (int64_t r0 = 0; r0 < A.lrs_per_group; r0 += LRS) (n > 1 ? packs : singles).push_back(Item{gi, n, r0});
    gi += n;
  }
  std::atomic<int64_t> next_pack{0}, next_single{0};
  auto work = [&]() {
    run_items<T, PACK>(A, packs, next_pack);
    run_items<T, 1>(A, singles, next_single);
  };
  if (threads <= 1) { work(); return; }
  std::vector<std::thread> pool;
  for (int i = 0; i < threads; ++i) pool.emplace_back(work);
  for (auto& th : pool) th.join();
}

}  // namespace

extern "C" {

int nos_abi_version() { return 1; }

// dtype: 64 (float64) or 32 (float32). Returns 0, or -1 on a bad argument.
int nos_rosenbrock_run(const Args* args, int dtype, int threads) {
  if (!args || args->groups < 0 || args->depth < 1 || args->lrs_per_group < 1) return -1;
  if (dtype == 64) run_all<double>(*args, threads);
  else if (dtype == 32) run_all<float>(*args, threads);
  else return -1;
  return 0;
}

// test hooks: the kernel's elementwise functions on arrays
void nos_exp(const double* x, double* y, int64_t n) { for (int64_t i = 0; i < n; ++i) y[i] = nexp(x[i]); }
void nos_log(const double* x, double* y, int64_t n) { for (int64_t i = 0; i < n; ++i) y[i] = nlog(x[i]); }
void nos_normal(const int64_t* bits, float* y, int64_t n, float std_) {
  for (int64_t i = 0; i < n; ++i) y[i] = normal_f((uint64_t)bits[i], std_);
}
void nos_hash(const int64_t* key, const int64_t* counter, int64_t* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = (int64_t)hash64((uint64_t)key[i], (uint64_t)counter[i]);
}

}  // extern "C"
