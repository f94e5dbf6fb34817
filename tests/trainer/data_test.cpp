// The trainer's data: token files of every supported format, text through a tokenizer, each
// rejection with the message a user needs, and the packing's deterministic, restorable order.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/trainer/token_batches.hpp"
#include "lema/trainer/token_source.hpp"
#include "lema/trainer/tokenizer.hpp"
#include "runtime_fixture.hpp"

#ifdef LEMA_TEST_SENTENCEPIECE
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#endif

namespace lema::trainer {
namespace {

using ::testing::AllOf;
using ::testing::HasSubstr;

void write_bytes(const std::filesystem::path& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

template <typename T>
std::string raw(const std::vector<T>& values) {
  std::string out(values.size() * sizeof(T), '\0');
  std::memcpy(out.data(), values.data(), out.size());
  return out;
}

// numpy.save's layout (format 1.0): magic, version, header length, the dict padded with
// spaces so the data starts at a multiple of 64, a newline.
std::string npy(const std::string& descr, const std::string& shape, const std::string& data,
                bool fortran = false) {
  std::string dict = "{'descr': '" + descr + "', 'fortran_order': " + (fortran ? "True" : "False") +
                     ", 'shape': " + shape + ", }";
  const std::size_t unpadded = 10 + dict.size() + 1;
  dict += std::string((64 - unpadded % 64) % 64, ' ') + "\n";
  std::string out = "\x93NUMPY";
  out += '\x01';
  out += '\x00';
  out += static_cast<char>(dict.size() & 0xFF);
  out += static_cast<char>(dict.size() >> 8);
  return out + dict + data;
}

class TokenFiles : public ::testing::Test {
 protected:
  std::filesystem::path file(const std::string& name, const std::string& bytes) {
    const auto path = dir_.path() / name;
    write_bytes(path, bytes);
    return path;
  }
  static TokenSourceOptions vocab(std::int64_t n) {
    TokenSourceOptions o;
    o.vocab_size = n;
    return o;
  }
  // The message of the InvalidArgument that loading `path` throws.
  static std::string error_of(const std::filesystem::path& path, const TokenSourceOptions& o) {
    try {
      load_tokens(path, o);
    } catch (const InvalidArgument& e) {
      const std::string what = e.what();
      EXPECT_EQ(what.find('\n'), std::string::npos) << "one line: " << what;
      return what;
    }
    ADD_FAILURE() << "no InvalidArgument for " << path;
    return {};
  }
  test::TempDir dir_{"trainer-data"};
};

TEST_F(TokenFiles, PreparedExamplesArePaddedOneASequenceWithTheirLabels) {
  const auto path = file("p.jsonl",
                         "{\"input_ids\": [5, 6, 7], \"labels\": [-100, 6, 7]}\n\n"
                         "{\"input_ids\": [8, 9], \"labels\": [-100, 9]}\n");
  const auto stream = load_tokens(path, vocab(16));
  ASSERT_EQ(stream.examples.size(), 2u);
  EXPECT_EQ(stream.examples[1].line, 3u);
  TokenBatches batches(stream, /*seq_len=*/4, /*batch=*/2, /*seed=*/1);
  EXPECT_EQ(batches.num_sequences(), 2u);
  const TokenBatch b = batches.next();
  std::vector<std::int64_t> first(b.ids.begin(), b.ids.begin() + 4);
  std::vector<std::int64_t> labels(b.labels.begin(), b.labels.begin() + 4);
  if (first[0] == 8) {
    EXPECT_EQ(first, (std::vector<std::int64_t>{8, 9, 0, 0}));
    EXPECT_EQ(labels, (std::vector<std::int64_t>{-100, 9, -100, -100}));
  } else {
    EXPECT_EQ(first, (std::vector<std::int64_t>{5, 6, 7, 0}));
    EXPECT_EQ(labels, (std::vector<std::int64_t>{-100, 6, 7, -100}));
  }
  // Longer than a sequence: refused naming the line, not truncated.
  try {
    TokenBatches(load_tokens(path, vocab(16)), 2, 1, 1);
    ADD_FAILURE() << "an example longer than --seq-len was accepted";
  } catch (const InvalidArgument& e) {
    EXPECT_THAT(std::string(e.what()), AllOf(HasSubstr("p.jsonl:1:"), HasSubstr("--seq-len 2")));
  }
}

TEST_F(TokenFiles, PackedExamplesShareRowsBestFitWithTheirOwnPositions) {
  // Lengths 5, 4, 3, 2 into rows of 8: 5 opens row 0 (room 3), 4 opens row 1 (room 4), 3 fits
  // both and goes where the room is least (row 0, now full), 2 into row 1 (room 2 left).
  const auto path = file("p.jsonl",
                         "{\"input_ids\": [1, 2, 3, 4, 5], \"labels\": [1, 2, 3, 4, 5]}\n"
                         "{\"input_ids\": [6, 7, 8, 9], \"labels\": [-100, 7, 8, 9]}\n"
                         "{\"input_ids\": [10, 11, 12], \"labels\": [10, 11, 12]}\n"
                         "{\"input_ids\": [13, 14], \"labels\": [13, 14]}\n");
  TokenBatches batches(load_tokens(path, vocab(16)), /*seq_len=*/8, /*batch=*/2, /*seed=*/1,
                       /*pack=*/true);
  EXPECT_TRUE(batches.packed());
  EXPECT_EQ(batches.num_sequences(), 2u);
  const TokenBatch b = batches.next();
  ASSERT_EQ(b.positions.size(), 16u);
  const auto row = [&](const std::vector<std::int64_t>& v, std::size_t r) {
    return std::vector<std::int64_t>(v.begin() + static_cast<std::ptrdiff_t>(8 * r),
                                     v.begin() + static_cast<std::ptrdiff_t>(8 * r + 8));
  };
  const std::size_t r0 = b.ids[0] == 1 ? 0 : 1, r1 = 1 - r0;
  using V = std::vector<std::int64_t>;
  EXPECT_EQ(row(b.ids, r0), (V{1, 2, 3, 4, 5, 10, 11, 12}));
  // Every example's first label is dropped: it would be predicted across the boundary.
  EXPECT_EQ(row(b.labels, r0), (V{-100, 2, 3, 4, 5, -100, 11, 12}));
  EXPECT_EQ(row(b.positions, r0), (V{0, 1, 2, 3, 4, 0, 1, 2}));
  EXPECT_EQ(row(b.attention_mask, r0), (V{1, 1, 1, 1, 1, 1, 1, 1}));
  EXPECT_EQ(row(b.ids, r1), (V{6, 7, 8, 9, 13, 14, 0, 0}));
  EXPECT_EQ(row(b.labels, r1), (V{-100, 7, 8, 9, -100, 14, -100, -100}));
  EXPECT_EQ(row(b.positions, r1), (V{0, 1, 2, 3, 0, 1, 0, 1}));
  EXPECT_EQ(row(b.attention_mask, r1), (V{1, 1, 1, 1, 1, 1, 0, 0}));
  // Packed and padded data differ, so a resume cannot mix them.
  EXPECT_NE(batches.fingerprint(),
            TokenBatches(load_tokens(path, vocab(16)), 8, 2, 1).fingerprint());
}

TEST_F(TokenFiles, BadPreparedExamplesNameTheLine) {
  const std::string good = "{\"input_ids\": [1, 2], \"labels\": [-100, 2]}\n";
  const std::pair<std::string, std::string> cases[] = {
      {"{\"input_ids\": [1, 99], \"labels\": [-100, 99]}", "input_ids[1] = 99"},
      {"{\"input_ids\": [1, 2], \"labels\": [-100, 3]}", "labels[1] = 3"},
      {"{\"input_ids\": [1, 2, 3], \"labels\": [1, 2]}", "3 input_ids but 2 labels"},
      {"{\"input_ids\": [1, 2], \"labels\": [1, -100]}", "nothing to learn"},
      {"{\"input_ids\": [1, 2]}", "\"labels\""},
  };
  for (const auto& [line, needle] : cases) {
    const auto path = file("bad.jsonl", good + line + "\n");
    EXPECT_THAT(error_of(path, vocab(16)), AllOf(HasSubstr("bad.jsonl:2:"), HasSubstr(needle)));
  }
}

TEST_F(TokenFiles, BinUint16IsTheDefaultForSmallVocabularies) {
  const auto path = file("a.bin", raw<std::uint16_t>({0, 1, 65535, 7}));
  const auto stream = load_tokens(path, vocab(65536));
  EXPECT_EQ(stream.tokens, (std::vector<std::uint32_t>{0, 1, 65535, 7}));
  EXPECT_EQ(stream.description, "uint16 .bin");
}

TEST_F(TokenFiles, BinUint32ForLargeVocabulariesOrWhenAsked) {
  const auto path = file("a.bin", raw<std::uint32_t>({70000, 3, 0}));
  EXPECT_EQ(load_tokens(path, vocab(70001)).tokens, (std::vector<std::uint32_t>{70000, 3, 0}));
  auto o = vocab(100);
  o.bin_width = TokenWidth::kUint32;
  const auto small = file("b.bin", raw<std::uint32_t>({5, 99}));
  EXPECT_EQ(load_tokens(small, o).tokens, (std::vector<std::uint32_t>{5, 99}));
}

TEST_F(TokenFiles, BinOfAnotherWidthIsNamed) {
  auto o = vocab(1000);
  o.bin_width = TokenWidth::kUint32;
  const auto path = file("odd.bin", raw<std::uint16_t>({1, 2, 3}));
  EXPECT_THAT(error_of(path, o),
              AllOf(HasSubstr("odd.bin"), HasSubstr("6 bytes"), HasSubstr("uint32")));
}

TEST_F(TokenFiles, OutOfVocabularyNamesFilePositionAndId) {
  const auto path = file("big.bin", raw<std::uint16_t>({1, 2, 600, 3}));
  EXPECT_THAT(error_of(path, vocab(512)), AllOf(HasSubstr("big.bin"), HasSubstr("token 2 "),
                                                HasSubstr("id 600"), HasSubstr("512")));
}

TEST_F(TokenFiles, NpyAsNumpyWritesIt) {
  // numpy.save(numpy.arange(5, dtype='<u2')), byte for byte.
  const std::string numpy_bytes = std::string("\x93NUMPY\x01\x00v\x00", 10) +
                                  "{'descr': '<u2', 'fortran_order': False, 'shape': (5,), }" +
                                  std::string(60, ' ') + "\n" + raw<std::uint16_t>({0, 1, 2, 3, 4});
  ASSERT_EQ(numpy_bytes.size() % 2, 0u);
  const auto stream = load_tokens(file("a.npy", numpy_bytes), vocab(10));
  EXPECT_EQ(stream.tokens, (std::vector<std::uint32_t>{0, 1, 2, 3, 4}));
}

TEST_F(TokenFiles, NpyDtypesAndTwoDimensions) {
  const std::vector<std::uint32_t> want{1, 2, 3, 4, 5, 6};
  EXPECT_EQ(load_tokens(file("u4.npy", npy("<u4", "(6,)", raw<std::uint32_t>({1, 2, 3, 4, 5, 6}))),
                        vocab(10))
                .tokens,
            want);
  EXPECT_EQ(load_tokens(file("i4.npy", npy("<i4", "(2, 3)", raw<std::int32_t>({1, 2, 3, 4, 5, 6}))),
                        vocab(10))
                .tokens,
            want);
  const auto i8 = load_tokens(
      file("i8.npy", npy("<i8", "(3, 2)", raw<std::int64_t>({1, 2, 3, 4, 5, 6}))), vocab(10));
  EXPECT_EQ(i8.tokens, want);
  EXPECT_EQ(i8.description, "npy <i8 [3, 2]");
  // A 1-D array may call itself Fortran-ordered: it is the same bytes.
  EXPECT_EQ(
      load_tokens(file("f1.npy", npy("<u2", "(2,)", raw<std::uint16_t>({4, 5}), true)), vocab(10))
          .tokens,
      (std::vector<std::uint32_t>{4, 5}));
}

TEST_F(TokenFiles, NpyRejections) {
  const auto o = vocab(100);
  EXPECT_THAT(error_of(file("f4.npy", npy("<f4", "(2,)", raw<float>({1, 2}))), o),
              AllOf(HasSubstr("f4.npy"), HasSubstr("'<f4'"), HasSubstr("uint16")));
  EXPECT_THAT(error_of(file("be.npy", npy(">u2", "(2,)", raw<std::uint16_t>({1, 2}))), o),
              HasSubstr("'>u2'"));
  EXPECT_THAT(error_of(file("3d.npy", npy("<u2", "(1, 1, 2)", raw<std::uint16_t>({1, 2}))), o),
              AllOf(HasSubstr("[1, 1, 2]"), HasSubstr("1-D or 2-D")));
  EXPECT_THAT(error_of(file("0d.npy", npy("<u2", "()", raw<std::uint16_t>({1}))), o),
              HasSubstr("1-D or 2-D"));
  EXPECT_THAT(
      error_of(file("f.npy", npy("<i4", "(2, 3)", raw<std::int32_t>({1, 2, 3, 4, 5, 6}), true)), o),
      HasSubstr("Fortran"));
  EXPECT_THAT(error_of(file("short.npy", npy("<u2", "(4,)", raw<std::uint16_t>({1, 2, 3}))), o),
              AllOf(HasSubstr("8 bytes"), HasSubstr("6 bytes follow")));
  EXPECT_THAT(error_of(file("magic.npy", "NUMPY but not really"), o), HasSubstr("magic"));
  EXPECT_THAT(error_of(file("dict.npy", npy("<u2", "(2", raw<std::uint16_t>({1, 2}))), o),
              HasSubstr("malformed .npy header"));
  EXPECT_THAT(error_of(file("neg.npy", npy("<i8", "(2,)", raw<std::int64_t>({3, -1}))), o),
              AllOf(HasSubstr("token 1 "), HasSubstr("id -1")));
  std::string truncated = npy("<u2", "(2,)", raw<std::uint16_t>({1, 2}));
  truncated.resize(20);
  EXPECT_THAT(error_of(file("cut.npy", truncated), o), HasSubstr("truncated"));
}

TEST_F(TokenFiles, EmptyAndMissingFiles) {
  EXPECT_THAT(error_of(file("empty.bin", ""), vocab(100)),
              AllOf(HasSubstr("empty.bin"), HasSubstr("is empty")));
  EXPECT_THAT(error_of(dir_.path() / "absent.bin", vocab(100)),
              AllOf(HasSubstr("absent.bin"), HasSubstr("does not exist")));
  const ByteTokenizer bytes(300);
  auto o = vocab(300);
  o.tokenizer = &bytes;
  EXPECT_THAT(error_of(file("blank.jsonl", "\n  \n"), o), HasSubstr("no JSONL lines"));
}

TEST_F(TokenFiles, JsonlAndTextThroughTheByteTokenizer) {
  const ByteTokenizer bytes(300);
  auto o = vocab(300);
  o.tokenizer = &bytes;
  const auto jsonl =
      load_tokens(file("d.jsonl", "{\"text\": \"hi\"}\n\n{\"text\": \"\\u00e9\", \"id\": 3}\n"), o);
  // <s> h i </s> <s> é (two UTF-8 bytes) </s>, each byte b as b + 3.
  EXPECT_EQ(jsonl.tokens,
            (std::vector<std::uint32_t>{1, 'h' + 3, 'i' + 3, 2, 1, 0xC3 + 3, 0xA9 + 3, 2}));
  EXPECT_THAT(jsonl.description, HasSubstr("2 documents"));

  const auto text = load_tokens(file("t.txt", "ab\ncd"), o);
  EXPECT_EQ(text.tokens,
            (std::vector<std::uint32_t>{1, 'a' + 3, 'b' + 3, '\n' + 3, 'c' + 3, 'd' + 3, 2}));
}

TEST_F(TokenFiles, JsonlRejectionsNameTheLine) {
  const ByteTokenizer bytes(300);
  auto o = vocab(300);
  o.tokenizer = &bytes;
  EXPECT_THAT(error_of(file("bad.jsonl", "{\"text\": \"a\"}\nnot json\n"), o),
              AllOf(HasSubstr("bad.jsonl:2"), HasSubstr("not a JSON object")));
  EXPECT_THAT(error_of(file("field.jsonl", "{\"body\": \"a\"}\n"), o),
              AllOf(HasSubstr("field.jsonl:1"), HasSubstr("\"text\"")));
  EXPECT_THAT(error_of(file("num.jsonl", "{\"text\": 3}\n"), o), HasSubstr("num.jsonl:1"));
  o.tokenizer = nullptr;
  EXPECT_THAT(error_of(file("none.txt", "abc"), o), HasSubstr("needs a tokenizer"));
}

TEST_F(TokenFiles, TokenizerIdsBeyondTheModelAreNamed) {
  const ByteTokenizer bytes(1000);  // a tokenizer for a larger vocabulary than the model's
  auto o = vocab(100);
  o.tokenizer = &bytes;
  EXPECT_THAT(error_of(file("t.txt", "a"), o), AllOf(HasSubstr("t.txt"), HasSubstr("token 1 "),
                                                     HasSubstr("id 100"), HasSubstr("byte-level")));
}

TEST(ByteTokenizerTest, NeedsRoomForEveryByte) {
  EXPECT_NO_THROW(ByteTokenizer(259).encode("abc"));
  // Refused when text is encoded, not before: such a model still takes token ids.
  const ByteTokenizer small(258);
  EXPECT_THROW(small.encode("a"), InvalidArgument);
  EXPECT_EQ(small.decode({3 + 'h', 3 + 'i', 1, 2}), "hi");
  EXPECT_EQ(small.eos_id(), 2u);
  EXPECT_NO_THROW(ByteTokenizer(256, 0));
  EXPECT_FALSE(ByteTokenizer(256, 0).bos_id().has_value());
}

TEST(OpenTokenizer, FallsBackToBytesWithoutTokenizerModel) {
  test::TempDir dir("trainer-tok");
  const auto tokenizer = open_tokenizer(dir.path(), 512);
  EXPECT_THAT(tokenizer->describe(), HasSubstr("byte-level"));
  EXPECT_EQ(tokenizer->encode("A"), (std::vector<std::uint32_t>{'A' + 3}));
}

#ifdef LEMA_TEST_SENTENCEPIECE
TEST(OpenTokenizer, UsesTheCheckpointsSentencePieceModel) {
  test::TempDir dir("trainer-spm");
  std::string corpus;
  for (int i = 0; i < 200; ++i) {
    corpus += "the quick brown fox jumps over the lazy dog number " + std::to_string(i) + "\n";
  }
  write_bytes(dir.path() / "corpus.txt", corpus);
  const auto prefix = (dir.path() / "tokenizer").string();
  const auto status = sentencepiece::SentencePieceTrainer::Train(
      "--input=" + (dir.path() / "corpus.txt").string() + " --model_prefix=" + prefix +
      " --vocab_size=60 --model_type=bpe --minloglevel=2 --num_threads=1");
  ASSERT_TRUE(status.ok()) << status.ToString();

  const auto tokenizer = open_tokenizer(dir.path(), 60);
  EXPECT_THAT(tokenizer->describe(), HasSubstr("sentencepiece"));
  sentencepiece::SentencePieceProcessor reference;
  ASSERT_TRUE(reference.Load(prefix + ".model").ok());
  std::vector<int> want;
  ASSERT_TRUE(reference.Encode("the lazy fox", &want).ok());
  const auto got = tokenizer->encode("the lazy fox");
  EXPECT_EQ(std::vector<int>(got.begin(), got.end()), want);
  EXPECT_EQ(tokenizer->bos_id(), std::optional<std::uint32_t>(reference.bos_id()));

  TokenSourceOptions o;
  o.vocab_size = 60;
  o.tokenizer = tokenizer.get();
  write_bytes(dir.path() / "d.jsonl", "{\"text\": \"the lazy fox\"}\n");
  const auto stream = load_tokens(dir.path() / "d.jsonl", o);
  EXPECT_EQ(stream.tokens.size(), want.size() + 2);  // with <s> and </s>

  write_bytes(dir.path() / "tokenizer.model", "not a model");
  EXPECT_THROW(open_tokenizer(dir.path(), 60), InvalidArgument);
}
#endif

// ---- packing -------------------------------------------------------------------------------

std::vector<std::uint32_t> iota_tokens(std::uint32_t n) {
  std::vector<std::uint32_t> t(n);
  for (std::uint32_t i = 0; i < n; ++i) t[i] = i;
  return t;
}

TEST(ShuffledOrder, IsAFixedPermutationOnEveryMachine) {
  // Pinned: a change here changes every run's data order.
  EXPECT_EQ(shuffled_order(10, 42, 0), (std::vector<std::uint64_t>{9, 6, 2, 0, 1, 4, 3, 8, 5, 7}));
  const auto order = shuffled_order(1000, 7, 3);
  std::vector<std::uint64_t> sorted = order;
  std::sort(sorted.begin(), sorted.end());
  for (std::uint64_t i = 0; i < 1000; ++i) ASSERT_EQ(sorted[i], i);
  EXPECT_NE(order, shuffled_order(1000, 7, 4));
  EXPECT_NE(order, shuffled_order(1000, 8, 3));
  EXPECT_EQ(order, shuffled_order(1000, 7, 3));
  EXPECT_EQ(shuffled_order(1, 7, 3), (std::vector<std::uint64_t>{0}));
  EXPECT_TRUE(shuffled_order(0, 7, 3).empty());
}

TEST(TokenBatchesTest, TooLittleDataForOneSequence) {
  try {
    TokenBatches(iota_tokens(15), "data.bin", 16, 1, 0);
    FAIL() << "no error";
  } catch (const InvalidArgument& e) {
    EXPECT_THAT(std::string(e.what()),
                AllOf(HasSubstr("data.bin"), HasSubstr("15 tokens"), HasSubstr("--seq-len 16")));
  }
  EXPECT_EQ(TokenBatches(iota_tokens(16), "data.bin", 16, 1, 0).num_sequences(), 1u);
  EXPECT_THROW(TokenBatches(iota_tokens(16), "data.bin", 1, 1, 0), InvalidArgument);
  EXPECT_THROW(TokenBatches(iota_tokens(16), "data.bin", 4, 0, 0), InvalidArgument);
}

TEST(TokenBatchesTest, EachEpochVisitsEverySequenceOnceInANewOrder) {
  // 10 sequences of 4 (the last 3 tokens are dropped), batches of 2: 5 batches per epoch.
  TokenBatches batches(iota_tokens(43), "d", 4, 2, 9);
  ASSERT_EQ(batches.num_sequences(), 10u);
  std::vector<std::vector<std::uint64_t>> epochs(2);
  for (int e = 0; e < 2; ++e) {
    for (int b = 0; b < 5; ++b) {
      const TokenBatch batch = batches.next();
      ASSERT_EQ(batch.rows, 2);
      ASSERT_EQ(batch.cols, 4);
      for (std::int64_t r = 0; r < 2; ++r) {
        const auto first = batch.ids[static_cast<std::size_t>(r * 4)];
        for (std::int64_t c = 0; c < 4; ++c) {  // a sequence is 4 consecutive tokens
          ASSERT_EQ(batch.ids[static_cast<std::size_t>(r * 4 + c)], first + c);
        }
        ASSERT_EQ(first % 4, 0);
        epochs[static_cast<std::size_t>(e)].push_back(static_cast<std::uint64_t>(first / 4));
      }
    }
  }
  for (const auto& order : epochs) {
    EXPECT_EQ(std::set<std::uint64_t>(order.begin(), order.end()).size(), 10u);
  }
  EXPECT_NE(epochs[0], epochs[1]);
  EXPECT_EQ(epochs[0], shuffled_order(10, 9, 0));
}

TEST(TokenBatchesTest, BatchesRunOnIntoTheNextEpoch) {
  TokenBatches batches(iota_tokens(12), "d", 4, 2, 1);  // 3 sequences, batches of 2
  batches.next();
  EXPECT_EQ(batches.position(), (DataPosition{0, 2}));
  batches.next();  // the third sequence of epoch 0, the first of epoch 1
  EXPECT_EQ(batches.position(), (DataPosition{1, 1}));
}

TEST(TokenBatchesTest, RestoredPositionContinuesExactly) {
  TokenBatches straight(iota_tokens(200), "d", 8, 3, 5);  // 25 sequences
  std::vector<TokenBatch> tail;
  DataPosition saved;
  for (int i = 0; i < 20; ++i) {
    if (i == 11) saved = straight.position();
    const TokenBatch b = straight.next();
    if (i >= 11) tail.push_back(b);
  }
  TokenBatches resumed(iota_tokens(200), "d", 8, 3, 5);
  resumed.restore(saved);
  EXPECT_EQ(resumed.position(), saved);
  for (const auto& want : tail) EXPECT_EQ(resumed.next().ids, want.ids);

  TokenBatches other(iota_tokens(200), "d", 8, 3, 5);
  EXPECT_THROW(other.restore({0, 26}), InvalidArgument);
  EXPECT_NE(TokenBatches(iota_tokens(200), "d", 8, 3, 5).fingerprint(),
            TokenBatches(iota_tokens(201), "d", 8, 3, 5).fingerprint());
}

TEST(TokenBatchesTest, SameSeedSameBatchesOtherSeedOther) {
  TokenBatches a(iota_tokens(400), "d", 8, 4, 11), b(iota_tokens(400), "d", 8, 4, 11),
      c(iota_tokens(400), "d", 8, 4, 12);
  const auto first = a.next().ids;
  EXPECT_EQ(first, b.next().ids);
  EXPECT_NE(first, c.next().ids);
}

}  // namespace
}  // namespace lema::trainer
