// The default (faithful=False) encoders of the GGUF legacy 32-element block types, one call per tensor:
// Q8_0, Q4_0, Q5_0 (d * level), Q4_1, Q5_1 (d * level + m) and IQ4_NL (d * kvalues[code]).
//
// Torch twin: qtool/formats/gguf_legacy.py (`_sym_default`, `_asym_default` with their llama.cpp reference
// candidates `_ref_q8`, `_ref_sym` / `_make_qx_quants`, `_ref_asym` / `_make_qkx3_quants`, `_iq4nl_faithful`, and
// `quantize_columns` for the codes). The same search: the same trial grids (the caller passes them), lloyd
// rounds, fp16 candidates, reference candidate, tie rules, degenerate-block handling and codes. Not bit-identical
// with the twin, in three ways:
//
// * sums: the search's in 4 interleaved partial sums (`Sum4`, a fixed order), the reference candidates' left
//   to right as llama.cpp's C code (so those are llama.cpp's exact d and m); the twin uses torch's order;
// * ties: trial scores within 1e-5 of the best are ties (float32 rounding orders them either way, the twin's
//   sums round differently, and tied trials can refine to far-apart results: a block with one dominant
//   weight, Q8_0 errors 2x apart), so every tied trial is refined and the exact final error decides (`Trials`);
//   the twin keeps the first of the noisy maximum. Its pick is one of the tied, so no block comes out measurably
//   worse than the twin's, some better (tests/formats/test_gguf_legacy_native.py bounds it block by block);
// * the asym fit centres the codes as well as x (`asym_fit`): codes shifted by one fit equally well and now
//   score alike (the twin's uncentred sum cancels badly under concentrated weights).
//
// Layout: N blocks at a time, element-major (`x[i]` holds element i of N blocks) in GCC vector-extension
// registers: the blocks are the SIMD lanes, and every vector op is the element-wise IEEE float op. One build
// per ISA, N = its register width in floats: AVX2 (8) and the baseline (4; SSE2 on x86-64), picked at run time
// (a vector type wider than the target's registers is lowered to scalar compares). No AVX-512 build: it needs
// the lane code compiled under `#pragma GCC target` (inlined into a target("avx512f") function, GCC 12
// scalarises its 16-lane compares), and measured only 1.1-1.4x over AVX2 (IQ4_NL slower). The build forbids
// FMA contraction and fast-math (runtime/native.py), so the result is the same for every ISA, lane count and
// split of the blocks over threads (a block's lane position changes nothing; no control flow depends on
// another lane's values except which masked extra work runs).

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <thread>
#include <vector>

#define INL inline __attribute__((always_inline))
// vector values only pass between always-inlined helpers, never across a real call: no ABI to keep
#pragma GCC diagnostic ignored "-Wpsabi"

#if defined(__x86_64__) && defined(__GNUC__)
#define QTOOL_X86 1
#endif

namespace {

constexpr int QK = 32;     // elements per block
constexpr int ALIGN = 8;   // thread ranges are whole batches of every lane count
constexpr int MAX_GRID = 32;  // trial targets / offsets at most
enum Type { Q8_0 = 0, Q4_0 = 1, Q5_0 = 2, Q4_1 = 3, Q5_1 = 4, IQ4_NL = 5 };
constexpr int KV[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};  // kvalues_iq4nl
constexpr float GROUP_MAX_EPS = 1e-15f;

// kvalues_iq4nl[nearest] by floor(2t) + 256 for floor(2t) in -256..228: slot s holds the entry k with
// v[k-1] + v[k] <= s - 256 < v[k] + v[k+1] (`_KV_VLUT`: a tie 2t == v[k-1] + v[k] goes to the upper entry)
// (`code`: its index k, the codes' table: at c = ceil(2t) - 1 that is the entry nearest t, a tie to the lower)
struct KvSlots {
    float v[485];
    int32_t code[485];
    constexpr KvSlots() : v(), code() {
        for (int s = 0; s < 485; ++s) {
            int k = 0;
            while (k < 15 && KV[k] + KV[k + 1] <= s - 256) ++k;
            v[s] = static_cast<float>(KV[k]);
            code[s] = k;
        }
    }
};
constexpr KvSlots KV_SLOT{};

// ------------------------------------------------------------------------------------------------ fp16
// float32 -> fp16 bits, round to nearest even: torch's `.to(torch.float16)` (c10's fp16_ieee_from_fp32_value):
// |v| >= 65520 -> inf, NaN -> 0x7e00, subnormals rounded on the 2^-24 grid, the sign kept (-0.0 -> 0x8000).
uint16_t f2h(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
    if (a >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // 65520 ties to even: to inf
    if (a >= 0x38800000u) {                                               // a normal fp16 (>= 2^-14)
        const uint32_t mant = a & 0x7fffffu, rem = mant & 0x1fffu;
        uint32_t h = (((a >> 23) - 112u) << 10) | (mant >> 13);
        if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // a carry into the exponent is still right
        return static_cast<uint16_t>(sign | h);
    }
    const uint32_t e = a >> 23;
    if (e < 102) return static_cast<uint16_t>(sign);  // below 2^-25 (float subnormals too): zero
    // value = m 2^(e-150) with the implicit bit; in fp16 subnormal units (2^-24): m >> (126 - e), shift 14..24
    const uint32_t m = (a & 0x7fffffu) | 0x800000u, shift = 126 - e;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    uint32_t h = m >> shift;
    if (rem > half || (rem == half && (h & 1u))) ++h;
    return static_cast<uint16_t>(sign | h);
}

// ------------------------------------------------------------------------------------------------ the tensor
struct Job {
    int type;
    const float* w;        // rows x cols, row-major: block b is w[32 b .. 32 b + 31]
    int64_t cols, nb;      // columns, blocks per row
    const float* imp;      // importance per column, or null
    const float* grid;     // sym: where the max element lands (float32 targets); asym: nmax + offset
    int ngrid;
    const int32_t* steps;  // sym: fp16 ulp steps around the refined d, scored at the end
    int nsteps, lloyd;
    float qlo, qhi;        // the level range (IQ4_NL: of floor(2t), the table slot); run-time values, so that
                           // GCC makes clamps against them max / min instructions (not so for constants)
    uint16_t* d;           // fp16 bits per block
    uint16_t* m;           // fp16 bits per block (asym types), else null
    uint8_t* codes;        // 32 per block
};

// sigma2 = sum(x^2)/n_per_row of rows r0 .. r1-1 into s2[0 ..], each row's sum left to right in float32
// (`row_sigma2`, llama.cpp): rows four at a time, four add chains in flight
void row_sigma2(const Job& J, int64_t r0, int64_t r1, float* s2) {
    const int64_t n = J.cols;
    const float fn = static_cast<float>(n);
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) {
        const float* p = J.w + r * n;
        float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
        for (int64_t j = 0; j < n; ++j) {
            a0 = a0 + p[j] * p[j];
            a1 = a1 + p[n + j] * p[n + j];
            a2 = a2 + p[2 * n + j] * p[2 * n + j];
            a3 = a3 + p[3 * n + j] * p[3 * n + j];
        }
        s2[r - r0] = a0 / fn, s2[r - r0 + 1] = a1 / fn, s2[r - r0 + 2] = a2 / fn, s2[r - r0 + 3] = a3 / fn;
    }
    for (; r < r1; ++r) {
        const float* p = J.w + r * n;
        float a = 0.0f;
        for (int64_t j = 0; j < n; ++j) a = a + p[j] * p[j];
        s2[r - r0] = a / fn;
    }
}

// ------------------------------------------------------------------------------------------------ N blocks
// the vector types of each lane count (a dependent vector_size in the template itself is not applied by GCC)
typedef float F4 __attribute__((vector_size(16)));
typedef int32_t I4 __attribute__((vector_size(16)));
typedef float F8 __attribute__((vector_size(32)));
typedef int32_t I8 __attribute__((vector_size(32)));
template <int N> struct Vec;
template <> struct Vec<4> { typedef F4 F; typedef I4 I; };
template <> struct Vec<8> { typedef F8 F; typedef I8 I; };

template <int N>
struct Lanes {
    typedef typename Vec<N>::F F;
    typedef typename Vec<N>::I I;

