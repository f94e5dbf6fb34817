#include "lema/trainer/distributed.hpp"

#include <ATen/ATen.h>
#include <spdlog/fmt/fmt.h>
#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <mutex>
#include <thread>

#include "detail/nccl_backend.hpp"
#include "lema/base/error.hpp"
#include "lema/trainer/rank_progress.hpp"

namespace lema::trainer {

namespace {

std::string first_line(const char* what) {
  std::string s(what);
  const auto nl = s.find('\n');
  if (nl != std::string::npos) s.resize(nl);
  return s;
}

std::optional<std::string> env_text(const char* name) {
  const char* v = std::getenv(name);
  if (v == nullptr) return std::nullopt;
  return std::string(v);
}

int env_int(const char* name, int fallback, int min, int max) {
  const auto text = env_text(name);
  if (!text) return fallback;
  char* end = nullptr;
  errno = 0;
  const long v = std::strtol(text->c_str(), &end, 10);
  if (text->empty() || *end != '\0' || errno != 0 || v < min || v > max) {
    throw InvalidArgument(fmt::format("environment variable {}='{}' is not a whole number in "
                                      "[{}, {}]; it is set by torchrun or lema train --nproc",
                                      name, *text, min, max));
  }
  return static_cast<int>(v);
}

std::vector<std::uint8_t> bytes(const std::string& s) { return {s.begin(), s.end()}; }

constexpr std::chrono::milliseconds kMeetingTimeout{std::chrono::minutes(2)};

}  // namespace

std::optional<DistributedEnv> distributed_env_from_environment() {
  if (!env_text("WORLD_SIZE")) return std::nullopt;
  DistributedEnv env;
  env.world_size = env_int("WORLD_SIZE", 1, 1, 1 << 16);
  if (!env_text("RANK")) {
    throw InvalidArgument("WORLD_SIZE is set but RANK is not; start the ranks with torchrun or "
                          "lema train --nproc N");
  }
  env.rank = env_int("RANK", 0, 0, env.world_size - 1);
  env.local_rank = env_int("LOCAL_RANK", env.rank, 0, env.world_size - 1);
  env.local_world_size = env_int("LOCAL_WORLD_SIZE", env.world_size, 1, env.world_size);
  env.master_addr = env_text("MASTER_ADDR").value_or("127.0.0.1");
  env.master_port = env_int("MASTER_PORT", 29500, 1, 65535);
  return env;
}

struct ProcessGroup::Impl {
  c10::intrusive_ptr<c10d::TCPStore> store;
  c10::intrusive_ptr<c10d::Backend> backend;  // ProcessGroupGloo or ProcessGroupNCCL
  DistBackend kind = DistBackend::kGloo;
  c10::Device device{c10::kCPU};
  std::chrono::milliseconds timeout;
  bool failed = false;  // a collective failed: the backend is aborted, not shut down
  int checks = 0;  // check_same calls so far
};

class ProcessGroup::Pending {
 public:
  std::vector<at::Tensor> tensors;
  c10::intrusive_ptr<c10d::Work> work;
};

ProcessGroup::ProcessGroup(DistributedEnv env, std::unique_ptr<Impl> impl)
    : env_(std::move(env)), impl_(std::move(impl)) {}

ProcessGroup::~ProcessGroup() {
  // ProcessGroupNCCL warns when destroyed before being shut down; after a failed collective its
  // communicators may wait on a lost peer, so they are aborted instead.
  if (impl_->kind != DistBackend::kNccl) return;
  try {
    if (impl_->failed) {
      impl_->backend->abort();
    } else {
      impl_->backend->shutdown();
    }
  } catch (const std::exception&) {  // the process is leaving the group either way
  }
}

DistBackend ProcessGroup::backend() const noexcept { return impl_->kind; }

c10::Device ProcessGroup::device() const noexcept { return impl_->device; }

std::unique_ptr<ProcessGroup> ProcessGroup::join(const DistributedEnv& env,
                                                 std::chrono::milliseconds timeout,
                                                 DistBackend backend, c10::Device device) {
  auto impl = std::make_unique<Impl>();
  impl->timeout = timeout;
  impl->kind = backend;
  if (backend == DistBackend::kNccl) {
    LEMA_EXPECTS(device.is_cuda() && device.has_index(), "NCCL needs a CUDA device with an index");
    impl->device = device;
  }
  const double seconds = static_cast<double>(timeout.count()) / 1000.0;
  c10d::TCPStoreOptions options;
  options.port = static_cast<std::uint16_t>(env.master_port);
  options.isServer = env.rank == 0;
  options.numWorkers = static_cast<std::size_t>(env.world_size);
  options.waitWorkers = true;
  // Ranks start minutes apart when their models load at different speeds: meeting and the
  // store's requests wait at least kMeetingTimeout, while collectives keep `timeout`.
  options.timeout = std::max<std::chrono::milliseconds>(timeout, kMeetingTimeout);
  const double meeting_s = static_cast<double>(options.timeout.count()) / 1000.0;
  try {
    impl->store = c10::make_intrusive<c10d::TCPStore>(env.master_addr, options);
  } catch (const std::exception& e) {
    const std::string why = first_line(e.what());
    if (env.rank == 0 && (why.find("EADDRINUSE") != std::string::npos ||
                          why.find("ddress already in use") != std::string::npos)) {
      throw Error(fmt::format(
          "MASTER_PORT {} is in use on this machine, so rank 0 cannot serve the rendezvous on "
          "it; give another port (MASTER_PORT, torchrun --master-port) or let lema train "
          "--nproc pick a free one",
          env.master_port));
    }
    throw Error(fmt::format(
        "rank {}: the {} ranks did not meet at {}:{} within {} s ({}); check MASTER_ADDR, "
        "MASTER_PORT and that every rank started",
        env.rank, env.world_size, env.master_addr, env.master_port, meeting_s, why));
  }
  try {
    if (backend == DistBackend::kNccl) {
      impl->backend = detail::make_nccl_backend(impl->store, env.rank, env.world_size, device,
                                                timeout);
    } else {
      auto gloo_options = c10d::ProcessGroupGloo::Options::create_default(timeout);
      auto prefixed = c10::make_intrusive<c10d::PrefixStore>("gloo", impl->store);
      impl->backend = c10::make_intrusive<c10d::ProcessGroupGloo>(prefixed, env.rank,
                                                                  env.world_size, gloo_options);
    }
  } catch (const InvalidArgument&) {
    throw;
  } catch (const std::exception& e) {
    throw Error(fmt::format("rank {}: could not connect to the other {} ranks through {} within "
                            "--dist-timeout {} s ({})",
                            env.rank, env.world_size - 1, dist_backend_name(backend), seconds,
                            first_line(e.what())));
  }
  return std::unique_ptr<ProcessGroup>(new ProcessGroup(env, std::move(impl)));
}

void ProcessGroup::fail(const char* what, const std::exception& e) {
  const std::string why = first_line(e.what());
  impl_->failed = true;
  std::vector<int> lost;
  bool store_gone = false;
  try {
    impl_->store->set(fmt::format("lema/alive/{}", rank()), bytes("1"));
    const auto deadline = std::chrono::steady_clock::now() +
                          std::min<std::chrono::milliseconds>(impl_->timeout,
                                                              std::chrono::seconds(3));
    for (;;) {
      lost.clear();
      for (int r = 0; r < world_size(); ++r) {
        if (!impl_->store->check({fmt::format("lema/alive/{}", r)})) lost.push_back(r);
      }
      if (lost.empty() || std::chrono::steady_clock::now() >= deadline) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
  } catch (const std::exception&) {
    store_gone = true;
    lost = {0};
  }
  std::string names;
  for (const int r : lost) names += (names.empty() ? "" : ", ") + std::to_string(r);
  const std::string who =
      lost.empty() ? std::string("a rank")
                   : fmt::format("rank{} {}", lost.size() > 1 ? "s" : "", names);
  throw Error(fmt::format(
      "{} stopped during {} (rank {} saw: {}{}); rank {} stops too. The last checkpoint in --out "
      "is complete: --resume continues from it",
      who, what, rank(), why, store_gone ? "; rank 0's rendezvous store is gone too" : "",
      rank()));
}

void ProcessGroup::check_same(const std::vector<std::pair<std::string, std::string>>& settings) {
  nlohmann::json mine = nlohmann::json::array();
  for (const auto& [name, value] : settings) mine.push_back({name, value});
  std::vector<nlohmann::json> all(static_cast<std::size_t>(world_size()));
  const int round = impl_->checks++;  // each comparison under keys of its own
  try {
    impl_->store->set(fmt::format("lema/settings/{}/{}", round, rank()), bytes(mine.dump()));
    for (int r = 0; r < world_size(); ++r) {
      const auto raw = impl_->store->get(fmt::format("lema/settings/{}/{}", round, r));
      all[static_cast<std::size_t>(r)] = nlohmann::json::parse(raw.begin(), raw.end());
    }
  } catch (const std::exception& e) {
    fail("the comparison of the ranks' settings", e);
  }
  const nlohmann::json& first = all.front();
  for (std::size_t i = 0; i < first.size(); ++i) {
    for (int r = 1; r < world_size(); ++r) {
      const nlohmann::json& other = all[static_cast<std::size_t>(r)];
      if (i >= other.size() || other[i][0] != first[i][0]) {
        throw InvalidArgument(fmt::format(
            "rank 0 and rank {} run different versions of lema (their settings lists differ); "
            "start every rank from the same lema",
            r));
      }
      if (other[i][1] != first[i][1]) {
        throw InvalidArgument(fmt::format(
            "{} differs between ranks: rank 0 has {}, rank {} has {}; start every rank with the "
            "same settings",
            first[i][0].get<std::string>(), first[i][1].get<std::string>(), r,
            other[i][1].get<std::string>()));
      }
    }
  }
}

std::unique_ptr<ProcessGroup::Pending> ProcessGroup::start_sum(at::Tensor tensor) {
  LEMA_EXPECTS(tensor.device() == impl_->device && tensor.is_contiguous(),
               "a sum over the ranks takes a contiguous tensor on " + impl_->device.str() +
                   ", not " + tensor.device().str());
  auto pending = std::make_unique<Pending>();
  pending->tensors.push_back(std::move(tensor));
  note_rank_arrival(rank());
  try {
    pending->work = impl_->backend->allreduce(pending->tensors);
  } catch (const std::exception& e) {
    fail("a gradient all-reduce", e);
  }
  return pending;
}

void ProcessGroup::wait(Pending& pending, const char* what) {
  try {
    pending.work->wait();
  } catch (const std::exception& e) {
    fail(what, e);
  }
}

void ProcessGroup::average(std::vector<at::Tensor>& tensors) {
  for (at::Tensor& t : tensors) {
    at::Tensor here = t.to(impl_->device).contiguous();
    auto pending = start_sum(here);
    wait(*pending, "an all-reduce");
    here.div_(world_size());
    if (!here.is_same(t)) t.copy_(here);
  }
}

void ProcessGroup::broadcast_from_rank0(std::vector<at::Tensor>& tensors) {
  for (at::Tensor& t : tensors) {
    std::vector<at::Tensor> here{t.to(impl_->device).contiguous()};
    note_rank_arrival(rank());
    try {
      impl_->backend->broadcast(here)->wait();
    } catch (const std::exception& e) {
      fail("the broadcast of rank 0's adapters", e);
    }
    if (!here[0].is_same(t)) t.copy_(here[0]);
  }
}

void ProcessGroup::barrier() {
  note_rank_arrival(rank());
  try {
    c10d::BarrierOptions options;
    // NCCL's barrier is an all-reduce on a device it would otherwise guess.
    if (impl_->device.is_cuda()) options.device_ids = {impl_->device.index()};
    impl_->backend->barrier(options)->wait();
  } catch (const std::exception& e) {
    fail("a barrier", e);
  }
}

// --- GradientBuckets ---------------------------------------------------------------------------

struct GradientBuckets::State {
  struct Bucket {
    std::vector<std::size_t> members;    // indices into params
    std::vector<std::int64_t> offsets;   // of each member in flat
    at::Tensor flat;                     // on the group's device, the members' dtype
    std::size_t pending = 0;             // members not ready yet
    std::unique_ptr<ProcessGroup::Pending> work;
  };
  ProcessGroup* group = nullptr;
  std::vector<at::Tensor> params;
  std::vector<Bucket> buckets;
  std::vector<std::size_t> bucket_of;
  std::vector<bool> ready;
  bool armed = false;
  std::mutex mutex;  // backward may run hooks on several threads (one per device)

  void copy_in(std::size_t i) {
    Bucket& b = buckets[bucket_of[i]];
    const auto k = static_cast<std::size_t>(
        std::find(b.members.begin(), b.members.end(), i) - b.members.begin());
    at::Tensor slot = b.flat.narrow(0, b.offsets[k], params[i].numel());
    const at::Tensor& g = params[i].grad();
    if (g.defined()) {
      slot.copy_(g.reshape({-1}));
    } else {
      slot.zero_();
    }
  }

  void launch(Bucket& b) { b.work = group->start_sum(b.flat); }

  void on_ready(std::size_t i) {
    std::lock_guard<std::mutex> lock(mutex);
    if (!armed || ready[i]) return;
    ready[i] = true;
    copy_in(i);
    Bucket& b = buckets[bucket_of[i]];
    if (--b.pending == 0) launch(b);
  }
};

namespace {

class ReadyHook : public torch::autograd::PostAccumulateGradHook {
 public:
  ReadyHook(std::weak_ptr<GradientBuckets::State> state, std::size_t index)
      : state_(std::move(state)), index_(index) {}
  void operator()(const torch::autograd::Variable&) override {
    if (auto s = state_.lock()) s->on_ready(index_);
  }

 private:
  std::weak_ptr<GradientBuckets::State> state_;
  std::size_t index_;
};

}  // namespace

GradientBuckets::GradientBuckets(ProcessGroup& group, std::vector<at::Tensor> params,
                                 std::int64_t bucket_bytes)
    : state_(std::make_shared<State>()) {
  LEMA_EXPECTS(bucket_bytes > 0, "the gradient bucket size must be positive");
  State& s = *state_;
  s.group = &group;
  s.params = std::move(params);
  s.bucket_of.resize(s.params.size());
  s.ready.assign(s.params.size(), false);
  // Reverse order: backward reaches the last layers' adapters first.
  std::int64_t filled = 0;
  for (std::size_t n = s.params.size(); n-- > 0;) {
    const at::Tensor& p = s.params[n];
    const bool new_bucket = s.buckets.empty() || filled >= bucket_bytes ||
                            s.buckets.back().flat.scalar_type() != p.scalar_type();
    if (new_bucket) {
      s.buckets.emplace_back();
      s.buckets.back().flat = at::empty(
          {0}, at::TensorOptions().dtype(p.scalar_type()).device(group.device()));
      filled = 0;
    }
    State::Bucket& b = s.buckets.back();
    b.offsets.push_back(b.flat.numel());
    b.members.push_back(n);
    b.flat = at::empty({b.flat.numel() + p.numel()}, b.flat.options());
    filled += p.numel() * static_cast<std::int64_t>(p.element_size());
    s.bucket_of[n] = s.buckets.size() - 1;
  }
  for (auto& b : s.buckets) b.pending = b.members.size();
  for (std::size_t i = 0; i < s.params.size(); ++i) {
    torch::autograd::impl::set_post_acc_grad_hooks(s.params[i],
                                                   std::make_unique<ReadyHook>(state_, i));
  }
}

GradientBuckets::~GradientBuckets() {
  for (const at::Tensor& p : state_->params) {
    torch::autograd::impl::set_post_acc_grad_hooks(p, nullptr);
  }
}

std::size_t GradientBuckets::bucket_count() const noexcept { return state_->buckets.size(); }

void GradientBuckets::arm() {
  std::lock_guard<std::mutex> lock(state_->mutex);
  state_->armed = true;
}

void GradientBuckets::finish() {
  State& s = *state_;
  {
    std::lock_guard<std::mutex> lock(s.mutex);
    // Adapters that received no gradient this step still take part, with zeros.
    for (auto& b : s.buckets) {
      if (b.work) continue;
      for (const std::size_t i : b.members) {
        if (!s.ready[i]) s.copy_in(i);
      }
      s.launch(b);
    }
    s.armed = false;
  }
  for (auto& b : s.buckets) {
    s.group->wait(*b.work, "the gradient all-reduce");
    b.flat.div_(s.group->world_size());
    for (std::size_t k = 0; k < b.members.size(); ++k) {
      at::Tensor& p = s.params[b.members[k]];
      const at::Tensor mean = b.flat.narrow(0, b.offsets[k], p.numel()).view(p.sizes());
      if (!p.grad().defined()) p.mutable_grad() = at::zeros_like(p);
      p.mutable_grad().copy_(mean);
    }
    b.work.reset();
    b.pending = b.members.size();
  }
  std::fill(s.ready.begin(), s.ready.end(), false);
}

}  // namespace lema::trainer
