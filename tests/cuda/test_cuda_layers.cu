// CUDA layer kernels (backend/cuda/layers.cuh) against the CPU operators (backend::Cpu, float)
// and host references: embedding (+ backward), add + LayerNorm/RMSNorm (+ backward), causal
// conv1d (+ backward, state), cross-entropy, deterministic sums, clip_scale, AdamW, convert;
// the layers:: contracts for (backend::Cuda, float); bitwise determinism of every gradient
// reduction. fp32 results to relative L2 error <= 1e-5, bf16 storage variants <= 1e-2.
// Needs a GPU to do more than compile: without one every GPU case is skipped (label `cuda`).
// Tag [small]: the reduced set run under compute-sanitizer.
#include <mambabyte/cuda.hpp>
#include <mambabyte/backend/cpu/layers.hpp>
#include <mambabyte/backend/cpu/layers_backward.hpp>
#include <mambabyte/model/config.hpp>
#include <mambabyte/model/weights.hpp>
#include <mambabyte/train/optimizer.hpp>

#include <catch2/catch.hpp>

#include "cuda_test_util.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

namespace {

using mambabyte::Status;
using mambabyte::backend::Cpu;
using mambabyte::backend::Cuda;
using mambabyte::backend::cuda::DeviceBuffer;
namespace bc = mambabyte::backend::cuda;
namespace layers = mambabyte::layers;
namespace train = mambabyte::train;
using dbf16 = __nv_bfloat16;

using mbtest::have_gpu;

constexpr double kTol = 1e-5;      // fp32 against the CPU (float)
constexpr double kTolBf16 = 1e-2;  // a bf16-rounded output

struct Rng {
  std::mt19937_64 g;
  explicit Rng(std::uint64_t seed) : g(seed) {}
  float uni(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(g); }
  int integer(int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(g); }
  std::vector<float> vec(std::size_t n, float lo = -1.f, float hi = 1.f) {
    std::vector<float> v(n);
    for (auto& x : v) x = uni(lo, hi);
    return v;
  }
};

template <class T>
DeviceBuffer<T> upload(std::vector<T> const& h) {
  DeviceBuffer<T> d(h.size());
  d.copy_from_host(h.data(), h.size());
  return d;
}
template <class T>
std::vector<T> download(DeviceBuffer<T> const& d) {
  MAMBABYTE_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<T> h(d.size());
  d.copy_to_host(h.data(), h.size());
  return h;
}
DeviceBuffer<std::byte> workspace(std::size_t bytes) { return DeviceBuffer<std::byte>(bytes); }

float bf(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }
std::vector<float> round_bf16(std::vector<float> v) {
  for (auto& x : v) x = bf(x);
  return v;
}
std::vector<dbf16> to_bf16(std::vector<float> const& v) {
  std::vector<dbf16> o(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) o[i] = __float2bfloat16_rn(v[i]);
  return o;
}
std::vector<float> to_float(std::vector<dbf16> const& v) {
  std::vector<float> o(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) o[i] = __bfloat162float(v[i]);
  return o;
}

/// Relative L2 error of a against the reference b (NaN anywhere fails every check).
double rel_err(std::vector<float> const& a, std::vector<float> const& b) {
  REQUIRE(a.size() == b.size());
  double num = 0, den = 0;
  for (std::size_t i = 0; i < b.size(); ++i) {
    double const d = static_cast<double>(a[i]) - b[i];
    num += d * d;
    den += static_cast<double>(b[i]) * b[i];
  }
  return std::sqrt(num) / std::max(std::sqrt(den), 1e-30);
}

template <class T>
bool bitwise_equal(std::vector<T> const& a, std::vector<T> const& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0);
}

Cuda const be{};

// =============================================================================================
// Embedding
// =============================================================================================

/// mode 0: uniform; 1: 70 % one token (runs across many 256-row pieces); 2: all one token;
/// 3: sorted blocks (long runs crossing piece boundaries).
std::vector<std::int32_t> make_tokens(int rows, int vocab, int mode, Rng& rng) {
  std::vector<std::int32_t> t(static_cast<std::size_t>(rows));
  for (int r = 0; r < rows; ++r) {
    switch (mode) {
      case 0: t[r] = rng.integer(0, vocab - 1); break;
      case 1: t[r] = rng.uni(0.f, 1.f) < 0.7f ? vocab / 2 : rng.integer(0, vocab - 1); break;
      case 2: t[r] = vocab - 1; break;
      default: t[r] = static_cast<std::int32_t>(static_cast<std::int64_t>(r) * vocab / rows); break;
    }
  }
  return t;
}

void check_embedding(int rows, int dim, int vocab, int mode, std::uint64_t seed) {
  INFO("embedding rows=" << rows << " dim=" << dim << " vocab=" << vocab << " mode=" << mode);
  Rng rng(seed);
  auto const tokens = make_tokens(rows, vocab, mode, rng);
  auto const table = rng.vec(static_cast<std::size_t>(vocab) * dim);
  auto const dout = rng.vec(static_cast<std::size_t>(rows) * dim);
  auto const dtable0 = rng.vec(static_cast<std::size_t>(vocab) * dim, -0.1f, 0.1f);
  std::size_t const n = static_cast<std::size_t>(rows) * dim;

  // forward: CPU, the raw function (with an offset output: the scalar path), the contract
  std::vector<float> ref(n);
  layers::EmbeddingArguments<float> a;
  a.rows = rows; a.dim = dim; a.vocab = vocab; a.tokens = tokens.data(); a.table = table.data(); a.out = ref.data();
  layers::Embedding<Cpu, float>::run(a);
  auto d_tok = upload(tokens);
  auto d_table = upload(table);
  DeviceBuffer<float> d_out(n + 1);
  bc::embedding_forward(be, rows, dim, d_tok.data(), d_table.data(), d_out.data());
  auto out = download(d_out);
  out.resize(n);
  CHECK(bitwise_equal(out, ref));
  bc::embedding_forward(be, rows, dim, d_tok.data(), d_table.data(), d_out.data() + 1);
  out = download(d_out);
  CHECK(bitwise_equal(std::vector<float>(out.begin() + 1, out.end()), ref));
  layers::EmbeddingArguments<float> da = a;
  da.tokens = d_tok.data(); da.table = d_table.data(); da.out = d_out.data();
  using Fwd = layers::Embedding<Cuda, float>;
  REQUIRE(Fwd::can_implement(da) == Status::kSuccess);
  Fwd::run(da, nullptr, be);
  out = download(d_out);
  out.resize(n);
  CHECK(bitwise_equal(out, ref));

  // backward: CPU scatter-add vs the raw function and the contract
  std::vector<float> dref = dtable0;
  layers::EmbeddingBackwardArguments<float> b;
  b.rows = rows; b.dim = dim; b.vocab = vocab; b.tokens = tokens.data(); b.dout = dout.data(); b.dtable = dref.data();
  layers::EmbeddingBackward<Cpu, float>::run(b);
  auto d_dout = upload(dout);
  auto d_dtable = upload(dtable0);
  auto ws = workspace(bc::embedding_backward_workspace_bytes(rows, dim, vocab));
  bc::embedding_backward(be, rows, dim, vocab, d_tok.data(), d_dout.data(), d_dtable.data(), ws.data());
  auto const got = download(d_dtable);
  double const e = rel_err(got, dref);
  INFO("rel err dtable " << e);
  CHECK(e <= kTol);
  d_dtable.copy_from_host(dtable0.data(), dtable0.size());
  layers::EmbeddingBackwardArguments<float> db = b;
  db.tokens = d_tok.data(); db.dout = d_dout.data(); db.dtable = d_dtable.data();
  using Bwd = layers::EmbeddingBackward<Cuda, float>;
  REQUIRE(Bwd::can_implement(db) == Status::kSuccess);
  auto ws2 = workspace(Bwd::workspace_bytes(db, be));
  Bwd::run(db, ws2.data(), be);
  CHECK(bitwise_equal(download(d_dtable), got));  // the same kernels: the same bits
}

// =============================================================================================
// Add + norm
// =============================================================================================

struct NormCase {
  int rows = 1, dim = 1;
  bool rms = false, bias = true, res = true, hidden = true;
  std::string name() const {
    return "rows=" + std::to_string(rows) + " dim=" + std::to_string(dim) + (rms ? " rms" : " ln") +
           (bias ? " bias" : "") + (res ? " res" : " no-res") + (hidden ? " hidden" : " no-hidden");
  }
};