    struct Batch {
        F x[QK], w[QK], wx[QK];  // element i of N blocks; the error weights (ones without importance); w x
        F amax, mx;              // the largest |x| and the first element reaching it (C's `ax > amax`)
        F lo, hi;                // min and max
    };

    static INL F S(float v) { return v - F{}; }  // broadcast (x - +0 is x, -0 and NaN included)

    static INL I Si(int32_t v) { return v - I{}; }

    // m ? a : b lane by lane (m: a compare's -1 / 0); GCC turns `t < lo ? lo : t` and the like into max/min
    // instructions of exactly that meaning (NaN and signed zeros included)
    static INL F sel(I m, F a, F b) { return m ? a : b; }

    static INL F vabs(F x) { return (F)((I)x & Si(0x7fffffff)); }

    // round half to even (torch.round, C rint) for |t| <= 2^22: every caller clamps t to the level range first
    // (clamping before or after rounding gives the same integer for integer bounds; NaN stays NaN)
    static INL F rnd(F t) {
        const F big = S(12582912.0f);  // 1.5 * 2^23: the sum's ulp is 1
        return (t + big) - big;
    }

    static INL F clampv(F t, F lo, F hi) {  // NaN stays NaN
        t = t < lo ? lo : t;
        return t > hi ? hi : t;
    }

    static INL F inv(F d) {  // d ? 1/d : 0 (`_inv`)
        const I nz = d != S(0.0f);
        return sel(nz, S(1.0f) / sel(nz, d, S(1.0f)), S(0.0f));
    }

    // to fp16 and back (`.to(torch.float16).float()`, as h2f(f2h(v)) lane by lane; NaN stays a NaN): the
    // mantissa rounded to 10 bits (to nearest even, a carry into the exponent is right), below 2^-14 to the
    // 2^-24 grid by (a + 0.5) - 0.5 (the sum's ulp is 2^-24, 0.5 an even multiple), 65520 and up to inf
    static INL F f16r(F v) {
        const I bits = (I)v, sign = bits & Si(static_cast<int32_t>(0x80000000u));
        const F a = (F)(bits & Si(0x7fffffff));
        const I u = (I)a;
        const F normal = (F)((u + Si(0xfff) + ((u >> 13) & Si(1))) & Si(~0x1fff));
        F r = a < S(6.103515625e-05f) ? (a + S(0.5f)) - S(0.5f) : normal;  // 2^-14
        r = r >= S(65536.0f) ? S(std::numeric_limits<float>::infinity()) : r;
        return (F)((I)r | sign);
    }

    // the fp16 ulp above a (an fp16 magnitude <= 65504); `below`: the ulp below it (half that at a power of two
    // above 2^-14: the exponent drops)
    static INL F f16_ulp(F a, bool below) {
        const I e = (I)a & Si(0x7f800000);
        const F up = a < S(6.103515625e-05f) ? S(5.9604644775390625e-08f) : (F)e * S(9.765625e-04f);  // 2^-24, 2^-10
        if (!below) return up;
        const I pow2 = (((I)a & Si(0x007fffff)) == Si(0)) & (a > S(6.103515625e-05f));
        return pow2 ? up * S(0.5f) : up;
    }

