// Backend-agnostic selective-scan test bodies, shared by the CPU tests (tests/test_scan.cpp,
// tests/test_backward.cpp) and the CUDA tests (tests/cuda/test_cuda_scan*.cu, test_cuda_step.cu).
//
// What is here, once:
//   * ScanCase: a problem's shape, which optional inputs exist and the layouts (padded rows,
//     B / C inside x_proj-like rows or as two arrays), and the named case lists every backend
//     runs (odd shapes, every option on / off, d_state 1..64, lengths 1..257, ...).
//   * ScanProblem: the problem builder. Values are drawn in a fixed order from the seed, so a
//     case and a seed give the same problem on every backend; each value is then rounded to what
//     the backend stores (Precision), so the fp64 oracles see exactly what the kernel reads.
//     Padding columns (and x_proj's dt columns, the gap between B and C) hold NaN: never read.
//   * The oracles: reference_forward (reference::selective_scan, fp64) and reference_backward
//     (the CPU backward in double, scan::Sequential, one thread; tests/test_backward.cpp checks
//     it against finite differences of reference::selective_scan).
//   * The bodies, parameterised by a runner (see below): check_forward (vs the oracle),
//     check_resume (two pieces with the state carried = one scan), check_policies_agree,
//     check_backward (vs the CPU double Sequential backward), check_steps (L single decode
//     steps = the parallel scan over L, and the oracle).
//
// A runner executes the operators of one backend and dtype from host data:
//   std::string name() const;
//   Precision precision() const;              // how inputs are rounded before the oracle sees them
//   bool random_param_grads() const;          // parameter-gradient buffers start random (accumulate) or 0
//   ScanTolerances tol() const;               // per backend / dtype, justified where it is defined
//   template <class P> ScanResult forward(ScanProblem const&) const;
//   template <class P> BackwardResult backward(ScanProblem const&) const;
//   ScanResult steps(ScanProblem const&) const;    // c.length decode steps, one token each
// Outputs are poisoned with NaN before a run and returned raw (widened to double), so the
// bodies can check that padding was left alone. Runners: tests/common/cpu_scan_runner.hpp,
// tests/cuda/cuda_scan_runner.cuh.
#pragma once

#include <catch2/catch.hpp>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "mambabyte/backend/cpu/selective_scan_backward.hpp"
#include "mambabyte/core/dtype.hpp"
#include "mambabyte/reference/reference.hpp"
#include "../test_util.hpp"

namespace mbtest {

// =============================================================================================
// Policies, storage
// =============================================================================================

template <class P>
std::string policy_name() {
  if constexpr (requires { P::chunk_len; })
    return std::string(P::name) + "<" + std::to_string(P::chunk_len) + ">";
  else
    return P::name;
}

/// What a backend stores a value in.
enum class Storage { kExact, kFloat, kBf16 };

inline double round_to(Storage s, double x) {
  switch (s) {
    case Storage::kExact: return x;
    case Storage::kFloat: return static_cast<double>(static_cast<float>(x));
    case Storage::kBf16:
      return static_cast<double>(mambabyte::bf16::to_float(mambabyte::bf16::from_float(static_cast<float>(x))));
  }
  return x;
}

/// Rounding of the problem's values: activations (u, delta, z, B, C, dout) and parameters /
/// states (delta_bias, A, D, initial state, dL/dfinal state, initial parameter gradients).
struct Precision {
  Storage act = Storage::kExact, param = Storage::kExact;
};

// =============================================================================================
// Cases
// =============================================================================================

enum class BcLayout {
  kRows,   ///< one row per token: [dt_rank columns][B: N][bc_gap][C: N][bc_pad] (x_proj's output)
  kPlain,  ///< two arrays, B then C, each (rows, N + bc_pad)
};

struct ScanCase {
  int batch = 1, length = 1, d_inner = 1, d_state = 16;
  // forward options
  bool bias = true, softplus = true, D = true, z = true, init = true, final_state = true;
  // backward: dL/dh_T given; dinitial_state and the recomputed output requested
  bool dfinal = true, dinit = true, out = true;
  BcLayout bc = BcLayout::kRows;
  int dt_rank = 8, bc_gap = 0, bc_pad = 0;
  int pad = 0;            ///< extra columns of the u / delta / z / dout / out rows (ld = d_inner + pad)
  double bias_hi = 0.0;   ///< with softplus, delta_bias ~ U(-2, bias_hi): > 20 puts channels on the linear branch
  bool misalign = false;  ///< decode step: state and A one element off 16-byte alignment (guarded loads)

