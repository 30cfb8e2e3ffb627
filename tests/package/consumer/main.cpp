// Downstream program for the package scenarios: uses the public API through the CPU umbrella
// and returns non-zero if anything disagrees.
#include <mambabyte/mambabyte.hpp>

#include <cstdio>
#include <cstring>

namespace {
int failures = 0;
void check(bool ok, char const* what) {
  if (!ok) {
    std::printf("FAIL %s\n", what);
    ++failures;
  }
}
}  // namespace

int main() {
  std::printf("mambabyte %s\n", mambabyte::version_string());
#ifdef MAMBABYTE_EXPECTED_VERSION
  // The CMake package version (project(VERSION)) and the headers' version must agree.
  check(std::strcmp(mambabyte::version_string(), MAMBABYTE_EXPECTED_VERSION) == 0,
        "version_string() differs from the CMake package version " MAMBABYTE_EXPECTED_VERSION);
#endif

  using mambabyte::DType;
  for (DType d : {DType::kF64, DType::kF32, DType::kF16, DType::kBF16, DType::kI64, DType::kI32,
                  DType::kI16, DType::kI8, DType::kU8, DType::kBool})
    check(mambabyte::parse_dtype(mambabyte::dtype_name(d)) == d, "parse_dtype(dtype_name(d)) == d");
  check(mambabyte::dtype_size(DType::kBF16) == sizeof(mambabyte::bf16), "dtype_size(kBF16)");
  check(mambabyte::dtype_traits<mambabyte::bf16>::dtype == DType::kBF16, "dtype_traits<bf16>");

  for (float f : {0.0f, 1.0f, -2.5f, 1.5f, 196608.0f, -0.0078125f})  // exactly representable
    check(static_cast<float>(mambabyte::bf16(f)) == f, "bf16 round trip of a representable value");
  check(static_cast<float>(mambabyte::bf16(1.00390625f)) == 1.0f, "bf16 rounds ties to even");

  bool threw = false;
  try {
    (void)mambabyte::parse_dtype("F99");
  } catch (mambabyte::Error const&) {
    threw = true;
  }
  check(threw, "parse_dtype(\"F99\") throws mambabyte::Error");

  if (failures) return 1;
  std::printf("DType/bf16 round trip ok\n");
  return 0;
}