    // fp16(d) moved by `st` ulps in magnitude, sign kept, saturated at 0 and the largest finite fp16, inf and
    // NaN taken as that (`_f16_steps`, which moves the fp16 bits: the same values)
    static INL F f16_step(F d, int st) {
        const I sign = (I)d & Si(static_cast<int32_t>(0x80000000u));
        F a = vabs(f16r(d));
        a = a <= S(65504.0f) ? a : S(65504.0f);
        for (; st > 0; --st) {
            a = a + f16_ulp(a, false);
            a = a <= S(65504.0f) ? a : S(65504.0f);
        }
        for (; st < 0; ++st) a = a > S(0.0f) ? a - f16_ulp(a, true) : a;
        return (F)((I)a | sign);
    }

    static INL F finite_err(F e) {  // torch.nan_to_num(e, nan=inf): NaN -> inf, inf -> the largest float
        e = sel(e == S(std::numeric_limits<float>::infinity()), S(std::numeric_limits<float>::max()), e);
        return sel(e != e, S(std::numeric_limits<float>::infinity()), e);
    }

    // the level nearest t: integers lo..hi (U), or kvalues_iq4nl with a tie going to the upper entry:
    // `_best_value`, the table of floor(2t) clamped to lo..hi = -256..228 (NaN -> -256: an in-range slot)
    template <bool U>
    static INL F nearest(F t, F lo, F hi) {
        if (U) return rnd(clampv(t, lo, hi));
        if constexpr (N == 8) return kv_search(t + t);
        F t2 = t + t;
        t2 = t2 > lo ? t2 : lo;
        t2 = t2 < hi ? t2 : hi;
        I i = __builtin_convertvector(t2, I);                // toward zero (exact: |t2| <= 256)
        i = i + (__builtin_convertvector(i, F) > t2 ? Si(-1) : Si(0));  // floor
        F v;
        for (int k = 0; k < N; ++k) v[k] = KV_SLOT.v[i[k] + 256];
        return v;
    }

    // the same for 8 lanes (AVX2): a binary search for k = #{j: v[j-1] + v[j] <= 2t} (the sums increase), its
    // thresholds and the value picked from 8-entry register tables (`__builtin_shuffle`: vpermps); a handful of
    // ops instead of one table load per lane (NaN: every compare false, k = 0 as in the table)
    static INL F kv_search(F t2) {
        static_assert(N == 8, "8-entry tables");
        auto s = [](int k) { return static_cast<float>(KV[k - 1] + KV[k]); };
        const F odd = {s(1), s(3), s(5), s(7), s(9), s(11), s(13), s(15)};  // s(k + 1) at k / 2, k even
        const F quad = {s(2), s(6), s(10), s(14), 0.0f, 0.0f, 0.0f, 0.0f};   // s(k + 2) at k / 4, k = 0 mod 4
        const F vlo = {float(KV[0]), float(KV[1]), float(KV[2]), float(KV[3]),
                       float(KV[4]), float(KV[5]), float(KV[6]), float(KV[7])};
        const F vhi = {float(KV[8]), float(KV[9]), float(KV[10]), float(KV[11]),
                       float(KV[12]), float(KV[13]), float(KV[14]), float(KV[15])};
        I m = t2 >= S(s(8));
        I k = m & Si(8);
        m = t2 >= sel(m, S(s(12)), S(s(4)));
        k = k + (m & Si(4));
        m = t2 >= __builtin_shuffle(quad, k >> 2);
        k = k + (m & Si(2));
        m = t2 >= __builtin_shuffle(odd, k >> 1);
        k = k + (m & Si(1));
        return __builtin_shuffle(vlo, vhi, k);
    }

    // load blocks b0 .. b0+n-1 (lanes from n on: zero blocks of zero weight, dropped) with their weights:
    // imp[col] * sqrt(sigma2 + x^2), sigma2 over the row, or 2 sum(x^2)/32 over the block for IQ4_NL
    static INL void fill(const Job& J, Batch& B, const float* s2rows, int64_t row0, int64_t b0, int n) {
        for (int k = 0; k < N; ++k) {
            if (k >= n) {
                for (int i = 0; i < QK; ++i) B.x[i][k] = B.w[i][k] = 0.0f;
                continue;
            }
            const int64_t b = b0 + k;
            const float* xb = J.w + b * QK;
            for (int i = 0; i < QK; ++i) B.x[i][k] = xb[i];
            if (J.imp == nullptr) {
                for (int i = 0; i < QK; ++i) B.w[i][k] = 1.0f;
                continue;
            }
            float s2;
            if (J.type == IQ4_NL) {
                float acc = 0.0f;
                for (int i = 0; i < QK; ++i) acc = acc + xb[i] * xb[i];
                s2 = acc * (2.0f / QK);
            } else {
                s2 = s2rows[b / J.nb - row0];
            }
            const float* ib = J.imp + (b % J.nb) * QK;
            for (int i = 0; i < QK; ++i) B.w[i][k] = ib[i] * std::sqrt(s2 + xb[i] * xb[i]);
        }
        B.amax = B.mx = S(0.0f);
        B.lo = B.hi = B.x[0];
        for (int i = 0; i < QK; ++i) {
            const F x = B.x[i], a = vabs(x);
            const I up = a > B.amax;
            B.amax = sel(up, a, B.amax);
            B.mx = sel(up, x, B.mx);
            B.lo = sel(x < B.lo, x, B.lo);
            B.hi = sel(x > B.hi, x, B.hi);
            B.wx[i] = B.w[i] * x;
        }
    }

