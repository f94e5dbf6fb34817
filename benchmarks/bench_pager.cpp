// `lema bench pager`: what the pager costs and how well it chooses, each number against a
// baseline measured in the same process:
//  - fault vs pread: a 2 MiB page fault served by the Pager (read, map, evict) against a plain
//    pread of the same bytes, interleaved page by page; from the page cache and with O_DIRECT;
//  - map+unmap of a page through the Backend against the fill of that page;
//  - policy quality: a training-like access sequence (layers forward, then backward) replayed
//    through a real Pager under several budgets; bytes fetched per step in steady state against
//    Belady's optimum for the same sequence and budget (and LRU's, simulated), and the step time
//    against a fully resident run.
// Without MODEL_DIR a temporary Llama-shaped checkpoint is generated with `lema gen` on a disk
// (not tmpfs) and removed afterwards.
#include <fcntl.h>
#include <fmt/core.h>
#include <linux/magic.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/statfs.h>
#include <sys/wait.h>
#include <unistd.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "bench_timing.hpp"
#include "commands.hpp"
#include "lema/base/error.hpp"
#include "lema/base/memory_mapping.hpp"
#include "lema/base/unique_fd.hpp"
#include "lema/base/units.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/runtime/address_space.hpp"
#include "lema/runtime/backend.hpp"
#include "lema/runtime/layout.hpp"
#include "lema/runtime/pager.hpp"
#include "lema/runtime/policy.hpp"

extern char** environ;

namespace lema::tools {
namespace {

namespace fs = std::filesystem;
using runtime::PageId;

struct BenchPagerArgs {
  std::string model;
  std::string budget;
  unsigned runs = 5;
  std::string json;
  std::string tmp_dir = "/var/tmp";
};

/// A page-aligned buffer, touched once so that page faults are not timed.
MemoryMapping make_buffer(std::uint64_t bytes) {
  MemoryMapping m = MemoryMapping::anonymous(align_up(bytes, 2_MiB), "a benchmark buffer");
  std::memset(m.data(), 1, m.size());
  return m;
}

/// A directory removed with everything in it on destruction.
class TempModelDir {
 public:
  explicit TempModelDir(const fs::path& parent) {
    std::string pattern = (parent / "lema-bench-pager-XXXXXX").string();
    if (::mkdtemp(pattern.data()) == nullptr)
      throw SystemError("cannot create a temporary directory in " + parent.string() +
                            " (pass --tmp-dir on a writable disk)",
                        errno);
    path_ = pattern;
  }
  TempModelDir(const TempModelDir&) = delete;
  TempModelDir& operator=(const TempModelDir&) = delete;
  ~TempModelDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

/// The arguments of `lema gen` for the generated model: Llama-shaped, 8 layers, about 256 MiB
/// in f32 (each layer about 29 MB, so a layer is 14 pages of 2 MiB).
std::vector<std::string> gen_arguments(const fs::path& out) {
  return {"gen",  "--out",   out.string(), "--hidden",       "1024", "--layers",
          "8",    "--heads", "16",         "--kv-heads",     "4",    "--intermediate",
          "1536", "--vocab", "4096",       "--max-position", "2048", "--seed",
          "1"};
}

/// Runs this very executable with `args` and waits; throws when it fails.
void run_self(const std::vector<std::string>& args) {
  const std::string self = fs::read_symlink("/proc/self/exe").string();
  std::vector<std::string> argv_storage{self};
  argv_storage.insert(argv_storage.end(), args.begin(), args.end());
  std::vector<char*> argv;
  for (auto& a : argv_storage) argv.push_back(a.data());
  argv.push_back(nullptr);
  pid_t pid = 0;
  const int rc = ::posix_spawn(&pid, self.c_str(), nullptr, nullptr, argv.data(), environ);
  if (rc != 0) throw SystemError("cannot start " + self + " gen", rc);
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) throw SystemError("waitpid on lema gen failed", errno);
  }
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    throw Error("generating the benchmark model with `lema gen` failed (status " +
                std::to_string(status) + ")");
}

std::string file_system_note(const fs::path& dir) {
  struct statfs st {};
  if (::statfs(dir.c_str(), &st) != 0) return "unknown file system";
  if (st.f_type == TMPFS_MAGIC) return "tmpfs (memory, not a disk)";
  if (st.f_type == EXT4_SUPER_MAGIC) return "ext4";
  if (st.f_type == XFS_SUPER_MAGIC) return "xfs";
  if (st.f_type == BTRFS_SUPER_MAGIC) return "btrfs";
  if (st.f_type == OVERLAYFS_SUPER_MAGIC) return "overlayfs";
  return fmt::format("file system magic {:#x}", static_cast<unsigned long>(st.f_type));
}

/// The checkpoint, its layout over 2 MiB pages and the address space, opened once.
struct Model {
  explicit Model(const fs::path& path, runtime::HostPages pages = runtime::HostPages::base)
      : ckpt(io::Checkpoint::open(path)),
        backend(runtime::make_host_backend(std::uint64_t{2} << 20, pages)),
        space(*backend, runtime::Layout::plan(ckpt, backend->granularity())) {
    for (const auto& f : ckpt.files())
      fds.emplace_back(LEMA_SYS_TRY(::open(f.path.c_str(), O_RDONLY | O_CLOEXEC)));
  }
  const runtime::Layout& layout() const { return space.layout(); }
  std::uint64_t page_size() const { return space.page_size(); }

