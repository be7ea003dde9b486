// GGUF k-quant default encoders ("better" encoders, faithful=False), one call per tensor.
//
// Torch twins (kept as the fallback and the reference): qtool/formats/gguf_k4.py `_better_k` (Q4_K, Q5_K:
// `_objective_weights`, `_fit_subblocks`, `_sub_error_k`, `_refit_d_dmin`) and qtool/formats/gguf_k16.py
// `_sym_sub_search` + `_sym_super` (Q6_K, Q3_K), `_affine_sub_exact` + `_affine_super` (Q2_K). The same
// algorithms, search grids (passed in by the Python side, so they have one definition), candidate orders and
// keep-if-strictly-better rules, in the same float32 operations (float64 where the twin sums in float64), with
// the sums in the order torch's CPU reductions use (`casc32` and friends below, cumsum's float64 accumulator)
// and the one fused multiply-add the twin gets from torch (`torch.addcmul` on AVX2/AVX-512 builds): on such
// machines the kernel reproduces the twin's output, up to the rare spot where the twin's own arithmetic is not
// IEEE (torch's sqrt, in Q4_K/Q5_K's importance weights) and a near-tie goes the other way
// (tests/formats/test_gguf_kquants_native.py compares the objective per super-block and the totals).
//
// Layout: a super-block is held transposed, one 8-lane vector per element position with one sub-block per
// lane (Q4_K/Q5_K: 8 sub-blocks of 32 -> 32 vectors; Q6_K/Q3_K/Q2_K: 16 sub-blocks of 16 -> two halves of 16
// vectors), so every per-sub-block quantity (sums, LS fits, candidate errors, keep-if-better selections) is a
// lane of a vector and no float operation depends on the vector width.
//
// Determinism: super-blocks are independent and each is computed by one thread, so results do not depend on
// the thread count. The build flags (runtime/native.py) forbid FMA contraction and fast-math; the vectors are
// GCC vector extensions (elementwise IEEE operations), compiled for x86-64-v4 (AVX-512) / v3 (AVX2 + FMA) /
// baseline by target_clones (never AMX), all bit-identical: the explicit fmaf is exactly rounded everywhere
// (libm's on the baseline clone), rounding to nearest-even uses the 1.5·2^23 trick on values first clamped to
// the code range (clamping by integers commutes with rounding), and fp16 conversion is c10's (round to
// nearest even, as torch's .to(float16)).
//
// Outputs (caller-allocated): fp16 bits of d (and dmin), the integer sub-scales / mins, and the codes: the
// nearest levels under the decoded params exactly as the codec's `quantize` computes them (ties to the lower
// level), so `quantize(w, fit(w))` equals `encode(w).codes`.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define QT_INLINE inline __attribute__((always_inline))
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define QT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define QT_CLONES
#endif

// the 8-lane vector types only ever live inside always-inlined helpers of one clone: no ABI crossing
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

constexpr int QK = 256;

typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

// ------------------------------------------------------------------------------------------------ scalars

QT_INLINE float rne(float v) {  // torch.round / nearbyint: half to even, any finite or non-finite v
    const float big = 8388608.0f;  // 2^23: |v| + 2^23 has no fraction bits left
    const float a = std::fabs(v);
    float r = (a + big) - big;
    r = a < big ? r : a;  // |v| >= 2^23 (or NaN): already an integer
    return std::copysign(r, v);
}

QT_INLINE float clampf(float v, float lo, float hi) {  // torch.clamp (NaN passes through)
    v = v < lo ? lo : v;
    return v > hi ? hi : v;
}

QT_INLINE float nz(float v) { return v == 0.0f ? 1.0f : v; }  // `_nz` / `_safe`

QT_INLINE uint32_t fbits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

