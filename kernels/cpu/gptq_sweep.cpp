// GPTQ's inner column sweep over one lazy batch, for affine integer grids.
//
// Torch twin: `_sweep_torch` in qtool/methods/gptq.py; this kernel must equal it bit for bit
// (tests/methods/test_gptq_native.py). Every operation is the twin's, in the same order, in float32:
//
//   y = x / s + z;  q = rint(clamp(y, qmin, qmax))             (the codec's quantize_columns)
//   d = round_to_scale_dtype((q - z) * s)                       (its dequantize_columns; (q - z) * s is exact
//                                                                in float32 for bf16/fp16 scales and |q - z| < 256)
//   e = (x - d) / u_ii;  w[j] -= e * U[i, j] for j >= i          (GPTQ's error feedback inside the batch)
//
// Rows are independent, so they are split across `threads` std::threads. Build flags (runtime/native.py)
// forbid FMA contraction and fast-math, so results do not depend on the machine's vector width.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

namespace {

enum ScaleDtype { F32 = 0, F16 = 1, BF16 = 2 };

inline float round_to(float v, int sdt) {
    if (sdt == F16) return static_cast<float>(static_cast<_Float16>(v));  // round to nearest even
    if (sdt == BF16) {
        uint32_t u;
        std::memcpy(&u, &v, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) return v;  // NaN stays NaN
        u += 0x7fffu + ((u >> 16) & 1u);                 // round to nearest even on the dropped 16 bits
        u &= 0xffff0000u;
        std::memcpy(&v, &u, 4);
    }
    return v;
}

struct Args {
    float* w; int64_t ldw;           // the batch's columns W1 [rows, b] (updated in place)
    const float* u; int64_t ldu;     // U1 [b, b]: the batch's block of the upper Cholesky factor of H^-1
    const float* s; const float* z;  // per-column scale and zero [rows, b] (float32 values of the stored ones)
    int64_t lds;
    const float* ud;                 // U1's diagonal [b]
    float* e; int64_t lde;           // scaled errors E1 [rows, b] (columns c0..c1 written)
    int8_t* q; int64_t ldq;          // codes [rows, ...], column i of the batch at q[i]
    int64_t b, c0, c1;
    float qmin, qmax;
    int sdt;
};

void rows(const Args& a, int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
        float* w = a.w + r * a.ldw;
        const float* s = a.s + r * a.lds;
        const float* z = a.z + r * a.lds;
        float* e = a.e + r * a.lde;
        int8_t* q = a.q + r * a.ldq;
        for (int64_t i = a.c0; i < a.c1; ++i) {
            const float x = w[i];
            float y = x / s[i] + z[i];
            y = y < a.qmin ? a.qmin : y;   // torch.clamp_: max(min(...)) on non-NaN input
            y = y > a.qmax ? a.qmax : y;
            const float code = std::nearbyint(y);  // half to even, as torch.round
            const float d = round_to((code - z[i]) * s[i], a.sdt);
            const float err = (x - d) / a.ud[i];
            const float* ui = a.u + i * a.ldu;
            for (int64_t j = i; j < a.b; ++j) {
                const float t = err * ui[j];
                w[j] -= t;
            }
            e[i] = err;
            q[i] = static_cast<int8_t>(code);
        }
    }
}

}  // namespace

extern "C" int qtool_gptq_sweep(float* w, int64_t ldw, const float* u, int64_t ldu, const float* s,
                                const float* z, int64_t lds, const float* ud, float* e, int64_t lde,
                                int8_t* q, int64_t ldq, int64_t n_rows, int64_t b, int64_t c0, int64_t c1,
                                int qmin, int qmax, int sdt, int threads) {
    if (n_rows < 0 || b < 0 || c0 < 0 || c1 > b || c0 > c1 || (sdt != F32 && sdt != F16 && sdt != BF16)) return 1;
    Args a{w, ldw, u, ldu, s, z, lds, ud, e, lde, q, ldq, b, c0, c1,
           static_cast<float>(qmin), static_cast<float>(qmax), sdt};
    const int64_t work = n_rows * (c1 - c0) * (b - c0);
    int64_t t = threads < 1 ? 1 : threads;
    if (work < (int64_t(1) << 18)) t = 1;  // thread start-up would cost more than the sweep
    if (t > n_rows) t = n_rows > 0 ? n_rows : 1;
    if (t == 1) {
        rows(a, 0, n_rows);
        return 0;
    }
    std::vector<std::thread> pool;
    const int64_t chunk = (n_rows + t - 1) / t;
    for (int64_t k = 1; k < t; ++k) {
        const int64_t r0 = k * chunk, r1 = r0 + chunk < n_rows ? r0 + chunk : n_rows;
        if (r0 < r1) pool.emplace_back(rows, std::cref(a), r0, r1);
    }
    rows(a, 0, chunk < n_rows ? chunk : n_rows);
    for (auto& th : pool) th.join();
    return 0;
}