    // -------------------------------------------------------------------------------------------- llama.cpp's d, m
    // make_qx_quants(32, nmax, x, L, rmse_type=1, w) (Q4_0/Q5_0 with an importance): the scale
    static INL F make_qx(const Job& J, const Batch& B, int nmax) {
        const I zero = B.amax < S(GROUP_MAX_EPS);
        const F safe = sel(zero, S(1.0f), B.mx);
        const float fn = static_cast<float>(nmax);
        const F lo = S(J.qlo), hi = S(J.qhi);  // -nmax, nmax - 1
        constexpr int T = 19;  // iscale = -nmax/max, then -(nmax + 0.1 is)/max for is = -9..-1, 1..9
        F iscale[T + 1], slx[T + 1], sl2[T + 1];
        for (int t = 0; t <= T; ++t) {
            const int is = t == 0 ? 0 : (t <= 9 ? t - 10 : t - 9);
            iscale[t] = S(is == 0 ? -fn : -(fn + 0.1f * static_cast<float>(is))) / safe;
        }
        for (int t = 0; t < T; t += 2) {  // two trials a loop (two add chains), each summed left to right
            F a0 = S(0.0f), b0 = S(0.0f), a1 = S(0.0f), b1 = S(0.0f);
            for (int i = 0; i < QK; ++i) {
                const F l0 = rnd(clampv(iscale[t] * B.x[i], lo, hi)), l1 = rnd(clampv(iscale[t + 1] * B.x[i], lo, hi));
                a0 = a0 + B.wx[i] * l0;
                b0 = b0 + (B.w[i] * l0) * l0;
                a1 = a1 + B.wx[i] * l1;
                b1 = b1 + (B.w[i] * l1) * l1;
            }
            slx[t] = a0, sl2[t] = b0, slx[t + 1] = a1, sl2[t + 1] = b1;  // (t = 19: a spare trial, unused)
        }
        F scale = S(0.0f), best = S(0.0f);
        for (int t = 0; t < T; ++t) {
            const F sc = slx[t] / sel(sl2[t] != S(0.0f), sl2[t], S(1.0f));
            if (t == 0) {
                scale = sel(sl2[t] != S(0.0f), sc, S(0.0f));
                best = scale * slx[t];
            } else {
                const I better = (sl2[t] > S(0.0f)) & (slx[t] * slx[t] > best * sl2[t]);
                scale = sel(better, sc, scale);
                best = sel(better, sc * slx[t], best);
            }
        }
        return sel(zero, S(0.0f), scale);
    }

    // make_qkx3_quants(32, nmax, x, w, ..., rmin=-0.9, rdelta=0.05, nstep=36, use_mad=false) (Q4_1/Q5_1 with
    // an importance): the scale and the min (<= 0; the offset m)
    static INL void make_qkx3(const Job& J, const Batch& B, int nmax, F& scale_out, F& min_out) {
        const float fmax = static_cast<float>(nmax), rmin = -0.9f, rdelta = 0.05f;
        const F zero = S(J.qlo), top = S(J.qhi);  // 0, nmax
        F sum_w = S(0.0f), sum_x = S(0.0f);
        for (int i = 0; i < QK; ++i) {
            sum_w = sum_w + B.w[i];
            sum_x = sum_x + B.wx[i];
        }
        F mn = sel(B.lo > S(0.0f), S(0.0f), B.lo);
        const F mx = B.hi;
        const I degen = mx <= mn;
        F rng = sel(degen, S(1.0f), mx - mn);
        F iscale = S(fmax) / rng;
        F scale = S(1.0f) / iscale, best = S(0.0f);
        for (int i = 0; i < QK; ++i) {
            const F l = rnd(clampv(iscale * (B.x[i] - mn), zero, top));
            const F diff = (scale * l + mn) - B.x[i];
            best = best + B.w[i] * (diff * diff);
        }
        F la[QK];
        for (int is = 0; is <= 36; ++is) {
            iscale = S((rmin + rdelta * static_cast<float>(is)) + fmax) / rng;
            F sl = S(0.0f), sl2 = S(0.0f), sxl = S(0.0f);
            for (int i = 0; i < QK; ++i) {
                const F v = (B.x[i] - mn) * iscale;  // v > 0 ? rint(min(v, nmax)) : 0 (inf -> nmax, NaN -> 0)
                la[i] = v > S(0.0f) ? rnd(v < top ? v : top) : S(0.0f);
                const F wl = B.w[i] * la[i];
                sl = sl + wl;
                sl2 = sl2 + wl * la[i];
                sxl = sxl + wl * B.x[i];
            }
            const F D = sum_w * sl2 - sl * sl;
            const I ok = D > S(0.0f);
            const F Ds = sel(ok, D, S(1.0f));
            F ts = (sum_w * sxl - sum_x * sl) / Ds, tm = (sl2 * sum_x - sl * sxl) / Ds;
            const I pos = tm > S(0.0f);
            tm = sel(pos, S(0.0f), tm);
            ts = sel(pos, sxl / sel(sl2 != S(0.0f), sl2, S(1.0f)), ts);
            F mad = S(0.0f);
            for (int i = 0; i < QK; ++i) {
                const F diff = (ts * la[i] + tm) - B.x[i];
                mad = mad + B.w[i] * (diff * diff);
            }
            const I better = ok & (mad < best) & ~degen;
            best = sel(better, mad, best);
            scale = sel(better, ts, scale);
            mn = sel(better, tm, mn);
            rng = sel(degen, rng, mx - mn);
        }
        scale_out = sel(degen, S(0.0f), scale);
        min_out = mn;
    }