void check_add_norm_forward(NormCase const& c, std::uint64_t seed) {
  INFO("add_norm_forward " << c.name());
  Rng rng(seed);
  std::size_t const n = static_cast<std::size_t>(c.rows) * c.dim;
  auto const res = c.res ? rng.vec(n, -1.5f, 2.5f) : std::vector<float>(n, 0.f);
  auto const hid = round_bf16(rng.vec(n, -2.f, 2.f));  // exact in bf16: the bf16 run sees the same input
  auto const w = rng.vec(static_cast<std::size_t>(c.dim), 0.5f, 1.5f);
  auto const b = rng.vec(static_cast<std::size_t>(c.dim), -0.5f, 0.5f);
  float const eps = 1e-5f;

  std::vector<float> cres = res, cout(n);
  layers::AddNormArguments<float> a;
  a.rows = c.rows; a.dim = c.dim; a.residual = cres.data(); a.hidden = c.hidden ? hid.data() : nullptr;
  a.weight = w.data(); a.bias = c.bias ? b.data() : nullptr; a.out = cout.data(); a.eps = eps; a.rms = c.rms;
  layers::AddNorm<Cpu, float>::run(a);

  auto d_res = upload(res);
  auto d_hid = upload(hid);
  auto d_w = upload(w);
  auto d_b = upload(b);
  DeviceBuffer<float> d_rout(n), d_out(n);
  float const* bias = c.bias ? d_b.data() : nullptr;
  bc::add_norm_forward<float, float>(be, c.rows, c.dim, c.res ? d_res.data() : nullptr,
                                     c.hidden ? d_hid.data() : nullptr, d_rout.data(), d_w.data(), bias,
                                     d_out.data(), eps, c.rms);
  CHECK(rel_err(download(d_rout), cres) <= kTol);
  double const e = rel_err(download(d_out), cout);
  INFO("rel err out " << e);
  CHECK(e <= kTol);

  // bf16 hidden and output: the input is the same, only the output is rounded
  auto d_hid16 = upload(to_bf16(hid));
  DeviceBuffer<dbf16> d_out16(n);
  bc::add_norm_forward<dbf16, dbf16>(be, c.rows, c.dim, c.res ? d_res.data() : nullptr,
                                     c.hidden ? d_hid16.data() : nullptr, d_rout.data(), d_w.data(), bias,
                                     d_out16.data(), eps, c.rms);
  CHECK(rel_err(download(d_rout), cres) <= kTol);
  CHECK(rel_err(to_float(download(d_out16)), cout) <= kTolBf16);

  // the contract: residual in place
  if (c.res) {
    d_res.copy_from_host(res.data(), n);
    layers::AddNormArguments<float> da = a;
    da.residual = d_res.data(); da.hidden = c.hidden ? d_hid.data() : nullptr; da.weight = d_w.data();
    da.bias = bias; da.out = d_out.data();
    using Op = layers::AddNorm<Cuda, float>;
    REQUIRE(Op::can_implement(da) == Status::kSuccess);
    Op::run(da, nullptr, be);
    CHECK(rel_err(download(d_res), cres) <= kTol);
    CHECK(rel_err(download(d_out), cout) <= kTol);
  }
}

struct NormBwdOut {
  std::vector<float> dres, dw, db, copy;
};

void check_add_norm_backward(int rows, int dim, bool rms, bool dbias, std::uint64_t seed) {
  INFO("add_norm_backward rows=" << rows << " dim=" << dim << (rms ? " rms" : " ln") << (dbias ? " dbias" : ""));
  Rng rng(seed);
  std::size_t const n = static_cast<std::size_t>(rows) * dim;
  auto const r = rng.vec(n, -1.f, 2.f);
  auto const w = rng.vec(static_cast<std::size_t>(dim), 0.5f, 1.5f);
  auto const dout = round_bf16(rng.vec(n));  // exact in bf16 (the TD = bf16 run)
  auto const dres0 = rng.vec(n);
  auto const dw0 = rng.vec(static_cast<std::size_t>(dim), -0.1f, 0.1f);
  auto const db0 = rng.vec(static_cast<std::size_t>(dim), -0.1f, 0.1f);
  float const eps = 1e-5f;

  std::vector<float> cdres = dres0, cdw = dw0, cdb = db0;
  layers::AddNormBackwardArguments<float> a;
  a.rows = rows; a.dim = dim; a.residual = r.data(); a.weight = w.data(); a.dout = dout.data();
  a.dresidual = cdres.data(); a.dweight = cdw.data(); a.dbias = dbias ? cdb.data() : nullptr; a.eps = eps; a.rms = rms;
  layers::AddNormBackward<Cpu, float>::run(a);

  auto d_r = upload(r);
  auto d_w = upload(w);
  auto d_dout = upload(dout);
  auto d_dout16 = upload(to_bf16(dout));
  auto d_dres = upload(dres0);
  auto d_dw = upload(dw0);
  auto d_db = upload(db0);
  DeviceBuffer<float> d_copy(n);
  DeviceBuffer<dbf16> d_copy16(n);
  auto ws = workspace(bc::add_norm_backward_workspace_bytes(rows, dim));
  bc::add_norm_backward<float, float>(be, rows, dim, d_r.data(), d_w.data(), d_dout.data(), d_dres.data(),
                                      d_copy.data(), d_dw.data(), dbias ? d_db.data() : nullptr, eps, rms, ws.data());
  auto const got_dres = download(d_dres);
  double const e_dr = rel_err(got_dres, cdres), e_dw = rel_err(download(d_dw), cdw);
  INFO("rel err dresidual " << e_dr << " dweight " << e_dw);
  CHECK(e_dr <= kTol);
  CHECK(e_dw <= kTol);
  if (dbias) CHECK(rel_err(download(d_db), cdb) <= kTol);
  else CHECK(bitwise_equal(download(d_db), db0));
  CHECK(bitwise_equal(download(d_copy), got_dres));

  // TD = TC = bf16: dout is exact in bf16, so dresidual matches to fp32 precision; the copy is
  // dresidual rounded to bf16
  d_dres.copy_from_host(dres0.data(), n);
  d_dw.copy_from_host(dw0.data(), dw0.size());
  d_db.copy_from_host(db0.data(), db0.size());
  bc::add_norm_backward<dbf16, dbf16>(be, rows, dim, d_r.data(), d_w.data(), d_dout16.data(), d_dres.data(),
                                      d_copy16.data(), d_dw.data(), dbias ? d_db.data() : nullptr, eps, rms,
                                      ws.data());
  auto const got16 = download(d_dres);
  CHECK(rel_err(got16, cdres) <= kTol);
  CHECK(rel_err(download(d_dw), cdw) <= kTol);
  CHECK(bitwise_equal(to_float(download(d_copy16)), round_bf16(got16)));

  // the contract (no copy)
  d_dres.copy_from_host(dres0.data(), n);
  d_dw.copy_from_host(dw0.data(), dw0.size());
  d_db.copy_from_host(db0.data(), db0.size());
  layers::AddNormBackwardArguments<float> da = a;
  da.residual = d_r.data(); da.weight = d_w.data(); da.dout = d_dout.data(); da.dresidual = d_dres.data();
  da.dweight = d_dw.data(); da.dbias = dbias ? d_db.data() : nullptr;
  using Op = layers::AddNormBackward<Cuda, float>;
  REQUIRE(Op::can_implement(da) == Status::kSuccess);
  REQUIRE(Op::workspace_bytes(da, be) == bc::add_norm_backward_workspace_bytes(rows, dim));
  Op::run(da, ws.data(), be);
  CHECK(bitwise_equal(download(d_dres), got_dres));
  CHECK(rel_err(download(d_dw), cdw) <= kTol);
}

// =============================================================================================
// Causal conv1d
// =============================================================================================

struct ConvCase {
  int batch = 1, length = 1, channels = 1, width = 4;
  bool silu = true, bias = true, state = true;
  bool aligned = false;  ///< leading dimensions multiples of 4 (the vectorized kernels when C % 4 == 0)
  std::string name() const {
    return "B=" + std::to_string(batch) + " L=" + std::to_string(length) + " C=" + std::to_string(channels) +
           " K=" + std::to_string(width) + (silu ? " silu" : "") + (bias ? " bias" : "") + (state ? " state" : "") +
           (aligned ? " aligned" : "");
  }
};

constexpr float kSentinel = 777.f;  // padding columns: must come back unchanged