  std::string name() const {
    std::string s = "B=" + std::to_string(batch) + " L=" + std::to_string(length) + " D=" + std::to_string(d_inner) +
                    " N=" + std::to_string(d_state);
    s += std::string(bias ? " bias" : "") + (softplus ? " softplus" : "") + (D ? " D" : "") + (z ? " z" : "") +
         (init ? " h0" : "") + (final_state ? " hT" : "") + (dfinal ? " dhT" : "") + (dinit ? " dh0" : "") +
         (out ? " out" : "");
    s += bc == BcLayout::kRows
             ? " BCrows(dt_rank=" + std::to_string(dt_rank) + " gap=" + std::to_string(bc_gap) + ")"
             : std::string(" BCplain");
    s += " bc_pad=" + std::to_string(bc_pad) + " pad=" + std::to_string(pad);
    if (bias_hi != 0.0) s += " bias_hi=" + std::to_string(bias_hi);
    if (misalign) s += " misaligned";
    return s;
  }
};

/// Row padding (in elements) that makes ld = d_inner + pad a multiple of 8 (16 bytes of bf16,
/// 32 of float) when `aligned`, else an ld that is not a multiple of 8.
inline int pad_for(int d_inner, bool aligned) {
  if (aligned) return (8 - d_inner % 8) % 8;
  return d_inner % 8 == 0 ? 1 : 0;
}

/// The layout of the original CPU scan tests: rows padded by 3; B and C in one row of 2N + 5
/// with B at 0, C at N + 2 (a gap of 2) and 3 trailing columns.
inline ScanCase cpu_layout(ScanCase c) {
  c.pad = 3;
  c.bc = BcLayout::kRows;
  c.dt_rank = 0;
  c.bc_gap = 2;
  c.bc_pad = 3;
  return c;
}

/// A case of a sweep whose optional inputs and layouts switch with the counter m (every option
/// is on and off many times over a sweep).
inline ScanCase sweep_case(int batch, int length, int d_inner, int d_state, int m) {
  ScanCase c;
  c.batch = batch; c.length = length; c.d_inner = d_inner; c.d_state = d_state;
  c.bias = m % 2 == 0;
  c.softplus = m % 3 != 1;
  c.D = m % 5 != 2;
  c.z = m % 7 != 3;
  c.init = (m / 2) % 2 == 0;
  c.final_state = m % 11 != 5;
  c.bc = m % 3 != 2 ? BcLayout::kRows : BcLayout::kPlain;
  c.pad = (m % 4 == 1) ? 3 : 0;
  return c;
}

// ---- forward lists -----------------------------------------------------------------------

/// The shapes of the original CPU forward test: the smallest case, L = 1 with a state, odd
/// sizes with nothing optional, batch > 1, L not a multiple of a chunk, a ragged tail.
inline std::vector<ScanCase> classic_forward_cases() {
  struct S { int batch, length, d_inner, d_state; bool D, z, bias, h0; };
  std::vector<ScanCase> v;
  for (S s : {S{1, 1, 1, 1, true, true, true, false}, S{1, 1, 17, 16, true, true, true, true},
              S{2, 7, 5, 3, false, false, false, false}, S{3, 33, 19, 16, true, true, true, true},
              S{1, 100, 40, 4, true, false, true, true}, S{2, 129, 16, 7, true, true, false, false},
              S{1, 300, 33, 16, true, true, true, true}}) {
    ScanCase c;
    c.batch = s.batch; c.length = s.length; c.d_inner = s.d_inner; c.d_state = s.d_state;
    c.D = s.D; c.z = s.z; c.bias = s.bias; c.init = s.h0;
    v.push_back(cpu_layout(c));
  }
  return v;
}

/// n random cases: B 1..3, L 1..max_len, D 1..40, N 1..max_state, options random (dfinal too
/// when with_dfinal); the draws in a fixed order from the seed.
inline std::vector<ScanCase> random_cases(std::uint64_t seed, int n, int max_len, int max_state, bool with_dfinal) {
  std::mt19937_64 rng(seed);
  std::vector<ScanCase> v;
  for (int i = 0; i < n; ++i) {
    ScanCase c;
    c.batch = 1 + int(rng() % 3); c.length = 1 + int(rng() % max_len); c.d_inner = 1 + int(rng() % 40);
    c.d_state = 1 + int(rng() % max_state);
    c.D = bool(rng() & 1); c.z = bool(rng() & 1); c.bias = bool(rng() & 1); c.init = bool(rng() & 1);
    if (with_dfinal) c.dfinal = bool(rng() & 1);
    v.push_back(cpu_layout(c));
  }
  return v;
}

/// Random shapes (the CPU property test): B 1..3, L 1..200, D 1..40, N 1..20, options random.
inline std::vector<ScanCase> random_forward_cases(std::uint64_t seed, int n) { return random_cases(seed, n, 200, 20, false); }

/// Small odd shapes: L 1, 2, 17, 100 x D 1, 37, 130 (partial channel blocks), d_state 16, in
/// three row layouts: u / delta / z rows and x_proj rows both 16-byte aligned (for bf16 and
/// float), neither, and x_proj rows aligned with unaligned activation rows.
inline std::vector<ScanCase> odd_shape_cases() {
  std::vector<ScanCase> v;
  for (int L : {1, 2, 17, 100})
    for (int Di : {1, 37, 130})
      for (int variant = 0; variant < 3; ++variant) {
        ScanCase c;
        c.batch = (L == 17 && variant < 2) ? 3 : 2; c.length = L; c.d_inner = Di; c.d_state = 16;
        c.pad = variant == 2 ? 0 : pad_for(Di, variant == 0);
        c.dt_rank = variant == 1 ? 5 : 8;  // x_proj ld 40 (aligned) or 37
        v.push_back(c);
      }
  return v;
}

/// Every optional input off and on (bias, softplus, D, z, initial / final state), both B / C
/// layouts, padded and aligned / unaligned rows; B 2, L 45, D 70, N 16.
inline std::vector<ScanCase> option_cases() {
  std::vector<ScanCase> v;
  for (int variant = 0; variant < 2; ++variant)
    for (int mask = 0; mask < 8; ++mask) {
      ScanCase c;
      c.batch = 2; c.length = 45; c.d_inner = 70; c.d_state = 16;
      c.bias = mask & 1; c.D = mask & 2; c.z = mask & 4;
      c.init = !(mask & 1); c.final_state = (mask != 3);
      c.softplus = (mask != 5);
      c.bc = (mask % 3 != 0) ? BcLayout::kRows : BcLayout::kPlain;
      if (variant == 0) {
        c.pad = (mask & 1) ? 3 : 0;
      } else {
        c.bc_pad = c.bc == BcLayout::kRows ? 0 : ((mask & 2) ? 0 : 3);  // plain B/C: ld 16 or 19
        c.pad = pad_for(c.d_inner, mask & 1);                          // ld 72 or 70
        c.dt_rank = (mask & 4) ? 8 : 3;                                // x_proj ld 40 or 35
      }
      v.push_back(c);
    }
  return v;
}

/// d_state other than 16 (the general paths) and 16 itself: 1, 3, 5, 16, 17, 33, 64; B 2, L 40,
/// D 50, with aligned plain B / C rows, unaligned x_proj rows, and x_proj rows of dt_rank 8.
inline std::vector<ScanCase> d_state_cases() {
  std::vector<ScanCase> v;
  for (int N : {1, 3, 5, 16, 17, 33, 64})
    for (int variant = 0; variant < 3; ++variant) {
      ScanCase c;
      c.batch = 2; c.length = 40; c.d_inner = 50; c.d_state = N;
      if (variant < 2) {
        bool const aligned = variant == 0;
        c.pad = pad_for(c.d_inner, aligned);
        c.bc = aligned ? BcLayout::kPlain : BcLayout::kRows;  // aligned: plain arrays, rows padded to 8
        c.bc_pad = aligned ? (8 - N % 8) % 8 : 0;
        c.dt_rank = 3;
      }
      v.push_back(c);
    }
  return v;
}

/// Lengths 1, 7, 33, 257 x d_state 1, 3, 16, 17, batch 1 / 3, D 3 / 19 / 37, options and
/// layouts switched by sweep_case.
inline std::vector<ScanCase> length_sweep_cases() {
  std::vector<ScanCase> v;
  int m = 0;
  for (int L : {1, 7, 33, 257})
    for (int N : {1, 3, 16, 17}) {
      int const Di = m % 3 == 0 ? 37 : (m % 3 == 1 ? 3 : 19);
      v.push_back(sweep_case(m % 2 ? 3 : 1, L, Di, N, m));
      ++m;
    }
  return v;
}

/// Every shared forward list above except the random one.
inline std::vector<ScanCase> all_forward_cases() {
  std::vector<ScanCase> v;
  for (auto const& list : {classic_forward_cases(), odd_shape_cases(), option_cases(), d_state_cases(),
                           length_sweep_cases()})
    v.insert(v.end(), list.begin(), list.end());
  return v;
}

/// Model-like sizes (dt_rank 64, d_state 16), rows optionally padded to 16 bytes of bf16.
inline std::vector<ScanCase> model_like_cases(bool aligned_rows) {
  struct S { int b, L, D; };
  std::vector<ScanCase> v;
  for (S s : {S{3, 1000, 200}, S{1, 3000, 256}, S{4, 513, 300}, S{2, 2048, 129}}) {
    ScanCase c;
    c.batch = s.b; c.length = s.L; c.d_inner = s.D; c.d_state = 16; c.dt_rank = 64;
    if (aligned_rows) c.pad = pad_for(s.D, true);
    v.push_back(c);
  }
  return v;
}

/// The sweep of the Associative tests: lengths around a 512-step chunk and its warps (several
/// chunks, ragged last chunk), D 1 / 3 / 130, batch 1 / 3, d_state 1 / 5 / 16 / 33; reduced: 16
/// cases of it.
inline std::vector<ScanCase> associative_sweep(bool reduced) {
  std::vector<ScanCase> v;
  int m = 0;
  if (reduced) {
    struct S { int b, D, N; };
    for (int L : {1, 2, 33, 600})
      for (S s : {S{1, 1, 1}, S{3, 3, 5}, S{1, 130, 16}, S{3, 3, 33}}) v.push_back(sweep_case(s.b, L, s.D, s.N, m++));
    return v;
  }
  for (int L : {1, 2, 31, 32, 33, 257, 1000, 4099})
    for (int Di : {1, 3, 130})
      for (int B : {1, 3})
        for (int N : {1, 5, 16, 33}) v.push_back(sweep_case(B, L, Di, N, m++));
  return v;
}

/// (case, split): the scan over [0, split) then [split, L) from the carried state. The first is
/// the original CPU test's (contiguous rows, z only, no initial state).
inline std::vector<std::pair<ScanCase, int>> resume_cases() {
  std::vector<std::pair<ScanCase, int>> v;
  ScanCase c;
  c.batch = 1; c.length = 90; c.d_inner = 12; c.d_state = 8;
  c.bias = false; c.D = false; c.init = false; c.dt_rank = 0;
  v.emplace_back(c, 37);
  v.emplace_back(sweep_case(3, 257, 37, 17, 0), 100);
  v.emplace_back(sweep_case(2, 33, 19, 3, 3), 1);   // first piece one step, no initial state
  v.emplace_back(cpu_layout(sweep_case(2, 70, 130, 16, 4)), 69);  // last piece one step
  return v;
}

// ---- backward lists ----------------------------------------------------------------------

/// The cases of the original CPU backward test (its finite-difference and policy checks).
inline std::vector<ScanCase> classic_backward_cases() {
  struct S {
    int batch, length, d_inner, d_state;
    bool D, z, bias, h0, dfinal, softplus = true;
    double bias_hi = 0.0;
  };
  std::vector<ScanCase> v;
  for (S s : {S{1, 1, 1, 1, true, true, true, false, false},          // the smallest case
              S{1, 1, 17, 16, true, true, true, true, true},          // L = 1 with states, two tiles
              S{2, 7, 5, 3, false, false, false, false, false},       // odd sizes, nothing optional
              S{2, 9, 5, 3, true, true, true, true, true},            // everything on
              S{3, 13, 19, 4, true, false, true, false, true},        // batch 3, ragged tile, no z
              S{1, 10, 6, 2, true, true, false, true, false, false},  // no softplus
              S{2, 11, 7, 3, true, true, true, true, true, false},    // no softplus, with a bias
              S{2, 6, 4, 2, true, true, true, false, true, true, 24.0}}) {  // v > 20: softplus's linear branch
    ScanCase c;
    c.batch = s.batch; c.length = s.length; c.d_inner = s.d_inner; c.d_state = s.d_state;
    c.D = s.D; c.z = s.z; c.bias = s.bias; c.init = s.h0; c.dfinal = s.dfinal; c.softplus = s.softplus;
    c.bias_hi = s.bias_hi;
    v.push_back(cpu_layout(c));
  }
  return v;
}

/// Random backward cases (the CPU property test): B 1..3, L 1..300, D 1..40, N 1..17.
inline std::vector<ScanCase> random_backward_cases(std::uint64_t seed, int n) { return random_cases(seed, n, 300, 17, true); }

/// Every backward option on and off across 8 masks, for each length in `lengths` and D 1, 37,
/// 130: batch 1 / 3, bias, softplus, D, z, initial state, dfinal, dinitial, out, both B / C
/// layouts, padded rows.
inline std::vector<ScanCase> backward_mask_cases(std::vector<int> const& lengths) {
  std::vector<ScanCase> v;
  for (int L : lengths)
    for (int Di : {1, 37, 130})
      for (int mask = 0; mask < 8; ++mask) {
        ScanCase c;
        c.batch = (mask & 1) ? 3 : 1;
        c.length = L;
        c.d_inner = Di;
        c.bias = mask & 2;
        c.softplus = !(mask & 4) || (mask & 2);
        c.D = !(mask & 2);
        c.z = mask & 4;
        c.init = mask & 1;
        c.dfinal = !(mask & 1);
        c.dinit = mask & 2;
        c.out = mask & 4;
        c.bc = (mask & 1) ? BcLayout::kRows : BcLayout::kPlain;
        c.pad = (mask & 2) ? 3 : 0;
        v.push_back(c);
      }
  return v;
}

/// d_state 1, 5, 17, 32 in the backward (B 2, L 21, D 70, padded rows).
inline std::vector<ScanCase> backward_d_state_cases() {
  std::vector<ScanCase> v;
  for (int N : {1, 5, 17, 32}) {
    ScanCase c;
    c.batch = 2; c.length = 21; c.d_inner = 70; c.d_state = N; c.pad = 1;
    v.push_back(c);
  }
  return v;
}

// ---- decode-step lists -------------------------------------------------------------------

/// L decode steps from an initial state: every option on and off (8 masks) x D 1, 37, 130,
/// batch 1 / 3, 1 or 5 steps, both B / C layouts, misaligned state / A; plus 7 and 33 steps.
inline std::vector<ScanCase> step_cases() {
  std::vector<ScanCase> v;
  for (int Di : {1, 37, 130})
    for (int mask = 0; mask < 8; ++mask) {
      ScanCase c;
      c.batch = (mask & 1) ? 3 : 1;
      c.length = (mask & 2) ? 5 : 1;
      c.d_inner = Di;
      c.bias = !(mask & 4);
      c.softplus = mask != 6;
      c.D = (mask & 3) != 1;
      c.z = mask != 3;
      c.bc = (mask & 2) ? BcLayout::kRows : BcLayout::kPlain;
      c.pad = (mask & 4) ? 3 : 0;
      c.misalign = mask == 5 || mask == 2;
      v.push_back(c);
    }
  ScanCase a = sweep_case(2, 7, 19, 3, 4);
  a.init = true;
  v.push_back(a);
  ScanCase b = sweep_case(1, 33, 37, 17, 9);
  b.init = true;
  v.push_back(b);
  return v;
}

/// Decode steps with d_state 1, 5, 16, 17, 33, 64 (B 2, 4 steps, D 70, padded rows).
inline std::vector<ScanCase> step_d_state_cases() {
  std::vector<ScanCase> v;
  for (int N : {1, 5, 16, 17, 33, 64}) {
    ScanCase c;
    c.batch = 2; c.length = 4; c.d_inner = 70; c.d_state = N; c.pad = 1;
    c.bc = (N % 2) ? BcLayout::kRows : BcLayout::kPlain;
    c.misalign = N == 16;
    v.push_back(c);
  }
  return v;
}

// =============================================================================================
// The problem
// =============================================================================================

struct ScanProblem {
  ScanCase c;
  Precision prec;
  std::int64_t ldx = 0, ldbc = 0, offB = 0, offC = 0;
  std::vector<double> u, delta, z, dout, BC;  ///< activations; padding / non-B,C columns NaN
  std::vector<double> bias, A, D, h0, dhT;    ///< parameters and states (h0: initial, dhT: dL/dh_T)
  std::vector<double> dA0, dD0, dbias0;       ///< initial parameter-gradient buffers (accumulated into)

