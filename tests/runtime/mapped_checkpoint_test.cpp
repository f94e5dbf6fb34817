// MappedCheckpointOptions: a backend and a reader of the caller's own.
#include <gtest/gtest.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/io/errors.hpp"
#include "lema/io/reader.hpp"
#include "lema/runtime/mapped_checkpoint.hpp"
#include "runtime_fixture.hpp"
#include "test_backends.hpp"

namespace lema::test {
namespace {

using runtime::MappedCheckpoint;
using runtime::MappedCheckpointOptions;
using runtime::ResidencyMode;

std::vector<std::byte> read_all(MappedCheckpoint& m, const std::string& name) {
  std::vector<std::byte> out;
  m.read_tensor(name, [&](const std::byte* p, std::uint64_t n) { out.insert(out.end(), p, p + n); });
  return out;
}

// The caller's backend is the one the pages are mapped with, whatever it is (here one whose
// pool has no host window, so every fill takes the staging path), and its capabilities decide:
// the staged pool is host memory, so read_tensor reads it.
TEST(MappedCheckpointOptions, OwnBackendIsUsed) {
  TempDir dir("own-backend");
  const auto path = write_model(dir.path(), ModelShape{});
  auto staged = std::make_shared<StagedBackend>();
  MappedCheckpointOptions o;
  o.budget_bytes = 64_MiB;
  o.backend = staged;
  auto m = MappedCheckpoint::open(path, o);
  ASSERT_EQ(m->mode(), ResidencyMode::guard);
  EXPECT_EQ(&m->pager()->space().backend(), staged.get());
  for (const io::TensorInfo& t : m->checkpoint().tensors())
    EXPECT_EQ(read_all(*m, t.name), file_bytes(m->checkpoint(), t)) << t.name;
  EXPECT_GT(staged->copies.load(), 0u) << "fills went through the caller's backend";
}

TEST(MappedCheckpointOptions, OwnBackendIsRefusedInFaultMode) {
  TempDir dir("own-backend-fault");
  const auto path = write_model(dir.path(), ModelShape{});
  MappedCheckpointOptions o;
  o.budget_bytes = 64_MiB;
  o.mode = ResidencyMode::fault;
  o.backend = std::shared_ptr<runtime::Backend>(runtime::make_host_backend());
  try {
    (void)MappedCheckpoint::open(path, o);
    ADD_FAILURE() << "no error";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("guard mode"), std::string::npos) << e.what();
  }
}

// The caller's reader serves every read, in both modes: one that fails every read makes the
// first read of a tensor fail with its ReadError.
TEST(MappedCheckpointOptions, OwnReaderServesTheReads) {
  TempDir dir("own-reader");
  const auto path = write_model(dir.path(), ModelShape{});
  struct FailEveryRead : io::FaultInjector {
    std::optional<long> inject(std::uint32_t, std::uint64_t, std::uint64_t) override {
      return -EIO;
    }
  };
  for (const ResidencyMode mode : {ResidencyMode::guard, ResidencyMode::fault}) {
    SCOPED_TRACE(std::string(runtime::residency_mode_name(mode)));
    std::atomic<int> opened{0};
    MappedCheckpointOptions o;
    o.budget_bytes = 64_MiB;
    o.mode = mode;
    o.open_reader = [&](const std::vector<std::filesystem::path>& files) {
      ++opened;
      io::ReaderOptions r;
      r.fault_injector = std::make_shared<FailEveryRead>();
      return io::Reader::open(files, r);
    };
    auto m = MappedCheckpoint::open(path, o);
    EXPECT_EQ(opened.load(), 1);
    const std::string name = m->checkpoint().tensors().front().name;
    EXPECT_THROW((void)read_all(*m, name), io::ReadError);
  }
}

}  // namespace
}  // namespace lema::test