void check_conv_forward(ConvCase const& c, std::uint64_t seed) {
  INFO("conv1d_forward " << c.name());
  Rng rng(seed);
  int const C = c.channels, K = c.width;
  // x inside wider rows (as xz), padded out; aligned: as the model lays them out (+ padding)
  std::int64_t const ld_x = c.aligned ? 2 * C : 2 * C + 3, ld_out = c.aligned ? C + 4 : C + 1;
  std::size_t const rows = static_cast<std::size_t>(c.batch) * c.length;
  auto const x = round_bf16(rng.vec(rows * ld_x, -2.f, 2.f));
  auto const w = rng.vec(static_cast<std::size_t>(C) * K, -0.6f, 0.6f);
  auto const b = rng.vec(static_cast<std::size_t>(C), -0.3f, 0.3f);
  auto const st0 = round_bf16(rng.vec(static_cast<std::size_t>(c.batch) * (K - 1) * C, -2.f, 2.f));
  bool const has_state = c.state && K > 1;

  std::vector<float> cout(rows * ld_out, kSentinel), cst = st0;
  layers::CausalConv1dArguments<float> a;
  a.batch = c.batch; a.length = c.length; a.channels = C; a.width = K;
  a.x = x.data(); a.ld_x = ld_x; a.weight = w.data(); a.bias = c.bias ? b.data() : nullptr;
  a.out = cout.data(); a.ld_out = ld_out; a.state = has_state ? cst.data() : nullptr; a.silu = c.silu;
  layers::CausalConv1d<Cpu, float>::run(a);

  auto d_x = upload(x);
  auto d_w = upload(w);
  auto d_b = upload(b);
  auto d_st = upload(st0);
  auto d_out = upload(std::vector<float>(rows * ld_out, kSentinel));
  float const* bias = c.bias ? d_b.data() : nullptr;
  bc::conv1d_forward<float>(be, c.batch, c.length, C, K, d_x.data(), ld_x, d_w.data(), bias, d_out.data(), ld_out,
                            has_state ? d_st.data() : nullptr, c.silu);
  double const e = rel_err(download(d_out), cout);
  INFO("rel err out " << e);
  CHECK(e <= kTol);
  if (has_state) CHECK(bitwise_equal(download(d_st), cst));  // the state is a copy of inputs

  // bf16 storage (x exact in bf16; out rounded); the state holds the same floats
  d_st.copy_from_host(st0.data(), st0.size());
  auto d_x16 = upload(to_bf16(x));
  DeviceBuffer<dbf16> d_out16(rows * ld_out);
  bc::conv1d_forward<dbf16>(be, c.batch, c.length, C, K, d_x16.data(), ld_x, d_w.data(), bias, d_out16.data(),
                            ld_out, has_state ? d_st.data() : nullptr, c.silu);
  auto out16 = to_float(download(d_out16));
  auto ref16 = cout;
  for (std::size_t r = 0; r < rows; ++r)  // padding of the bf16 output was never written: ignore it
    for (std::int64_t j = C; j < ld_out; ++j) out16[r * ld_out + j] = ref16[r * ld_out + j] = 0.f;
  CHECK(rel_err(out16, ref16) <= kTolBf16);
  if (has_state) CHECK(bitwise_equal(download(d_st), cst));

  // the contract
  d_st.copy_from_host(st0.data(), st0.size());
  std::vector<float> const poison(rows * ld_out, kSentinel);
  d_out.copy_from_host(poison.data(), poison.size());
  layers::CausalConv1dArguments<float> da = a;
  da.x = d_x.data(); da.weight = d_w.data(); da.bias = bias; da.out = d_out.data();
  da.state = has_state ? d_st.data() : nullptr;
  using Op = layers::CausalConv1d<Cuda, float>;
  REQUIRE(Op::can_implement(da) == Status::kSuccess);
  Op::run(da, nullptr, be);
  CHECK(rel_err(download(d_out), cout) <= kTol);
  if (has_state) CHECK(bitwise_equal(download(d_st), cst));
}

/// Runs the same conv forward twice in pieces (prefill then steps), carrying the state: the
/// outputs must equal the single call's (the decoding path).
void check_conv_streaming(int batch, int length, int channels, int width, std::uint64_t seed) {
  INFO("conv1d_forward streaming B=" << batch << " L=" << length << " C=" << channels << " K=" << width);
  Rng rng(seed);
  std::size_t const rows = static_cast<std::size_t>(batch) * length;
  auto const x = rng.vec(rows * channels);
  auto const w = rng.vec(static_cast<std::size_t>(channels) * width, -0.6f, 0.6f);
  auto const b = rng.vec(static_cast<std::size_t>(channels), -0.3f, 0.3f);
  std::vector<float> const zero_state(static_cast<std::size_t>(batch) * (width - 1) * channels, 0.f);
  auto d_x = upload(x);
  auto d_w = upload(w);
  auto d_b = upload(b);
  DeviceBuffer<float> d_full(rows * channels);
  bc::conv1d_forward<float>(be, batch, length, channels, width, d_x.data(), channels, d_w.data(), d_b.data(),
                            d_full.data(), channels, nullptr, true);
  auto const full = download(d_full);
  // per batch element: the same sequence one step at a time
  for (int bb = 0; bb < batch; ++bb) {
    auto d_state = upload(std::vector<float>(static_cast<std::size_t>(width - 1) * channels, 0.f));
    DeviceBuffer<float> d_step(channels);
    for (int t = 0; t < length; ++t) {
      std::size_t const row = static_cast<std::size_t>(bb) * length + t;
      bc::conv1d_forward<float>(be, 1, 1, channels, width, d_x.data() + row * channels, channels, d_w.data(),
                                d_b.data(), d_step.data(), channels, width > 1 ? d_state.data() : nullptr, true);
      auto const step = download(d_step);
      std::vector<float> const want(full.begin() + row * channels, full.begin() + (row + 1) * channels);
      CHECK(rel_err(step, want) <= kTol);
    }
  }
}

void check_conv_backward(ConvCase const& c, std::uint64_t seed) {
  INFO("conv1d_backward " << c.name());
  Rng rng(seed);
  int const C = c.channels, K = c.width;
  std::int64_t const ld_x = c.aligned ? 2 * C : 2 * C + 3, ld_dout = c.aligned ? C : C + 2,
                     ld_dx = c.aligned ? 2 * C + 4 : 2 * C + 1;
  std::size_t const rows = static_cast<std::size_t>(c.batch) * c.length;
  auto const x = round_bf16(rng.vec(rows * ld_x, -2.f, 2.f));
  auto const w = rng.vec(static_cast<std::size_t>(C) * K, -0.6f, 0.6f);
  auto const b = rng.vec(static_cast<std::size_t>(C), -0.3f, 0.3f);
  auto const dout = round_bf16(rng.vec(rows * ld_dout));
  auto const dw0 = rng.vec(static_cast<std::size_t>(C) * K, -0.1f, 0.1f);
  auto const db0 = rng.vec(static_cast<std::size_t>(C), -0.1f, 0.1f);

  std::vector<float> cdx(rows * ld_dx, kSentinel), cdw = dw0, cdb = db0;
  layers::CausalConv1dBackwardArguments<float> a;
  a.batch = c.batch; a.length = c.length; a.channels = C; a.width = K;
  a.x = x.data(); a.ld_x = ld_x; a.weight = w.data(); a.bias = c.bias ? b.data() : nullptr; a.silu = c.silu;
  a.dout = dout.data(); a.ld_dout = ld_dout; a.dx = cdx.data(); a.ld_dx = ld_dx;
  a.dweight = cdw.data(); a.dbias = c.bias ? cdb.data() : nullptr;
  layers::CausalConv1dBackward<Cpu, float>::run(a);

  auto d_x = upload(x);
  auto d_w = upload(w);
  auto d_b = upload(b);
  auto d_dout = upload(dout);
  auto d_dx = upload(std::vector<float>(rows * ld_dx, kSentinel));
  auto d_dw = upload(dw0);
  auto d_db = upload(db0);
  float const* bias = c.bias ? d_b.data() : nullptr;
  auto ws = workspace(bc::conv1d_backward_workspace_bytes(c.batch, c.length, C, K));
  bc::conv1d_backward<float>(be, c.batch, c.length, C, K, d_x.data(), ld_x, d_w.data(), bias, c.silu, d_dout.data(),
                             ld_dout, d_dx.data(), ld_dx, d_dw.data(), c.bias ? d_db.data() : nullptr, ws.data());
  auto const got_dx = download(d_dx);
  double const e_dx = rel_err(got_dx, cdx), e_dw = rel_err(download(d_dw), cdw);
  INFO("rel err dx " << e_dx << " dweight " << e_dw);
  CHECK(e_dx <= kTol);
  CHECK(e_dw <= kTol);
  if (c.bias) CHECK(rel_err(download(d_db), cdb) <= kTol);

  // bf16 storage: x and dout exact in bf16, so the weight gradients match to fp32 precision
  auto d_x16 = upload(to_bf16(x));
  auto d_dout16 = upload(to_bf16(dout));
  DeviceBuffer<dbf16> d_dx16(rows * ld_dx);
  d_dw.copy_from_host(dw0.data(), dw0.size());
  d_db.copy_from_host(db0.data(), db0.size());
  bc::conv1d_backward<dbf16>(be, c.batch, c.length, C, K, d_x16.data(), ld_x, d_w.data(), bias, c.silu,
                             d_dout16.data(), ld_dout, d_dx16.data(), ld_dx, d_dw.data(),
                             c.bias ? d_db.data() : nullptr, ws.data());
  auto dx16 = to_float(download(d_dx16));
  auto ref16 = cdx;
  for (std::size_t r = 0; r < rows; ++r)
    for (std::int64_t j = C; j < ld_dx; ++j) dx16[r * ld_dx + j] = ref16[r * ld_dx + j] = 0.f;
  CHECK(rel_err(dx16, ref16) <= kTolBf16);
  CHECK(rel_err(download(d_dw), cdw) <= kTol);
  if (c.bias) CHECK(rel_err(download(d_db), cdb) <= kTol);

  // the contract
  d_dw.copy_from_host(dw0.data(), dw0.size());
  d_db.copy_from_host(db0.data(), db0.size());
  layers::CausalConv1dBackwardArguments<float> da = a;
  da.x = d_x.data(); da.weight = d_w.data(); da.bias = bias; da.dout = d_dout.data(); da.dx = d_dx.data();
  da.dweight = d_dw.data(); da.dbias = c.bias ? d_db.data() : nullptr;
  using Op = layers::CausalConv1dBackward<Cuda, float>;
  REQUIRE(Op::can_implement(da) == Status::kSuccess);
  auto ws2 = workspace(Op::workspace_bytes(da, be));
  Op::run(da, ws2.data(), be);
  CHECK(bitwise_equal(download(d_dx), got_dx));
  CHECK(rel_err(download(d_dw), cdw) <= kTol);
}