  ScanProblem(ScanCase const& cs, std::uint64_t seed, Precision p = {}, bool random_param_grads = false)
      : c(cs), prec(p) {
    set_layout();
    std::mt19937_64 rng(seed);
    auto uni = [&](double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); };
    auto act = [&](double x) { return round_to(prec.act, x); };
    auto par = [&](double x) { return round_to(prec.param, x); };
    std::size_t const R = rows();
    int const N = c.d_state, Di = c.d_inner;
    u.assign(x_size(), kNaN);
    delta = z = dout = u;
    for (std::size_t r = 0; r < R; ++r)
      for (int d = 0; d < Di; ++d) {
        std::size_t const i = r * ldx + d;
        u[i] = act(uni(-1, 1));
        // with softplus: raw dt + bias over softplus's curved part; without: a positive step
        delta[i] = act(c.softplus ? uni(-4, 1.5) : uni(0.001, 0.2));
        z[i] = act(uni(-3, 3));
        dout[i] = act(uni(-1, 1));
      }
    if (c.softplus && R > 0) delta[(R > 1 ? 1 : 0) * ldx] = 25.0;  // softplus's v > 20 branch at least once
    bias.resize(Di);
    for (auto& x : bias) x = par(c.softplus ? uni(-2, c.bias_hi) : uni(0, 0.05));
    A.resize(static_cast<std::size_t>(Di) * N);
    for (int d = 0; d < Di; ++d)
      for (int n = 0; n < N; ++n) A[static_cast<std::size_t>(d) * N + n] = par(-std::exp(std::log(n + 1.0) + uni(-0.1, 0.1)));
    BC.assign(bc_size(), kNaN);
    for (std::size_t r = 0; r < R; ++r) {
      for (int n = 0; n < N; ++n) BC[b_index(r, n)] = act(uni(-1, 1));
      for (int n = 0; n < N; ++n) BC[c_index(r, n)] = act(uni(-1, 1));
    }
    D.resize(Di);
    for (auto& x : D) x = par(1.0 + uni(-0.1, 0.1));
    h0.resize(state_size());
    for (auto& x : h0) x = par(uni(-1, 1));
    dhT.resize(state_size());
    for (auto& x : dhT) x = par(uni(-1, 1));
    dA0.resize(A.size());
    dD0.resize(Di);
    dbias0.resize(Di);
    for (auto* v : {&dA0, &dD0, &dbias0})
      for (auto& x : *v) {
        double const r = uni(-1, 1);
        x = random_param_grads ? par(r) : 0.0;
      }
  }

