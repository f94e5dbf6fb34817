#include "lema/trainer/token_batches.hpp"

#include <algorithm>
#include <map>
#include <random>
#include <utility>

#include "lema/base/error.hpp"

namespace lema::trainer {

namespace {

// A prepared data set laid out in rows of seq_len.
struct Rows {
  std::vector<std::uint32_t> ids;
  std::vector<std::int32_t> labels;
  std::vector<std::uint32_t> positions;  // packed only
  std::vector<std::uint8_t> mask;        // 1: an example's token, 0: padding
};

std::uint64_t splitmix64(std::uint64_t x) {
  x += 0x9E3779B97F4A7C15ULL;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ULL;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBULL;
  return x ^ (x >> 31);
}

// Uniform in [0, n) for n ≥ 1: accept draws in the top multiple-of-n part of [0, 2^64).
std::uint64_t bounded_draw(std::mt19937_64& gen, std::uint64_t n) {
  const std::uint64_t reject_below = (0 - n) % n;  // 2^64 mod n
  for (;;) {
    const std::uint64_t r = gen();
    if (r >= reject_below) return r % n;
  }
}

std::uint64_t fnv1a(const std::vector<std::uint32_t>& ids) {
  std::uint64_t h = 0xCBF29CE484222325ULL;
  for (const std::uint32_t id : ids) {
    for (int b = 0; b < 4; ++b) {
      h ^= (id >> (8 * b)) & 0xFF;
      h *= 0x100000001B3ULL;
    }
  }
  return h;
}

void check_fits(const TokenStream& stream, const PreparedExample& e, std::size_t len) {
  if (e.ids.size() > len) {
    throw InvalidArgument(stream.path.string() + ":" + std::to_string(e.line) + ": the example " +
                          "has " + std::to_string(e.ids.size()) + " tokens, more than --seq-len " +
                          std::to_string(len) +
                          "; raise --seq-len or shorten the example (nothing is truncated)");
  }
}

// Note [Packing]
// Rows are filled best-fit in file order: each example goes into the open row with the least
// room that still holds it, else starts a new row; rows keep the order in which they were
// started and each row its examples in file order. Deterministic, and close to full rows without
// sorting the data. Within a row every example has its own positions 0, 1, ... (the rotary or
// learned positions it would have alone), and the model attends only within an example
// (LlamaModel reads the restarts of the positions as the boundaries). An example's first label
// is set to -100: it would be predicted from the end of the example before it. The rest of a
// row is padding (id 0, label -100, attention mask 0) with positions of its own from 0, so it is
// one more segment that no example sees.
void pack_rows(const TokenStream& stream, std::size_t len, Rows& out) {
  std::vector<std::vector<const PreparedExample*>> rows;
  std::multimap<std::size_t, std::size_t> room;  // free tokens -> row, for rows with room
  for (const PreparedExample& e : stream.examples) {
    check_fits(stream, e, len);
    const auto it = room.lower_bound(e.ids.size());
    std::size_t row = rows.size(), free = len;
    if (it != room.end()) {
      row = it->second, free = it->first;
      room.erase(it);
    } else {
      rows.emplace_back();
    }
    rows[row].push_back(&e);
    if (free - e.ids.size() >= 2) room.emplace(free - e.ids.size(), row);
  }
  for (const auto& row : rows) {
    const std::size_t start = out.ids.size();
    for (const PreparedExample* e : row) {
      out.ids.insert(out.ids.end(), e->ids.begin(), e->ids.end());
      out.labels.insert(out.labels.end(), e->labels.begin(), e->labels.end());
      out.labels[out.labels.size() - e->labels.size()] = kIgnoreLabel;
      for (std::size_t i = 0; i < e->ids.size(); ++i)
        out.positions.push_back(static_cast<std::uint32_t>(i));
    }
    const std::size_t used = out.ids.size() - start;
    out.mask.resize(out.mask.size() + used, 1);
    out.ids.resize(start + len, 0);
    out.labels.resize(start + len, kIgnoreLabel);
    out.mask.resize(start + len, 0);
    for (std::size_t i = 0; used + i < len; ++i)
      out.positions.push_back(static_cast<std::uint32_t>(i));
  }
}

// Prepared examples padded to seq_len each, or packed (Note [Packing]).
void take_examples(const TokenStream& stream, std::int64_t seq_len, bool pack, Rows& out) {
  const auto len = static_cast<std::size_t>(std::max<std::int64_t>(seq_len, 0));
  if (pack) {
    pack_rows(stream, len, out);
    return;
  }
  out.ids.reserve(stream.examples.size() * len);
  out.labels.reserve(stream.examples.size() * len);
  for (const PreparedExample& e : stream.examples) {
    check_fits(stream, e, len);
    out.ids.insert(out.ids.end(), e.ids.begin(), e.ids.end());
    out.ids.resize(out.ids.size() + len - e.ids.size(), 0);
    out.labels.insert(out.labels.end(), e.labels.begin(), e.labels.end());
    out.labels.resize(out.labels.size() + len - e.labels.size(), kIgnoreLabel);
    out.mask.resize(out.mask.size() + e.ids.size(), 1);
    out.mask.resize(out.mask.size() + len - e.ids.size(), 0);
  }
}

}  // namespace

std::vector<std::uint64_t> shuffled_order(std::uint64_t n, std::uint64_t seed,
                                          std::uint64_t epoch) {
  std::vector<std::uint64_t> order(n);
  for (std::uint64_t i = 0; i < n; ++i) order[i] = i;
  std::mt19937_64 gen(splitmix64(seed ^ splitmix64(epoch)));
  for (std::uint64_t i = n; i > 1; --i) {
    std::swap(order[i - 1], order[bounded_draw(gen, i)]);
  }
  return order;
}

TokenBatches::TokenBatches(TokenStream stream, std::int64_t seq_len, std::int64_t batch,
                           std::uint64_t seed, bool pack)
    : source_(stream.path.string()), seq_len_(seq_len), batch_(batch), seed_(seed) {
  check_shape();
  if (stream.examples.empty()) {
    tokens_ = std::move(stream.tokens);
  } else {
    Rows rows;
    take_examples(stream, seq_len, pack, rows);
    tokens_ = std::move(rows.ids);
    labels_ = std::move(rows.labels);
    positions_ = std::move(rows.positions);
    mask_ = std::move(rows.mask);
  }
  init();
}

TokenBatches::TokenBatches(std::vector<std::uint32_t> tokens, std::string source,
                           std::int64_t seq_len, std::int64_t batch, std::uint64_t seed)
    : tokens_(std::move(tokens)),
      source_(std::move(source)),
      seq_len_(seq_len),
      batch_(batch),
      seed_(seed) {
  check_shape();
  init();
}

void TokenBatches::check_shape() const {
  if (seq_len_ < 2) {
    throw InvalidArgument("--seq-len " + std::to_string(seq_len_) +
                          " is too short: a sequence needs at least 2 tokens to predict one");
  }
  if (batch_ < 1) {
    throw InvalidArgument("--batch " + std::to_string(batch_) + " must be at least 1");
  }
}

void TokenBatches::init() {
  if (tokens_.empty()) {
    throw InvalidArgument("data file " + source_ + " holds no tokens; give a file with tokens");
  }
  if (tokens_.size() < static_cast<std::uint64_t>(seq_len_)) {
    throw InvalidArgument("data file " + source_ + " holds " + std::to_string(tokens_.size()) +
                          " tokens, fewer than one sequence of --seq-len " +
                          std::to_string(seq_len_) + "; lower --seq-len or give more data");
  }
  num_sequences_ = tokens_.size() / static_cast<std::uint64_t>(seq_len_);
  fingerprint_ = fnv1a(tokens_);
  if (!labels_.empty()) {
    const std::vector<std::uint32_t> as_ids(labels_.begin(), labels_.end());
    fingerprint_ ^= splitmix64(fnv1a(as_ids));
  }
  if (!positions_.empty()) fingerprint_ ^= splitmix64(splitmix64(fnv1a(positions_)));
  enter_epoch(0);
}

void TokenBatches::enter_epoch(std::uint64_t epoch) {
  order_ = shuffled_order(num_sequences_, seed_, epoch);
  position_ = {epoch, 0};
}

TokenBatch TokenBatches::next() {
  TokenBatch out;
  out.rows = batch_;
  out.cols = seq_len_;
  out.ids.reserve(static_cast<std::size_t>(batch_ * seq_len_));
  for (std::int64_t r = 0; r < batch_ * shard_world_; ++r) {
    if (position_.index == num_sequences_) enter_epoch(position_.epoch + 1);
    const std::uint64_t first = order_[position_.index++] * static_cast<std::uint64_t>(seq_len_);
    if (r % shard_world_ != shard_rank_) continue;  // another rank's (set_shard)
    out.ids.insert(out.ids.end(), tokens_.begin() + static_cast<std::ptrdiff_t>(first),
                   tokens_.begin() + static_cast<std::ptrdiff_t>(first + seq_len_));
    if (!labels_.empty()) {
      out.labels.insert(out.labels.end(), labels_.begin() + static_cast<std::ptrdiff_t>(first),
                        labels_.begin() + static_cast<std::ptrdiff_t>(first + seq_len_));
      out.attention_mask.insert(out.attention_mask.end(),
                                mask_.begin() + static_cast<std::ptrdiff_t>(first),
                                mask_.begin() + static_cast<std::ptrdiff_t>(first + seq_len_));
    }
    if (!positions_.empty()) {
      out.positions.insert(out.positions.end(),
                           positions_.begin() + static_cast<std::ptrdiff_t>(first),
                           positions_.begin() + static_cast<std::ptrdiff_t>(first + seq_len_));
    }
  }
  return out;
}

void TokenBatches::set_shard(int rank, int world_size) {
  if (world_size < 1 || rank < 0 || rank >= world_size) {
    throw InvalidArgument("rank " + std::to_string(rank) + " of " + std::to_string(world_size) +
                          " ranks is not a rank of the world");
  }
  shard_rank_ = rank;
  shard_world_ = world_size;
}

void TokenBatches::restore(DataPosition position) {
  if (position.index > num_sequences_) {
    throw InvalidArgument("data position " + std::to_string(position.index) + " of epoch " +
                          std::to_string(position.epoch) + " is beyond the " +
                          std::to_string(num_sequences_) + " sequences of " + source_ +
                          "; the data or --seq-len changed since the checkpoint");
  }
  if (position.epoch != position_.epoch)
    order_ = shuffled_order(num_sequences_, seed_, position.epoch);
  position_ = position;
}

}  // namespace lema::trainer
