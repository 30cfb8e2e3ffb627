// The CUDA runner of the shared scan test bodies (tests/common/scan_cases.hpp): uploads a
// ScanProblem with DeviceBuffer (activations in the storage type TS = float or __nv_bfloat16,
// parameters, states and parameter gradients in float), runs ssm::SelectiveScan /
// SelectiveScanBackward<backend::Cuda, TS, Policy> or L calls of
// backend::cuda::selective_state_update<TS>, and downloads the results (outputs poisoned with
// NaN before every run, so the bodies can check that padding was left alone).
#pragma once

#include <mambabyte/cuda.hpp>

#include <cuda_bf16.h>

#include <catch2/catch.hpp>

#include "cuda_test_util.hpp"
#include "scan_cases.hpp"

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <vector>

namespace mbtest {

/// Host values (already rounded to TS) -> device, after `lead` zero elements (misalignment).
template <class TS>
mambabyte::backend::cuda::DeviceBuffer<TS> to_device(std::vector<double> const& v, std::size_t lead = 0) {
  std::vector<TS> h(v.size() + lead);
  for (std::size_t i = 0; i < h.size(); ++i) {
    float const x = i < lead ? 0.f : static_cast<float>(v[i - lead]);
    if constexpr (std::is_same_v<TS, float>) {
      h[i] = x;
    } else {
      std::uint16_t const bits = mambabyte::bf16::from_float(x);  // round to nearest even; NaN stays NaN
      std::memcpy(static_cast<void*>(&h[i]), &bits, sizeof bits);
    }
  }
  mambabyte::backend::cuda::DeviceBuffer<TS> d(std::max<std::size_t>(h.size(), 1));
  d.copy_from_host(h.data(), h.size());
  return d;
}

/// n elements from `offset` of a device buffer, widened to double.
template <class TS>
std::vector<double> to_host(mambabyte::backend::cuda::DeviceBuffer<TS> const& d, std::size_t n, std::size_t offset = 0) {
  std::vector<TS> h(n + offset);
  d.copy_to_host(h.data(), n + offset);
  std::vector<double> r(n);
  for (std::size_t i = 0; i < n; ++i) {
    if constexpr (std::is_same_v<TS, float>) {
      r[i] = h[i + offset];
    } else {
      std::uint16_t bits;
      std::memcpy(&bits, static_cast<void const*>(&h[i + offset]), sizeof bits);
      r[i] = mambabyte::bf16::to_float(bits);
    }
  }
  return r;
}

/// Device copies of a problem, with the member names forward_args / backward_args expect.
template <class TS>
struct DeviceScanBuffers {
  template <class X> using Buf = mambabyte::backend::cuda::DeviceBuffer<X>;
  Buf<TS> u, delta, z, dout, BC;
  Buf<float> bias, A, D, h0, dhT;
  Buf<TS> out;
  Buf<float> hT;
  Buf<TS> du, ddelta, dBC, dz;
  Buf<float> dh0, dA, dD, dbias;

  /// Outputs NaN; with `backward`, the gradient outputs too (NaN) and the parameter gradients
  /// at the problem's initial values.
  DeviceScanBuffers(ScanProblem const& p, bool backward)
      : u(to_device<TS>(p.u)), delta(to_device<TS>(p.delta)), z(to_device<TS>(p.z)), dout(to_device<TS>(p.dout)),
        BC(to_device<TS>(p.BC)), bias(to_device<float>(p.bias)), A(to_device<float>(p.A)), D(to_device<float>(p.D)),
        h0(to_device<float>(p.h0)), dhT(to_device<float>(p.dhT)), out(to_device<TS>(nans(p.x_size()))),
        hT(to_device<float>(nans(p.state_size()))) {
    if (!backward) return;
    du = to_device<TS>(nans(p.x_size()));
    ddelta = to_device<TS>(nans(p.x_size()));
    dz = to_device<TS>(nans(p.x_size()));
    dBC = to_device<TS>(nans(p.bc_size()));
    dh0 = to_device<float>(nans(p.state_size()));
    dA = to_device<float>(p.dA0);
    dD = to_device<float>(p.dD0);
    dbias = to_device<float>(p.dbias0);
  }
  static std::vector<double> nans(std::size_t n) { return std::vector<double>(n, std::numeric_limits<double>::quiet_NaN()); }
};

template <class TS>
struct CudaScanRunner {
  static_assert(std::is_same_v<TS, float> || std::is_same_v<TS, __nv_bfloat16>);
  static constexpr bool kBf16 = std::is_same_v<TS, __nv_bfloat16>;
  using Cuda = mambabyte::backend::Cuda;