// =============================================================================================
// Cross-entropy
// =============================================================================================

std::vector<std::int32_t> make_targets(int rows, int classes, Rng& rng) {
  std::vector<std::int32_t> t(static_cast<std::size_t>(rows));
  for (int r = 0; r < rows; ++r) {
    int const u = rng.integer(0, 9);
    t[r] = u == 0 ? -1 : (u == 1 ? -100 : rng.integer(0, classes - 1));
  }
  if (rows > 2) t[1] = classes - 1;
  return t;
}

void check_cross_entropy(int rows, int classes, std::uint64_t seed) {
  INFO("cross_entropy rows=" << rows << " classes=" << classes);
  Rng rng(seed);
  std::int64_t const ld = classes + 3, ld_d = classes + 5;
  auto const logits = rng.vec(static_cast<std::size_t>(rows) * ld, -4.f, 4.f);
  auto const targets = make_targets(rows, classes, rng);
  float const gs = 0.75f;

  // per-row loss in double
  std::vector<float> ref_loss(static_cast<std::size_t>(rows));
  int counted = 0;
  for (int r = 0; r < rows; ++r) {
    if (targets[r] < 0) { ref_loss[r] = 0.f; continue; }
    ++counted;
    double mx = -1e300;
    for (int j = 0; j < classes; ++j) mx = std::max(mx, double(logits[r * ld + j]));
    double s = 0;
    for (int j = 0; j < classes; ++j) s += std::exp(double(logits[r * ld + j]) - mx);
    ref_loss[r] = static_cast<float>(mx + std::log(s) - logits[r * ld + targets[r]]);
  }

  // CPU contract with grad_scale = gs * n: dlogits = gs (softmax - onehot)
  std::vector<float> cd(static_cast<std::size_t>(rows) * ld_d, kSentinel);
  layers::CrossEntropyArguments<float> a;
  a.rows = rows; a.classes = classes; a.logits = logits.data(); a.ld_logits = ld; a.targets = targets.data();
  a.dlogits = cd.data(); a.ld_dlogits = ld_d; a.grad_scale = static_cast<double>(gs) * std::max(counted, 1);
  a.zero_padding = false;
  double const cpu_loss = layers::CrossEntropy<Cpu, float>::run(a);

  auto d_logits = upload(logits);
  auto d_t = upload(targets);
  auto d_d = upload(std::vector<float>(static_cast<std::size_t>(rows) * ld_d, kSentinel));
  DeviceBuffer<float> d_loss(static_cast<std::size_t>(rows));
  bc::cross_entropy<float>(be, rows, classes, d_logits.data(), ld, d_t.data(), d_d.data(), ld_d, gs, d_loss.data());
  auto const loss = download(d_loss);
  double const e_l = rel_err(loss, ref_loss), e_d = rel_err(download(d_d), cd);
  INFO("rel err row loss " << e_l << " dlogits " << e_d);
  CHECK(e_l <= kTol);
  CHECK(e_d <= kTol);
  double mean = 0;
  for (int r = 0; r < rows; ++r) {
    if (targets[r] < 0) CHECK(loss[r] == 0.f);
    mean += loss[r];
  }
  mean = counted > 0 ? mean / counted : 0.0;
  CHECK(std::abs(mean - cpu_loss) <= 1e-5 * std::max(1.0, std::abs(cpu_loss)));
  // loss only, and bf16 dlogits
  bc::cross_entropy<float>(be, rows, classes, d_logits.data(), ld, d_t.data(), static_cast<float*>(nullptr), ld_d, gs,
                           d_loss.data());
  CHECK(bitwise_equal(download(d_loss), loss));
  DeviceBuffer<dbf16> d_d16(static_cast<std::size_t>(rows) * ld_d);
  bc::cross_entropy<dbf16>(be, rows, classes, d_logits.data(), ld, d_t.data(), d_d16.data(), ld_d, gs, d_loss.data());
  auto d16 = to_float(download(d_d16));
  auto ref16 = cd;
  for (int r = 0; r < rows; ++r)
    for (std::int64_t j = classes; j < ld_d; ++j) d16[r * ld_d + j] = ref16[r * ld_d + j] = 0.f;
  CHECK(rel_err(d16, ref16) <= kTolBf16);

  // the contracts: mean loss and dlogits (grad_scale / n), zero padding on and off, in place
  for (int mode = 0; mode < 3; ++mode) {
    bool const zero_padding = mode != 1, in_place = mode == 2;
    INFO("contract zero_padding=" << zero_padding << " in_place=" << in_place);
    std::vector<float> hbuf = in_place ? logits : std::vector<float>(static_cast<std::size_t>(rows) * ld_d, kSentinel);
    layers::CrossEntropyArguments<float> ca = a;
    ca.grad_scale = 1.5;
    ca.zero_padding = zero_padding;
    ca.dlogits = hbuf.data();
    ca.ld_dlogits = in_place ? ld : ld_d;
    if (in_place) ca.logits = hbuf.data();
    double const want = layers::CrossEntropy<Cpu, float>::run(ca);
    auto d_buf = upload(in_place ? logits : std::vector<float>(static_cast<std::size_t>(rows) * ld_d, kSentinel));
    auto d_lg = upload(logits);
    layers::CrossEntropyArguments<float> da = ca;
    da.logits = in_place ? d_buf.data() : d_lg.data();
    da.targets = d_t.data();
    da.dlogits = d_buf.data();
    using Op = layers::CrossEntropy<Cuda, float>;
    REQUIRE(Op::can_implement(da) == Status::kSuccess);
    auto ws = workspace(Op::workspace_bytes(da, be));
    double const got = Op::run(da, ws.data(), be);
    CHECK(std::abs(got - want) <= kTol * std::max(1.0, std::abs(want)));
    CHECK(rel_err(download(d_buf), hbuf) <= kTol);
  }
}

// =============================================================================================
// Conv / norm / embedding case lists
// =============================================================================================

}  // namespace

TEST_CASE("CUDA embedding forward/backward match the CPU", "[cuda][layers][embedding][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 1;
  for (int rows : {1, 7, 300})
    for (int dim : {1, 5, 64, 1000, 1536}) check_embedding(rows, dim, 256, 0, seed++);
  check_embedding(300, 64, 10, 0, seed++);     // many repeats
  check_embedding(1000, 64, 256, 1, seed++);   // one token across many pieces
  check_embedding(1000, 5, 256, 2, seed++);    // all rows one token
  check_embedding(777, 12, 7, 3, seed++);      // sorted runs crossing piece boundaries
  check_embedding(700, 6, 50000, 0, seed++);   // large vocabulary
}

