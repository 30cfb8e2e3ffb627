// The CPU runner of the shared scan test bodies (tests/common/scan_cases.hpp): runs
// ssm::SelectiveScan / SelectiveScanBackward<backend::Cpu, T, Policy> on host copies of a
// ScanProblem, with a given thread count. The decode step on the CPU is what Model::step runs:
// the scan over one token per sequence with initial_state and final_state aliased (in place).
#pragma once

#include <cstddef>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

#include "mambabyte/backend/cpu/selective_scan.hpp"
#include "mambabyte/backend/cpu/selective_scan_backward.hpp"
#include "scan_cases.hpp"

namespace mbtest {

template <class T>
struct CpuScanRunner {
  static_assert(std::is_same_v<T, double> || std::is_same_v<T, float>);
  int threads = 1;

  std::string name() const {
    return std::string("cpu ") + (std::is_same_v<T, double> ? "double" : "float") + " threads=" + std::to_string(threads);
  }

  /// Exact: the oracle sees the unrounded double values while the float scan reads them cast to
  /// float, so the float tolerances also cover the input rounding (as the CPU tests always did;
  /// the stricter choice).
  Precision precision() const { return {}; }

  /// Parameter gradients start at 0 and are compared as such (accumulation into non-zero
  /// buffers is checked by its own CPU test case, exactly, in tests/test_backward.cpp).
  bool random_param_grads() const { return false; }

  ScanTolerances tol() const {
    ScanTolerances t;
    if constexpr (std::is_same_v<T, double>) {
      t.fwd_out = t.fwd_state = 10 * mbtest::tol<double>();  // 1e-11: the CPU forward tests' bound
      t.agree_out = t.agree_state = 1e-12;
      t.resume_out = t.resume_state = 1e-13;                 // the CPU resume test's bound
      t.bwd_act = t.bwd_param = 1e-12;                       // the CPU policy-vs-Sequential bound
      t.step_out_scan = t.step_state_scan = 1e-13;           // same arithmetic, step by step
      t.step_out_ref = t.step_state_ref = 10 * mbtest::tol<double>();
    } else {
      t.fwd_out = t.fwd_state = 10 * mbtest::tol<float>();   // 2e-4: the CPU forward tests' bound
      t.agree_out = t.agree_state = 1e-5;
      t.resume_out = t.resume_state = 1e-5;                  // chunk boundaries move: fp32 rounding only
      t.bwd_act = t.bwd_param = 1e-4;                        // the CPU "float tracks double" bound
      t.step_out_scan = t.step_state_scan = 1e-5;
      t.step_out_ref = t.step_state_ref = 10 * mbtest::tol<float>();
    }
    return t;
  }

  template <class P>
  ScanResult forward(ScanProblem const& p) const {
    HostScanBuffers<T> b(p, std::numeric_limits<T>::quiet_NaN());
    auto const a = forward_args<mambabyte::ssm::SelectiveScanArguments<T>>(p, b);
    using Scan = mambabyte::ssm::SelectiveScan<mambabyte::backend::Cpu, T, P>;
    REQUIRE(Scan::can_implement(a) == mambabyte::Status::kSuccess);
    mambabyte::backend::Cpu const be{threads};
    std::vector<std::byte> ws(Scan::workspace_bytes(a, be));
    Scan::run(a, ws.data(), be);
    return {widen(b.out), p.c.final_state ? widen(b.hT) : std::vector<double>{}};
  }

  template <class P>
  BackwardResult backward(ScanProblem const& p) const {
    HostScanBuffers<T> b(p, std::numeric_limits<T>::quiet_NaN());
    auto const a = backward_args<mambabyte::ssm::SelectiveScanBackwardArguments<T>>(p, b);
    using Bwd = mambabyte::ssm::SelectiveScanBackward<mambabyte::backend::Cpu, T, P>;
    REQUIRE(Bwd::can_implement(a) == mambabyte::Status::kSuccess);
    mambabyte::backend::Cpu const be{threads};
    std::vector<std::byte> ws(Bwd::workspace_bytes(a, be));
    Bwd::run(a, ws.data(), be);
    return {widen(b.du), widen(b.ddelta), widen(b.dBC), widen(b.dz), widen(b.dh0),
            widen(b.out), widen(b.dA), widen(b.dD), widen(b.dbias)};
  }

  /// c.length decode steps: step t of sequence b reads row b * L + t, i.e. base + t * ld with
  /// leading dimension L * ld; the state (from the initial state, or 0) is updated in place.
  /// (`misalign` is a device load-path switch; the CPU operator takes any pointer.)
  ScanResult steps(ScanProblem const& p) const {
    auto const& c = p.c;
    HostScanBuffers<T> b(p, std::numeric_limits<T>::quiet_NaN());
    std::vector<T> state = c.init ? b.h0 : std::vector<T>(p.state_size(), T(0));
    using Scan = mambabyte::ssm::SelectiveScan<mambabyte::backend::Cpu, T, mambabyte::scan::Sequential>;
    mambabyte::backend::Cpu const be{threads};
    std::int64_t const L = c.length;
    for (int t = 0; t < c.length; ++t) {
      auto a = forward_args<mambabyte::ssm::SelectiveScanArguments<T>>(p, b);
      a.length = 1;
      a.u += t * p.ldx; a.ld_u = L * p.ldx;
      a.delta += t * p.ldx; a.ld_delta = L * p.ldx;
      a.B += t * p.ldbc; a.ld_B = L * p.ldbc;
      a.C += t * p.ldbc; a.ld_C = L * p.ldbc;
      if (a.z) a.z += t * p.ldx;
      a.ld_z = L * p.ldx;
      a.out += t * p.ldx; a.ld_out = L * p.ldx;
      a.initial_state = state.data();
      a.final_state = state.data();
      REQUIRE(Scan::can_implement(a) == mambabyte::Status::kSuccess);
      Scan::run(a, be);
    }
    return {widen(b.out), widen(state)};
  }
};

}  // namespace mbtest