  static constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

  std::size_t rows() const { return static_cast<std::size_t>(c.batch) * c.length; }
  std::size_t x_size() const { return rows() * static_cast<std::size_t>(ldx); }
  std::size_t bc_size() const { return (c.bc == BcLayout::kRows ? 1 : 2) * rows() * static_cast<std::size_t>(ldbc); }
  std::size_t state_size() const { return static_cast<std::size_t>(c.batch) * c.d_inner * c.d_state; }
  std::size_t b_index(std::size_t r, int n) const { return static_cast<std::size_t>(offB) + r * ldbc + n; }
  std::size_t c_index(std::size_t r, int n) const { return static_cast<std::size_t>(offC) + r * ldbc + n; }

  /// Time steps [t0, t0 + len) of every sequence as a problem of its own; with `h_in` it starts
  /// from that state (initial state on), else from this problem's initial state (if any).
  ScanProblem slice(int t0, int len, std::vector<double> const* h_in) const {
    ScanProblem s;
    s.c = c;
    s.c.length = len;
    s.prec = prec;
    s.set_layout();
    s.u.assign(s.x_size(), kNaN);
    s.delta = s.z = s.dout = s.u;
    s.BC.assign(s.bc_size(), kNaN);
    for (int b = 0; b < c.batch; ++b)
      for (int t = 0; t < len; ++t) {
        std::size_t const src = static_cast<std::size_t>(b) * c.length + t0 + t, dst = static_cast<std::size_t>(b) * len + t;
        for (std::int64_t d = 0; d < ldx; ++d) {
          s.u[dst * ldx + d] = u[src * ldx + d];
          s.delta[dst * ldx + d] = delta[src * ldx + d];
          s.z[dst * ldx + d] = z[src * ldx + d];
          s.dout[dst * ldx + d] = dout[src * ldx + d];
        }
        for (int n = 0; n < c.d_state; ++n) {
          s.BC[s.b_index(dst, n)] = BC[b_index(src, n)];
          s.BC[s.c_index(dst, n)] = BC[c_index(src, n)];
        }
      }
    s.bias = bias; s.A = A; s.D = D; s.dhT = dhT; s.dA0 = dA0; s.dD0 = dD0; s.dbias0 = dbias0;
    s.h0 = h0;
    if (h_in) {
      s.c.init = true;
      s.h0 = *h_in;
    }
    return s;
  }

