// Packing a token stream into training batches.
//
// The stream is cut into consecutive, non-overlapping sequences of seq_len ids (the tail that
// does not fill a sequence is dropped); the loss of a sequence has position t predict t + 1, so
// one sequence is exactly seq_len ids and a stream must hold at least that many. Each epoch
// visits every sequence once in an order shuffled from (seed, epoch); a batch takes the next
// `batch` sequences of that order and runs on into the next epoch's order when one ends, so any
// number of sequences ≥ 1 serves any batch size.
//
// Prepared examples (token_source.hpp) are by default not packed: each is one sequence, padded on
// the right to seq_len with id 0 and label -100. Causal attention never looks right, so the
// padding changes no logit of the example's own positions: the loss is what transformers computes
// on the padded batch with the same labels (and an attention mask). With `pack`, several examples
// share a row (Note [Packing] in token_batches.cpp), each with positions restarting at 0, and the
// model attends only within each: the loss is transformers' on the packed batch given those
// position ids and the block-diagonal causal 4-D attention mask. Either way an example longer
// than seq_len is refused, naming its line, and the batch carries the attention mask (1 on an
// example's tokens, 0 on padding) that Mixtral's router loss needs.
//
// The shuffle is the same on every machine and standard library: std::mt19937_64 (whose output
// the standard fixes) drives a Fisher-Yates shuffle with its own unbiased bounded draw, not
// std::shuffle or std::uniform_int_distribution (implementation-defined).
//
// The position (epoch, index into the epoch's order) is all the state there is: restoring it
// continues the exact batch sequence. Not thread-safe; one owner.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "lema/trainer/token_source.hpp"

namespace lema::trainer {

struct DataPosition {
  std::uint64_t epoch = 0;
  std::uint64_t index = 0;  // sequences of this epoch's order already served
  bool operator==(const DataPosition&) const = default;
};

/// One batch: `rows` sequences of `cols` ids, row-major, as int64 for torch.
struct TokenBatch {
  std::vector<std::int64_t> ids;
  std::vector<std::int64_t> labels;  // prepared examples only; empty: every next id is learned
  std::vector<std::int64_t> attention_mask;  // prepared examples only: 1 example, 0 padding
  std::vector<std::int64_t> positions;       // packed examples only: each example's from 0
  std::int64_t rows = 0;
  std::int64_t cols = 0;
};

/// The order in which epoch `epoch` visits n sequences (a permutation of 0..n-1).
std::vector<std::uint64_t> shuffled_order(std::uint64_t n, std::uint64_t seed, std::uint64_t epoch);

class TokenBatches {
 public:
  /// Throws InvalidArgument naming `source` when the stream holds fewer than seq_len ids, or
  /// when seq_len < 2 or batch < 1.
  TokenBatches(std::vector<std::uint32_t> tokens, std::string source, std::int64_t seq_len,
               std::int64_t batch, std::uint64_t seed);
  /// `pack` applies to prepared examples (plain token streams are always cut in full rows).
  TokenBatches(TokenStream stream, std::int64_t seq_len, std::int64_t batch, std::uint64_t seed,
               bool pack = false);

  /// The next `batch` sequences.
  TokenBatch next();

  /// Data parallelism: next() walks `world_size` × batch sequences of the shared order and
  /// serves this rank's share, every world_size-th of them from the rank-th, so W ranks together
  /// see what one loader of batch W × batch sees, in the same steps. position() stays the
  /// shared position, the same on every rank. Throws InvalidArgument on a rank outside the world.
  void set_shard(int rank, int world_size);
  int shard_world_size() const noexcept { return shard_world_; }

  DataPosition position() const noexcept { return position_; }
  /// Continues from `position` (from position() of a loader over the same data and settings).
  /// Throws InvalidArgument when the index is beyond this data's sequence count.
  void restore(DataPosition position);

  std::uint64_t num_sequences() const noexcept { return num_sequences_; }
  std::uint64_t num_tokens() const noexcept { return tokens_.size(); }
  std::int64_t seq_len() const noexcept { return seq_len_; }
  std::int64_t batch() const noexcept { return batch_; }
  std::uint64_t seed() const noexcept { return seed_; }
  const std::string& source() const noexcept { return source_; }
  bool has_labels() const noexcept { return !labels_.empty(); }
  bool packed() const noexcept { return !positions_.empty(); }
  /// FNV-1a 64 over the ids (and labels): tells a resumed run whether its data is the data it started with.
  std::uint64_t fingerprint() const noexcept { return fingerprint_; }

 private:
  void enter_epoch(std::uint64_t epoch);
  void check_shape() const;
  void init();

  std::vector<std::uint32_t> tokens_;
  std::vector<std::int32_t> labels_;  // beside tokens_, for prepared examples; else empty
  std::vector<std::uint8_t> mask_;    // beside labels_: 1 an example's token, 0 padding
  std::vector<std::uint32_t> positions_;  // beside tokens_ when packed; else empty
  std::string source_;
  std::int64_t seq_len_ = 0;
  std::int64_t batch_ = 0;
  std::uint64_t seed_ = 0;
  std::uint64_t num_sequences_ = 0;
  std::uint64_t fingerprint_ = 0;
  DataPosition position_;
  int shard_rank_ = 0;
  int shard_world_ = 1;
  std::vector<std::uint64_t> order_;  // the current epoch's
};

}  // namespace lema::trainer
