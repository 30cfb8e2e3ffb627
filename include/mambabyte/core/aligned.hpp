/*! \file
 *  \brief 64-byte aligned storage for every buffer the kernels read or write.
 *
 *  Why it matters beyond speed: vectorised reductions (Eigen's dot products and GEMV, with
 *  AVX-512 16 floats wide) peel a different number of leading elements depending on the
 *  address's alignment, which changes the summation order and so the last bits of the result.
 *  With std::vector's 16-byte alignment the same computation on a fresh allocation could
 *  round differently; with every base address on a 64-byte boundary a run is a pure function
 *  of its inputs, which exact resume of training relies on.
 */
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace mambabyte {

inline constexpr std::size_t kBufferAlignment = 64;

template <class T, std::size_t Align = kBufferAlignment>
struct AlignedAllocator {
  using value_type = T;
  template <class U> struct rebind { using other = AlignedAllocator<U, Align>; };
  AlignedAllocator() noexcept = default;
  template <class U> AlignedAllocator(AlignedAllocator<U, Align> const&) noexcept {}
  T* allocate(std::size_t n) {
    if (n > static_cast<std::size_t>(-1) / sizeof(T)) throw std::bad_array_new_length();
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t{Align}));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t{Align}); }
  template <class U> bool operator==(AlignedAllocator<U, Align> const&) const noexcept { return true; }
};

/// std::vector with 64-byte aligned storage.
template <class T> using aligned_vector = std::vector<T, AlignedAllocator<T>>;

}  // namespace mambabyte