  std::string name() const { return kBf16 ? "cuda bf16" : "cuda float"; }

  /// float: every value float. bf16: activations bf16-exact (the oracles evaluate the bf16-
  /// rounded inputs, so the tolerances cover fp32 arithmetic and the rounding of the outputs
  /// only), parameters and states float.
  Precision precision() const {
    return kBf16 ? Precision{Storage::kBf16, Storage::kFloat} : Precision{Storage::kFloat, Storage::kFloat};
  }

  /// The parameter-gradient buffers start random: the kernels accumulate into them (+=).
  bool random_param_grads() const { return true; }

  ScanTolerances tol() const {
    ScanTolerances t;
    if constexpr (!kBf16) {
      // fp32 storage, state and math (ex2.approx, fused softplus): 1e-5 against the fp64
      // oracle, between policies and between one scan and two resumed pieces; the backward
      // 1e-4 against the CPU double backward (long fp32 reductions over batch and time).
      t.fwd_out = t.fwd_state = 1e-5;
      t.agree_out = t.agree_state = 1e-5;
      t.resume_out = t.resume_state = 1e-5;
      t.bwd_act = t.bwd_param = 1e-4;
      t.step_out_scan = t.step_state_scan = t.step_out_ref = t.step_state_ref = 1e-5;
    } else {
      // bf16 outputs: one rounding, <= 2^-8 relative each -> 1e-2; the float final state (fp32
      // math only) 2e-4 against the oracle. Between two fp32 evaluations of the same bf16
      // problem (policies, resumed pieces) an output rounds the other way here and there: 1e-3;
      // the float state 1e-5. Backward: bf16 activation gradients 1e-2, float ones 1e-3.
      t.fwd_out = 1e-2;
      t.fwd_state = 2e-4;
      t.agree_out = t.resume_out = 1e-3;
      t.agree_state = t.resume_state = 1e-5;
      t.bwd_act = 1e-2;
      t.bwd_param = 1e-3;
      t.step_out_scan = 1e-2;
      t.step_state_scan = 1e-4;
      t.step_out_ref = 1e-2;
      t.step_state_ref = 2e-4;
    }
    return t;
  }

  template <class P>
  ScanResult forward(ScanProblem const& p) const {
    Cuda be{};
    DeviceScanBuffers<TS> b(p, false);
    using Op = mambabyte::ssm::SelectiveScan<Cuda, TS, P>;
    auto const a = forward_args<typename Op::Arguments>(p, b);
    REQUIRE(Op::can_implement(a) == mambabyte::Status::kSuccess);
    mambabyte::backend::cuda::DeviceBuffer<std::byte> ws(Op::workspace_bytes(a, be), be);
    Op::run(a, ws.data(), be);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
    return {to_host(b.out, p.x_size()), p.c.final_state ? to_host(b.hT, p.state_size()) : std::vector<double>{}};
  }

  template <class P>
  BackwardResult backward(ScanProblem const& p) const {
    Cuda be{};
    DeviceScanBuffers<TS> b(p, true);
    using Op = mambabyte::ssm::SelectiveScanBackward<Cuda, TS, P>;
    auto const a = backward_args<typename Op::Arguments>(p, b);
    REQUIRE(Op::can_implement(a) == mambabyte::Status::kSuccess);
    mambabyte::backend::cuda::DeviceBuffer<std::byte> ws(Op::workspace_bytes(a, be), be);
    Op::run(a, ws.data(), be);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
    std::size_t const X = p.x_size(), S = p.state_size();
    return {to_host(b.du, X),  to_host(b.ddelta, X),     to_host(b.dBC, p.bc_size()), to_host(b.dz, X),
            to_host(b.dh0, S), to_host(b.out, X),        to_host(b.dA, p.A.size()),   to_host(b.dD, p.D.size()),
            to_host(b.dbias, p.bias.size())};
  }