 private:
  ScanProblem() = default;
  void set_layout() {
    ldx = c.d_inner + c.pad;
    if (c.bc == BcLayout::kRows) {
      ldbc = c.dt_rank + 2 * c.d_state + c.bc_gap + c.bc_pad;
      offB = c.dt_rank;
      offC = c.dt_rank + c.d_state + c.bc_gap;
    } else {
      ldbc = c.d_state + c.bc_pad;
      offB = 0;
      offC = static_cast<std::int64_t>(rows()) * ldbc;
    }
  }
};

// =============================================================================================
// Buffers and arguments (host vectors, or any container with data(): the CUDA DeviceBuffer)
// =============================================================================================

template <class T>
std::vector<T> cast_vector(std::vector<double> const& v) {
  return std::vector<T>(v.begin(), v.end());
}
template <class T>
std::vector<double> widen(std::vector<T> const& v) {
  return std::vector<double>(v.begin(), v.end());
}

/// Every input and output of a problem as host vectors of T; outputs filled with `poison`, the
/// parameter gradients with the problem's initial values.
template <class T>
struct HostScanBuffers {
  std::vector<T> u, delta, z, dout, BC, bias, A, D, h0, dhT;
  std::vector<T> out, hT, du, ddelta, dBC, dz, dh0, dA, dD, dbias;

  HostScanBuffers(ScanProblem const& p, T poison)
      : u(cast_vector<T>(p.u)), delta(cast_vector<T>(p.delta)), z(cast_vector<T>(p.z)), dout(cast_vector<T>(p.dout)),
        BC(cast_vector<T>(p.BC)), bias(cast_vector<T>(p.bias)), A(cast_vector<T>(p.A)), D(cast_vector<T>(p.D)),
        h0(cast_vector<T>(p.h0)), dhT(cast_vector<T>(p.dhT)), out(p.x_size(), poison), hT(p.state_size(), poison),
        du(p.x_size(), poison), ddelta(p.x_size(), poison), dBC(p.bc_size(), poison), dz(p.x_size(), poison),
        dh0(p.state_size(), poison), dA(cast_vector<T>(p.dA0)), dD(cast_vector<T>(p.dD0)),
        dbias(cast_vector<T>(p.dbias0)) {}
};