TEST_CASE("CUDA embedding backward at training sizes", "[cuda][layers][embedding]") {
  REQUIRE_GPU();
  check_embedding(16384, 1024, 256, 1, 11);
  check_embedding(8192, 768, 256, 0, 12);
  check_embedding(5000, 256, 256, 3, 13);
}

TEST_CASE("CUDA add+norm forward matches the CPU", "[cuda][layers][norm][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 100;
  for (int rows : {1, 7, 300})
    for (int dim : {1, 5, 64, 1000, 1536})
      for (int mode = 0; mode < 3; ++mode) {  // LN + bias, LN, RMS
        NormCase c;
        c.rows = rows; c.dim = dim; c.rms = mode == 2; c.bias = mode == 0;
        check_add_norm_forward(c, seed++);
      }
  for (int mask = 0; mask < 4; ++mask) {  // residual_in / hidden absent
    NormCase c;
    c.rows = 7; c.dim = 64; c.res = mask & 1; c.hidden = mask & 2; c.rms = mask == 1;
    c.bias = !c.rms;  // RMSNorm has no bias (the contract rejects one)
    check_add_norm_forward(c, seed++);
    c.dim = 1000;
    check_add_norm_forward(c, seed++);
  }
  NormCase big;
  big.rows = 3; big.dim = 8192;
  check_add_norm_forward(big, seed++);
  big.dim = 8191; big.rms = true; big.bias = false;
  check_add_norm_forward(big, seed++);
}

TEST_CASE("CUDA add+norm backward matches the CPU", "[cuda][layers][norm][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 200;
  for (int rows : {1, 7, 300})
    for (int dim : {1, 5, 64, 1000, 1536}) {
      check_add_norm_backward(rows, dim, false, true, seed++);
      check_add_norm_backward(rows, dim, false, false, seed++);
      check_add_norm_backward(rows, dim, true, false, seed++);
    }
  int const many = 2 * bc::layers_detail::kNormGroups + 37;  // more rows than row groups
  check_add_norm_backward(many, 64, false, true, seed++);
  check_add_norm_backward(many, 5, true, false, seed++);
}

TEST_CASE("CUDA add+norm backward at training sizes", "[cuda][layers][norm]") {
  REQUIRE_GPU();
  check_add_norm_backward(8192, 1536, false, true, 250);
  check_add_norm_backward(4096, 2048, true, false, 251);
}

TEST_CASE("CUDA causal conv1d forward matches the CPU (state, short lengths)", "[cuda][layers][conv][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 300;
  for (int K : {1, 2, 3, 4, 6})
    for (int L : {1, 2, 5, 37, 300})
      for (int C : {1, 5, 130}) {
        ConvCase c;
        c.batch = (L + C) % 2 ? 3 : 1; c.length = L; c.channels = C; c.width = K;
        c.state = true; c.silu = (K + L) % 2 == 0; c.bias = C != 5;
        check_conv_forward(c, seed++);
        c.state = false; c.silu = !c.silu; c.bias = !c.bias;
        check_conv_forward(c, seed++);
      }
}

TEST_CASE("CUDA causal conv1d: step-by-step decoding equals the whole sequence", "[cuda][layers][conv][small]") {
  REQUIRE_GPU();
  check_conv_streaming(2, 9, 70, 4, 350);
  check_conv_streaming(1, 5, 3, 3, 351);
  check_conv_streaming(2, 4, 17, 1, 352);
}

TEST_CASE("CUDA causal conv1d backward matches the CPU", "[cuda][layers][conv][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 400;
  for (int K : {1, 2, 3, 4, 6})
    for (int L : {1, 2, 5, 37, 600})
      for (int C : {1, 5, 130}) {
        ConvCase c;
        c.batch = (L + C) % 2 ? 3 : 1; c.length = L; c.channels = C; c.width = K;
        c.silu = (K + L) % 2 == 0; c.bias = C != 5; c.state = false;
        check_conv_backward(c, seed++);
      }
}

TEST_CASE("CUDA causal conv1d at model sizes", "[cuda][layers][conv]") {
  REQUIRE_GPU();
  ConvCase c;
  c.batch = 4; c.length = 1031; c.channels = 1536; c.width = 4; c.silu = true; c.bias = true; c.state = true;
  check_conv_forward(c, 450);
  c.state = false;
  check_conv_backward(c, 451);
  c.aligned = true;  // the model's layout: the vectorized kernels
  check_conv_backward(c, 452);
  c.state = true;
  check_conv_forward(c, 453);
}

TEST_CASE("CUDA causal conv1d, vectorized kernels, match the CPU", "[cuda][layers][conv][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 460;
  for (int K : {1, 2, 3, 4})
    for (int L : {1, 2, 5, 37, 600})
      for (int C : {4, 132}) {
        ConvCase c;
        c.batch = (L + C) % 2 ? 3 : 2; c.length = L; c.channels = C; c.width = K; c.aligned = true;
        c.state = true; c.silu = (K + L) % 2 == 0; c.bias = K != 2;
        check_conv_forward(c, seed++);
        c.state = false; c.silu = !c.silu; c.bias = !c.bias;
        check_conv_forward(c, seed++);
        check_conv_backward(c, seed++);
      }
}

/// The vectorized conv kernels against the scalar ones on the same values (the scalar path
/// forced by rows of ld = C + 1): outputs, new states, dx and the weight / bias gradients
/// bitwise equal (the same arithmetic in the same order), in storage type T.
template <class T>
void check_conv_vector_vs_scalar(int batch, int length, int C, int K, bool silu, std::uint64_t seed) {
  INFO("conv1d vector vs scalar B=" << batch << " L=" << length << " C=" << C << " K=" << K << " silu=" << silu
                                    << (std::is_same_v<T, float> ? " fp32" : " bf16"));
  Rng rng(seed);
  std::size_t const rows = static_cast<std::size_t>(batch) * length;
  auto const x = round_bf16(rng.vec(rows * C, -2.f, 2.f));
  auto const dout = round_bf16(rng.vec(rows * C));
  auto const w = rng.vec(static_cast<std::size_t>(C) * K, -0.6f, 0.6f);
  auto const b = rng.vec(static_cast<std::size_t>(C), -0.3f, 0.3f);
  auto const st0 = rng.vec(static_cast<std::size_t>(batch) * (K - 1) * C, -2.f, 2.f);
  auto place = [&](std::vector<float> const& v, std::int64_t ld) {  // (rows, C) into rows of ld
    std::vector<float> o(rows * ld, 0.f);
    for (std::size_t r = 0; r < rows; ++r) std::copy_n(v.begin() + r * C, C, o.begin() + r * ld);
    if constexpr (std::is_same_v<T, float>) return o;
    else return to_bf16(o);
  };
  auto pick = [&](DeviceBuffer<T> const& d, std::int64_t ld) {  // the (rows, C) values as float
    std::vector<float> all;
    if constexpr (std::is_same_v<T, float>) all = download(d);
    else all = to_float(download(d));
    std::vector<float> o(rows * C);
    for (std::size_t r = 0; r < rows; ++r) std::copy_n(all.begin() + r * ld, C, o.begin() + r * C);
    return o;
  };
  auto d_w = upload(w);
  auto d_b = upload(b);
  std::vector<float> out[2], st[2], dx[2], dw[2], db[2];
  for (int path = 0; path < 2; ++path) {  // 0: vector (ld = C), 1: scalar (ld = C + 1)
    std::int64_t const ld = C + path;
    auto d_x = upload(place(x, ld));
    auto d_dout = upload(place(dout, ld));
    DeviceBuffer<T> d_out(rows * ld), d_dx(rows * ld);
    auto d_st = upload(st0);
    auto d_dw = upload(std::vector<float>(w.size(), 0.f));
    auto d_db = upload(std::vector<float>(b.size(), 0.f));
    bool const vec = bc::layers_detail::conv_vector_path<T>(C, K, {{d_x.data(), ld}, {d_out.data(), ld}});
    REQUIRE(vec == (path == 0));
    bc::conv1d_forward<T>(be, batch, length, C, K, d_x.data(), ld, d_w.data(), d_b.data(), d_out.data(), ld,
                          K > 1 ? d_st.data() : nullptr, silu);
    auto ws = workspace(bc::conv1d_backward_workspace_bytes(batch, length, C, K));
    bc::conv1d_backward<T>(be, batch, length, C, K, d_x.data(), ld, d_w.data(), d_b.data(), silu, d_dout.data(),
                           ld, d_dx.data(), ld, d_dw.data(), d_db.data(), ws.data());
    out[path] = pick(d_out, ld);
    dx[path] = pick(d_dx, ld);
    st[path] = download(d_st);
    dw[path] = download(d_dw);
    db[path] = download(d_db);
  }
  CHECK(bitwise_equal(out[0], out[1]));
  CHECK(bitwise_equal(st[0], st[1]));
  CHECK(bitwise_equal(dx[0], dx[1]));
  CHECK(bitwise_equal(dw[0], dw[1]));
  CHECK(bitwise_equal(db[0], db[1]));
}