  /// The forward of policy F writing the backward's checkpoints (MixedScanArguments::
  /// checkpoints, poisoned with NaN first), then the backward of policy P reading them
  /// (MixedScanBackwardArguments::checkpoints). Also returns the checkpoints and the forward's
  /// output (its own buffer: the backward's `out` stays a backward output).
  struct FromStates {
    BackwardResult g;
    std::vector<double> ck, fwd_out;
  };
  template <class F, class P>
  FromStates backward_from_forward_states(ScanProblem const& p) const {
    namespace mcu = mambabyte::backend::cuda;
    Cuda be{};
    DeviceScanBuffers<TS> b(p, true);
    using Fwd = mambabyte::ssm::SelectiveScan<Cuda, TS, F>;
    using Bwd = mambabyte::ssm::SelectiveScanBackward<Cuda, TS, P>;
    std::size_t const X = p.x_size(), S = p.state_size();
    std::size_t const nck = mcu::checkpoint_floats(p.c.batch, p.c.length, p.c.d_inner, p.c.d_state);
    auto fout = to_device<TS>(DeviceScanBuffers<TS>::nans(X));
    auto ck = to_device<float>(DeviceScanBuffers<TS>::nans(nck));
    auto fa = forward_args<mcu::MixedScanArguments<TS>>(p, b);
    fa.out = fout.data();
    fa.final_state = nullptr;
    fa.checkpoints = ck.data();
    REQUIRE(Fwd::can_implement(fa) == mambabyte::Status::kSuccess);
    mcu::DeviceBuffer<std::byte> fws(Fwd::workspace_bytes(fa, be), be);
    Fwd::run(fa, fws.data(), be);
    auto ba = backward_args<mcu::MixedScanBackwardArguments<TS>>(p, b);
    ba.checkpoints = ck.data();
    REQUIRE(Bwd::can_implement(ba) == mambabyte::Status::kSuccess);
    mcu::DeviceBuffer<std::byte> bws(Bwd::workspace_bytes(ba, be), be);
    Bwd::run(ba, bws.data(), be);
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
    FromStates r;
    r.g = {to_host(b.du, X),  to_host(b.ddelta, X), to_host(b.dBC, p.bc_size()), to_host(b.dz, X),
           to_host(b.dh0, S), to_host(b.out, X),    to_host(b.dA, p.A.size()),   to_host(b.dD, p.D.size()),
           to_host(b.dbias, p.bias.size())};
    r.ck = to_host(ck, nck);
    r.fwd_out = to_host(fout, X);
    return r;
  }

  /// The backward's workspace for policy P on this problem.
  template <class P>
  std::size_t backward_workspace_bytes(ScanProblem const& p) const {
    DeviceScanBuffers<TS> b(p, true);
    using Op = mambabyte::ssm::SelectiveScanBackward<Cuda, TS, P>;
    return Op::workspace_bytes(backward_args<typename Op::Arguments>(p, b), Cuda{});
  }