/// Forward arguments of any scan Arguments type (SelectiveScanArguments<T>, the CUDA
/// MixedScanArguments) pointing into a buffer set with the member names of HostScanBuffers.
template <class Args, class Buf>
Args forward_args(ScanProblem const& p, Buf& b) {
  auto const& c = p.c;
  Args a{};
  a.batch = c.batch; a.length = c.length; a.d_inner = c.d_inner; a.d_state = c.d_state;
  a.u = b.u.data(); a.ld_u = p.ldx;
  a.delta = b.delta.data(); a.ld_delta = p.ldx;
  a.delta_bias = c.bias ? b.bias.data() : nullptr;
  a.delta_softplus = c.softplus;
  a.A = b.A.data();
  a.B = b.BC.data() + p.offB; a.ld_B = p.ldbc;
  a.C = b.BC.data() + p.offC; a.ld_C = p.ldbc;
  a.D = c.D ? b.D.data() : nullptr;
  a.z = c.z ? b.z.data() : nullptr; a.ld_z = p.ldx;
  a.out = b.out.data(); a.ld_out = p.ldx;
  a.initial_state = c.init ? b.h0.data() : nullptr;
  a.final_state = c.final_state ? b.hT.data() : nullptr;
  return a;
}

/// Backward arguments (SelectiveScanBackwardArguments<T>, MixedScanBackwardArguments).
template <class Args, class Buf>
Args backward_args(ScanProblem const& p, Buf& b) {
  auto const& c = p.c;
  Args a{};
  a.batch = c.batch; a.length = c.length; a.d_inner = c.d_inner; a.d_state = c.d_state;
  a.u = b.u.data(); a.ld_u = p.ldx;
  a.delta = b.delta.data(); a.ld_delta = p.ldx;
  a.delta_bias = c.bias ? b.bias.data() : nullptr;
  a.delta_softplus = c.softplus;
  a.A = b.A.data();
  a.B = b.BC.data() + p.offB; a.ld_B = p.ldbc;
  a.C = b.BC.data() + p.offC; a.ld_C = p.ldbc;
  a.D = c.D ? b.D.data() : nullptr;
  a.z = c.z ? b.z.data() : nullptr; a.ld_z = p.ldx;
  a.initial_state = c.init ? b.h0.data() : nullptr;
  a.dout = b.dout.data(); a.ld_dout = p.ldx;
  a.dfinal_state = c.dfinal ? b.dhT.data() : nullptr;
  a.du = b.du.data(); a.ld_du = p.ldx;
  a.ddelta = b.ddelta.data(); a.ld_ddelta = p.ldx;
  a.dB = b.dBC.data() + p.offB; a.ld_dB = p.ldbc;
  a.dC = b.dBC.data() + p.offC; a.ld_dC = p.ldbc;
  a.dz = c.z ? b.dz.data() : nullptr; a.ld_dz = p.ldx;
  a.dinitial_state = c.dinit ? b.dh0.data() : nullptr;
  a.out = c.out ? b.out.data() : nullptr; a.ld_out = p.ldx;
  a.dA = b.dA.data();
  a.dD = c.D ? b.dD.data() : nullptr;
  a.ddelta_bias = c.bias ? b.dbias.data() : nullptr;
  return a;
}

// =============================================================================================
// Results, oracles, tolerances
// =============================================================================================

/// Output rows (batch, length, ldx) and the final state (empty when not requested).
struct ScanResult {
  std::vector<double> out, hT;
};

/// Every backward output, raw: activation gradients in their strided layouts, dBC the whole
/// B / C buffer (B and C gradients at the problem's offsets).
struct BackwardResult {
  std::vector<double> du, ddelta, dBC, dz, dh0, out, dA, dD, dbias;
};

/// The fp64 oracle reference::selective_scan on the problem's values: output padding 0, the
/// final state always.
inline ScanResult reference_forward(ScanProblem const& p) {
  HostScanBuffers<double> b(p, 0.0);
  auto a = forward_args<mambabyte::ssm::SelectiveScanArguments<double>>(p, b);
  a.final_state = b.hT.data();
  mambabyte::reference::selective_scan(a);
  return {b.out, b.hT};
}

/// The backward oracle: the CPU backward in double, scan::Sequential, one thread (checked
/// against finite differences of reference::selective_scan in tests/test_backward.cpp). The
/// NaN padding of the inputs is read as 0 (the oracle is not under test); outputs start at 0.
inline BackwardResult reference_backward(ScanProblem const& p) {
  HostScanBuffers<double> b(p, 0.0);
  for (auto* v : {&b.u, &b.delta, &b.z, &b.dout, &b.BC})
    for (auto& x : *v)
      if (std::isnan(x)) x = 0.0;
  auto const a = backward_args<mambabyte::ssm::SelectiveScanBackwardArguments<double>>(p, b);
  using Op = mambabyte::ssm::SelectiveScanBackward<mambabyte::backend::Cpu, double, mambabyte::scan::Sequential>;
  REQUIRE(Op::can_implement(a) == mambabyte::Status::kSuccess);
  Op::run(a, mambabyte::backend::Cpu{1});
  return {b.du, b.ddelta, b.dBC, b.dz, b.dh0, b.out, b.dA, b.dD, b.dbias};
}

/// Relative L2 tolerances of one runner (backend x dtype); each runner justifies its numbers.
struct ScanTolerances {
  double fwd_out = 0, fwd_state = 0;        ///< forward vs the fp64 oracle
  double agree_out = 0, agree_state = 0;    ///< one policy vs another, same backend and dtype
  double resume_out = 0, resume_state = 0;  ///< two pieces with the state carried vs one scan
  double bwd_act = 0, bwd_param = 0;        ///< backward vs the CPU double Sequential backward:
                                            ///< activation gradients + out / dh0, dA, dD, dbias
  double step_out_scan = 0, step_state_scan = 0;  ///< decode steps vs the parallel scan
  double step_out_ref = 0, step_state_ref = 0;    ///< decode steps vs the fp64 oracle
};

