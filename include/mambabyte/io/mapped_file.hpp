/*! \file
 *  \brief MappedFile: RAII read-only memory mapping of a whole file (POSIX mmap, MAP_PRIVATE).
 *         Every failure (missing file, no permission, a directory, a non-regular file) throws
 *         mambabyte::Error naming the path and the system reason. An empty file maps to an
 *         empty span (no mmap call).
 *
 *  Caveat: as with any mmap, truncating the file while it is mapped makes later reads fault
 *  (SIGBUS); checkpoints are expected not to change while they are being read.
 */
#pragma once

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <span>
#include <string>
#include <utility>

#include "mambabyte/core/error.hpp"

namespace mambabyte::io {

/// A whole file mapped read-only into memory. Move-only.
class MappedFile {
 public:
  /// Map `path`. Throws mambabyte::Error naming the path on any failure.
  explicit MappedFile(std::filesystem::path path) : path_(std::move(path)) {
    int fd = -1;
    do {
      fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
    } while (fd < 0 && errno == EINTR);
    if (fd < 0) {
      int const e = errno;
      fail("cannot open file '", path_.string(), "': ", std::strerror(e));
    }
    struct stat st {};
    if (::fstat(fd, &st) != 0) {
      int const e = errno;
      ::close(fd);
      fail("cannot stat file '", path_.string(), "': ", std::strerror(e));
    }
    if (S_ISDIR(st.st_mode)) {
      ::close(fd);
      fail("cannot map file '", path_.string(), "': ", std::strerror(EISDIR));
    }
    if (!S_ISREG(st.st_mode)) {
      ::close(fd);
      fail("cannot map file '", path_.string(), "': not a regular file");
    }
    if (st.st_size < 0 ||
        static_cast<std::uint64_t>(st.st_size) > static_cast<std::uint64_t>(SIZE_MAX)) {
      ::close(fd);
      fail("cannot map file '", path_.string(), "': size ", st.st_size, " is not addressable");
    }
    size_ = static_cast<std::size_t>(st.st_size);
    if (size_ > 0) {
      void* p = ::mmap(nullptr, size_, PROT_READ, MAP_PRIVATE, fd, 0);
      if (p == MAP_FAILED) {
        int const e = errno;
        ::close(fd);
        size_ = 0;
        fail("cannot mmap file '", path_.string(), "' (", st.st_size,
             " bytes): ", std::strerror(e));
      }
      data_ = p;
    }
    ::close(fd);  // the mapping stays valid without the descriptor
  }

  MappedFile(MappedFile const&) = delete;
  MappedFile& operator=(MappedFile const&) = delete;
  MappedFile(MappedFile&& o) noexcept
      : path_(std::move(o.path_)),
        data_(std::exchange(o.data_, nullptr)),
        size_(std::exchange(o.size_, 0)) {}
  MappedFile& operator=(MappedFile&& o) noexcept {
    if (this != &o) {
      unmap();
      path_ = std::move(o.path_);
      data_ = std::exchange(o.data_, nullptr);
      size_ = std::exchange(o.size_, 0);
    }
    return *this;
  }
  ~MappedFile() { unmap(); }

  /// The mapped bytes (empty for an empty file).
  std::span<const std::byte> bytes() const noexcept {
    return {static_cast<const std::byte*>(data_), size_};
  }
  std::size_t size() const noexcept { return size_; }
  std::filesystem::path const& path() const noexcept { return path_; }

 private:
  void unmap() noexcept {
    if (data_ != nullptr) ::munmap(data_, size_);
    data_ = nullptr;
    size_ = 0;
  }

  std::filesystem::path path_;
  void* data_ = nullptr;
  std::size_t size_ = 0;
};

}  // namespace mambabyte::io