QT_INLINE float bitsf(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

// float -> fp16 bits, round to nearest even (c10's fp16_ieee_from_fp32_value: what torch's .to(float16) does)
QT_INLINE uint16_t f2h(float f) {
    const float scale_to_inf = bitsf(UINT32_C(239) << 23);  // 0x1.0p+112f
    const float scale_to_zero = bitsf(UINT32_C(17) << 23);  // 0x1.0p-110f
    float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
    const uint32_t w = fbits(f);
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & UINT32_C(0x80000000);
    uint32_t bias = shl1_w & UINT32_C(0xFF000000);
    if (bias < UINT32_C(0x71000000)) bias = UINT32_C(0x71000000);
    base = bitsf((bias >> 1) + UINT32_C(0x07800000)) + base;
    const uint32_t bits = fbits(base);
    const uint32_t exp_bits = (bits >> 13) & UINT32_C(0x00007C00);
    const uint32_t mantissa_bits = bits & UINT32_C(0x00000FFF);
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return static_cast<uint16_t>((sign >> 16) | (shl1_w > UINT32_C(0xFF000000) ? UINT32_C(0x7E00) : nonsign));
}

QT_INLINE float h2f(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {
        const float v = static_cast<float>(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
        return sign ? -v : v;
    }
    if (e == 31) return bitsf(sign | UINT32_C(0x7f800000) | (m << 13));
    return bitsf(sign | ((e + 112) << 23) | (m << 13));
}

QT_INLINE uint16_t f2h_sat(float f) { return f2h(clampf(f, -65504.0f, 65504.0f)); }  // `_fp16_sat` / `f16`

// ------------------------------------------------------------------------------------------------ vectors

QT_INLINE v8f splat(float f) { return v8f{f, f, f, f, f, f, f, f}; }

typedef double v4d __attribute__((vector_size(32)));

QT_INLINE v8f vld(const float* p) {
    v8f v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

QT_INLINE v4d lo4(v8f v) { return v4d{v[0], v[1], v[2], v[3]}; }  // float -> double, exact
QT_INLINE v4d hi4(v8f v) { return v4d{v[4], v[5], v[6], v[7]}; }

QT_INLINE v8f vmin_(v8f v, v8f hi) { return v > hi ? hi : v; }  // NaN passes through
QT_INLINE v8f vmax_(v8f v, v8f lo) { return v < lo ? lo : v; }
QT_INLINE v8f vclamp(v8f v, v8f lo, v8f hi) { return vmin_(vmax_(v, lo), hi); }
QT_INLINE v8f vnz(v8f v) { return v == 0.0f ? splat(1.0f) : v; }

// round half to even of v in [-2^22, 2^22] (callers clamp first): v + 1.5·2^23 lies in [2^23, 2^24)
QT_INLINE v8f vrne_small(v8f v) {
    const v8f c = splat(12582912.0f);
    return (v + c) - c;
}

// ceil of v in [-2^22, 2^22]
QT_INLINE v8f vceil_small(v8f v) {
    const v8f r = vrne_small(v);
    return r < v ? r + 1.0f : r;
}

// round half to even, any v (torch.round)
QT_INLINE v8f vrne(v8f v) {
    const v8f big = splat(8388608.0f);
    const v8f a = (v8f)((v8i)v & 0x7fffffff);
    v8f r = (a + big) - big;
    r = a < big ? r : a;
    return (v8f)((v8i)r | ((v8i)v & (int32_t)0x80000000u));
}

// fused a·b + c per lane (exactly rounded on every ISA: a hardware FMA, else libm's fmaf)
QT_INLINE v8f vfma(v8f a, v8f b, v8f c) {
    v8f r;
    for (int l = 0; l < 8; ++l) r[l] = __builtin_fmaf(a[l], b[l], c[l]);
    return r;
}

// Sums in torch's order (ATen's cascade_sum on a contiguous row, 8-float vectors, 4 accumulators; the
// twin's results are the same on AVX2 and AVX-512 machines). A row of 32: lane l of ((v0 + v1) + v2) + v3
// (v_i = elements 8i..8i+7), then the 8 lanes in order from 0. A row of 16: lane l of v0 + v1, then in
// order. A row of 8 (the sub-blocks of a Q4_K super-block): in order. Here `p(j)` is element j of every
// sub-block at once (one per lane of the transposed layout).
template <class F>
QT_INLINE v8f casc32(F&& p) {
    v8f s = {};
    for (int l = 0; l < 8; ++l) s += ((p(l) + p(8 + l)) + p(16 + l)) + p(24 + l);
    return s;
}

template <class F>
QT_INLINE v8f casc16(F&& p) {
    v8f s = {};
    for (int l = 0; l < 8; ++l) s += p(l) + p(8 + l);
    return s;
}

// a contiguous row of 256 (a whole super-block): 32 vectors in 4 accumulators (vector m into m % 4)
QT_INLINE float casc256(const float* v) {
    float P[4][8] = {};
    for (int m = 0; m < 32; ++m)
        for (int l = 0; l < 8; ++l) P[m % 4][l] += v[8 * m + l];
    float s = 0.0f;
    for (int l = 0; l < 8; ++l) s += ((P[0][l] + P[1][l]) + P[2][l]) + P[3][l];
    return s;
}

QT_INLINE float lane_sum(v8f v) {  // sequential over the lanes (= over sub-blocks in order)
    float s = 0.0f;
    for (int l = 0; l < 8; ++l) s += v[l];
    return s;
}

QT_INLINE float lane_max(v8f v) {  // torch amax (exact whatever the order; no NaN here)
    float m = v[0];
    for (int l = 1; l < 8; ++l) m = v[l] > m ? v[l] : m;
    return m;
}

template <class F>
void parallel(int64_t n, int threads, F&& f) {
    int64_t t = threads < 1 ? 1 : threads;
    if (t > n) t = n > 0 ? n : 1;
    if (t == 1) {
        f(int64_t(0), n);
        return;
    }
    std::vector<std::thread> pool;
    const int64_t chunk = (n + t - 1) / t;
    for (int64_t k = 1; k < t; ++k) {
        const int64_t r0 = k * chunk, r1 = std::min(n, r0 + chunk);
        if (r0 < r1) pool.emplace_back([&f, r0, r1] { f(r0, r1); });
    }
    f(int64_t(0), std::min(n, chunk));
    for (auto& th : pool) th.join();
}

// ================================================================================================ Q4_K / Q5_K
// gguf_k4.py: 8 sub-blocks of 32, x ≈ (d·sc)·q − dmin·m, q in 0..nmax, sc/m 6-bit.

struct K4Cfg {
    float nmax;
    const float* kf;  // (float)(nmax + k) for k in _KS_Q4 / _KS_Q5
    int nks;
    int refine;  // `_fit_subblocks` refine rounds
    const float* shifts;
    int nshifts;
    const int32_t* sched;  // prefix lengths of `pairs`, one per round
    int nsched;
    const int32_t* pairs;  // (npairs, 2) (sc, m) offsets
};

constexpr int S4 = 32;  // elements per sub-block (= vectors of the transposed super-block)

struct K4Blk {
    v8f X[S4];  // X[j][s] = x[32 s + j]
    v8f O[S4];  // objective weights, same layout (weighted case)
    v8f Sw, Sx, Sxx;
};

// `_stats`: Σωq, Σωq², Σωxq per sub-block
template <bool W>
QT_INLINE void k4_stats(const K4Blk& B, const v8f* Q, v8f& Sl, v8f& Sll, v8f& Sxl) {
    v8f a = {}, b = {}, c = {};
    for (int l = 0; l < 8; ++l) {
        v8f pa[4], pb[4], pc[4];
        for (int i = 0; i < 4; ++i) {
            const int j = l + 8 * i;
            const v8f q = Q[j];
            const v8f wq = W ? B.O[j] * q : q;
            pa[i] = wq;
            pb[i] = wq * q;
            pc[i] = wq * B.X[j];
        }
        a += ((pa[0] + pa[1]) + pa[2]) + pa[3];
        b += ((pb[0] + pb[1]) + pb[2]) + pb[3];
        c += ((pc[0] + pc[1]) + pc[2]) + pc[3];
    }
    Sl = a;
    Sll = b;
    Sxl = c;
}

// `_affine_lsq`: x ≈ a·l + b with b <= 0; returns the `ok` mask
QT_INLINE v8i affine_lsq(v8f Sw, v8f Sl, v8f Sll, v8f Sx, v8f Sxl, v8f& a, v8f& b) {
    const v8f D = Sw * Sll - Sl * Sl;
    const v8i ok = D > 0.0f;
    const v8f Ds = ok ? D : splat(1.0f);
    a = (Sw * Sxl - Sx * Sl) / Ds;
    b = (Sll * Sx - Sl * Sxl) / Ds;
    const v8i pos = b > 0.0f;
    a = pos ? Sxl / vnz(Sll) : a;
    b = pos ? splat(0.0f) : b;
    return ok;
}

// `_fit_subblocks`: per sub-block (a, mn) with x ≈ a·q − mn
template <bool W>
QT_INLINE void k4_fit(const K4Blk& B, const K4Cfg& c, v8f& a_out, v8f& mn_out) {
    v8f mn0 = B.X[0], mx = B.X[0];
    for (int j = 1; j < S4; ++j) {
        mn0 = B.X[j] < mn0 ? B.X[j] : mn0;
        mx = B.X[j] > mx ? B.X[j] : mx;
    }
    const v8f zero = splat(0.0f), vnmax = splat(c.nmax);
    mn0 = mn0 > 0.0f ? zero : mn0;
    const v8f rng = mx - mn0;
    const v8i flat = rng == 0.0f;
    const v8f rs = flat ? splat(1.0f) : rng;
    v8f XM[S4], Q[S4];
    for (int j = 0; j < S4; ++j) XM[j] = (B.X[j] - mn0) / rs;
    v8f best = splat(INFINITY), a = zero, b = mn0;
    for (int k = 0; k < c.nks; ++k) {
        const v8f f = splat(c.kf[k]);
        for (int j = 0; j < S4; ++j) Q[j] = vrne_small(vclamp(XM[j] * f, zero, vnmax));
        v8f Sl, Sll, Sxl, ak, bk;
        k4_stats<W>(B, Q, Sl, Sll, Sxl);
        const v8i ok = affine_lsq(B.Sw, Sl, Sll, B.Sx, Sxl, ak, bk);
        const v8f err = ((((B.Sxx - (2.0f * ak) * Sxl) - (2.0f * bk) * B.Sx) + (ak * ak) * Sll) +
                         ((2.0f * ak) * bk) * Sl) + (bk * bk) * B.Sw;
        const v8i u = ok & (err < best);
        best = u ? err : best;
        a = u ? ak : a;
        b = u ? bk : b;
    }
    for (int r = 0; r < c.refine; ++r) {
        const v8f as = vnz(a);
        for (int j = 0; j < S4; ++j) Q[j] = vceil_small(vclamp((B.X[j] - b) / as - 0.5f, zero, vnmax));
        v8f Sl, Sll, Sxl, a2, b2;
        k4_stats<W>(B, Q, Sl, Sll, Sxl);
        const v8i ok = affine_lsq(B.Sw, Sl, Sll, B.Sx, Sxl, a2, b2) & (a2 > 0.0f);
        a = ok ? a2 : a;
        b = ok ? b2 : b;
    }
    a = vmax_(a, zero);
    a_out = flat ? zero : a;
    mn_out = -b;
}

// `_sub_error_k`: per sub-block Σω·(x − (A·q − B))², q nearest via the reciprocal (the search's rounding)
template <bool W>
QT_INLINE v8f k4_err(const K4Blk& B, v8f A, v8f Bm, float nmax, v8f* Qout) {
    const v8f inv = 1.0f / vnz(A);
    const v8f zero = splat(0.0f), vnmax = splat(nmax);
    const v8f nA = -A;
    return casc32([&](int j) {
        const v8f xb = B.X[j] + Bm;
        const v8f q = vceil_small(vclamp(xb * inv - 0.5f, zero, vnmax));
        const v8f r = vfma(q, nA, xb);  // torch.addcmul(xb, q, A, value=-1): one fused op on AVX2/AVX-512
        const v8f e = r * r;
        if (Qout) Qout[j] = q;
        return W ? B.O[j] * e : e;
    });
}

template <bool W>
QT_INLINE void k4_block(const float* x, const float* imp, const K4Cfg& c, uint16_t* d_out, uint16_t* dmin_out,
                        uint8_t* sc_out, uint8_t* m_out, uint8_t* codes) {
    K4Blk B;
    for (int j = 0; j < S4; ++j)
        for (int s = 0; s < 8; ++s) B.X[j][s] = x[S4 * s + j];
    if (W) {  // `_objective_weights`
        float xx[QK], om[QK];
        for (int i = 0; i < QK; ++i) xx[i] = x[i] * x[i];
        const float sigma2 = (2.0f * casc256(xx)) / 256.0f;
        for (int i = 0; i < QK; ++i) om[i] = imp[i] * std::sqrt(sigma2 + xx[i]);
        const float mean = casc256(om) / 256.0f;
        const float e = mean * 1e-4f;
        for (int i = 0; i < QK; ++i) om[i] = mean > 0.0f ? om[i] + e : 1.0f;
        for (int j = 0; j < S4; ++j)
            for (int s = 0; s < 8; ++s) B.O[j][s] = om[S4 * s + j];
        B.Sw = casc32([&](int j) { return B.O[j]; });
        B.Sx = casc32([&](int j) { return B.O[j] * B.X[j]; });
        B.Sxx = casc32([&](int j) { return (B.O[j] * B.X[j]) * B.X[j]; });
    } else {
        B.Sw = splat(static_cast<float>(S4));
        B.Sx = casc32([&](int j) { return B.X[j]; });
        B.Sxx = casc32([&](int j) { return B.X[j] * B.X[j]; });
    }
    const float nmax = c.nmax;
    v8f a, mn;
    k4_fit<W>(B, c, a, mn);
    uint16_t d = f2h_sat(lane_max(a) / 63.0f), dmin = f2h_sat(lane_max(mn) / 63.0f);
    float bestE = 0.0f;
    uint16_t bd = 0, bdm = 0;
    v8f bsc = {}, bm = {};
    v8f Q[S4];
    const v8f zero = splat(0.0f), top = splat(63.0f);
    for (int r = 0; r < c.nsched; ++r) {
        const int np = c.sched[r];
        const float df = h2f(d), dmf = h2f(dmin);
        const v8f vdf = splat(df), vdmf = splat(dmf);
        const v8f s0 = vrne(a / vnz(vdf)), m0 = vrne(mn / vnz(vdmf));
        v8f bE = {}, cs = {}, cm = {};
        for (int p = 0; p < np; ++p) {
            const v8f s_ = vclamp(s0 + static_cast<float>(c.pairs[2 * p]), zero, top);
            const v8f m_ = vclamp(m0 + static_cast<float>(c.pairs[2 * p + 1]), zero, top);
            const v8f E = k4_err<W>(B, vdf * s_, vdmf * m_, nmax, nullptr);
            const v8i u = p == 0 ? v8i{-1, -1, -1, -1, -1, -1, -1, -1} : (E < bE);
            bE = u ? E : bE;
            cs = u ? s_ : cs;
            cm = u ? m_ : cm;
        }
        const v8f s_ = vclamp(s0, zero, top);
        for (int k = 0; k < c.nshifts; ++k) {
            const v8f m_ = vclamp(vrne((mn + a * c.shifts[k]) / vnz(vdmf)), zero, top);
            const v8f E = k4_err<W>(B, vdf * s_, vdmf * m_, nmax, nullptr);
            const v8i u = (np == 0 && k == 0) ? v8i{-1, -1, -1, -1, -1, -1, -1, -1} : (E < bE);
            bE = u ? E : bE;
            cs = u ? s_ : cs;
            cm = u ? m_ : cm;
        }
        const float Esum = lane_sum(bE);
        if (r == 0 || Esum < bestE) {
            bestE = Esum;
            bd = d;
            bdm = dmin;
            bsc = cs;
            bm = cm;
        }
        // `_refit_d_dmin`: (d, dmin) by weighted LS over the super-block, sub-scales and codes fixed
        k4_err<W>(B, vdf * cs, vdmf * cm, nmax, Q);
        v8f Sq, Sqq, Sxq;
        k4_stats<W>(B, Q, Sq, Sqq, Sxq);
        const float A11 = lane_sum((cs * cs) * Sqq);
        const float A12 = -lane_sum((cs * cm) * Sq);
        const float A22 = lane_sum((cm * cm) * B.Sw);
        const float b1 = lane_sum(cs * Sxq);
        const float b2 = -lane_sum(cm * B.Sx);
        const float det = A11 * A22 - A12 * A12;
        bool ok = det > 0.0f;
        const float dets = ok ? det : 1.0f;
        const float dn = (b1 * A22 - A12 * b2) / dets;
        const float dmn = (A11 * b2 - A12 * b1) / dets;
        ok = ok && dn > 0.0f && dmn >= 0.0f;
        const bool only = A22 == 0.0f && A11 > 0.0f;
        const float d1 = b1 / nz(A11);
        const float d_new = ok ? dn : ((only && d1 > 0.0f) ? d1 : df);
        const float dm_new = ok ? dmn : dmf;
        const uint16_t d2 = f2h_sat(d_new), dm2 = f2h_sat(dm_new);
        const float E2 = lane_sum(k4_err<W>(B, splat(h2f(d2)) * cs, splat(h2f(dm2)) * cm, nmax, nullptr));
        if (E2 < bestE) {
            bestE = E2;
            bd = d2;
            bdm = dm2;
            bsc = cs;
            bm = cm;
        }
        d = bd;
        dmin = bdm;
    }
    *d_out = bd;
    *dmin_out = bdm;
    // codes: `_KQuantCodec.quantize_columns` under the decoded params: ceil((x − offset)/scale − ½) clamped
    const v8f scale = splat(h2f(bd)) * bsc;
    const v8f off = -(splat(h2f(bdm)) * bm);
    const v8f safe = vnz(scale);
    const v8f vnmax = splat(nmax);
    for (int s = 0; s < 8; ++s) {
        sc_out[s] = static_cast<uint8_t>(bsc[s]);
        m_out[s] = static_cast<uint8_t>(bm[s]);
    }
    for (int j = 0; j < S4; ++j) {
        const v8f t = (B.X[j] - off) / safe;
        v8f q = vceil_small(vclamp(t - 0.5f, zero, vnmax));
        q = t != t ? vnmax : q;  // NaN -> top level (as bucketize)
        for (int s = 0; s < 8; ++s) codes[S4 * s + j] = static_cast<uint8_t>(q[s]);
    }
}

struct K4Args {
    const float* w;
    int64_t nb;  // super-blocks per row
    const float* imp;
    K4Cfg cfg;
    uint16_t* d;
    uint16_t* dmin;
    uint8_t* sc;
    uint8_t* m;
    uint8_t* codes;
    std::atomic<int> nonfinite;  // set when a super-block holds NaN/Inf (the caller then runs the twin)
};

QT_INLINE bool all_finite(const float* x) {  // no element with an all-ones exponent (NaN/Inf)
    v8i bad = {};
    for (int i = 0; i < QK; i += 8) bad |= ((v8i)vld(x + i) & 0x7f800000) == 0x7f800000;
    int any = 0;
    for (int l = 0; l < 8; ++l) any |= bad[l];
    return any == 0;
}

QT_CLONES void k4_range(K4Args& A, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        const float* x = A.w + b * QK;
        if (!all_finite(x)) {
            A.nonfinite.store(1, std::memory_order_relaxed);
            continue;
        }
        if (A.imp)
            k4_block<true>(x, A.imp + (b % A.nb) * QK, A.cfg, A.d + b, A.dmin + b, A.sc + b * 8, A.m + b * 8,
                           A.codes + b * QK);
        else
            k4_block<false>(x, nullptr, A.cfg, A.d + b, A.dmin + b, A.sc + b * 8, A.m + b * 8, A.codes + b * QK);
    }
}

// ================================================================================================ Q6_K / Q3_K
// gguf_k16.py: 16 sub-blocks of 16, x ≈ (d·sc)·l, l in -nq..nq-1, sc integer in [sc_lo, sc_hi].
// Two halves of 8 sub-blocks, each 16 vectors (element position j, lane = sub-block).

constexpr int S16 = 16;

struct SymCfg {
    float nq;
    const float* grid;  // `_sym_sub_search` starting scales (as float32)
    int ngrid;
    int sub_refine;  // its rounding / LS rounds
    float sc_lo, sc_hi;
    const float* dgrid;  // `_sym_super` d_grid (as float32)
    int ndgrid;
    int refits;
};

struct SymHalf {
    v8f X[S16];
    v8f W[S16];  // importance (weighted case)
    v8f S;       // ideal sub-block scales
};

// `_sym_sub_search`: per sub-block the weighted-LS scale
template <bool W>
QT_INLINE v8f sym_sub(const SymHalf& H, const SymCfg& c) {
    v8f amax = (v8f)((v8i)H.X[0] & 0x7fffffff), mx = H.X[0];
    for (int j = 1; j < S16; ++j) {  // signed absmax, first index on ties
        const v8f av = (v8f)((v8i)H.X[j] & 0x7fffffff);
        const v8i u = av > amax;
        amax = u ? av : amax;
        mx = u ? H.X[j] : mx;
    }
    const v8i nzb = amax > 0.0f;
    mx = nzb ? mx : splat(1.0f);
    v8f WX[S16], L[S16];
    for (int j = 0; j < S16; ++j) WX[j] = W ? H.W[j] * H.X[j] : H.X[j];
    v8f best_sc = splat(-1.0f), best_s = splat(0.0f);
    const v8f lo = splat(-c.nq), hi = splat(c.nq - 1.0f);
    auto consider = [&]() {
        const v8f sxl = casc16([&](int j) { return WX[j] * L[j]; });
        const v8f sll = casc16([&](int j) { return (W ? H.W[j] * L[j] : L[j]) * L[j]; });
        const v8i ok = sll > 0.0f;
        const v8f s = sxl / vnz(sll);
        const v8f score = ok ? sxl * s : splat(0.0f);
        const v8i better = score > best_sc;
        best_s = better ? s : best_s;
        best_sc = better ? score : best_sc;
    };
    const v8f rmx = 1.0f / mx;  // `g / mx` is reciprocal(mx)·g in torch
    for (int g = 0; g < c.ngrid; ++g) {
        const v8f f = rmx * c.grid[g];
        for (int j = 0; j < S16; ++j) L[j] = vrne_small(vclamp(f * H.X[j], lo, hi));
        consider();
    }
    for (int r = 0; r < c.sub_refine; ++r) {
        const v8f bs = vnz(best_s);
        for (int j = 0; j < S16; ++j) L[j] = vrne_small(vclamp(H.X[j] / bs, lo, hi));
        consider();
    }
    return nzb ? best_s : splat(0.0f);
}

// `_sym_super`'s evaluate on one half: per sub-block the best sc in {r−1, r, r+1}; returns the errors
template <bool W>
QT_INLINE v8f sym_eval(const SymHalf& H, float d, const SymCfg& c, v8f& sc) {
    const v8f vd = splat(d);
    const v8f r = vrne(H.S / vnz(vd));
    const v8f lo = splat(-c.nq), hi = splat(c.nq - 1.0f), slo = splat(c.sc_lo), shi = splat(c.sc_hi);
    v8f be = {}, bsc = {};
    for (int k = -1; k <= 1; ++k) {
        const v8f scv = vclamp(r + static_cast<float>(k), slo, shi);
        const v8f t = vd * scv;
        const v8f ts = vnz(t);
        const v8f acc = casc16([&](int j) {
            const v8f q = vrne_small(vclamp(H.X[j] / ts, lo, hi));
            const v8f e = H.X[j] - t * q;
            const v8f e2 = e * e;
            return W ? H.W[j] * e2 : e2;
        });
        const v8i u = k == -1 ? v8i{-1, -1, -1, -1, -1, -1, -1, -1} : (acc < be);
        be = u ? acc : be;
        bsc = u ? scv : bsc;
    }
    sc = bsc;
    return be;
}

template <bool W>
QT_INLINE float sym_eval_all(const SymHalf* H, float d, const SymCfg& c, v8f* sc) {
    const v8f e0 = sym_eval<W>(H[0], d, c, sc[0]);
    const v8f e1 = sym_eval<W>(H[1], d, c, sc[1]);
    float t = 0.0f;  // a row of 16 sub-blocks in torch's order: lane l of (e[l] + e[8 + l]), then in order
    for (int l = 0; l < 8; ++l) t += e0[l] + e1[l];
    return t;
}

template <bool W>
QT_INLINE void sym_block(const float* x, const float* imp, const SymCfg& c, uint16_t* d_out, int8_t* sc_out,
                         uint8_t* codes) {
    SymHalf H[2];
    for (int h = 0; h < 2; ++h)
        for (int j = 0; j < S16; ++j)
            for (int s = 0; s < 8; ++s) {
                H[h].X[j][s] = x[S16 * (8 * h + s) + j];
                if (W) H[h].W[j][s] = imp[S16 * (8 * h + s) + j];
            }
    for (int h = 0; h < 2; ++h) H[h].S = sym_sub<W>(H[h], c);
    // signed absmax of the 16 ideal scales (first on ties)
    float smax = H[0].S[0], amax = std::fabs(smax);
    for (int i = 1; i < 16; ++i) {
        const float v = H[i / 8].S[i % 8];
        if (std::fabs(v) > amax) {
            amax = std::fabs(v);
            smax = v;
        }
    }
    float bestE = 0.0f, bd = 0.0f;
    v8f bsc[2] = {}, sc[2];
    for (int g = 0; g < c.ndgrid; ++g) {
        const float d = h2f(f2h_sat(smax / c.dgrid[g]));
        const float e = sym_eval_all<W>(H, d, c, sc);
        if (g == 0 || e < bestE) {
            bestE = e;
            bd = d;
            bsc[0] = sc[0];
            bsc[1] = sc[1];
        }
    }
    const v8f lo = splat(-c.nq), hi = splat(c.nq - 1.0f);
    for (int r = 0; r < c.refits; ++r) {
        // float32 products summed in float64 in torch's order: a row of 256 in 4-double vectors, vector m into
        // accumulator m % 4, then ((P0 + P1) + P2) + P3 and its 4 lanes in order. Vector m = 4·sb + j/4 holds
        // elements j = 4(m % 4) .. +3 of sub-block sb, so accumulator k runs over the sub-blocks in order.
        v4d pn[4] = {}, pd[4] = {};
        for (int sb = 0; sb < 16; ++sb) {
            const float scv = bsc[sb / 8][sb % 8];
            const v8f vsc = splat(scv), ts = splat(nz(bd * scv));
            for (int half = 0; half < 2; ++half) {
                const v8f xv = vld(x + S16 * sb + 8 * half);
                const v8f q = vrne_small(vclamp(xv / ts, lo, hi));
                const v8f a = vsc * q;
                const v8f wa = W ? vld(imp + S16 * sb + 8 * half) * a : a;
                const v8f n8 = wa * xv, d8 = wa * a;
                pn[2 * half] += lo4(n8);
                pn[2 * half + 1] += hi4(n8);
                pd[2 * half] += lo4(d8);
                pd[2 * half + 1] += hi4(d8);
            }
        }
        const v4d pnv = ((pn[0] + pn[1]) + pn[2]) + pn[3], pdv = ((pd[0] + pd[1]) + pd[2]) + pd[3];
        double num = 0.0, den = 0.0;
        for (int l = 0; l < 4; ++l) {
            num += pnv[l];
            den += pdv[l];
        }
        const double dn = den > 0.0 ? num / den : static_cast<double>(bd);
        const float d = h2f(f2h_sat(static_cast<float>(dn)));
        const float e = sym_eval_all<W>(H, d, c, sc);
        if (e < bestE) {
            bestE = e;
            bd = d;
            bsc[0] = sc[0];
            bsc[1] = sc[1];
        }
    }
    *d_out = f2h(bd);
    // codes: the base `quantize_columns` (bucketize on the level midpoints: nearest level, ties to the lower)
    for (int h = 0; h < 2; ++h) {
        const v8f safe = vnz(splat(bd) * bsc[h]);
        for (int s = 0; s < 8; ++s) sc_out[8 * h + s] = static_cast<int8_t>(bsc[h][s]);
        for (int j = 0; j < S16; ++j) {
            const v8f t = vclamp((H[h].X[j] - 0.0f) / safe, lo, hi);
            const v8f rr = vrne_small(t);
            v8f lv = (rr - t) == 0.5f ? rr - 1.0f : rr;  // a tie rounded up: take the lower level
            lv = t != t ? hi : lv;                        // NaN -> top level
            const v8f code = lv - lo;
            for (int s = 0; s < 8; ++s) codes[S16 * (8 * h + s) + j] = static_cast<uint8_t>(code[s]);
        }
    }
}

struct SymArgs {
    const float* w;
    int64_t nb;
    const float* imp;
    SymCfg cfg;
    uint16_t* d;
    int8_t* sc;
    uint8_t* codes;
};

QT_CLONES void sym_range(const SymArgs& A, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        const float* x = A.w + b * QK;
        if (A.imp)
            sym_block<true>(x, A.imp + (b % A.nb) * QK, A.cfg, A.d + b, A.sc + b * 16, A.codes + b * QK);
        else
            sym_block<false>(x, nullptr, A.cfg, A.d + b, A.sc + b * 16, A.codes + b * QK);
    }
}


// ================================================================================================ Q2_K
// gguf_k16.py `_affine_sub_exact` + `_affine_super`: 16 sub-blocks of 16, x ≈ (d·sc)·q − dmin·m, q in 0..3,
// sc/m 4-bit. Per sub-block the exact affine fit over every monotone 4-level partition of its sorted elements
// (the cut search runs on 8 sub-blocks per vector), then the joint fp16 (d, dmin) / integer (sc, m) search.

QT_INLINE v8i splat_i(int v) { return v8i{v, v, v, v, v, v, v, v}; }

QT_INLINE v8f vfloor(v8f v) {  // floor, any v
    const v8f r = vrne(v);
    return r > v ? r - 1.0f : r;
}

QT_INLINE float casc16s(const float* p) {  // casc16 on one contiguous row
    float s = 0.0f;
    for (int l = 0; l < 8; ++l) s += p[l] + p[8 + l];
    return s;
}

struct Q2Sub {  // one sub-block: its elements sorted (stable), weight sums and tail sums (`_tail_sums`)
    float sw, swx, xbar;
    float TW[17], TX[17];
};

QT_INLINE void q2_prep(const float* x, const float* w, Q2Sub& o) {
    int idx[16];
    for (int i = 0; i < 16; ++i) idx[i] = i;
    for (int i = 1; i < 16; ++i) {  // stable insertion sort by x (torch's sort keeps ties in index order)
        const int v = idx[i];
        int j = i - 1;
        while (j >= 0 && x[idx[j]] > x[v]) {
            idx[j + 1] = idx[j];
            --j;
        }
        idx[j + 1] = v;
    }
    float xs[16], ws[16], p[16];
    for (int i = 0; i < 16; ++i) {
        xs[i] = x[idx[i]];
        ws[i] = w ? w[idx[i]] : 1.0f;
        p[i] = ws[i] * xs[i];
    }
    o.sw = casc16s(ws);
    o.swx = casc16s(p);
    o.xbar = o.swx / nz(o.sw);
    double aw = 0.0, ax = 0.0;  // torch's cumsum accumulates float in double (from the end: flip, cumsum, flip)
    o.TW[16] = 0.0f;
    o.TX[16] = 0.0f;
    for (int k = 15; k >= 0; --k) {
        aw += static_cast<double>(ws[k]);
        ax += static_cast<double>(ws[k] * (xs[k] - o.xbar));
        o.TW[k] = static_cast<float>(aw);
        o.TX[k] = static_cast<float>(ax);
    }
}

// `_affine_cut_search` on 8 sub-blocks (lanes): the first best cut triple (a <= b <= c) in the twin's order
// (b ascending; within b the first maximum over a, then c). Returns a·289 + b·17 + c per lane.
template <bool CONSTRAINED>
QT_INLINE v8i q2_cuts(const v8f* TW, const v8f* TX, v8f sw, v8f swx, v8f xbar) {
    v8f best = splat(-1.0f);
    v8i bi = {};
    const v8f eps = (sw * sw) * (float)1e-6 + (float)1e-30;
    const v8f isw = 1.0f / vnz(sw);  // `1 / _safe(sw)`: reciprocal(·)·1
    const v8f swx2 = (swx * swx) * isw;
    for (int b = 0; b < 17; ++b) {
        const v8f Bw = TW[b], Bx = TX[b];
        v8f C1[17], C5[17], Cx[17], swC5[17];
        for (int c = b; c < 17; ++c) {
            C1[c] = TW[c] + Bw;
            C5[c] = TW[c] * 5.0f + Bw * 3.0f;
            Cx[c] = TX[c] + Bx;
            swC5[c] = sw * C5[c];
        }
        for (int a = 0; a <= b; ++a) {
            const v8f Aw = TW[a], Ax = TX[a], swAw = sw * Aw;
            for (int c = b; c < 17; ++c) {
                const v8f sl = Aw + C1[c];
                const v8f sxl = Ax + Cx[c];
                v8f R;
                if (!CONSTRAINED) {
                    R = (sxl * sxl) / vmax_((swAw + swC5[c]) - sl * sl, eps);
                } else {
                    const v8f sll = Aw + C5[c];
                    const v8f var = sll - (sl * sl) * isw;
                    R = (sxl * sxl) / vmax_(var, sll * (float)1e-6 + (float)1e-30);
                    const v8i infeasible = (var <= sll * (float)1e-6) | (xbar * var > (sxl * sl) * isw);
                    const v8f sxu = sxl + xbar * sl;
                    const v8f R0 = (sxu * sxu) / (sll + (float)1e-30);
                    R = infeasible ? R0 : R + swx2;
                }
                const v8i u = R > best;
                best = u ? R : best;
                bi = u ? splat_i(a * 289 + b * 17 + c) : bi;
            }
        }
    }
    return bi;
}

// the closed-form weighted LS of one cut triple (`solve` in `_affine_sub_exact`)
struct Q2Solve {
    float s, m, sl, sll, sxl;
    bool ok;
};

QT_INLINE Q2Solve q2_solve(const Q2Sub& o, int code) {
    const int a = code / 289, b = (code / 17) % 17, c = code % 17;
    Q2Solve r;
    r.sl = (o.TW[a] + o.TW[b]) + o.TW[c];
    r.sll = (o.TW[a] + o.TW[b] * 3.0f) + o.TW[c] * 5.0f;
    r.sxl = ((o.TX[a] + o.TX[b]) + o.TX[c]) + o.xbar * r.sl;
    const float D = o.sw * r.sll - r.sl * r.sl;
    r.ok = D > (o.sw * (float)1e-6) * r.sll;
    const float Ds = r.ok ? D : 1.0f;
    r.s = (o.sw * r.sxl - o.swx * r.sl) / Ds;
    r.m = (r.sll * o.swx - r.sl * r.sxl) / Ds;
    return r;
}

struct Q2Half {
    v8f X[S16];
    v8f W[S16];
    v8f S, M, LB;  // ideal scale, min to subtract (>= 0), weighted mean code
};

// `_affine_sub_exact` for the 8 sub-blocks of one half (x, w: the super-block, original layout)
template <bool W>
QT_INLINE void q2_subs(const float* x, const float* w, int h, Q2Half& H) {
    Q2Sub o[8];
    v8f TW[17], TX[17], sw, swx, xbar;
    for (int s = 0; s < 8; ++s) {
        const int sb = 8 * h + s;
        q2_prep(x + S16 * sb, W ? w + S16 * sb : nullptr, o[s]);
        for (int k = 0; k < 17; ++k) {
            TW[k][s] = o[s].TW[k];
            TX[k][s] = o[s].TX[k];
        }
        sw[s] = o[s].sw;
        swx[s] = o[s].swx;
        xbar[s] = o[s].xbar;
    }
    const v8i cut = q2_cuts<false>(TW, TX, sw, swx, xbar);
    Q2Solve r[8];
    bool redo_any = false;
    bool redo[8];
    for (int s = 0; s < 8; ++s) {
        r[s] = q2_solve(o[s], cut[s]);
        redo[s] = !r[s].ok || r[s].m > 0.0f || r[s].s < 0.0f;
        redo_any |= redo[s];
    }
    if (redo_any) {  // the min <= 0 constrained search where the free fit is infeasible
        const v8i cut2 = q2_cuts<true>(TW, TX, sw, swx, xbar);
        for (int s = 0; s < 8; ++s) {
            if (!redo[s]) continue;
            r[s] = q2_solve(o[s], cut2[s]);
            if (!r[s].ok || r[s].m > 0.0f || r[s].s < 0.0f) {
                r[s].m = 0.0f;
                r[s].s = r[s].sll > 0.0f ? r[s].sxl / nz(r[s].sll) : 0.0f;
            }
        }
    }
    for (int s = 0; s < 8; ++s) {
        const int sb = 8 * h + s;
        const float* xs = x + S16 * sb;
        const float* ws = W ? w + S16 * sb : nullptr;
        float sv = r[s].s < 0.0f ? 0.0f : r[s].s, mv = r[s].m;
        // a (near) constant sub-block: s = 0 and the best constant min(mean, 0) may beat every partition's fit
        const float ss = nz(sv), mc = o[s].xbar > 0.0f ? 0.0f : o[s].xbar;
        float pe[16], pc[16];
        for (int j = 0; j < 16; ++j) {
            const float l = clampf(rne((xs[j] - mv) / ss), 0.0f, 3.0f);
            const float e = (xs[j] - sv * l) - mv;
            const float ec = xs[j] - mc;
            pe[j] = W ? ws[j] * (e * e) : e * e;
            pc[j] = W ? ws[j] * (ec * ec) : ec * ec;
        }
        const bool cst = casc16s(pc) < casc16s(pe);
        H.S[s] = cst ? 0.0f : sv;
        H.M[s] = -(cst ? mc : mv);
        H.LB[s] = cst ? 0.0f : r[s].sl / nz(o[s].sw);
        for (int j = 0; j < 16; ++j) {
            H.X[j][s] = xs[j];
            if (W) H.W[j][s] = ws[j];
        }
    }
}

// `_affine_super`'s evaluate on one half: per sub-block the best (sc, m) of the 6 candidates
template <bool W>
QT_INLINE v8f q2_eval(const Q2Half& H, float d, float dmin, v8f& sc_out, v8f& m_out) {
    const v8f vd = splat(d), vdm = splat(dmin);
    const v8f rs = vrne(H.S / vnz(vd));
    const v8f dms = vnz(vdm);
    const v8f zero = splat(0.0f), q15 = splat(15.0f), q3 = splat(3.0f);
    v8f be = {}, bsc = {}, bm = {};
    bool first = true;
    for (int k = -1; k <= 1; ++k) {
        const v8f sc = vclamp(rs + static_cast<float>(k), zero, q15);
        const v8f t = vd * sc;
        const v8f ts = vnz(t);
        const v8f fl = vfloor(vmax_(H.M + (t - H.S) * H.LB, zero) / dms);
        for (int j = 0; j < 2; ++j) {
            const v8f m = vclamp(fl + static_cast<float>(j), zero, q15);
            const v8f off = -(vdm * m);
            const v8f e = casc16([&](int i) {
                const v8f q = vrne_small(vclamp((H.X[i] - off) / ts, zero, q3));
                const v8f r = H.X[i] - (t * q + off);
                const v8f r2 = r * r;
                return W ? H.W[i] * r2 : r2;
            });
            const v8i u = first ? splat_i(-1) : (e < be);
            first = false;
            be = u ? e : be;
            bsc = u ? sc : bsc;
            bm = u ? m : bm;
        }
    }
    sc_out = bsc;
    m_out = bm;
    return be;
}

template <bool W>
QT_INLINE void q2_block(const float* x, const float* w, const float* init, int ninit, int refits, uint16_t* d_out,
                        uint16_t* dmin_out, uint8_t* sc_out, uint8_t* m_out, uint8_t* codes) {
    Q2Half H[2];
    q2_subs<W>(x, w, 0, H[0]);
    q2_subs<W>(x, w, 1, H[1]);
    float smax = H[0].S[0], mmax = H[0].M[0];  // amax over the 16 sub-blocks
    for (int i = 1; i < 16; ++i) {
        const float sv = H[i / 8].S[i % 8], mv = H[i / 8].M[i % 8];
        smax = sv > smax ? sv : smax;
        mmax = mv > mmax ? mv : mmax;
    }
    float bestE = INFINITY, bd = 0.0f, bdm = 0.0f;
    v8f bsc[2] = {}, bm[2] = {};
    auto keep = [&](float d, float dm) {
        v8f sc[2], m[2];
        const v8f e0 = q2_eval<W>(H[0], d, dm, sc[0], m[0]);
        const v8f e1 = q2_eval<W>(H[1], d, dm, sc[1], m[1]);
        float e = 0.0f;  // a row of 16 sub-blocks in torch's order
        for (int l = 0; l < 8; ++l) e += e0[l] + e1[l];
        if (e < bestE) {
            bestE = e;
            bd = d;
            bdm = dm;
            bsc[0] = sc[0];
            bsc[1] = sc[1];
            bm[0] = m[0];
            bm[1] = m[1];
        }
    };
    for (int i = 0; i < ninit; ++i) keep(h2f(f2h_sat(smax / init[2 * i])), h2f(f2h_sat(mmax / init[2 * i + 1])));
    for (int r = 0; r < refits; ++r) {
        // (d, dmin) by weighted LS in float64 given sc, m and the codes; sums over the 256 elements in torch's
        // order (4-double vectors, accumulator k = element j / 4 of each sub-block, sub-blocks in order)
        v4d Saa[4] = {}, Sab[4] = {}, Sbb[4] = {}, Sax[4] = {}, Sbx[4] = {};
        for (int sb = 0; sb < 16; ++sb) {
            const float scv = bsc[sb / 8][sb % 8], mv = bm[sb / 8][sb % 8];
            const float t = bd * scv, off = -(bdm * mv);
            const v8f ts = splat(nz(t)), voff = splat(off), vsc = splat(scv);
            const v4d bmd = v4d{mv, mv, mv, mv};
            for (int half = 0; half < 2; ++half) {
                const v8f xv = vld(x + S16 * sb + 8 * half);
                const v8f q = vrne_small(vclamp((xv - voff) / ts, splat(0.0f), splat(3.0f)));
                const v8f a8 = vsc * q;
                const v8f w8 = W ? vld(w + S16 * sb + 8 * half) : splat(1.0f);
                for (int p = 0; p < 2; ++p) {
                    const v4d a = p ? hi4(a8) : lo4(a8), wd = p ? hi4(w8) : lo4(w8), xd = p ? hi4(xv) : lo4(xv);
                    const int k = 2 * half + p;
                    Saa[k] += (wd * a) * a;
                    Sab[k] += (wd * a) * bmd;
                    Sbb[k] += (wd * bmd) * bmd;
                    Sax[k] += (wd * a) * xd;
                    Sbx[k] += (wd * bmd) * xd;
                }
            }
        }
        auto total = [](const v4d* P) {
            const v4d v = ((P[0] + P[1]) + P[2]) + P[3];
            double s = 0.0;
            for (int l = 0; l < 4; ++l) s += v[l];
            return s;
        };
        const double saa = total(Saa), sab = total(Sab), sbb = total(Sbb), sax = total(Sax), sbx = total(Sbx);
        const double det = saa * sbb - sab * sab;
        const bool good = det > (1e-12 * saa) * sbb;
        const double dets = good ? det : 1.0;
        double d2 = good ? (sax * sbb - sab * sbx) / dets : sax / (saa > 0.0 ? saa : 1.0);
        const double dm2 = good ? (sab * sax - saa * sbx) / dets : static_cast<double>(bdm);
        d2 = saa > 0.0 ? d2 : static_cast<double>(bd);
        keep(h2f(f2h_sat(static_cast<float>(d2))), h2f(f2h_sat(static_cast<float>(dm2))));
    }
    *d_out = f2h(bd);
    *dmin_out = f2h(bdm);
    // codes: the base `quantize_columns` (nearest level, ties to the lower) under the decoded params
    for (int h = 0; h < 2; ++h) {
        const v8f scale = splat(bd) * bsc[h];
        const v8f off = -(splat(bdm) * bm[h]);
        const v8f safe = vnz(scale);
        for (int s = 0; s < 8; ++s) {
            sc_out[8 * h + s] = static_cast<uint8_t>(bsc[h][s]);
            m_out[8 * h + s] = static_cast<uint8_t>(bm[h][s]);
        }
        for (int j = 0; j < S16; ++j) {
            const v8f t = vclamp((H[h].X[j] - off) / safe, splat(0.0f), splat(3.0f));
            const v8f rr = vrne_small(t);
            v8f lv = (rr - t) == 0.5f ? rr - 1.0f : rr;
            lv = t != t ? splat(3.0f) : lv;
            for (int s = 0; s < 8; ++s) codes[S16 * (8 * h + s) + j] = static_cast<uint8_t>(lv[s]);
        }
    }
}

struct Q2Args {
    const float* w;
    int64_t nb;
    const float* imp;
    const float* init;  // (ninit, 2) divisors of max S / max M for the starting (d, dmin)
    int ninit;
    int refits;
    uint16_t* d;
    uint16_t* dmin;
    uint8_t* sc;
    uint8_t* m;
    uint8_t* codes;
};

QT_CLONES void q2_range(const Q2Args& A, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
        const float* x = A.w + b * QK;
        if (A.imp)
            q2_block<true>(x, A.imp + (b % A.nb) * QK, A.init, A.ninit, A.refits, A.d + b, A.dmin + b,
                           A.sc + b * 16, A.m + b * 16, A.codes + b * QK);
        else
            q2_block<false>(x, nullptr, A.init, A.ninit, A.refits, A.d + b, A.dmin + b, A.sc + b * 16,
                            A.m + b * 16, A.codes + b * QK);
    }
}

}  // namespace