/// Padding columns [d_inner, ldx) of every row of an (rows, ldx) output: true when all still
/// hold the NaN poison; they are then set to 0, as in the oracles' outputs.
inline bool strip_x_padding(ScanProblem const& p, std::vector<double>& v) {
  bool intact = v.size() == p.x_size();
  if (!intact) return false;
  for (std::size_t r = 0; r < p.rows(); ++r)
    for (std::int64_t d = p.c.d_inner; d < p.ldx; ++d) {
      intact = intact && std::isnan(v[r * p.ldx + d]);
      v[r * p.ldx + d] = 0.0;
    }
  return intact;
}

/// The B entries and the C entries of a B / C-shaped buffer; *untouched (when given) is false
/// when any other entry (dt columns, gap, row padding) no longer holds NaN.
inline void split_bc(ScanProblem const& p, std::vector<double> const& v, std::vector<double>& b,
                     std::vector<double>& c, bool* untouched) {
  b.clear();
  c.clear();
  if (v.size() != p.bc_size()) {
    if (untouched) *untouched = false;
    return;
  }
  std::vector<char> real(v.size(), 0);
  for (std::size_t r = 0; r < p.rows(); ++r)
    for (int n = 0; n < p.c.d_state; ++n) {
      b.push_back(v[p.b_index(r, n)]);
      c.push_back(v[p.c_index(r, n)]);
      real[p.b_index(r, n)] = real[p.c_index(r, n)] = 1;
    }
  if (untouched)
    for (std::size_t i = 0; i < v.size(); ++i)
      if (!real[i] && !std::isnan(v[i])) *untouched = false;
}

/// The real B and C entries of a B / C-shaped buffer (B first).
inline std::vector<double> bc_entries(ScanProblem const& p, std::vector<double> const& v) {
  std::vector<double> b, c;
  split_bc(p, v, b, c, nullptr);
  b.insert(b.end(), c.begin(), c.end());
  return b;
}

/// Bitwise equality (NaN poison included).
inline bool same_bits(std::vector<double> const& x, std::vector<double> const& y) {
  return x.size() == y.size() && (x.empty() || std::memcmp(x.data(), y.data(), x.size() * sizeof(double)) == 0);
}

/// Largest backward error seen by check_backward (relative to its tolerance), for summaries.
inline double& worst_backward_rel_err() {
  static double worst = 0;
  return worst;
}

// =============================================================================================
// The bodies
// =============================================================================================

/// Forward of policy P on the runner's backend vs the fp64 oracle: output (padding untouched)
/// and, when requested, the final state.
template <class P, class R>
void check_forward(R const& runner, ScanCase const& c, std::uint64_t seed) {
  ScanProblem const p(c, seed, runner.precision(), runner.random_param_grads());
  INFO(runner.name() << " policy " << policy_name<P>() << " " << c.name() << " seed " << seed);
  auto const ref = reference_forward(p);
  auto got = runner.template forward<P>(p);
  CHECK(strip_x_padding(p, got.out));
  double const e_out = rel_err(got.out, ref.out);
  INFO("rel err out " << e_out);
  CHECK(e_out < runner.tol().fwd_out);
  if (c.final_state) {
    double const e_h = rel_err(got.hT, ref.hT);
    INFO("rel err final state " << e_h);
    CHECK(e_h < runner.tol().fwd_state);
  }
}

/// check_forward for each policy Ps, the same problem.
template <class... Ps, class R>
void check_forward_all(R const& runner, ScanCase const& c, std::uint64_t seed) {
  (check_forward<Ps>(runner, c, seed), ...);
}

/// check_forward_all over a list, one seed per case (seed, seed + 1, ...).
template <class... Ps, class R>
void forward_suite(R const& runner, std::vector<ScanCase> const& cases, std::uint64_t seed) {
  for (auto const& c : cases) check_forward_all<Ps...>(runner, c, seed++);
}

/// Two policies on the same problem agree (output, final state); both leave the padding alone.
template <class P, class Q, class R>
void check_policies_agree(R const& runner, ScanCase const& c, std::uint64_t seed) {
  ScanProblem const p(c, seed, runner.precision(), runner.random_param_grads());
  INFO(runner.name() << " " << policy_name<P>() << " vs " << policy_name<Q>() << " " << c.name() << " seed " << seed);
  auto x = runner.template forward<P>(p);
  auto y = runner.template forward<Q>(p);
  CHECK(strip_x_padding(p, x.out));
  CHECK(strip_x_padding(p, y.out));
  double const e_out = rel_err(x.out, y.out);
  INFO("rel diff out " << e_out);
  CHECK(e_out < runner.tol().agree_out);
  if (c.final_state) {
    double const e_h = rel_err(x.hT, y.hT);
    INFO("rel diff final state " << e_h);
    CHECK(e_h < runner.tol().agree_state);
  }
}