    // quantize_row_iq4_nl_impl(32, 32, 16, ..., ntry=7): the unrounded d; weights w (x^2 without an importance)
    static INL F iq4_ref(const Job& J, const Batch& B, bool has_imp) {
        const I zero = B.amax < S(GROUP_MAX_EPS);
        const F safe = sel(zero, S(1.0f), B.mx);
        F wr[QK];
        for (int i = 0; i < QK; ++i) wr[i] = has_imp ? B.w[i] : B.x[i] * B.x[i];
        constexpr int T = 16;  // id = 1/(-max/v[0]), then (itry + v[0])/max for itry = -7..7
        F id[T], sqxs[T], sq2s[T];
        for (int t = 0; t < T; ++t)
            id[t] = t == 0 ? S(1.0f) / ((-safe) / S(static_cast<float>(KV[0])))
                           : S(static_cast<float>(t - 8 + KV[0])) / safe;
        for (int t = 0; t < T; t += 2) {  // two trials a loop (two add chains), each summed left to right
            F a0 = S(0.0f), b0 = S(0.0f), a1 = S(0.0f), b1 = S(0.0f);
            for (int i = 0; i < QK; ++i) {
                const F q0 = nearest<false>(id[t] * B.x[i], S(J.qlo), S(J.qhi));
                const F q1 = nearest<false>(id[t + 1] * B.x[i], S(J.qlo), S(J.qhi));
                const F wq0 = wr[i] * q0, wq1 = wr[i] * q1;
                a0 = a0 + wq0 * B.x[i];
                b0 = b0 + wq0 * q0;
                a1 = a1 + wq1 * B.x[i];
                b1 = b1 + wq1 * q1;
            }
            sqxs[t] = a0, sq2s[t] = b0, sqxs[t + 1] = a1, sq2s[t + 1] = b1;
        }
        F d = S(0.0f), best = S(0.0f);
        for (int t = 0; t < T; ++t) {
            const F sqx = sqxs[t], sq2 = sq2s[t];
            const I pos = sq2 > S(0.0f);
            const F dn = sqx / sel(pos, sq2, S(1.0f));
            if (t == 0) {
                d = sel(pos, dn, S(0.0f));
                best = d * sqx;
            } else {
                const I better = pos & (sqx * sqx > best * sq2);
                d = sel(better, dn, d);
                best = sel(better, dn * sqx, best);
            }
        }
        return sel(zero, S(0.0f), d);
    }

    // -------------------------------------------------------------------------------------------- default search
    static INL bool any_lane(I m) {
        for (int k = 0; k < N; ++k)
            if (m[k]) return true;
        return false;
    }

    // The trial candidates of the default search, with the twin's choice: the first of the highest score.
    // Scores within 1e-5 of the best are ties (float32 rounding of the sums, a few 1e-7 of a score, orders them
    // either way, and the twin's sums round differently), and tied trials can end far apart after the
    // refinement (a block with one dominant weight: every trial explains it, Q8_0 errors differ 2x; the two
    // ends of the asym types: the same codes shifted by one), so `tied(g)` trials are refined too and the
    // final exact error decides between them. Exact duplicates (same d and m) are refined once.
    struct Trials {
        F s[2 * MAX_GRID], d[2 * MAX_GRID], m[2 * MAX_GRID];
        int n = 0;
        F s1 = S(-2.0f), d1 = S(0.0f), m1;  // the best (the twin's start: score -2, d 0, m the block mean)
        INL explicit Trials(F m0) : m1(m0) {}
        INL void add(F score, F dd, F mm) {
            s[n] = score;
            d[n] = dd;
            m[n] = mm;
            ++n;
            const I up = score > s1;
            s1 = sel(up, score, s1);
            d1 = sel(up, dd, d1);
            m1 = sel(up, mm, m1);
        }
        INL I near(int g) const { return (s[g] > S(-1.0f)) & (s1 - s[g] <= s1 * S(1e-5f)); }
        INL I same(int g, F dd, F mm) const { return (d[g] == dd) & (m[g] == mm); }
        INL I tied(int g) const {  // lanes where trial g is a tie to refine besides the best
            I t = near(g) & ~same(g, d1, m1);
            for (int h = 0; h < g; ++h) t = t & ~(near(h) & same(h, d[g], m[g]));
            return t;
        }
    };

    // the lowest exact error so far (the first candidate always taken, then strictly lower replaces), in the
    // lanes of `mask`
    struct Pick {
        F d = S(0.0f), m = S(0.0f), err = S(0.0f);
        bool any = false;
        INL void offer(F dk, F mk, F e, I mask) {
            e = finite_err(e);
            const I up = (any ? (e < err) : Si(-1)) & mask;
            any = true;
            d = sel(up, dk, d);
            m = sel(up, mk, m);
            err = sel(up, e, err);
        }
    };

    // the default search's sums over a block: 4 interleaved partial sums (element i into i % 4, four add
    // chains in flight), added in a fixed tree; the reference candidates' sums run left to right as in C
    struct Sum4 {
        F p[4] = {S(0.0f), S(0.0f), S(0.0f), S(0.0f)};
        INL void add(int u, F v) { p[u] = p[u] + v; }
        INL F sum() const { return (p[0] + p[1]) + (p[2] + p[3]); }
    };

    // least-squares d for x ~ d q and its score, the error reduction d sum(w x q) (-1 when q == 0): `_ls_scale`
    static INL void ls_scale(F sqx, F sq2, F& d, F& score) {
        const I ok = sq2 > S(0.0f);
        d = sel(ok, sqx / sel(ok, sq2, S(1.0f)), S(0.0f));
        score = sel(ok, d * sqx, S(-1.0f));
    }

    template <bool U>
    static INL void sym_fit(const Batch& B, F s, F lo, F hi, F& d, F& score) {  // codes nearest s x
        Sum4 sqx, sq2;
        for (int i = 0; i < QK; i += 4)
#pragma GCC unroll 4
            for (int u = 0; u < 4; ++u) {
                const F q = nearest<U>(s * B.x[i + u], lo, hi);
                sqx.add(u, B.wx[i + u] * q);
                sq2.add(u, (B.w[i + u] * q) * q);
            }
        ls_scale(sqx.sum(), sq2.sum(), d, score);
    }