  io::Checkpoint ckpt;
  std::unique_ptr<runtime::Backend> backend;
  runtime::AddressSpace space;
  std::vector<UniqueFd> fds;
};

void pread_fully(int fd, std::byte* dest, std::uint64_t length, std::uint64_t offset) {
  while (length > 0) {
    const ssize_t n = ::pread(fd, dest, length, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) throw SystemError("pread failed while measuring the baseline", n < 0 ? errno : EIO);
    dest += n;
    offset += static_cast<std::uint64_t>(n);
    length -= static_cast<std::uint64_t>(n);
  }
}

/// The baseline fill: pread of the page's extents into `dest`, as the page lays them out.
void pread_page(const Model& m, PageId page, std::byte* dest) {
  for (const runtime::FillExtent& e : m.layout().extents(page))
    pread_fully(m.fds[e.file].get(), dest + e.page_offset, e.length, e.file_offset);
}

/// The O_DIRECT baseline: each extent read with O_DIRECT over its 4 KiB-aligned enclosure (the
/// least a direct read of those bytes has to transfer) into an aligned buffer.
void pread_page_direct(const Model& m, const std::vector<UniqueFd>& direct_fds, PageId page,
                       std::byte* scratch) {
  constexpr std::uint64_t kBlock = 4096;
  for (const runtime::FillExtent& e : m.layout().extents(page)) {
    const std::uint64_t begin = align_down(e.file_offset, kBlock);
    const std::uint64_t end = align_up(e.file_offset + e.length, kBlock);
    const std::uint64_t file_size = m.ckpt.files()[e.file].file_size;
    // The tail of a file need not be a whole block: a direct read may then come back short.
    std::uint64_t done = 0;
    while (begin + done < std::min(end, align_up(file_size, kBlock))) {
      const ssize_t n = ::pread(direct_fds[e.file].get(), scratch + done, end - begin - done,
                                static_cast<off_t>(begin + done));
      if (n < 0 && errno == EINTR) continue;
      if (n < 0)
        throw SystemError("pread with O_DIRECT failed while measuring the baseline", errno);
      if (n == 0) break;
      done += static_cast<std::uint64_t>(n);
    }
  }
}

void warm_page_cache(const Model& m) {
  const MemoryMapping buf = make_buffer(8_MiB);
  for (std::size_t i = 0; i < m.fds.size(); ++i) {
    const std::uint64_t size = m.ckpt.files()[i].file_size;
    for (std::uint64_t off = 0; off < size; off += 8_MiB)
      pread_fully(m.fds[i].get(), buf.data(), std::min<std::uint64_t>(8_MiB, size - off), off);
  }
}

void drop_page_cache(const Model& m) {
  for (const auto& fd : m.fds) ::posix_fadvise(fd.get(), 0, 0, POSIX_FADV_DONTNEED);
}

/// Pages filled completely from the files (most of a layer): the "2 MiB faults".
std::vector<PageId> full_pages(const Model& m) {
  std::vector<PageId> out;
  for (PageId p = 0; p < m.space.page_count(); ++p)
    if (m.layout().page_fill_bytes(p) == m.page_size()) out.push_back(p);
  return out;
}

// ---------------------------------------------------------------- fault cost against pread

struct FaultComparison {
  std::string name;
  std::string io_path;
  std::size_t pool_pages = 1;
  std::vector<double> fault_us, pread_us;
  std::vector<double> reader_us;  // the same page through a Reader alone (no pager)
  // From the pager's event log: a fault's fill and map, and an eviction (unmap).
  std::vector<double> fill_map_us, evict_us;
  double ratio() const { return median(fault_us) / median(pread_us); }
};

/// Every acquire faults: LRU, no prefetch, a pool of `pool_pages` pages, pages visited in order
/// (each page's previous use is more than the pool ago). The baseline preads into as much memory
/// as the pool (one buffer per chunk, in turn), so both write into the same amount of memory;
/// the fault, the pread and the Reader alone run one after another, their order alternating, so
/// drift and background load hit all alike.
FaultComparison measure_faults(Model& m, const std::string& name, io::IoKind kind, bool direct,
                               unsigned runs, std::size_t pool_pages) {
  const std::vector<PageId> pages = full_pages(m);
  LEMA_EXPECTS(pages.size() >= 4, "the model has too few full 2 MiB pages to measure faults");
  runtime::PagerOptions opt;
  opt.budget_bytes = pool_pages * m.page_size();
  opt.policy = runtime::PolicyKind::lru;
  opt.prefetch = false;
  opt.reader.kind = kind;
  opt.reader.direct = direct;
  runtime::Pager pager(m.space, opt);
  FaultComparison out{name, pager.stats().io_path, pool_pages, {}, {}, {}, {}, {}};
  // A Reader of the same kind, to split the fault into its read and the rest.
  const std::unique_ptr<io::Reader> reader = io::Reader::open(m.ckpt, opt.reader);

  std::vector<UniqueFd> direct_fds;
  if (direct) {
    for (const auto& f : m.ckpt.files())
      direct_fds.emplace_back(
          LEMA_SYS_TRY(::open(f.path.c_str(), O_RDONLY | O_CLOEXEC | O_DIRECT)));
    drop_page_cache(m);
  }
  // One buffer per chunk of the pool, each with room for the 4 KiB enclosure of direct reads.
  const std::uint64_t stride = m.page_size() + 2_MiB;
  const MemoryMapping buf = make_buffer(pool_pages * stride);
  std::uint64_t faults_before = pager.stats().faults;
  std::size_t i = 0;
  // The three reads of one round take pages a third of the model apart: a page read just before
  // sits in the CPU's cache, and whichever read came second would copy from it.
  const std::size_t n = pages.size();
  for (unsigned run = 0; run < runs; ++run) {
    for (std::size_t k = 0; k < n; ++k) {
      const PageId p = pages[k];
      const PageId q = pages[(k + n / 3) % n];
      const PageId r = pages[(k + 2 * n / 3) % n];
      std::byte* dest = buf.data() + (k % pool_pages) * stride;
      auto fault = [&] {
        const auto start = Clock::now();
        runtime::Lease lease = pager.acquire_pages({p, 1});
        pager.release(std::move(lease));
        out.fault_us.push_back(micros_since(start));
      };
      auto baseline = [&] {
        const auto start = Clock::now();
        if (direct)
          pread_page_direct(m, direct_fds, q, dest);
        else
          pread_page(m, q, dest);
        out.pread_us.push_back(micros_since(start));
      };
      auto read_only = [&] {
        std::vector<io::ReadRequest> batch;
        for (const runtime::FillExtent& e : m.layout().extents(r))
          batch.push_back({e.file, e.file_offset, e.length, dest + e.page_offset});
        const auto start = Clock::now();
        reader->read(std::move(batch));
        out.reader_us.push_back(micros_since(start));
      };
      if (i++ % 2 == 0) {
        fault();
        baseline();
        read_only();
      } else {
        read_only();
        baseline();
        fault();
      }
    }
  }
  for (const runtime::Event& e : pager.events().snapshot()) {
    if (e.kind == runtime::EventKind::fault) out.fill_map_us.push_back(e.duration_ns / 1e3);
    if (e.kind == runtime::EventKind::evict) out.evict_us.push_back(e.duration_ns / 1e3);
  }
  const std::uint64_t faults = pager.stats().faults - faults_before;
  if (faults != out.fault_us.size())
    throw Error(
        fmt::format("fault benchmark: {} of {} acquires faulted; the measurement is "
                    "not of faults",
                    faults, out.fault_us.size()));
  return out;
}

// ---------------------------------------------------------------- map+unmap against fill

struct MapCost {
  std::vector<double> map_us, unmap_us, touch_us, fill_us;
};

/// One chunk mapped at a reserved address and unmapped again, through the Backend, against
/// filling the chunk with a page's bytes (pread from the page cache into the pool window).
/// The first touch of every 4 KiB after a map (the page-table entries the map does not create)
/// is measured apart.
MapCost measure_map(Model& m, unsigned runs) {
  runtime::Backend& backend = *m.backend;
  const std::uint64_t page = m.page_size();
  runtime::Reservation range = backend.reserve(page);
  std::unique_ptr<runtime::PhysicalPool> pool = backend.create_pool(1, page);
  const std::vector<PageId> pages = full_pages(m);
  const std::size_t iterations = std::max<std::size_t>(64, pages.size()) * runs;
  MapCost out;
  volatile std::uint64_t sink = 0;
  for (std::size_t i = 0; i < iterations; ++i) {
    auto start = Clock::now();
    pread_page(m, pages[i % pages.size()], pool->window(0));
    out.fill_us.push_back(micros_since(start));

    start = Clock::now();
    backend.map(*pool, 0, range.base(), runtime::Access::read);
    out.map_us.push_back(micros_since(start));

    start = Clock::now();
    std::uint64_t sum = 0;
    for (std::uint64_t off = 0; off < page; off += 4096)
      sum += *reinterpret_cast<const volatile std::uint64_t*>(range.base() + off);
    sink = sink + sum;
    out.touch_us.push_back(micros_since(start));

    start = Clock::now();
    backend.unmap(range.base(), page);
    out.unmap_us.push_back(micros_since(start));
  }
  (void)sink;
  return out;
}

// ---------------------------------------------------------------- policy quality

/// A training step: every layout group forward (embedding, layers, tail), then backward in
/// reverse order; inside a group its pages ascending.
std::vector<PageId> training_step(const Model& m) {
  std::vector<std::pair<PageId, PageId>> groups;  // [first, end)
  const std::uint64_t page = m.page_size();
  for (const auto& t : m.layout().tensors()) {
    if (groups.size() <= t.group) groups.resize(t.group + 1, {~PageId{0}, 0});
    auto& [first, end] = groups[t.group];
    first = std::min<PageId>(first, static_cast<PageId>(t.offset / page));
    end = std::max<PageId>(end, static_cast<PageId>(align_up(t.offset + t.nbytes, page) / page));
  }
  std::vector<PageId> step;
  for (const auto& [first, end] : groups)
    for (PageId p = first; p < end; ++p) step.push_back(p);
  for (auto g = groups.rbegin(); g != groups.rend(); ++g)
    for (PageId p = g->first; p < g->second; ++p) step.push_back(p);
  return step;
}

std::vector<PageId> repeat(const std::vector<PageId>& step, std::size_t times) {
  std::vector<PageId> out;
  out.reserve(step.size() * times);
  for (std::size_t i = 0; i < times; ++i) out.insert(out.end(), step.begin(), step.end());
  return out;
}

constexpr std::size_t kLearnSteps = 4;     // skipped: the trace policy learns the period
constexpr std::size_t kMeasuredSteps = 4;  // per run

/// Per-step fetches of the simulators in steady state: how much the count grows when
/// kMeasuredSteps steps are appended to a run of 4 steps.
double simulated_per_step(const std::vector<PageId>& step, std::size_t capacity, bool belady) {
  constexpr std::size_t kWarm = 4;
  auto fetches = [&](std::size_t steps) {
    const auto seq = repeat(step, steps);
    return belady ? runtime::belady_fetches(seq, capacity) : runtime::lru_fetches(seq, capacity);
  };
  return static_cast<double>(fetches(kWarm + kMeasuredSteps) - fetches(kWarm)) / kMeasuredSteps;
}

struct PolicyRun {
  std::string policy;
  std::uint64_t budget_bytes = 0;  // the pool actually created
  std::size_t capacity = 0;        // pages
  std::vector<double> fetches;     // per measured step (faults + prefetches issued)
  std::vector<double> bytes_read;  // per measured step
  std::vector<double> step_ms;     // per measured step
  std::uint64_t peak_resident_bytes = 0;
  std::uint64_t stall_ns = 0;  // over all steps of all runs
  std::uint64_t prefetches_used = 0, prefetches_wasted = 0;
  double belady_per_step = 0, lru_sim_per_step = 0;
};

/// Reads the whole page (the least work a step does with its weights: load every byte once).
std::uint64_t consume(const std::byte* page, std::uint64_t bytes) {
  const auto* words = reinterpret_cast<const std::uint64_t*>(page);
  std::uint64_t sum = 0;
  for (std::uint64_t i = 0; i < bytes / 8; ++i) sum += words[i];
  return sum;
}

void replay(Model& m, const std::vector<PageId>& step, runtime::PolicyKind policy, bool prefetch,
            std::uint64_t budget, unsigned runs, PolicyRun& out) {
  volatile std::uint64_t sink = 0;
  for (unsigned run = 0; run < runs; ++run) {
    runtime::PagerOptions opt;
    opt.budget_bytes = budget;
    opt.policy = policy;
    opt.prefetch = prefetch;
    opt.reader.direct = false;  // the page cache holds the model: this measures the pager
    runtime::Pager pager(m.space, opt);
    std::uint64_t fetched_before = 0, bytes_before = 0;
    for (std::size_t s = 0; s < kLearnSteps + kMeasuredSteps; ++s) {
      const auto start = Clock::now();
      for (PageId p : step) {
        runtime::Lease lease = pager.acquire_pages({p, 1});
        sink = sink + consume(m.space.page_address(p), m.page_size());
        pager.release(std::move(lease));
      }
      const double ms = micros_since(start) / 1000;
      pager.quiesce();  // a step's prefetches are counted in that step
      const runtime::PagerStats st = pager.stats();
      const std::uint64_t fetched = st.faults + st.prefetches_issued;
      if (s >= kLearnSteps) {
        out.fetches.push_back(static_cast<double>(fetched - fetched_before));
        out.bytes_read.push_back(static_cast<double>(st.bytes_read - bytes_before));
        out.step_ms.push_back(ms);
      }
      fetched_before = fetched;
      bytes_before = st.bytes_read;
    }
    const runtime::PagerStats st = pager.stats();
    if (st.peak_resident_bytes > st.budget_bytes)
      throw Error(fmt::format("peak resident bytes {} exceeded the budget {}",
                              st.peak_resident_bytes, st.budget_bytes));
    out.policy = std::string(pager.policy_name()) + (prefetch ? "+pf" : "");
    out.budget_bytes = st.budget_bytes;
    out.capacity = pager.chunk_count();
    out.peak_resident_bytes = std::max(out.peak_resident_bytes, st.peak_resident_bytes);
    out.stall_ns += st.stall_ns;
    out.prefetches_used += st.prefetches_used;
    out.prefetches_wasted += st.prefetches_wasted;
  }
  (void)sink;
}

// ---------------------------------------------------------------- the command

void bench_pager(const BenchPagerArgs& a) {
  LEMA_EXPECTS(a.runs >= 1, "--runs must be at least 1");
  std::optional<TempModelDir> temp;
  fs::path model_path = a.model;
  if (model_path.empty()) {
    temp.emplace(a.tmp_dir);
    model_path = temp->path() / "model";
    fmt::print("generating a benchmark model in {} ({})\n", temp->path().string(),
               file_system_note(temp->path()));
    run_self(gen_arguments(model_path));
  }
  Model m(model_path);
  // The same model over a pool of huge pages, where the system has a few free.
  std::optional<Model> huge;
  if (runtime::huge_page_pool().available >= 2) huge.emplace(model_path, runtime::HostPages::huge);
  const std::uint64_t page = m.page_size();
  const std::uint64_t model_bytes = m.layout().virtual_bytes();
  const std::string fs_note = file_system_note(m.ckpt.files().front().path.parent_path());
  fmt::print("model {}: {} tensors, {} in {} pages of {} ({} full), {} ({}), {} run(s)\n\n",
             model_path.string(), m.layout().tensors().size(), format_size(model_bytes),
             m.space.page_count(), format_size(page), full_pages(m).size(),
             m.ckpt.files().size() == 1 ? "1 file" : fmt::format("{} files", m.ckpt.files().size()),
             fs_note, a.runs);
  nlohmann::ordered_json j;
  j["model"] = {{"path", model_path.string()},   {"generated", temp.has_value()},
                {"file_system", fs_note},        {"bytes", model_bytes},
                {"pages", m.space.page_count()}, {"page_size", page}};
  j["runs"] = a.runs;

  // a. Fault cost against pread.
  warm_page_cache(m);
  std::vector<FaultComparison> faults;
  faults.push_back(
      measure_faults(m, "fault, warm page cache", io::IoKind::automatic, false, a.runs, 1));
  faults.push_back(
      measure_faults(m, "fault, warm, pread reader", io::IoKind::pread, false, a.runs, 1));
  // A destination that no longer fits the CPU's cache as well: the pool's two chunks in turn.
  faults.push_back(
      measure_faults(m, "fault, warm, 2-page pool", io::IoKind::automatic, false, a.runs, 2));
  if (huge)
    faults.push_back(
        measure_faults(*huge, "fault, warm, huge pages", io::IoKind::automatic, false, a.runs, 1));
  faults.push_back(measure_faults(m, "fault, O_DIRECT", io::IoKind::automatic, true, a.runs, 1));
  fmt::print(
      "Fault cost against pread of the same bytes (median over {} faults of full {} "
      "pages, interleaved; target <= 1.20 warm). The pread writes into as many buffers as the "
      "pool has pages, in turn. Reader = the same read through the pager's Reader alone.\n",
      faults.front().fault_us.size(), format_size(page));
  fmt::print("{:<26} {:<18} {:>9} {:>9} {:>7} {:>10} {:>7}\n", "case", "pager io path", "fault us",
             "pread us", "ratio", "Reader us", "ratio");
  for (const auto& f : faults) {
    const bool direct = f.name.find("O_DIRECT") != std::string::npos;
    fmt::print(
        "{:<26} {:<18} {:>9.1f} {:>9.1f} {:>7.2f} {:>10.1f} {:>7.2f}  (baseline: "
        "pread{})\n",
        f.name, f.io_path, median(f.fault_us), median(f.pread_us), f.ratio(), median(f.reader_us),
        median(f.reader_us) / median(f.pread_us),
        direct ? " with O_DIRECT of the 4 KiB-aligned extents" : " from the page cache");
    fmt::print("{:<26} in the fault (event log): fill+map {:.1f} us, eviction (unmap) {:.1f} us\n",
               "", median(f.fill_map_us), median(f.evict_us));
    j["fault_vs_pread"].push_back({{"case", f.name},
                                   {"io_path", f.io_path},
                                   {"pool_pages", f.pool_pages},
                                   {"samples", f.fault_us.size()},
                                   {"fault_us_median", median(f.fault_us)},
                                   {"pread_us_median", median(f.pread_us)},
                                   {"ratio", f.ratio()},
                                   {"reader_us_median", median(f.reader_us)},
                                   {"fill_and_map_us_median", median(f.fill_map_us)},
                                   {"evict_us_median", median(f.evict_us)},
                                   {"fault_us", f.fault_us},
                                   {"reader_us", f.reader_us},
                                   {"pread_us", f.pread_us}});
  }

  // b. Map+unmap against fill.
  warm_page_cache(m);
  auto report_map = [&](Model& model, const std::string& memory) {
    const MapCost mc = measure_map(model, a.runs);
    const double fill = median(mc.fill_us), map = median(mc.map_us),
                 unmap = median(mc.unmap_us), touch = median(mc.touch_us);
    fmt::print(
        "\nMap+unmap of a {} page through the host backend ({}) against its fill (median of "
        "{})\n",
        format_size(page), memory, mc.fill_us.size());
    fmt::print(
        "  fill (pread, page cache) {:.1f} us; map {:.1f} us + unmap {:.1f} us = {:.1f} us "
        "({:.1f}% of the fill); first touch of each 4 KiB after map {:.1f} us ({:.1f}%)\n",
        fill, map, unmap, map + unmap, 100 * (map + unmap) / fill, touch, 100 * touch / fill);
    j["map_unmap"].push_back({{"memory", memory},
                              {"samples", mc.fill_us.size()},
                              {"fill_us_median", fill},
                              {"map_us_median", map},
                              {"unmap_us_median", unmap},
                              {"map_unmap_fraction_of_fill", (map + unmap) / fill},
                              {"first_touch_us_median", touch},
                              {"first_touch_fraction_of_fill", touch / fill}});
  };
  report_map(m, "base pages");
  if (huge) {
    report_map(*huge, "huge pages");
  } else {
    const runtime::HugePagePool pool = runtime::huge_page_pool();
    fmt::print(
        "  (huge pages: {} free of {}; reserve a few with vm.nr_hugepages to measure them)\n",
        pool.available, format_size(pool.page_bytes));
  }

  // c. Policy quality and step time.
  const std::vector<PageId> step = training_step(m);
  std::vector<std::uint64_t> budgets;
  if (!a.budget.empty()) {
    budgets.push_back(parse_size(a.budget, "--budget"));
  } else {
    for (std::uint64_t div : {8, 4, 2}) budgets.push_back(align_down(model_bytes / div, page));
  }
  PolicyRun resident;
  replay(m, step, runtime::PolicyKind::trace, true, model_bytes, a.runs, resident);
  const double resident_ms = median(resident.step_ms);
  fmt::print(
      "\nPolicy quality: a training step = {} page accesses (layers forward, then "
      "backward); steady state after {} steps, {} step(s) x {} run(s); prefetch on for "
      "trace\n",
      step.size(), kLearnSteps, kMeasuredSteps, a.runs);
  fmt::print("{:>10} {:>6} {:<9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9} {:>8} {:>9}\n", "budget",
             "pages", "policy", "MiB/step", "Belady", "LRU sim", "x Belady", "LRU/Bel", "step ms",
             "x resid.", "stall ms");
  for (std::uint64_t budget : budgets) {
    const std::pair<runtime::PolicyKind, bool> policies[] = {{runtime::PolicyKind::lru, false},
                                                             {runtime::PolicyKind::trace, false},
                                                             {runtime::PolicyKind::trace, true}};
    for (const auto& [policy, prefetch] : policies) {
      PolicyRun r;
      replay(m, step, policy, prefetch, budget, a.runs, r);
      r.belady_per_step = simulated_per_step(step, r.capacity, true);
      r.lru_sim_per_step = simulated_per_step(step, r.capacity, false);
      const double fetched = median(r.fetches);
      const double mib = 1.0 / (1 << 20);
      const double ratio = r.belady_per_step > 0 ? fetched / r.belady_per_step : 1.0;
      const double lru_ratio = r.belady_per_step > 0 ? r.lru_sim_per_step / r.belady_per_step : 1.0;
      const double stall_ms_per_step =
          static_cast<double>(r.stall_ns) / 1e6 / (a.runs * (kLearnSteps + kMeasuredSteps));
      fmt::print(
          "{:>10} {:>6} {:<9} {:>9.1f} {:>9.1f} {:>9.1f} {:>8.3f} {:>8.3f} {:>9.1f} {:>8.2f} "
          "{:>9.1f}\n",
          format_size(r.budget_bytes), r.capacity, r.policy, fetched * page * mib,
          r.belady_per_step * page * mib, r.lru_sim_per_step * page * mib, ratio, lru_ratio,
          median(r.step_ms), median(r.step_ms) / resident_ms, stall_ms_per_step);
      j["policy"].push_back({{"budget_bytes", r.budget_bytes},
                             {"capacity_pages", r.capacity},
                             {"policy", r.policy},
                             {"prefetch", prefetch},
                             {"stall_ms_per_step_mean", stall_ms_per_step},
                             {"fetches_per_step", r.fetches},
                             {"fetches_per_step_median", fetched},
                             {"page_bytes_per_step_median", fetched * page},
                             {"bytes_read_per_step", r.bytes_read},
                             {"belady_fetches_per_step", r.belady_per_step},
                             {"lru_sim_fetches_per_step", r.lru_sim_per_step},
                             {"ratio_to_belady", ratio},
                             {"lru_sim_ratio_to_belady", lru_ratio},
                             {"step_ms", r.step_ms},
                             {"step_ms_median", median(r.step_ms)},
                             {"step_time_ratio_to_resident", median(r.step_ms) / resident_ms},
                             {"stall_ns", r.stall_ns},
                             {"prefetches_used", r.prefetches_used},
                             {"prefetches_wasted", r.prefetches_wasted},
                             {"peak_resident_bytes", r.peak_resident_bytes}});
    }
  }
  fmt::print("{:>10} {:>6} {:<9} {:>9} {:>9} {:>9} {:>8} {:>8} {:>9.1f} {:>8}\n",
             format_size(resident.budget_bytes), resident.capacity, "resident", "0", "-", "-", "-",
             "-", resident_ms, "1.00");
  fmt::print(
      "MiB/step = pages fetched per step x page size (faults + prefetches, median); "
      "Belady and LRU sim = the simulators on the same page sequence and page count; +pf = "
      "prefetch on. Step = acquire, read every byte, release, for each access.\n");
  j["resident"] = {{"budget_bytes", resident.budget_bytes},
                   {"step_ms", resident.step_ms},
                   {"step_ms_median", resident_ms}};
  j["step_page_accesses"] = step.size();

  if (!a.json.empty()) {
    std::ofstream out(a.json);
    out << j.dump(2) << "\n";
    if (!out.good()) throw Error("cannot write " + a.json);
  }
}

}  // namespace

void register_bench_pager(CLI::App& bench) {
  auto args = std::make_shared<BenchPagerArgs>();
  CLI::App* cmd = bench.add_subcommand(
      "pager", "Pager fault and map costs against pread, and its policies against Belady");
  cmd->add_option("MODEL_DIR", args->model,
                  "Checkpoint to use (default: generate a 256 MiB one and remove it after)");
  cmd->add_option("--budget", args->budget,
                  "Budget of the policy comparison (default: 1/8, 1/4 and 1/2 of the model)");
  cmd->add_option("--runs", args->runs, "Repetitions; tables show medians")->capture_default_str();
  cmd->add_option("--json", args->json, "Write the raw numbers to this file");
  cmd->add_option("--tmp-dir", args->tmp_dir, "Where to generate the model (a disk, not tmpfs)")
      ->capture_default_str();
  cmd->callback([args] { bench_pager(*args); });
}

}  // namespace lema::tools