TEST_CASE("CUDA causal conv1d: the vectorized kernels equal the scalar ones bitwise", "[cuda][layers][conv][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 480;
  for (int K : {1, 2, 3, 4})
    for (int L : {1, 3, 9, 64, 515}) {
      check_conv_vector_vs_scalar<float>(2, L, 12, K, (L + K) % 2 == 0, seed++);
      check_conv_vector_vs_scalar<dbf16>(1, L, 136, K, (L + K) % 2 == 1, seed++);
    }
  check_conv_vector_vs_scalar<float>(2, 70, 1036, 4, true, seed++);  // several channel blocks
  check_conv_vector_vs_scalar<dbf16>(1, 600, 1036, 3, false, seed++);
  // what decides the path: width, channel count, leading dimensions, alignment
  float* const f = reinterpret_cast<float*>(std::uintptr_t{256});
  CHECK(bc::layers_detail::conv_vector_path<float>(8, 4, {{f, 8}, {f, 12}}));
  CHECK_FALSE(bc::layers_detail::conv_vector_path<float>(8, 5, {{f, 8}, {f, 12}}));
  CHECK_FALSE(bc::layers_detail::conv_vector_path<float>(6, 4, {{f, 8}, {f, 12}}));
  CHECK_FALSE(bc::layers_detail::conv_vector_path<float>(8, 4, {{f, 8}, {f, 10}}));
  CHECK_FALSE(bc::layers_detail::conv_vector_path<float>(8, 4, {{f + 2, 8}, {f, 12}}));
  CHECK(bc::layers_detail::conv_vector_path<dbf16>(8, 4, {{f + 2, 8}, {nullptr, 0}}));
}

TEST_CASE("CUDA cross-entropy matches the CPU", "[cuda][layers][loss][small]") {
  REQUIRE_GPU();
  std::uint64_t seed = 500;
  for (int rows : {1, 7, 300})
    for (int classes : {1, 5, 256, 300, 1000, 1024}) check_cross_entropy(rows, classes, seed++);
}

TEST_CASE("CUDA cross-entropy contract rejects targets >= classes", "[cuda][layers][loss][small]") {
  REQUIRE_GPU();
  std::vector<float> const logits(3 * 8, 0.5f);
  std::vector<std::int32_t> const targets = {1, 8, -1};
  auto d_l = upload(logits);
  auto d_t = upload(targets);
  layers::CrossEntropyArguments<float> a;
  a.rows = 3; a.classes = 8; a.logits = d_l.data(); a.ld_logits = 8; a.targets = d_t.data();
  using Op = layers::CrossEntropy<Cuda, float>;
  REQUIRE(Op::can_implement(a) == Status::kSuccess);
  auto ws = workspace(Op::workspace_bytes(a, be));
  CHECK_THROWS_AS(Op::run(a, ws.data(), be), mambabyte::Error);
  // the raw function: NaN loss for that row, 0 for the ignored one
  DeviceBuffer<float> d_loss(3);
  bc::cross_entropy<float>(be, 3, 8, d_l.data(), 8, d_t.data(), static_cast<float*>(nullptr), 8, 1.f, d_loss.data());
  auto const loss = download(d_loss);
  CHECK(std::abs(loss[0] - std::log(8.f)) < 1e-6f);
  CHECK(std::isnan(loss[1]));
  CHECK(loss[2] == 0.f);
}

TEST_CASE("CUDA deterministic sums equal a double host sum and repeat bitwise", "[cuda][layers][reduce][small]") {
  REQUIRE_GPU();
  Rng rng(600);
  for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(5), std::size_t(8191), std::size_t(8192),
                        std::size_t(8193), std::size_t(100003)}) {
    INFO("n=" << n);
    auto const x = rng.vec(n + 1, -3.f, 5.f);
    double s = 0, q = 0;
    for (std::size_t i = 0; i < n; ++i) {
      s += x[i];
      q += double(x[i]) * double(x[i]);
    }
    auto d_x = upload(x);
    DeviceBuffer<double> d_out(4);
    auto ws = workspace(bc::reduce_workspace_bytes(n));
    bc::deterministic_sum(be, d_x.data(), n, d_out.data(), ws.data());
    bc::sum_of_squares(be, d_x.data(), n, d_out.data() + 1, ws.data());
    bc::deterministic_sum(be, d_x.data(), n, d_out.data() + 2, ws.data());
    bc::sum_of_squares(be, d_x.data(), n, d_out.data() + 3, ws.data());
    auto const out = download(d_out);
    CHECK(std::abs(out[0] - s) <= 1e-12 * std::max(1.0, q));
    CHECK(std::abs(out[1] - q) <= 1e-12 * std::max(1.0, q));
    CHECK(bitwise_equal(std::vector<double>{out[0], out[1]}, std::vector<double>{out[2], out[3]}));
    if (n > 0) {  // an unaligned start (scalar loads): still the right sum
      double s1 = 0;
      for (std::size_t i = 1; i <= n; ++i) s1 += x[i];
      bc::deterministic_sum(be, d_x.data() + 1, n, d_out.data(), ws.data());
      CHECK(std::abs(download(d_out)[0] - s1) <= 1e-12 * std::max(1.0, q));
    }
  }
}

TEST_CASE("CUDA deterministic sums over a large buffer", "[cuda][layers][reduce]") {
  REQUIRE_GPU();
  Rng rng(601);
  std::size_t const n = 30'000'001;
  std::vector<float> x(n);
  for (auto& v : x) v = rng.uni(-1.f, 1.f);
  double q = 0;
  for (float v : x) q += double(v) * double(v);
  auto d_x = upload(x);
  DeviceBuffer<double> d_out(2);
  auto ws = workspace(bc::reduce_workspace_bytes(n));
  bc::sum_of_squares(be, d_x.data(), n, d_out.data(), ws.data());
  bc::sum_of_squares(be, d_x.data(), n, d_out.data() + 1, ws.data());
  auto const out = download(d_out);
  CHECK(std::abs(out[0] - q) <= 1e-10 * q);
  CHECK(bitwise_equal(std::vector<double>{out[0]}, std::vector<double>{out[1]}));
}

TEST_CASE("CUDA clip_scale follows train::clip_grad_norm", "[cuda][layers][reduce][small]") {
  REQUIRE_GPU();
  for (double sumsq : {0.0, 0.25, 1.0, 4.0, 123.456}) {
    for (float max_norm : {1.f, 0.5f, 0.f, -1.f}) {
      INFO("sumsq=" << sumsq << " max_norm=" << max_norm);
      auto d_s = upload(std::vector<double>{sumsq});
      DeviceBuffer<float> d_scale(1);
      bc::clip_scale(be, d_s.data(), max_norm, d_scale.data());
      float const got = download(d_scale)[0];
      double const norm = std::sqrt(sumsq);
      float const want = (max_norm > 0 && norm > double(max_norm)) ? static_cast<float>(double(max_norm) / (norm + 1e-6)) : 1.f;
      CHECK(got == want);
      // the same factor train::clip_grad_norm applies to a gradient of that norm
      std::vector<float> g = {static_cast<float>(norm)};
      (void)train::clip_grad_norm(std::span<float>(g), double(max_norm));
      CHECK(std::abs(g[0] - static_cast<float>(norm) * got) <= 1e-6f * std::max(1.f, g[0]));
    }
  }
}