    template <bool U>
    static INL F sym_refine(const Job& J, const Batch& B, F lo, F hi, F bd) {  // the lloyd rounds
        for (int r = 0; r < J.lloyd; ++r) {
            F d, score;
            sym_fit<U>(B, inv(bd), lo, hi, d, score);
            bd = sel(score > S(0.0f), d, bd);
        }
        return bd;
    }

    template <bool U>
    static INL F sym_err(const Batch& B, F dk, F lo, F hi) {  // exact weighted error of fp16 d dk
        const F iv = inv(dk);
        Sum4 e;
        for (int i = 0; i < QK; i += 4)
#pragma GCC unroll 4
            for (int u = 0; u < 4; ++u) {
                const F r = B.x[i + u] - dk * nearest<U>(B.x[i + u] * iv, lo, hi);
                e.add(u, B.w[i + u] * (r * r));
            }
        return e.sum();
    }

    // `_sym_default`: the best fp16 d for x ~ d level (levels lo..hi, or kvalues when !U); dref: llama.cpp's d
    // in fp16. The best trial and its ties are refined; their fp16 steps, then dref, are scored.
    template <bool U>
    static INL F sym_default(const Job& J, const Batch& B, F lo, F hi, F dref) {
        const F safe = sel(B.amax > S(0.0f), B.mx, S(1.0f));
        Trials tr(S(0.0f));
        for (int g = 0; g < J.ngrid; ++g) {  // trial scales: the max element at each target position
            F d, score;
            sym_fit<U>(B, S(J.grid[g]) / safe, lo, hi, d, score);
            tr.add(score, d, S(0.0f));
        }
        Pick pick;
        for (int g = -1; g < J.ngrid; ++g) {  // the best, then the ties: refined, their fp16 steps scored
            const I mask = g < 0 ? Si(-1) : tr.tied(g);
            if (g >= 0 && !any_lane(mask)) continue;  // (a lane's result never depends on the others')
            const F bd = sym_refine<U>(J, B, lo, hi, g < 0 ? tr.d1 : tr.d[g]);
            for (int c = 0; c < J.nsteps; ++c) {
                const F dk = f16_step(bd, J.steps[c]);
                pick.offer(dk, S(0.0f), sym_err<U>(B, dk, lo, hi), mask);
            }
        }
        pick.offer(dref, S(0.0f), sym_err<U>(B, dref, lo, hi), Si(-1));
        return pick.d;
    }

    // weighted LS (d, m) for x ~ d L + m with fixed codes L; score = the error reduction (-1 when L is constant):
    // `_asym_fit`, but with the codes centred as well as x (the twin: sum(w L^2) - sum(w L) lbar, which cancels
    // badly under concentrated weights): codes shifted by one (the min end's and the max end's trials often are)
    // fit equally well, and their scores now agree to rounding, so `Trials` sees the tie
    static INL void asym_fit(const Batch& B, const F* wxc, const F* L, F sw, F xm, F& d, F& m, F& score) {
        Sum4 sl4, sxl4, sll4;
        for (int i = 0; i < QK; i += 4)
#pragma GCC unroll 4
            for (int u = 0; u < 4; ++u) sl4.add(u, B.w[i + u] * L[i + u]);
        const F lbar = sl4.sum() / sw;
        for (int i = 0; i < QK; i += 4)
#pragma GCC unroll 4
            for (int u = 0; u < 4; ++u) {
                const F c = L[i + u] - lbar, wc = B.w[i + u] * c;
                sxl4.add(u, wxc[i + u] * c);
                sll4.add(u, wc * c);
            }
        const F sxl = sxl4.sum(), sll = sll4.sum();
        const I ok = sll > S(0.0f);
        d = sel(ok, sxl / sel(ok, sll, S(1.0f)), S(0.0f));
        m = xm - d * lbar;
        score = sel(ok, sxl * d, S(-1.0f));
    }

    static INL void asym_codes(const Batch& B, F d, F m, F lo, F hi, F* L) {  // nearest codes of x ~ d L + m
        const F iv = inv(d);
        for (int i = 0; i < QK; ++i) L[i] = rnd(clampv((B.x[i] - m) * iv, lo, hi));
    }

    static INL F asym_err(const Batch& B, F dk, F mk, F lo, F hi) {  // exact weighted error of fp16 (d, m)
        const F iv = inv(dk);
        Sum4 e;
        for (int i = 0; i < QK; i += 4)
#pragma GCC unroll 4
            for (int u = 0; u < 4; ++u) {
                const F q = rnd(clampv((B.x[i + u] - mk) * iv, lo, hi));
                const F r = B.x[i + u] - (dk * q + mk);
                e.add(u, B.w[i + u] * (r * r));
            }
        return e.sum();
    }

