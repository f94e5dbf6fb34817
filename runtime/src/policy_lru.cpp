// The lru policy: evicts the candidate accessed longest ago; predicts nothing.
#include "detail/recency.hpp"
#include "lema/runtime/policy.hpp"

namespace lema::runtime {
namespace {

class LruPolicy final : public EvictionPolicy {
 public:
  explicit LruPolicy(std::size_t page_count) : order_(page_count) {}

  std::string_view name() const override { return "lru"; }
  void on_access(PageId page) override {
    detail::check_page(page, order_.page_count());
    order_.touch(page);
  }
  void on_demote(PageId page) override {
    detail::check_page(page, order_.page_count());
    order_.demote(page);
  }
  void on_resident(PageId) override {}
  void on_evicted(PageId) override {}
  PageId choose_victim(std::span<const PageId> candidates) override {
    return order_.least_recent(candidates);
  }
  std::optional<std::uint64_t> next_use(PageId) const override { return std::nullopt; }
  std::vector<PageId> predict_next(std::size_t) const override { return {}; }

 private:
  detail::RecencyOrder order_;
};

}  // namespace

std::unique_ptr<EvictionPolicy> make_lru_policy(std::size_t page_count) {
  return std::make_unique<LruPolicy>(page_count);
}

}  // namespace lema::runtime