namespace {
/// AdamW on the host in double (train::AdamW::step's formula) for arbitrary segments.
void host_adamw(std::vector<bc::AdamWSegment> const& segs, std::vector<float>& p, std::vector<float> const& g,
                std::vector<float>& m, std::vector<float>& v, double lr, double b1, double b2, double eps, double wd,
                double c1, double c2) {
  for (auto const& s : segs)
    for (std::size_t i = s.offset; i < s.offset + s.numel; ++i) {
      double const gi = g[i];
      double const mi = b1 * m[i] + (1 - b1) * gi;
      double const vi = b2 * v[i] + (1 - b2) * gi * gi;
      m[i] = static_cast<float>(mi);
      v[i] = static_cast<float>(vi);
      double const upd = (mi / c1) / (std::sqrt(vi / c2) + eps) + (s.decay ? wd : 0.0) * double(p[i]);
      p[i] = static_cast<float>(double(p[i]) - lr * upd);
    }
}

std::vector<bool> covered(std::vector<bc::AdamWSegment> const& segs, std::size_t total) {
  std::vector<bool> in(total, false);
  for (auto const& s : segs)
    for (std::size_t i = s.offset; i < s.offset + s.numel; ++i) in[i] = true;
  return in;
}
}  // namespace

TEST_CASE("CUDA AdamW matches train::AdamW over a model layout", "[cuda][layers][adamw][small]") {
  REQUIRE_GPU();
  mambabyte::ModelConfig cfg;
  cfg.d_model = 24; cfg.n_layer = 2; cfg.vocab_size = 256; cfg.rms_norm = false;
  cfg.finalize();
  std::size_t total = 0;
  auto const params = mambabyte::parameter_layout(cfg, &total);
  train::AdamWOptions opt;
  opt.lr = 1e-3; opt.beta1 = 0.9; opt.beta2 = 0.95; opt.eps = 1e-8; opt.weight_decay = 0.1;
  train::AdamW<float> cpu(cfg, opt);
  std::vector<bc::AdamWSegment> segs;
  for (auto const& p : params) segs.push_back({p.offset, p.numel, !p.no_weight_decay});
  auto const in = covered(segs, total);
  std::size_t outside = 0;
  for (bool b : in) outside += !b;
  REQUIRE(outside > 0);  // the layout has padding between tensors

  Rng rng(700);
  float const nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> p0 = rng.vec(total), g1 = rng.vec(total), g2 = rng.vec(total, -0.01f, 0.01f);
  for (std::size_t i = 0; i < total; ++i)
    if (!in[i]) { p0[i] = 3.f; g1[i] = g2[i] = nan; }
  float const scale = 0.37f;
  auto scaled = [&](std::vector<float> g) {
    for (std::size_t i = 0; i < total; ++i) g[i] = in[i] ? g[i] * scale : 0.f;
    return g;
  };

  bc::AdamWPlan plan(segs, be);
  CHECK(plan.extent() <= total);
  CHECK(plan.numel() == total - outside);
  auto d_p = upload(p0);
  auto d_m = upload(std::vector<float>(total, 0.f));
  auto d_v = upload(std::vector<float>(total, 0.f));
  auto d_scale = upload(std::vector<float>{scale});
  std::vector<dbf16> bf0(total, __float2bfloat16_rn(-5.f));
  auto d_bf = upload(bf0);
  std::vector<float> pc = p0;
  for (int step = 1; step <= 2; ++step) {
    double const lr = step == 1 ? 1e-3 : 5e-4;
    auto const& g = step == 1 ? g1 : g2;
    cpu.step(pc, scaled(g), lr);
    double const c1 = 1 - std::pow(opt.beta1, double(step)), c2 = 1 - std::pow(opt.beta2, double(step));
    auto d_g = upload(g);
    bc::adamw_step(be, plan, d_p.data(), d_g.data(), d_m.data(), d_v.data(), d_bf.data(), static_cast<float>(lr),
                   static_cast<float>(opt.beta1), static_cast<float>(opt.beta2), static_cast<float>(opt.eps),
                   static_cast<float>(opt.weight_decay), static_cast<float>(c1), static_cast<float>(c2),
                   d_scale.data());
  }
  auto const p = download(d_p), m = download(d_m), v = download(d_v);
  auto const pbf = download(d_bf);
  std::vector<float> pi, pref, mi, mref, vi, vref;
  bool untouched = true, copy_ok = true;
  for (std::size_t i = 0; i < total; ++i) {
    if (in[i]) {
      pi.push_back(p[i]); pref.push_back(pc[i]);
      mi.push_back(m[i]); mref.push_back(cpu.first_moment()[i]);
      vi.push_back(v[i]); vref.push_back(cpu.second_moment()[i]);
      dbf16 const want = __float2bfloat16_rn(p[i]);
      copy_ok = copy_ok && std::memcmp(&pbf[i], &want, sizeof(dbf16)) == 0;
    } else {
      untouched = untouched && p[i] == 3.f && m[i] == 0.f && v[i] == 0.f &&
                  std::memcmp(&pbf[i], &bf0[i], sizeof(dbf16)) == 0;
    }
  }
  CHECK(untouched);
  CHECK(copy_ok);
  double const ep = rel_err(pi, pref), em = rel_err(mi, mref), ev = rel_err(vi, vref);
  INFO("rel err p " << ep << " m " << em << " v " << ev);
  CHECK(ep <= kTol);
  CHECK(em <= kTol);
  CHECK(ev <= kTol);
}

TEST_CASE("CUDA AdamW: odd segments (scalar path, split pieces), no grad scale", "[cuda][layers][adamw][small]") {
  REQUIRE_GPU();
  std::vector<bc::AdamWSegment> const segs = {{3, 5000, true}, {5010, 7, false}, {6000, 8192, false}, {20000, 1, true}};
  std::size_t const total = 20005;
  bc::AdamWPlan plan(segs, be);
  CHECK(plan.size() == 2 + 1 + 2 + 1);
  CHECK(plan.numel() == 5000 + 7 + 8192 + 1);
  CHECK(plan.extent() == 20001);
  auto const in = covered(segs, total);
  Rng rng(701);
  auto p = rng.vec(total), m = rng.vec(total, 0.f, 0.1f), v = rng.vec(total, 0.f, 0.01f);
  auto const g = rng.vec(total);
  auto d_p = upload(p);
  auto d_m = upload(m);
  auto d_v = upload(v);
  auto d_g = upload(g);
  auto const p0 = p, m0 = m, v0 = v;
  double const lr = 2e-3, b1 = 0.9, b2 = 0.95, eps = 1e-8, wd = 0.1;
  double const c1 = 1 - std::pow(b1, 7.0), c2 = 1 - std::pow(b2, 7.0);
  host_adamw(segs, p, g, m, v, lr, b1, b2, eps, wd, c1, c2);
  bc::adamw_step(be, plan, d_p.data(), d_g.data(), d_m.data(), d_v.data(), nullptr, float(lr), float(b1), float(b2),
                 float(eps), float(wd), float(c1), float(c2), nullptr);
  auto const gp = download(d_p), gm = download(d_m), gv = download(d_v);
  CHECK(rel_err(gp, p) <= kTol);
  CHECK(rel_err(gm, m) <= kTol);
  CHECK(rel_err(gv, v) <= kTol);
  bool untouched = true;
  for (std::size_t i = 0; i < total; ++i)
    if (!in[i]) untouched = untouched && gp[i] == p0[i] && gm[i] == m0[i] && gv[i] == v0[i];
  CHECK(untouched);
}

TEST_CASE("CUDA convert and convert_2d", "[cuda][layers][convert][small]") {
  REQUIRE_GPU();
  Rng rng(800);
  for (std::size_t n : {std::size_t(0), std::size_t(1), std::size_t(1000), std::size_t(100001)}) {
    auto const x = rng.vec(n, -100.f, 100.f);
    auto d_x = upload(x);
    DeviceBuffer<dbf16> d_b(n);
    DeviceBuffer<float> d_f(n);
    bc::convert<dbf16, float>(be, d_x.data(), d_b.data(), n);
    bc::convert<float, dbf16>(be, d_b.data(), d_f.data(), n);
    CHECK(bitwise_equal(download(d_f), round_bf16(x)));
    bc::convert<float, float>(be, d_x.data(), d_f.data(), n);
    CHECK(bitwise_equal(download(d_f), x));
  }
  int const rows = 7, cols = 5;
  std::int64_t const ld_in = 9, ld_out = 6;
  auto const x = rng.vec(static_cast<std::size_t>(rows) * ld_in, -10.f, 10.f);
  auto d_x = upload(x);
  auto d_b = upload(std::vector<dbf16>(static_cast<std::size_t>(rows) * ld_out, __float2bfloat16_rn(kSentinel)));
  bc::convert_2d<dbf16, float>(be, rows, cols, d_x.data(), ld_in, d_b.data(), ld_out);
  auto d_f = upload(std::vector<float>(static_cast<std::size_t>(rows) * ld_in, kSentinel));
  bc::convert_2d<float, dbf16>(be, rows, cols, d_b.data(), ld_out, d_f.data(), ld_in);
  auto const b = to_float(download(d_b));
  auto const f = download(d_f);
  bool ok = true;
  for (int r = 0; r < rows; ++r) {
    for (int c = 0; c < ld_out; ++c) ok = ok && b[r * ld_out + c] == bf(c < cols ? x[r * ld_in + c] : kSentinel);
    for (int c = 0; c < ld_in; ++c) ok = ok && f[r * ld_in + c] == (c < cols ? bf(x[r * ld_in + c]) : kSentinel);
  }
  CHECK(ok);
}