    // `_asym_default`: the best fp16 (d, m) for x ~ d code + m, codes 0..nmax; dref/mref: llama.cpp's, in fp16.
    // The best trial and its ties are refined; their (fp16 d, refitted fp16 m), then llama.cpp's, are scored.
    static INL void asym_default(const Job& J, const Batch& B, F dref, F mref, F& od, F& om) {
        const F lo = S(J.qlo), hi = S(J.qhi);  // 0, nmax
        Sum4 sw4, swx4;
        for (int i = 0; i < QK; i += 4)
#pragma GCC unroll 4
            for (int u = 0; u < 4; ++u) {
                sw4.add(u, B.w[i + u]);
                swx4.add(u, B.wx[i + u]);
            }
        const F sw = sel(sw4.sum() > S(0.0f), sw4.sum(), S(1.0f));
        const F xm = swx4.sum() / sw;  // the weighted block mean
        F wxc[QK], L[QK], d, m, score;
        for (int i = 0; i < QK; ++i) wxc[i] = B.w[i] * (B.x[i] - xm);
        const F rng = sel(B.hi > B.lo, B.hi - B.lo, S(1.0f));
        Trials tr(xm);
        for (int g = 0; g < J.ngrid; ++g) {  // iscale = (nmax + offset)/(max - min), rounded from either end
            const F iscale = S(J.grid[g]) / rng;
            for (int i = 0; i < QK; ++i) L[i] = rnd(clampv((B.x[i] - B.lo) * iscale, lo, hi));
            asym_fit(B, wxc, L, sw, xm, d, m, score);
            tr.add(score, d, m);
            for (int i = 0; i < QK; ++i) L[i] = hi - rnd(clampv((B.hi - B.x[i]) * iscale, lo, hi));
            asym_fit(B, wxc, L, sw, xm, d, m, score);
            tr.add(score, d, m);
        }
        Pick pick;
        for (int g = -1; g < tr.n; ++g) {  // the best, then the ties: refined, (fp16 d, refitted m) scored
            const I mask = g < 0 ? Si(-1) : tr.tied(g);
            if (g >= 0 && !any_lane(mask)) continue;  // (a lane's result never depends on the others')
            F bd = g < 0 ? tr.d1 : tr.d[g], bm = g < 0 ? tr.m1 : tr.m[g];
            for (int r = 0; r < J.lloyd; ++r) {  // nearest codes / LS rounds
                asym_codes(B, bd, bm, lo, hi, L);
                asym_fit(B, wxc, L, sw, xm, d, m, score);
                const I up = (bd > S(0.0f)) & (score > S(0.0f));
                bd = sel(up, d, bd);
                bm = sel(up, m, bm);
            }
            asym_codes(B, bd, bm, lo, hi, L);
            const F d16 = f16r(bd);
            Sum4 acc;
            for (int i = 0; i < QK; i += 4)
#pragma GCC unroll 4
                for (int u = 0; u < 4; ++u) acc.add(u, B.w[i + u] * (B.x[i + u] - d16 * L[i + u]));
            const F m16 = f16r(acc.sum() / sw);  // m refitted for the fp16 d
            pick.offer(d16, m16, asym_err(B, d16, m16, lo, hi), mask);
        }
        pick.offer(dref, mref, asym_err(B, dref, mref, lo, hi), Si(-1));
        od = pick.d;
        om = pick.m;
    }

    // -------------------------------------------------------------------------------------------- driver
    static INL void encode_batch(const Job& J, Batch& B, const float* s2rows, int64_t row0, int64_t b0, int n) {
        fill(J, B, s2rows, row0, b0, n);
        const bool has_imp = J.imp != nullptr;
        const F lo = S(J.qlo), hi = S(J.qhi);
        F d = S(0.0f), m = S(0.0f);
        switch (J.type) {
            case Q8_0:  // quantize_q8_0 ignores the importance: d = amax/127
                d = sym_default<true>(J, B, lo, hi, f16r(B.amax / S(127.0f)));
                break;
            case Q4_0:
            case Q5_0: {
                const int nmax = J.type == Q4_0 ? 8 : 16;
                const F dref = has_imp ? make_qx(J, B, nmax) : B.mx / S(static_cast<float>(-nmax));
                d = sym_default<true>(J, B, lo, hi, f16r(dref));
                break;
            }
            case IQ4_NL:
                d = sym_default<false>(J, B, lo, hi, f16r(iq4_ref(J, B, has_imp)));
                break;
            default: {  // Q4_1, Q5_1
                const int nmax = J.type == Q4_1 ? 15 : 31;
                F dref, mref;
                if (has_imp) {
                    make_qkx3(J, B, nmax, dref, mref);
                } else {  // quantize_row_q4_1_ref: d = (max - min)/nmax, m = min
                    dref = (B.hi - B.lo) / S(static_cast<float>(nmax));
                    mref = B.lo;
                }
                asym_default(J, B, f16r(dref), f16r(mref), d, m);
            }
        }
        for (int k = 0; k < n; ++k) {
            J.d[b0 + k] = f2h(d[k]);
            if (J.m != nullptr) J.m[b0 + k] = f2h(m[k]);
        }
        codes(J, B, d, J.m != nullptr ? m : S(0.0f), b0, n);  // (d, m: fp16 values already)
    }

    // the codes under the stored (d, m): the nearest level of t = (x - m)/d, ties to the lower level, d = 0 as
    // 1: `quantize_columns`' rule, c = ceil(2t) - 1 (the largest integer below 2t: the doubled midpoints are
    // integers); 2t is first clamped to a range giving the same clamped code (NaN to the lowest code)
    static INL void codes(const Job& J, const Batch& B, F d, F m, int64_t b0, int n) {
        const F safe = d == S(0.0f) ? S(1.0f) : d;
        const bool kv = J.type == IQ4_NL;
        const F lo2 = S(kv ? -256.0f : 2.0f * J.qlo - 2.0f), hi2 = S(kv ? 229.0f : 2.0f * J.qhi + 2.0f);
        const int32_t lo = static_cast<int32_t>(J.qlo), top = static_cast<int32_t>(J.qhi) - lo;
        uint8_t* out = J.codes + b0 * QK;
        for (int i = 0; i < QK; ++i) {
            const F t = (B.x[i] - m) / safe;
            F t2 = t + t;
            t2 = t2 > lo2 ? t2 : lo2;
            t2 = t2 < hi2 ? t2 : hi2;
            I c = __builtin_convertvector(t2, I);                            // toward zero
            c = c + (__builtin_convertvector(c, F) < t2 ? Si(0) : Si(-1));  // ceil(2t) - 1
            I k;
            if (kv) {
                c = c < Si(-256) ? Si(-256) : c;
                for (int l = 0; l < N; ++l) k[l] = KV_SLOT.code[c[l] + 256];
            } else {
                k = ((c - Si(2 * lo + 1)) >> 1) + Si(1);  // floor((c - (2 lo + 1))/2) + 1
                k = k < Si(0) ? Si(0) : k;
                k = k > Si(top) ? Si(top) : k;
            }
            for (int l = 0; l < n; ++l) out[l * QK + i] = static_cast<uint8_t>(k[l]);
        }
    }