  /// c.length decode steps with selective_state_update: step t of sequence b reads row b*L + t,
  /// i.e. base + t*ld with leading dimension L*ld; the float state (one element off 16-byte
  /// alignment when c.misalign, as A) starts as the initial state (or 0) and is updated in
  /// place. With `graph`, the copy of the initial state and the L calls are captured in a CUDA
  /// graph on a non-blocking stream and replayed twice (the second replay starts over).
  ScanResult steps(ScanProblem const& p, bool graph = false) const {
    using mambabyte::backend::cuda::selective_state_update;
    auto const& c = p.c;
    std::size_t const off = c.misalign ? 1 : 0;
    std::size_t const X = p.x_size(), S = p.state_size();
    auto gu = to_device<TS>(p.u), gdelta = to_device<TS>(p.delta), gz = to_device<TS>(p.z), gBC = to_device<TS>(p.BC);
    auto gbias = to_device<float>(p.bias), gA = to_device<float>(p.A, off), gD = to_device<float>(p.D);
    auto gh0 = to_device<float>(c.init ? p.h0 : std::vector<double>(S, 0.0));
    auto gout = to_device<TS>(DeviceScanBuffers<TS>::nans(X));
    auto gstate = to_device<float>(DeviceScanBuffers<TS>::nans(S), off);
    float* const state = gstate.data() + off;
    float const* const Ap = gA.data() + off;

    cudaStream_t stream = nullptr;
    if (graph) MAMBABYTE_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    Cuda const be{stream, 0};
    std::int64_t const L = c.length, ldx = p.ldx, ldbc = p.ldbc;
    auto enqueue = [&] {
      MAMBABYTE_CUDA_CHECK(cudaMemcpyAsync(state, gh0.data(), S * sizeof(float), cudaMemcpyDeviceToDevice, stream));
      for (int t = 0; t < c.length; ++t)
        selective_state_update<TS>(be, c.batch, c.d_inner, c.d_state, state, gu.data() + t * ldx, L * ldx,
                                   gdelta.data() + t * ldx, L * ldx, c.bias ? gbias.data() : nullptr, c.softplus, Ap,
                                   gBC.data() + p.offB + t * ldbc, L * ldbc, gBC.data() + p.offC + t * ldbc, L * ldbc,
                                   c.D ? gD.data() : nullptr, c.z ? gz.data() + t * ldx : nullptr, L * ldx,
                                   gout.data() + t * ldx, L * ldx);
    };
    if (graph) {
      cudaGraph_t g = nullptr;
      cudaGraphExec_t exec = nullptr;
      MAMBABYTE_CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal));
      enqueue();
      MAMBABYTE_CUDA_CHECK(cudaStreamEndCapture(stream, &g));
      MAMBABYTE_CUDA_CHECK(cudaGraphInstantiate(&exec, g, 0));
      for (int rep = 0; rep < 2; ++rep) MAMBABYTE_CUDA_CHECK(cudaGraphLaunch(exec, stream));
      MAMBABYTE_CUDA_CHECK(cudaStreamSynchronize(stream));
      MAMBABYTE_CUDA_CHECK(cudaGraphExecDestroy(exec));
      MAMBABYTE_CUDA_CHECK(cudaGraphDestroy(g));
      MAMBABYTE_CUDA_CHECK(cudaStreamDestroy(stream));
    } else {
      enqueue();
    }
    MAMBABYTE_CUDA_CHECK(cudaGetLastError());
    MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
    return {to_host(gout, X), to_host(gstate, S, off)};
  }
};

/// The forward of policy F keeping the scan states for the backward of policy P
/// (backward_from_forward_states): the forward's output is bitwise the one it writes without
/// them; every stored state (slot k: the state entering step 4k) agrees with the fp64 oracle's
/// state after the first 4k steps (reference_forward of that prefix; slot 0 the initial state)
/// to the forward-state tolerance; the backward from them agrees with the CPU double backward
/// (compare_backward) exactly as check_backward's does.
template <class F, class P, class R>
void check_backward_from_forward_states(R const& runner, ScanCase const& c, std::uint64_t seed) {
  ScanProblem const p(c, seed, runner.precision(), runner.random_param_grads());
  INFO(runner.name() << " forward " << policy_name<F>() << " states -> backward " << policy_name<P>() << " "
                     << c.name() << " seed " << seed);
  auto r = runner.template backward_from_forward_states<F, P>(p);
  auto plain = runner.template forward<F>(p);
  CHECK(same_bits(r.fwd_out, plain.out));
  int const nck = (c.length + 3) / 4;
  std::size_t const DN = static_cast<std::size_t>(c.d_inner) * c.d_state;
  REQUIRE(r.ck.size() == static_cast<std::size_t>(c.batch) * nck * DN);
  std::vector<int> slots = {0, nck / 2, nck - 1};
  for (int k : slots) {
    std::vector<double> want(static_cast<std::size_t>(c.batch) * DN, 0.0), got(want.size());
    if (k == 0) {
      if (c.init) want.assign(p.h0.begin(), p.h0.end());
    } else {
      want = reference_forward(p.slice(0, 4 * k, nullptr)).hT;
    }
    for (int b = 0; b < c.batch; ++b)
      for (std::size_t i = 0; i < DN; ++i) got[b * DN + i] = r.ck[(static_cast<std::size_t>(b) * nck + k) * DN + i];
    double const e = rel_err(got, want);
    INFO("state slot " << k << " (step " << 4 * k << "): rel err " << e);
    CHECK(e < (k == 0 ? 1e-7 : runner.tol().fwd_state));
  }
  compare_backward(p, r.g, reference_backward(p), runner.tol());
}

}  // namespace mbtest