/// Scanning [0, split) and then [split, L) from the carried final state gives the outputs and
/// the final state of one scan over [0, L) (policy P, the runner's backend and dtype).
template <class P, class R>
void check_resume(R const& runner, ScanCase const& c, int split, std::uint64_t seed) {
  ScanCase whole = c;
  whole.final_state = true;
  ScanProblem const p(whole, seed, runner.precision(), runner.random_param_grads());
  INFO(runner.name() << " policy " << policy_name<P>() << " " << whole.name() << " split at " << split << " seed "
                     << seed);
  REQUIRE(split > 0);
  REQUIRE(split < c.length);
  auto full = runner.template forward<P>(p);
  auto first = runner.template forward<P>(p.slice(0, split, nullptr));
  auto second = runner.template forward<P>(p.slice(split, c.length - split, &first.hT));
  CHECK(strip_x_padding(p, full.out));
  std::vector<double> joined(p.x_size(), 0.0);
  for (auto [part, t0, len] : {std::tuple{&first, 0, split}, std::tuple{&second, split, c.length - split}}) {
    ScanProblem const piece = p.slice(t0, len, nullptr);
    CHECK(strip_x_padding(piece, part->out));
    for (int b = 0; b < c.batch; ++b)
      for (int t = 0; t < len; ++t)
        for (std::int64_t d = 0; d < p.ldx; ++d)
          joined[(static_cast<std::size_t>(b) * c.length + t0 + t) * p.ldx + d] =
              part->out[(static_cast<std::size_t>(b) * len + t) * p.ldx + d];
  }
  double const e_out = rel_err(joined, full.out), e_h = rel_err(second.hT, full.hT);
  INFO("two pieces vs one scan: out " << e_out << " final state " << e_h);
  CHECK(e_out < runner.tol().resume_out);
  CHECK(e_h < runner.tol().resume_state);
}

/// A backward's outputs vs the oracle's (ref): du, ddelta, dB, dC, dz, dinitial_state, the
/// recomputed out, dA, dD, ddelta_bias (each requested one) within tol, written outputs overwrite
/// their poison, strided padding and the non-B / C columns of dB / dC are left alone.
inline void compare_backward(ScanProblem const& p, BackwardResult g, BackwardResult const& ref,
                             ScanTolerances const& tol) {
  auto const& c = p.c;
  bool pad_ok = true;
  auto check = [&](char const* what, std::vector<double> const& x, std::vector<double> const& y, double t) {
    double const e = rel_err(x, y);
    worst_backward_rel_err() = std::max(worst_backward_rel_err(), e / t);
    INFO(what << ": rel err " << e);
    CHECK(e < t);
  };
  pad_ok = strip_x_padding(p, g.du) && pad_ok;
  pad_ok = strip_x_padding(p, g.ddelta) && pad_ok;
  check("du", g.du, ref.du, tol.bwd_act);
  check("ddelta", g.ddelta, ref.ddelta, tol.bwd_act);
  {
    std::vector<double> gb, gc, rb, rc;
    split_bc(p, g.dBC, gb, gc, &pad_ok);
    split_bc(p, ref.dBC, rb, rc, nullptr);
    check("dB", gb, rb, tol.bwd_act);
    check("dC", gc, rc, tol.bwd_act);
  }
  if (c.z) {
    pad_ok = strip_x_padding(p, g.dz) && pad_ok;
    check("dz", g.dz, ref.dz, tol.bwd_act);
  }
  if (c.dinit) check("dinitial_state", g.dh0, ref.dh0, tol.bwd_param);
  if (c.out) {
    pad_ok = strip_x_padding(p, g.out) && pad_ok;
    check("out", g.out, ref.out, tol.bwd_act);
  }
  check("dA", g.dA, ref.dA, tol.bwd_param);
  if (c.D) check("dD", g.dD, ref.dD, tol.bwd_param);
  if (c.bias) check("ddelta_bias", g.dbias, ref.dbias, tol.bwd_param);
  CHECK(pad_ok);
}

/// Backward of policy P on the runner's backend vs the CPU double Sequential backward
/// (compare_backward).
template <class P, class R>
void check_backward(R const& runner, ScanCase const& c, std::uint64_t seed) {
  ScanProblem const p(c, seed, runner.precision(), runner.random_param_grads());
  INFO(runner.name() << " policy " << policy_name<P>() << " " << c.name() << " seed " << seed);
  compare_backward(p, runner.template backward<P>(p), reference_backward(p), runner.tol());
}

/// check_resume for every (case, split) of resume_cases() and each policy Ps, the same problem
/// for every policy; one seed per case (seed, seed + 1, ...).
template <class... Ps, class R>
void resume_suite(R const& runner, std::uint64_t seed) {
  for (auto const& [c, split] : resume_cases()) {
    (check_resume<Ps>(runner, c, split, seed), ...);
    ++seed;
  }
}

/// check_backward for every case of a list and each policy Ps, the same problem for every policy;
/// one seed per case (seed, seed + 1, ...).
template <class... Ps, class R>
void backward_suite(R const& runner, std::vector<ScanCase> const& cases, std::uint64_t seed) {
  for (auto const& c : cases) {
    (check_backward<Ps>(runner, c, seed), ...);
    ++seed;
  }
}

/// c.length decode steps (one token per call, the state updated in place, from the initial
/// state) give the outputs and the final state of the parallel scan (scan::Sequential, same
/// backend and dtype) and of the fp64 oracle.
template <class R>
void check_steps(R const& runner, ScanCase const& c, std::uint64_t seed) {
  ScanCase sc = c;
  sc.final_state = true;
  ScanProblem const p(sc, seed, runner.precision(), runner.random_param_grads());
  INFO(runner.name() << " decode steps " << sc.name() << " seed " << seed);
  auto const ref = reference_forward(p);
  auto scan = runner.template forward<mambabyte::scan::Sequential>(p);
  auto step = runner.steps(p);
  CHECK(strip_x_padding(p, scan.out));
  CHECK(strip_x_padding(p, step.out));
  double const e1 = rel_err(step.out, scan.out), e2 = rel_err(step.hT, scan.hT);
  double const e3 = rel_err(step.out, ref.out), e4 = rel_err(step.hT, ref.hT);
  INFO("step vs scan: out " << e1 << " state " << e2 << "; step vs oracle: out " << e3 << " state " << e4);
  auto const tol = runner.tol();
  CHECK(e1 < tol.step_out_scan);
  CHECK(e2 < tol.step_state_scan);
  CHECK(e3 < tol.step_out_ref);
  CHECK(e4 < tol.step_state_ref);
}

}  // namespace mbtest