TEST_CASE("CUDA gradient reductions are bitwise deterministic", "[cuda][layers][determinism][small]") {
  REQUIRE_GPU();
  Rng rng(900);
  SECTION("embedding backward") {
    int const rows = 6000, dim = 96, vocab = 256;
    auto const tokens = make_tokens(rows, vocab, 1, rng);
    auto const dout = rng.vec(static_cast<std::size_t>(rows) * dim);
    auto const t0 = rng.vec(static_cast<std::size_t>(vocab) * dim);
    auto d_tok = upload(tokens);
    auto d_dout = upload(dout);
    auto ws = workspace(bc::embedding_backward_workspace_bytes(rows, dim, vocab));
    std::vector<float> runs[2];
    for (auto& out : runs) {
      auto d_t = upload(t0);
      bc::embedding_backward(be, rows, dim, vocab, d_tok.data(), d_dout.data(), d_t.data(), ws.data());
      out = download(d_t);
    }
    CHECK(bitwise_equal(runs[0], runs[1]));
  }
  SECTION("add+norm backward") {
    int const rows = 1500, dim = 1000;  // more rows than the 512 row groups
    std::size_t const n = static_cast<std::size_t>(rows) * dim;
    auto d_r = upload(rng.vec(n));
    auto d_w = upload(rng.vec(dim, 0.5f, 1.5f));
    auto d_dout = upload(rng.vec(n));
    auto const dres0 = rng.vec(n);
    auto ws = workspace(bc::add_norm_backward_workspace_bytes(rows, dim));
    std::vector<float> runs[2][3];
    for (auto& out : runs) {
      auto d_dres = upload(dres0);
      auto d_dw = upload(std::vector<float>(dim, 0.f));
      auto d_db = upload(std::vector<float>(dim, 0.f));
      bc::add_norm_backward<float, float>(be, rows, dim, d_r.data(), d_w.data(), d_dout.data(), d_dres.data(),
                                          static_cast<float*>(nullptr), d_dw.data(), d_db.data(), 1e-5f, false,
                                          ws.data());
      out[0] = download(d_dres);
      out[1] = download(d_dw);
      out[2] = download(d_db);
    }
    for (int i = 0; i < 3; ++i) CHECK(bitwise_equal(runs[0][i], runs[1][i]));
  }
  SECTION("conv1d backward") {
    int const B = 4, L = 1000, C = 300, K = 4;
    std::size_t const rows = static_cast<std::size_t>(B) * L;
    auto d_x = upload(rng.vec(rows * C));
    auto d_w = upload(rng.vec(static_cast<std::size_t>(C) * K));
    auto d_b = upload(rng.vec(C));
    auto d_dout = upload(rng.vec(rows * C));
    DeviceBuffer<float> d_dx(rows * C);
    auto ws = workspace(bc::conv1d_backward_workspace_bytes(B, L, C, K));
    std::vector<float> runs[2][3];
    for (auto& out : runs) {
      auto d_dw = upload(std::vector<float>(static_cast<std::size_t>(C) * K, 0.f));
      auto d_db = upload(std::vector<float>(C, 0.f));
      bc::conv1d_backward<float>(be, B, L, C, K, d_x.data(), C, d_w.data(), d_b.data(), true, d_dout.data(), C,
                                 d_dx.data(), C, d_dw.data(), d_db.data(), ws.data());
      out[0] = download(d_dx);
      out[1] = download(d_dw);
      out[2] = download(d_db);
    }
    for (int i = 0; i < 3; ++i) CHECK(bitwise_equal(runs[0][i], runs[1][i]));
  }
}

TEST_CASE("CUDA layer argument checks and workspace sizes", "[cuda][layers][small]") {
  // Host-side only: no GPU needed.
  CHECK(bc::embedding_backward_workspace_bytes(0, 64, 256) == 0);
  CHECK(bc::embedding_backward_workspace_bytes(300, 64, 256) > 0);
  CHECK(bc::add_norm_backward_workspace_bytes(0, 64) == 0);
  CHECK(bc::add_norm_backward_workspace_bytes(7, 64) == 7 * 2 * 64 * sizeof(float));
  CHECK(bc::add_norm_backward_workspace_bytes(100000, 64) == 2048 * 2 * 64 * sizeof(float));
  CHECK(bc::conv1d_backward_workspace_bytes(2, 513, 10, 4) == 2 * 2 * 10 * 5 * sizeof(float));
  CHECK(bc::reduce_workspace_bytes(0) == 0);
  CHECK(bc::reduce_workspace_bytes(8192) == 0);
  CHECK(bc::reduce_workspace_bytes(8193) == 2 * sizeof(double));

  float dummy = 0;
  float* f = &dummy;
  CHECK_THROWS_AS((bc::add_norm_forward<float, float>(be, 2, 9000, f, f, f, f, nullptr, f, 1e-5f, false)), mambabyte::Error);
  CHECK_THROWS_AS((bc::add_norm_forward<float, float>(be, 2, 8, f, f, f, f, f, f, 1e-5f, true)), mambabyte::Error);
  CHECK_THROWS_AS((bc::conv1d_forward<float>(be, 1, 4, 8, 65, f, 8, f, nullptr, f, 8, nullptr, true)), mambabyte::Error);
  CHECK_THROWS_AS((bc::conv1d_forward<float>(be, 1, 4, 8, 4, f, 7, f, nullptr, f, 8, nullptr, true)), mambabyte::Error);
  CHECK_THROWS_AS((bc::cross_entropy<float>(be, 2, 1025, f, 1025, nullptr, f, 1025, 1.f, f)), mambabyte::Error);
  CHECK_THROWS_AS(bc::embedding_backward(be, 4, 8, 16, nullptr, f, f, f), mambabyte::Error);
  CHECK_THROWS_AS((bc::AdamWPlan({{0, 10, true}, {5, 10, false}}, be)), mambabyte::Error);

  layers::CausalConv1dBackwardArguments<float> cb;
  cb.batch = 1; cb.length = 4; cb.channels = 8; cb.width = 4;
  cb.x = cb.weight = cb.dout = f; cb.ld_x = cb.ld_dout = 8;
  CHECK(layers::CausalConv1dBackward<Cuda, float>::can_implement(cb) == Status::kSuccess);
  cb.state = f;
  CHECK(layers::CausalConv1dBackward<Cuda, float>::can_implement(cb) == Status::kUnsupported);
  cb.state = nullptr;
  cb.accumulate_dx = true;
  CHECK(layers::CausalConv1dBackward<Cuda, float>::can_implement(cb) == Status::kUnsupported);

  layers::CrossEntropyArguments<float> ce;
  ce.rows = 4; ce.classes = 2048; ce.logits = f; ce.ld_logits = 2048;
  std::int32_t t = 0;
  ce.targets = &t;
  CHECK(layers::CrossEntropy<Cuda, float>::can_implement(ce) == Status::kUnsupported);
  ce.classes = 256; ce.ld_logits = 100;
  CHECK(layers::CrossEntropy<Cuda, float>::can_implement(ce) == Status::kInvalidArgument);

  layers::AddNormArguments<float> an;
  an.rows = 2; an.dim = 10000; an.residual = an.out = f; an.weight = f;
  CHECK(layers::AddNorm<Cuda, float>::can_implement(an) == Status::kUnsupported);
  an.dim = 16; an.rms = true; an.bias = f;
  CHECK(layers::AddNorm<Cuda, float>::can_implement(an) == Status::kInvalidArgument);

  layers::EmbeddingArguments<float> em;
  em.rows = 3; em.dim = 4; em.vocab = 0;
  CHECK(layers::Embedding<Cuda, float>::can_implement(em) == Status::kInvalidArgument);
  em.vocab = 256;  // null pointers with rows > 0
  CHECK(layers::Embedding<Cuda, float>::can_implement(em) == Status::kInvalidArgument);
  em.rows = 0;
  CHECK(layers::Embedding<Cuda, float>::can_implement(em) == Status::kSuccess);
}