extern "C" {

int qtool_kquant_abi() { return 1; }

// The fp16 conversions the encoders use, exposed for the tests: to_f16 (round to nearest even, as torch's
// .to(float16)); saturate != 0 clamps to ±65504 first (`_fp16_sat`). from_f16: fp16 bits -> float.
void qtool_kquant_to_f16(const float* x, int64_t n, int saturate, uint16_t* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = saturate ? f2h_sat(x[i]) : f2h(x[i]);
}

void qtool_kquant_from_f16(const uint16_t* h, int64_t n, float* out) {
    for (int64_t i = 0; i < n; ++i) out[i] = h2f(h[i]);
}

// Q4_K / Q5_K default encoder over n_blocks super-blocks (rows × cols/256, rows contiguous).
// imp: cols importance values or null. Outputs per super-block d, dmin (fp16 bits), 8 sc, 8 m, 256 codes.
// Returns 0, 1/2 for bad arguments, 3 when the weight holds NaN/Inf (outputs incomplete: use the twin).
int qtool_k4_encode(const float* w, int64_t n_blocks, int64_t blocks_per_row, const float* imp, int nmax,
                    const float* kf, int nks, int refine, const float* shifts, int nshifts, const int32_t* sched,
                    int nsched, const int32_t* pairs, int npairs, int threads, uint16_t* d, uint16_t* dmin,
                    uint8_t* sc, uint8_t* m, uint8_t* codes) {
    if (n_blocks < 0 || blocks_per_row <= 0 || (nmax != 15 && nmax != 31) || nks < 1 || refine < 0 ||
        nshifts < 0 || nsched < 1)
        return 1;
    for (int r = 0; r < nsched; ++r)
        if (sched[r] < 0 || sched[r] > npairs || (sched[r] == 0 && nshifts == 0)) return 2;
    K4Args A{w, blocks_per_row, imp,
             K4Cfg{static_cast<float>(nmax), kf, nks, refine, shifts, nshifts, sched, nsched, pairs},
             d, dmin, sc, m, codes, {0}};
    parallel(n_blocks, threads, [&A](int64_t b0, int64_t b1) { k4_range(A, b0, b1); });
    return A.nonfinite.load() ? 3 : 0;
}

// Q6_K (nq 32, sc -128..127) / Q3_K (nq 4, sc -32..31) default encoder. Outputs d (fp16 bits), 16 signed
// sub-scales and 256 codes (level + nq) per super-block.
int qtool_sym_encode(const float* w, int64_t n_blocks, int64_t blocks_per_row, const float* imp, int nq,
                     const float* grid, int ngrid, int sub_refine, int sc_lo, int sc_hi, const float* dgrid,
                     int ndgrid, int refits, int threads, uint16_t* d, int8_t* sc, uint8_t* codes) {
    if (n_blocks < 0 || blocks_per_row <= 0 || nq < 1 || nq > 128 || ngrid < 1 || sub_refine < 0 || ndgrid < 1 ||
        refits < 0 || sc_lo > sc_hi || sc_lo < -128 || sc_hi > 127)
        return 1;
    SymArgs A{w, blocks_per_row, imp,
              SymCfg{static_cast<float>(nq), grid, ngrid, sub_refine, static_cast<float>(sc_lo),
                     static_cast<float>(sc_hi), dgrid, ndgrid, refits},
              d, sc, codes};
    parallel(n_blocks, threads, [&A](int64_t b0, int64_t b1) { sym_range(A, b0, b1); });
    return 0;
}

// Q2_K default encoder. init: (ninit, 2) float divisors (qmax·fd, qmax·fm) of the starting (d, dmin); refits:
// float64 LS rounds. Outputs d, dmin (fp16 bits), 16 sc and 16 m (0..15) and 256 codes per super-block.
int qtool_q2_encode(const float* w, int64_t n_blocks, int64_t blocks_per_row, const float* imp, const float* init,
                    int ninit, int refits, int threads, uint16_t* d, uint16_t* dmin, uint8_t* sc, uint8_t* m,
                    uint8_t* codes) {
    if (n_blocks < 0 || blocks_per_row <= 0 || ninit < 1 || refits < 0) return 1;
    Q2Args A{w, blocks_per_row, imp, init, ninit, refits, d, dmin, sc, m, codes};
    parallel(n_blocks, threads, [&A](int64_t b0, int64_t b1) { q2_range(A, b0, b1); });
    return 0;
}

}  // extern "C"
