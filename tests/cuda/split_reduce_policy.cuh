// A test-only scan policy for the CUDA forward: Chunked<L> with the reduce pass cut into M
// sub-chunks per chunk (scan_detail::run_impl's reduce_split, which scan::Auto uses when the
// reduce pass alone would leave most of the SMs idle). Lets the shared test bodies run the
// split on small shapes, where Auto itself never picks it.
#pragma once

#include <mambabyte/cuda.hpp>

namespace mbtest {

template <int L, int M>
struct SplitReduce {
  static constexpr char const* name = "ChunkedSplitReduce";
  static constexpr int chunk_len = L;
  static constexpr int reduce_split = M;
};

}  // namespace mbtest

namespace mambabyte::ssm {

template <class TS, int L, int M>
struct SelectiveScan<backend::Cuda, TS, mbtest::SplitReduce<L, M>,
                     std::enable_if_t<backend::cuda::is_scan_storage_v<TS>>>
    : CudaSelectiveScanBase<SelectiveScan<backend::Cuda, TS, mbtest::SplitReduce<L, M>>, TS> {
  using Base = CudaSelectiveScanBase<SelectiveScan, TS>;
  using typename Base::Arguments;
  using Base::run;
  static std::size_t workspace_bytes(Arguments const& a, backend::Cuda const&) {
    return backend::cuda::scan_detail::chunked_workspace_bytes(a.batch, a.length, a.d_inner, a.d_state, L, M);
  }
  static void run(Arguments const& a, void* ws, backend::Cuda const& be) {
    Base::check(a);
    if (a.batch == 0 || a.length == 0) return;
    backend::cuda::scan_detail::run(backend::cuda::to_mixed(a), L, ws, /*split_single=*/true, be, M);
  }
};

}  // namespace mambabyte::ssm
