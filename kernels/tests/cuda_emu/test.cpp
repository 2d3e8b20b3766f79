// Checks every kernel of kernels/src/cuda/kernels.cu on the CPU under emu.h against naive references
// (independent ggml-order dequantizers, f64 sums, naive causal softmax attention), with the launch shapes
// gpu.rs uses. Built and run by scripts/cuda-emu-test.sh; a GPU run is still needed for timing, memory
// coalescing and anything emu.h does not model (alignment faults, the real memory model).
#include "kernels_host.cu"
#include <cstdio>
#include <cstdlib>
#include <string>
static uint64_t rs = 88172645463325252ull;
static uint64_t rnd() { rs ^= rs << 13; rs ^= rs >> 7; rs ^= rs << 17; return rs; }
static float frand() { return ((rnd() >> 40) / 16777216.0f) * 2.f - 1.f; }
static float h2f(u16 h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
static u16 f2h(float x) { _Float16 h = (_Float16)x; u16 r; memcpy(&r, &h, 2); return r; }
static int fails = 0;
static void check(const char* what, const std::vector<float>& got, const std::vector<double>& want, double tol) {
    double worst = 0, scale = 1e-30; size_t at = 0;
    for (double w : want) scale = std::max(scale, std::fabs(w));
    for (size_t i = 0; i < want.size(); i++) {
        double e = std::fabs(got[i] - want[i]) / scale;
        if (!(e <= worst)) { worst = e; at = i; }
    }
    bool ok = worst <= tol;
    if (!ok) fails++;
    printf("%s %-50s max rel err %.3g (at %zu: %g vs %g)\n", ok ? "ok  " : "FAIL", what, worst, at, got[at], want[at]);
}
// Reference dequantizers (ggml order, as kernels/src/quant).
static void deq_q8_0(const u8* b, float* y) { float d = h2f(b[0] | b[1] << 8); for (int i = 0; i < 32; i++) y[i] = d * (float)(signed char)b[2 + i]; }
static void scale_min_k4(int j, const u8* q, int& sc, int& m) {
    if (j < 4) { sc = q[j] & 63; m = q[j + 4] & 63; } else { sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4); m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4); }
}
static void deq_q4_k(const u8* b, float* y) {
    float d = h2f(b[0] | b[1] << 8), mn = h2f(b[2] | b[3] << 8); const u8* sc = b + 4; const u8* q = b + 16;
    for (int j = 0; j < 4; j++) { int s1, m1, s2, m2; scale_min_k4(2 * j, sc, s1, m1); scale_min_k4(2 * j + 1, sc, s2, m2);
        for (int l = 0; l < 32; l++) { y[64 * j + l] = d * s1 * (q[32 * j + l] & 0xF) - mn * m1; y[64 * j + 32 + l] = d * s2 * (q[32 * j + l] >> 4) - mn * m2; } }
}
static void deq_q6_k(const u8* b, float* y) {
    float d = h2f(b[208] | b[209] << 8);
    for (int h = 0; h < 2; h++) { const u8* ql = b + 64 * h; const u8* qh = b + 128 + 32 * h; const signed char* sc = (const signed char*)b + 192 + 8 * h; float* yy = y + 128 * h;
        for (int l = 0; l < 32; l++) { int is = l / 16;
            int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32, q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
            int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32, q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            yy[l] = d * sc[is] * q1; yy[l + 32] = d * sc[is + 2] * q2; yy[l + 64] = d * sc[is + 4] * q3; yy[l + 96] = d * sc[is + 6] * q4; } }
}
enum Ty { F32, F16, BF16, Q8, Q4K, Q6K };
static const char* tyname[] = {"f32", "f16", "bf16", "q8_0", "q4_k", "q6_k"};
typedef void (*MvF)(const void*, const float*, float*, int, int, int);
static MvF mvk(Ty ty, int nt) {
#define C(f) (MvF)(void*)f
    MvF t[6][4] = {{C(matvec_f32_t1), C(matvec_f32_t2), C(matvec_f32_t4), C(matvec_f32_t8)},
                   {C(matvec_f16_t1), C(matvec_f16_t2), C(matvec_f16_t4), C(matvec_f16_t8)},
                   {C(matvec_bf16_t1), C(matvec_bf16_t2), C(matvec_bf16_t4), C(matvec_bf16_t8)},
                   {C(matvec_q8_0_t1), C(matvec_q8_0_t2), C(matvec_q8_0_t4), C(matvec_q8_0_t8)},
                   {C(matvec_q4_k_t1), C(matvec_q4_k_t2), C(matvec_q4_k_t4), C(matvec_q4_k_t8)},
                   {C(matvec_q6_k_t1), C(matvec_q6_k_t2), C(matvec_q6_k_t4), C(matvec_q6_k_t8)}};
    return t[ty][__builtin_ctz(nt)];
}
// Random weights: bytes + dequantized f32 matrix.
static void weights(Ty ty, int rows, int cols, std::vector<u8>& bytes, std::vector<float>& deq) {
    deq.assign((size_t)rows * cols, 0);
    if (ty == F32) { bytes.resize((size_t)rows * cols * 4); for (size_t i = 0; i < deq.size(); i++) { deq[i] = frand(); memcpy(&bytes[4 * i], &deq[i], 4); } return; }
    if (ty == F16 || ty == BF16) { bytes.resize((size_t)rows * cols * 2);
        for (size_t i = 0; i < deq.size(); i++) { float v = frand(); u16 b; if (ty == F16) { b = f2h(v); deq[i] = h2f(b); } else { b = f32_to_bf16(v); deq[i] = bf16_to_f32(b); } memcpy(&bytes[2 * i], &b, 2); } return; }
    int bs = ty == Q8 ? 32 : 256, ts = ty == Q8 ? 34 : ty == Q4K ? 144 : 210;
    size_t nb = (size_t)rows * cols / bs; bytes.resize(nb * ts);
    for (auto& b : bytes) b = (u8)rnd();
    for (size_t k = 0; k < nb; k++) { u8* b = &bytes[k * ts];
        auto put = [&](int at) { u16 h = f2h(frand() * 0.01f); b[at] = h & 0xff; b[at + 1] = h >> 8; };
        if (ty == Q8) put(0); else if (ty == Q4K) { put(0); put(2); } else put(208);
        float* y = &deq[k * bs]; if (ty == Q8) deq_q8_0(b, y); else if (ty == Q4K) deq_q4_k(b, y); else deq_q6_k(b, y); }
}
static void test_matvec(Ty ty, int rows, int cols, int n, int nt) {
    std::vector<u8> w; std::vector<float> deq; weights(ty, rows, cols, w, deq);
    std::vector<float> x((size_t)n * cols), y((size_t)n * rows, NAN); for (auto& v : x) v = frand();
    std::vector<double> want((size_t)n * rows);
    for (int t = 0; t < n; t++) for (int r = 0; r < rows; r++) { double s = 0; for (int c = 0; c < cols; c++) s += (double)deq[(size_t)r * cols + c] * x[(size_t)t * cols + c]; want[(size_t)t * rows + r] = s; }
    int blocks = (rows + 3) / 4 * ((n + nt - 1) / nt);
    launch(mvk(ty, nt), {(unsigned)blocks}, {128}, (const void*)w.data(), (const float*)x.data(), y.data(), rows, cols, n);
    char what[100]; snprintf(what, 100, "matvec_%s_t%d rows %d cols %d n %d", tyname[ty], nt, rows, cols, n);
    check(what, y, want, 2e-6);
}
static void test_dequant(Ty ty, int rows, int cols) {
    std::vector<u8> w; std::vector<float> deq; weights(ty, rows, cols, w, deq);
    std::vector<u16> out((size_t)rows * cols, 0xffff);
    auto f = ty == Q8 ? dequant_f16_q8_0 : ty == Q4K ? dequant_f16_q4_k : dequant_f16_q6_k;
    launch(f, {3}, {64}, (const u8*)w.data(), out.data(), rows, cols);
    size_t bad = 0; for (size_t i = 0; i < out.size(); i++) if (out[i] != f2h(deq[i])) bad++;
    printf("%s dequant_f16_%s: %zu of %zu differ from f16(reference)\n", bad ? "FAIL" : "ok  ", tyname[ty], bad, out.size());
    if (bad) fails++;
}
static void test_attention(int nh, int nkv, int hd, int nt, int np, int sm) {
    int pos = np + nt; float scale = 1.0f / std::sqrt((float)hd);
    std::vector<float> q((size_t)nt * nh * hd), out(q.size(), NAN); for (auto& v : q) v = frand() * 2;
    std::vector<u16> kc((size_t)pos * nkv * hd), vc(kc.size()); for (auto& v : kc) v = f2h(frand() * 2); for (auto& v : vc) v = f2h(frand());
    std::vector<double> want(q.size());
    int g = nh / nkv;
    for (int t = 0; t < nt; t++) for (int h = 0; h < nh; h++) { int kvh = h / g; const float* qq = &q[((size_t)t * nh + h) * hd];
        int len = np + t + 1; std::vector<double> s(len); double mx = -1e300;
        for (int p = 0; p < len; p++) { float acc = 0; for (int d = 0; d < hd; d++) acc += h2f(f2h(qq[d])) * h2f(kc[((size_t)p * nkv + kvh) * hd + d]); s[p] = (double)acc * scale; mx = std::max(mx, s[p]); }
        double l = 0; for (auto& v : s) { v = std::exp(v - mx); l += v; }
        for (int d = 0; d < hd; d++) { double a = 0; for (int p = 0; p < len; p++) a += s[p] * h2f(vc[((size_t)p * nkv + kvh) * hd + d]); want[((size_t)t * nh + h) * hd + d] = a / l; } }
    // Launch geometry as gpu.rs.
    int row_tiles = (nt * g + 7) / 8, base = nkv * row_tiles;
    int want_s = std::max(1, (2 * sm + base - 1) / base);
    int splits = std::min(want_s, (pos + 127) / 128);
    int chunk = ((pos + splits - 1) / splits + 127) / 128 * 128; splits = (pos + chunk - 1) / chunk;
    int n_rows = nt * nh;
    std::vector<float> pa((size_t)splits * n_rows * hd, NAN), pm((size_t)splits * n_rows * 2, NAN);
    launch(attention_f16, {(unsigned)base, (unsigned)splits}, {128}, (const float*)q.data(), (const u16*)kc.data(), (const u16*)vc.data(), out.data(),
           splits > 1 ? pa.data() : (float*)nullptr, splits > 1 ? pm.data() : (float*)nullptr, nt, np, nh, nkv, hd, scale, chunk);
    if (splits > 1) launch(attention_combine, {(unsigned)n_rows}, {128}, (const float*)pa.data(), (const float*)pm.data(), out.data(), n_rows, hd, splits);
    char what[120]; snprintf(what, 120, "attention h %d kv %d hd %d tok %d past %d splits %d", nh, nkv, hd, nt, np, splits);
    check(what, out, want, 1e-5);
}
int main() {
    for (Ty ty : {F32, F16, BF16, Q8, Q4K, Q6K}) {
        int cols = (ty >= Q4K) ? 1024 : (ty == Q8 ? 384 : 200);
        for (int nt : {1, 2, 4, 8}) for (int n : {1, 3, 9}) { if (nt == 1 && n > 1) continue; test_matvec(ty, 13, cols, n, nt); }
        if (ty >= Q8) test_dequant(ty, 5, cols);
    }
    test_matvec(Q4K, 9, 256 * 7, 2, 2);  // blocks per row not a multiple of the 4 per warp step
    test_matvec(Q6K, 9, 256 * 5, 1, 1);
    test_matvec(Q8, 9, 32 * 11, 1, 1);
    test_attention(8, 2, 64, 1, 300, 132);  // decode, split
    test_attention(8, 2, 64, 1, 0, 132);
    test_attention(4, 4, 128, 1, 700, 4);   // few splits
    test_attention(16, 1, 64, 3, 200, 132); // group > ATT_ROWS
    test_attention(8, 2, 256, 2, 130, 132); // hd 256: dims tid + 128
    test_attention(4, 2, 128, 20, 5, 1);    // prefill, one split
    test_attention(6, 2, 80, 37, 150, 132); // prefill, split, odd sizes
    test_attention(4, 2, 32, 5, 0, 132);
    // rms_norm
    { int rows = 3, cols = 1000; std::vector<float> x(rows * cols), w(cols), o(rows * cols); for (auto& v : x) v = frand(); for (auto& v : w) v = frand();
      launch(rms_norm_f32, {(unsigned)rows}, {256}, (const float*)x.data(), (const float*)w.data(), o.data(), cols, 1e-5f);
      std::vector<double> want(rows * cols); for (int r = 0; r < rows; r++) { double s = 0; for (int c = 0; c < cols; c++) s += (double)x[r * cols + c] * x[r * cols + c];
        double sc = 1 / std::sqrt(s / cols + 1e-5); for (int c = 0; c < cols; c++) want[r * cols + c] = x[r * cols + c] * sc * w[c]; }
      check("rms_norm", o, want, 1e-6); }
    // silu_mul, add, converts
    { long long n = 3000; std::vector<float> g(n), u(n), g0; for (auto& v : g) v = frand() * 8; for (auto& v : u) v = frand(); g0 = g;
      launch(silu_mul_f32, {3}, {256}, g.data(), (const float*)u.data(), n);
      std::vector<double> want(n); for (int i = 0; i < n; i++) want[i] = g0[i] / (1 + std::exp(-(double)g0[i])) * u[i]; check("silu_mul", g, want, 1e-6);
      std::vector<float> a = u; launch(add_f32, {2}, {256}, a.data(), (const float*)g0.data(), n);
      for (int i = 0; i < n; i++) want[i] = (double)u[i] + g0[i]; check("add", a, want, 1e-7);
      std::vector<u16> h(n), b(n); launch(convert_f32_f16, {2}, {256}, (const float*)g0.data(), h.data(), n); launch(convert_f32_bf16, {2}, {256}, (const float*)g0.data(), b.data(), n);
      int bad = 0; for (int i = 0; i < n; i++) { if (h[i] != f2h(g0[i])) bad++; u32 uu = __float_as_uint(g0[i]); if (b[i] != (u16)((uu + 0x7fff + ((uu >> 16) & 1)) >> 16)) bad++; }
      printf("%s converts (%d bad)\n", bad ? "FAIL" : "ok  ", bad); fails += bad != 0; }
    // rope
    { int n = 3, nh = 4, hd = 16, rd = 12; std::vector<float> x(n * nh * hd), cs(n * rd); for (auto& v : x) v = frand(); for (auto& v : cs) v = frand();
      std::vector<double> want(x.begin(), x.end());
      for (int t = 0; t < n; t++) for (int h = 0; h < nh; h++) for (int i = 0; i < rd / 2; i++) { size_t o = (size_t)(t * nh + h) * hd + 2 * i; double c = cs[t * rd + 2 * i], s = cs[t * rd + 2 * i + 1];
        want[o] = x[o] * c - x[o + 1] * s; want[o + 1] = x[o] * s + x[o + 1] * c; }
      launch(rope_f32, {1}, {32}, x.data(), (const float*)cs.data(), n, nh, hd, rd); check("rope", x, want, 1e-6); }
    // kv_write
    { int row = 24, n = 3, pos = 5; std::vector<float> src(row * n); for (auto& v : src) v = frand(); std::vector<u16> cache(row * 10, 0x1234);
      launch(kv_write_f16, {1}, {32}, (const float*)src.data(), cache.data(), row, pos, n);
      int bad = 0; for (int i = 0; i < row * 10; i++) { int p = i / row; u16 w = (p >= pos && p < pos + n) ? f2h(src[i - pos * row]) : 0x1234; bad += cache[i] != w; }
      printf("%s kv_write (%d bad)\n", bad ? "FAIL" : "ok  ", bad); fails += bad != 0; }
    // row_stats
    { int rows = 3, cols = 5000; std::vector<float> x(rows * cols); for (auto& v : x) v = frand() * 10;
      x[1234] = 50; x[4321] = 50;  // tie in row 0: first wins
      for (int c = 0; c < cols; c++) x[2 * cols + c] = -INFINITY;
      std::vector<float> mx(rows), lse(rows); std::vector<u32> arg(rows);
      launch(row_stats_f32, {(unsigned)rows}, {1024}, (const float*)x.data(), cols, mx.data(), arg.data(), lse.data());
      for (int r = 0; r < rows; r++) { double m = -INFINITY; u32 a = 0; for (int c = 0; c < cols; c++) if (x[r * cols + c] > m) { m = x[r * cols + c]; a = c; }
        double s = 0; for (int c = 0; c < cols; c++) s += std::exp(x[r * cols + c] - m); double l = m + std::log(s);
        bool ok = mx[r] == (float)m && arg[r] == a && (std::isinf(l) ? lse[r] == l : std::fabs(lse[r] - l) < 1e-5);
        if (r == 2) ok = std::isinf(mx[r]) && std::isinf(lse[r]) && arg[r] == 0;
        printf("%s row_stats row %d: max %g arg %u lse %g (want %g %u %g)\n", ok ? "ok  " : "FAIL", r, mx[r], arg[r], lse[r], m, a, l); fails += !ok; } }
    printf("%d failures\n", fails);
    return fails != 0;
}
