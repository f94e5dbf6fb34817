#include "detail/safetensors_file.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <string>

#include "lema/base/unique_fd.hpp"

namespace lema::io::detail {

namespace {

// Reads exactly `length` bytes at `offset`, retrying short reads and EINTR.
void pread_exact(int fd, char* out, std::uint64_t length, std::uint64_t offset,
                 const std::string& file) {
  std::uint64_t done = 0;
  while (done < length) {
    const ssize_t n = ::pread(fd, out + done, length - done, static_cast<off_t>(offset + done));
    if (n < 0) {
      if (errno == EINTR) continue;
      throw ReadError(file, offset, length, errno, "reading the safetensors header");
    }
    if (n == 0) {
      throw ReadError(file, offset, length, 0,
                      "the file ended after " + std::to_string(done) +
                          " bytes; was it truncated while being opened?");
    }
    done += static_cast<std::uint64_t>(n);
  }
}

UniqueFd open_for_reading(const std::filesystem::path& path, const std::string& label) {
  for (;;) {
    const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
    if (fd >= 0) return UniqueFd(fd);
    const int err = errno;
    if (err == EINTR) continue;
    if (err == ENOENT || err == ENOTDIR) {
      throw CheckpointError(label, "", "not-found", "no such file");
    }
    throw CheckpointError(label, "", "unreadable",
                          std::string("cannot open for reading: ") + std::strerror(err));
  }
}

}  // namespace

LoadedFile load_safetensors_file(const std::filesystem::path& path) {
  const std::string label = path.string();
  UniqueFd fd = open_for_reading(path, label);

  struct stat st {};
  if (::fstat(fd.get(), &st) != 0) {
    throw CheckpointError(label, "", "unreadable",
                          std::string("cannot stat: ") + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) {
    throw CheckpointError(label, "", "unreadable", "not a regular file");
  }
  const auto file_size = static_cast<std::uint64_t>(st.st_size);
  if (file_size < 8) {
    throw CheckpointError(label, "", "file-too-small",
                          "file is " + std::to_string(file_size) +
                              " bytes, shorter than the 8-byte header length of a safetensors "
                              "file");
  }

  unsigned char prefix[8];
  pread_exact(fd.get(), reinterpret_cast<char*>(prefix), 8, 0, label);
  std::uint64_t n = 0;
  for (int i = 7; i >= 0; --i) n = (n << 8) | prefix[i];  // little-endian on every host

  if (n > kMaxHeaderBytes) {
    throw CheckpointError(label, "", "header-too-large",
                          "header length field says " + std::to_string(n) +
                              " bytes, over the limit of " + std::to_string(kMaxHeaderBytes) +
                              " (not a safetensors file, or a corrupt one)");
  }
  if (n > file_size - 8) {
    throw CheckpointError(label, "", "header-out-of-bounds",
                          "header length field says " + std::to_string(n) + " bytes but only " +
                              std::to_string(file_size - 8) +
                              " bytes follow it in the file (is the file truncated?)");
  }

  std::string header(n, '\0');
  pread_exact(fd.get(), header.data(), n, 8, label);

  LoadedFile out;
  out.header = parse_header(header, file_size - 8 - n, label);
  out.info.path = path;
  out.info.header_bytes = 8 + n;
  out.info.file_size = file_size;
  out.info.metadata = std::move(out.header.metadata);
  return out;
}

}  // namespace lema::io::detail