    static INL void range(const Job* J, int64_t b0, int64_t b1) {
        Batch B;
        std::vector<float> s2;  // the row sigma2 of this range's rows (with an importance, but IQ4_NL's is per block)
        const int64_t row0 = b0 / J->nb;
        if (J->imp != nullptr && J->type != IQ4_NL && b0 < b1) {
            s2.resize(static_cast<size_t>((b1 - 1) / J->nb - row0 + 1));
            row_sigma2(*J, row0, (b1 - 1) / J->nb + 1, s2.data());
        }
        for (int64_t b = b0; b < b1; b += N)
            encode_batch(*J, B, s2.data(), row0, b, static_cast<int>(b1 - b < N ? b1 - b : N));
    }
};

// one build of the lanes per ISA (the always-inlined lane code compiles under each function's target)
typedef void (*RangeFn)(const Job*, int64_t, int64_t);

void range_base(const Job* J, int64_t b0, int64_t b1) { Lanes<4>::range(J, b0, b1); }
#ifdef QTOOL_X86
__attribute__((target("avx2"))) void range_avx2(const Job* J, int64_t b0, int64_t b1) {
    Lanes<8>::range(J, b0, b1);
}
#endif

// isa: 0 the widest this CPU has, 1 baseline, 2 AVX2 (capped at what the CPU has); *used: the one run
RangeFn pick_isa(int isa, int* used) {
    int best = 1;
#ifdef QTOOL_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) best = 2;
#endif
    const int k = isa <= 0 || isa > best ? best : isa;
    *used = k;
#ifdef QTOOL_X86
    if (k == 2) return range_avx2;
#endif
    return range_base;
}

}  // namespace

// One tensor: w (rows x cols float32, cols % 32 == 0), imp (cols float32) or null; grid/steps: the default
// search's trial targets (or nmax + offsets) and fp16 steps; writes d (and m for Q4_1/Q5_1, else pass null) as
// fp16 bits per block (rows x cols/32) and the codes (rows x cols uint8: level indices, as the codec's
// `quantize`). type: 0 Q8_0, 1 Q4_0, 2 Q5_0, 3 Q4_1, 4 Q5_1, 5 IQ4_NL. isa: 0 = the best available (see
// pick_isa; the result is the same for every isa). Returns the ISA used (1 baseline, 2 AVX2), or a negative
// number for rejected arguments.
extern "C" int qtool_gguf_legacy_encode(int type, const float* w, int64_t rows, int64_t cols, const float* imp,
                                        const float* grid, int ngrid, const int32_t* steps, int nsteps, int lloyd,
                                        uint16_t* d, uint16_t* m, uint8_t* codes, int threads, int isa) {
    const bool asym = type == Q4_1 || type == Q5_1;
    if (type < Q8_0 || type > IQ4_NL || rows < 0 || cols <= 0 || cols % QK != 0 || ngrid < 0 ||
        ngrid > MAX_GRID || nsteps < 0 || lloyd < 0)
        return -1;
    if (w == nullptr || d == nullptr || codes == nullptr || (ngrid > 0 && grid == nullptr) ||
        (nsteps > 0 && steps == nullptr) || asym != (m != nullptr))
        return -2;
    int used = 1;
    const RangeFn run = pick_isa(isa, &used);
    const int64_t nb = cols / QK, nblocks = rows * nb;
    static const float QLO[6] = {-128.0f, -8.0f, -16.0f, 0.0f, 0.0f, -256.0f};
    static const float QHI[6] = {127.0f, 7.0f, 15.0f, 15.0f, 31.0f, 228.0f};
    const Job J{type, w, cols, nb, imp, grid, ngrid, steps, nsteps, lloyd, QLO[type], QHI[type], d, m, codes};
    const int64_t nbatch = (nblocks + ALIGN - 1) / ALIGN;
    int64_t t = threads < 1 ? 1 : threads;
    if (t > nbatch / 4) t = nbatch / 4 > 0 ? nbatch / 4 : 1;  // at least 64 blocks a thread
    const int64_t chunk = (nbatch + t - 1) / t * ALIGN;      // blocks per thread
    std::vector<std::thread> pool;
    for (int64_t k = 1; k < t; ++k) {
        const int64_t b0 = k * chunk, b1 = b0 + chunk < nblocks ? b0 + chunk : nblocks;
        if (b0 < b1) pool.emplace_back(run, &J, b0, b1);
    }
    run(&J, 0, chunk < nblocks ? chunk : nblocks);
    for (auto& th : pool) th.join();
    return used;
}

// fp16 rounding of n floats (tests): bits[i] = the fp16 bits of in[i] (the scalar conversion that writes d and m),
// back[i] = the lanes' round trip (f16r), steps[i] = the value `st` fp16 ulps away (f16_step)
extern "C" void qtool_gguf_legacy_f16(const float* in, uint16_t* bits, float* back, float* steps, int st, int64_t n) {
    typedef Lanes<4> L;
    for (int64_t i = 0; i < n; i += 4) {
        L::F v = L::S(0.0f);
        for (int k = 0; k < 4 && i + k < n; ++k) v[k] = in[i + k];
        const L::F r = L::f16r(v), s = L::f16_step(v, st);
        for (int k = 0; k < 4 && i + k < n; ++k) {
            bits[i + k] = f2h(in[i + k]);
            back[i + k] = r[k];
            steps[i + k] = s[k];
        }
    }
}
