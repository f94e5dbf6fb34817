// Checkpoint::open and parse_header: every broken-file case is a named test that checks the
// exception type, the rule id and that the offending file is named; positive cases check the
// tensor table against bytes written independently of the library.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <future>
#include <string>
#include <vector>

#include "lema/io/checkpoint.hpp"
#include "safetensors_builder.hpp"

namespace lema::io {
namespace {

namespace fs = std::filesystem;
using test::header_entry;
using test::safetensors_bytes;
using test::SafetensorsBuilder;
using test::write_bytes;

class CheckpointTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (fs::temp_directory_path() / "lema-checkpoint-test-XXXXXX").string();
    ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
    dir_ = pattern;
  }
  void TearDown() override {
    std::error_code ec;
    fs::permissions(dir_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(dir_, ec);
  }

  // Writes `bytes` as dir/<name> and returns the path.
  fs::path file(const std::string& name, std::string_view bytes) {
    const fs::path p = dir_ / name;
    fs::create_directories(p.parent_path());
    write_bytes(p, bytes);
    return p;
  }
  // A file with `header` (verbatim) followed by `data_bytes` pattern bytes.
  fs::path file_with_header(const std::string& header, std::uint64_t data_bytes,
                            const std::string& name = "model.safetensors") {
    return file(name, safetensors_bytes(header, test::pattern_bytes(data_bytes)));
  }

  fs::path dir_;
};

// Opens `path` expecting a CheckpointError with `rule` whose what() names `file_name`.
CheckpointError expect_rejected(const fs::path& path, const std::string& rule,
                                const std::string& file_name) {
  try {
    Checkpoint::open(path);
  } catch (const CheckpointError& e) {
    EXPECT_EQ(e.rule(), rule) << e.what();
    EXPECT_NE(std::string(e.what()).find(file_name), std::string::npos)
        << "'" << file_name << "' not named in: " << e.what();
    EXPECT_NE(e.file().find(file_name), std::string::npos) << e.file();
    return e;
  } catch (const std::exception& e) {
    ADD_FAILURE() << "expected CheckpointError '" << rule
                  << "', got another exception: " << e.what();
    return CheckpointError("", "", "", "");
  }
  ADD_FAILURE() << "expected CheckpointError '" << rule << "' but " << path << " opened";
  return CheckpointError("", "", "", "");
}

// A one-tensor header: {"t": {dtype, shape, data_offsets}} with the entry's JSON given.
std::string one_entry(const std::string& entry_json) {
  return "{\"t\":" + entry_json + "}";
}

// ---------------------------------------------------------------------------------------------
// Broken single files.

TEST_F(CheckpointTest, RejectsFileShorterThanEightBytes) {
  expect_rejected(file("short.safetensors", "\x02\x00\x00"), "file-too-small", "short.safetensors");
  expect_rejected(file("empty.safetensors", ""), "file-too-small", "empty.safetensors");
}

TEST_F(CheckpointTest, RejectsHeaderLengthOverLimit) {
  auto p =
      file("big.safetensors", test::safetensors_bytes_with_length(kMaxHeaderBytes + 1, "{}", ""));
  auto e = expect_rejected(p, "header-too-large", "big.safetensors");
  EXPECT_NE(std::string(e.what()).find("100000001"), std::string::npos) << e.what();
  expect_rejected(file("max.safetensors", test::safetensors_bytes_with_length(~0ull, "{}", "")),
                  "header-too-large", "max.safetensors");
}

TEST_F(CheckpointTest, RejectsHeaderBeyondEndOfFile) {
  auto p = file("trunc.safetensors", test::safetensors_bytes_with_length(100, "{}", "1234"));
  expect_rejected(p, "header-out-of-bounds", "trunc.safetensors");
}

TEST_F(CheckpointTest, RejectsHeaderThatIsNotJson) {
  expect_rejected(file_with_header("this is not json", 0), "bad-json", "model.safetensors");
  expect_rejected(file_with_header("{\"t\":{\"dtype\":\"F32\",", 0), "bad-json",
                  "model.safetensors");
  expect_rejected(file_with_header("", 0), "bad-json", "model.safetensors");
  expect_rejected(file_with_header("{} {}", 0), "bad-json", "model.safetensors");
}

TEST_F(CheckpointTest, RejectsHeaderThatIsNotUtf8) {
  const std::string header = one_entry("{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]}");
  std::string bad = "{\"t\xff\":" + header.substr(5);
  expect_rejected(file_with_header(bad, 4), "bad-utf8", "model.safetensors");
  // An encoded surrogate (U+D800) is not valid UTF-8 either.
  bad = "{\"t\xed\xa0\x80\":" + header.substr(5);
  expect_rejected(file_with_header(bad, 4), "bad-utf8", "model.safetensors");
}

TEST_F(CheckpointTest, RejectsByteOrderMark) {
  expect_rejected(file_with_header("\xef\xbb\xbf{}", 0), "bad-json", "model.safetensors");
}

TEST_F(CheckpointTest, RejectsHeaderThatIsNotAnObject) {
  expect_rejected(file_with_header("[1, 2]", 0), "not-object", "model.safetensors");
  expect_rejected(file_with_header("\"x\"", 0), "not-object", "model.safetensors");
  expect_rejected(file_with_header("null", 0), "not-object", "model.safetensors");
}

TEST_F(CheckpointTest, RejectsDuplicateTensorName) {
  const std::string h =
      "{" + header_entry("w", "U8", {4}, 0, 4) + "," + header_entry("w", "U8", {4}, 4, 8) + "}";
  auto e = expect_rejected(file_with_header(h, 8), "duplicate-key", "model.safetensors");
  EXPECT_EQ(e.tensor(), "w");
}

TEST_F(CheckpointTest, RejectsDuplicateFieldInEntry) {
  const std::string h =
      one_entry("{\"dtype\":\"U8\",\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4]}");
  auto e = expect_rejected(file_with_header(h, 4), "duplicate-key", "model.safetensors");
  EXPECT_EQ(e.tensor(), "t");
}

TEST_F(CheckpointTest, RejectsEntryThatIsNotAnObject) {
  expect_rejected(file_with_header("{\"t\":[1,2,3]}", 0), "bad-entry", "model.safetensors");
}

TEST_F(CheckpointTest, RejectsUnknownDtype) {
  auto h = one_entry("{\"dtype\":\"F17\",\"shape\":[1],\"data_offsets\":[0,4]}");
  auto e = expect_rejected(file_with_header(h, 4), "bad-dtype", "model.safetensors");
  EXPECT_EQ(e.tensor(), "t");
  EXPECT_NE(std::string(e.what()).find("F17"), std::string::npos);
  h = one_entry("{\"dtype\":\"f32\",\"shape\":[1],\"data_offsets\":[0,4]}");  // case matters
  expect_rejected(file_with_header(h, 4), "bad-dtype", "model.safetensors");
  h = one_entry("{\"dtype\":32,\"shape\":[1],\"data_offsets\":[0,4]}");
  expect_rejected(file_with_header(h, 4), "bad-dtype", "model.safetensors");
}

TEST_F(CheckpointTest, RejectsNegativeDimension) {
  auto h = one_entry("{\"dtype\":\"U8\",\"shape\":[-4],\"data_offsets\":[0,4]}");
  expect_rejected(file_with_header(h, 4), "bad-shape", "model.safetensors");
}

TEST_F(CheckpointTest, RejectsNonIntegerDimension) {
  for (const char* dim : {"4.0", "4.5", "4e0", "\"4\"", "null", "[4]", "true"}) {
    SCOPED_TRACE(dim);
    auto h =
        one_entry(std::string("{\"dtype\":\"U8\",\"shape\":[") + dim + "],\"data_offsets\":[0,4]}");
    expect_rejected(file_with_header(h, 4), "bad-shape", "model.safetensors");
  }
  auto h = one_entry("{\"dtype\":\"U8\",\"shape\":4,\"data_offsets\":[0,4]}");
  expect_rejected(file_with_header(h, 4), "bad-shape", "model.safetensors");
}

TEST_F(CheckpointTest, RejectsDimensionPastInt64) {
  // 2^63 fits uint64 but not int64; 2^64 does not fit any integer type.
  for (const char* dim : {"9223372036854775808", "18446744073709551616"}) {
    SCOPED_TRACE(dim);
    auto h =
        one_entry(std::string("{\"dtype\":\"U8\",\"shape\":[") + dim + "],\"data_offsets\":[0,4]}");
    expect_rejected(file_with_header(h, 4), "bad-shape", "model.safetensors");
  }
}

TEST_F(CheckpointTest, RejectsShapeWhoseSizeOverflows) {
  // Each dimension is valid, their product is not.
  auto h = one_entry("{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296],\"data_offsets\":[0,0]}");
  expect_rejected(file_with_header(h, 0), "size-overflow", "model.safetensors");
  // The element count fits, the bit count does not.
  h = one_entry("{\"dtype\":\"F64\",\"shape\":[9223372036854775807],\"data_offsets\":[0,0]}");
  expect_rejected(file_with_header(h, 0), "size-overflow", "model.safetensors");
  // An overflow before a zero dimension is still an overflow, as in the reference.
  h = one_entry("{\"dtype\":\"U8\",\"shape\":[4294967296,4294967296,0],\"data_offsets\":[0,0]}");
  expect_rejected(file_with_header(h, 0), "size-overflow", "model.safetensors");
}

TEST_F(CheckpointTest, RejectsReversedOffsets) {
  const std::string h = "{" + header_entry("a", "U8", {4}, 4, 0) + "}";
  auto e = expect_rejected(file_with_header(h, 4), "bad-offsets", "model.safetensors");
  EXPECT_EQ(e.tensor(), "a");
}

TEST_F(CheckpointTest, RejectsOffsetsThatAreNotAPair) {
  for (const char* offsets : {"[0]", "[0,4,8]", "[-1,3]", "[0,4.0]", "{}", "\"0,4\""}) {
    SCOPED_TRACE(offsets);
    auto h =
        one_entry(std::string("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":") + offsets + "}");
    expect_rejected(file_with_header(h, 4), "bad-offsets", "model.safetensors");
  }
}

TEST_F(CheckpointTest, RejectsSizeMismatch) {
  const std::string h =
      "{" + header_entry("model.layers.0.q_proj.weight", "F16", {4, 4}, 0, 30) + "}";
  auto e = expect_rejected(file_with_header(h, 30), "size-mismatch", "model.safetensors");
  EXPECT_EQ(e.tensor(), "model.layers.0.q_proj.weight");
  EXPECT_NE(e.detail().find("[4, 4] x F16 = 32 bytes"), std::string::npos) << e.detail();
  EXPECT_NE(e.detail().find("span 30 bytes"), std::string::npos) << e.detail();
}

TEST_F(CheckpointTest, RejectsGapBetweenTensors) {
  const std::string h =
      "{" + header_entry("a", "U8", {4}, 0, 4) + "," + header_entry("b", "U8", {4}, 6, 10) + "}";
  auto e = expect_rejected(file_with_header(h, 10), "gap", "model.safetensors");
  EXPECT_EQ(e.tensor(), "b");
}

TEST_F(CheckpointTest, RejectsGapAtStartOfData) {
  const std::string h = "{" + header_entry("a", "U8", {4}, 2, 6) + "}";
  expect_rejected(file_with_header(h, 6), "gap", "model.safetensors");
}

TEST_F(CheckpointTest, RejectsOverlappingTensors) {
  const std::string h =
      "{" + header_entry("a", "U8", {4}, 0, 4) + "," + header_entry("b", "U8", {4}, 2, 6) + "}";
  auto e = expect_rejected(file_with_header(h, 6), "overlap", "model.safetensors");
  EXPECT_EQ(e.tensor(), "b");
  EXPECT_NE(e.detail().find("'a'"), std::string::npos) << e.detail();
}

TEST_F(CheckpointTest, RejectsZeroSizedTensorInsideAnother) {
  const std::string h =
      "{" + header_entry("a", "U8", {4}, 0, 4) + "," + header_entry("empty", "U8", {0}, 2, 2) + "}";
  expect_rejected(file_with_header(h, 4), "overlap", "model.safetensors");
}

TEST_F(CheckpointTest, RejectsTrailingBytes) {
  const std::string h = "{" + header_entry("a", "U8", {4}, 0, 4) + "}";
  auto e = expect_rejected(file_with_header(h, 5), "trailing-bytes", "model.safetensors");
  EXPECT_NE(e.detail().find("1 bytes"), std::string::npos) << e.detail();
  // An empty header must be followed by nothing.
  expect_rejected(file_with_header("{}", 3, "empty.safetensors"), "trailing-bytes",
                  "empty.safetensors");
}

TEST_F(CheckpointTest, RejectsDataEndingBeforeTheLastTensor) {
  const std::string h =
      "{" + header_entry("a", "U8", {4}, 0, 4) + "," + header_entry("b", "U8", {4}, 4, 8) + "}";
  auto e = expect_rejected(file_with_header(h, 6), "offsets-beyond-eof", "model.safetensors");
  EXPECT_EQ(e.tensor(), "b");
}

TEST_F(CheckpointTest, RejectsMetadataWithNonStringValue) {
  const std::string h = "{\"__metadata__\":{\"format\":\"pt\",\"step\":3}}";
  auto e = expect_rejected(file_with_header(h, 0), "bad-metadata", "model.safetensors");
  EXPECT_NE(e.detail().find("'step'"), std::string::npos) << e.detail();
  expect_rejected(file_with_header("{\"__metadata__\":{\"a\":null}}", 0), "bad-metadata",
                  "model.safetensors");
}

TEST_F(CheckpointTest, RejectsMetadataThatIsNotAnObject) {
  expect_rejected(file_with_header("{\"__metadata__\":\"pt\"}", 0), "bad-metadata",
                  "model.safetensors");
  expect_rejected(file_with_header("{\"__metadata__\":null}", 0), "bad-metadata",
                  "model.safetensors");
}

TEST_F(CheckpointTest, RejectsUnknownField) {
  auto h = one_entry("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":[0,4],\"quant\":\"nf4\"}");
  auto e = expect_rejected(file_with_header(h, 4), "unknown-field", "model.safetensors");
  EXPECT_NE(e.detail().find("'quant'"), std::string::npos) << e.detail();
}

TEST_F(CheckpointTest, RejectsMissingField) {
  for (const char* entry :
       {"{\"shape\":[4],\"data_offsets\":[0,4]}", "{\"dtype\":\"U8\",\"data_offsets\":[0,4]}",
        "{\"dtype\":\"U8\",\"shape\":[4]}"}) {
    SCOPED_TRACE(entry);
    expect_rejected(file_with_header(one_entry(entry), 4), "missing-field", "model.safetensors");
  }
}

TEST_F(CheckpointTest, RejectsSubByteDtypeThatIsNotWholeBytes) {
  // 3 x 4 bits and 2 x 6 bits do not fill whole bytes.
  auto h = "{" + header_entry("f4", "F4", {3}, 0, 2) + "}";
  expect_rejected(file_with_header(h, 2), "partial-byte", "model.safetensors");
  h = "{" + header_entry("f6", "F6_E2M3", {2}, 0, 2) + "}";
  expect_rejected(file_with_header(h, 2), "partial-byte", "model.safetensors");
}

TEST_F(CheckpointTest, RejectsNonexistentPath) {
  expect_rejected(dir_ / "nope.safetensors", "not-found", "nope.safetensors");
  expect_rejected(dir_ / "nope" / "deeper", "not-found", "deeper");
}

TEST_F(CheckpointTest, RejectsFileThatIsNotRegular) {
  expect_rejected("/dev/null", "unreadable", "/dev/null");
}

TEST_F(CheckpointTest, RejectsUnreadableFile) {
  auto p = file_with_header("{}", 0, "secret.safetensors");
  fs::permissions(p, fs::perms::none);
  if (::access(p.c_str(), R_OK) == 0) GTEST_SKIP() << "running with permission to read anything";
  expect_rejected(p, "unreadable", "secret.safetensors");
}

// A header nested 100,000 deep must be refused while it is read: building or printing it
// recursively would overflow the stack.
TEST_F(CheckpointTest, RejectsDeeplyNestedShape) {
  const std::size_t depth = 100'000;
  const std::string h = one_entry("{\"dtype\":\"U8\",\"shape\":" + std::string(depth, '[') +
                                  std::string(depth, ']') + ",\"data_offsets\":[0,4]}");
  auto e = expect_rejected(file_with_header(h, 4), "too-deep", "model.safetensors");
  EXPECT_EQ(e.tensor(), "t");
  EXPECT_NE(e.detail().find("128"), std::string::npos) << e.what();
  // The same document unclosed, and nested objects, hit the same rule before the syntax error.
  expect_rejected(file_with_header("{\"t\":" + std::string(depth, '['), 0), "too-deep",
                  "model.safetensors");
  std::string objects;
  for (std::size_t i = 0; i < depth; ++i) objects += "{\"a\":";
  expect_rejected(file_with_header(objects + "1" + std::string(depth, '}'), 0), "too-deep",
                  "model.safetensors");
}

TEST_F(CheckpointTest, AcceptsNestingUpToTheLimitWhereTheFormatAllowsIt) {
  // 128 levels are parsed (the reference's JSON parser has the same limit); the entry is then
  // refused for its shape, not for its depth.
  const std::string h = one_entry("{\"dtype\":\"U8\",\"shape\":[" + std::string(125, '[') +
                                  std::string(126, ']') + ",\"data_offsets\":[0,4]}");
  expect_rejected(file_with_header(h, 4), "bad-shape", "model.safetensors");
  const std::string deeper = one_entry("{\"dtype\":\"U8\",\"shape\":[" + std::string(126, '[') +
                                       std::string(127, ']') + ",\"data_offsets\":[0,4]}");
  expect_rejected(file_with_header(deeper, 4), "too-deep", "model.safetensors");
}

// Whatever a rejection quotes from the file (a tensor name, a JSON value, the token a syntax
// error stopped at) is cut short, so one bad entry cannot make a megabyte-long message.
TEST_F(CheckpointTest, RejectionMessagesQuoteBoundedExcerpts) {
  const std::string big(1'000'000, 'x');
  std::string many_dims = "[";
  for (int i = 0; i < 100'000; ++i) many_dims += "1,";
  many_dims += "[1]]";
  std::string long_array = "[";
  for (int i = 0; i < 100'000; ++i) long_array += "12345,";
  long_array += "0]";
  const std::vector<std::pair<std::string, std::string>> cases = {
      {"bad-dtype", "{" + header_entry(big, "X99", {4}, 0, 4) + "}"},
      {"bad-dtype", one_entry("{\"dtype\":\"" + big + "\",\"shape\":[4],\"data_offsets\":[0,4]}")},
      {"bad-shape",
       one_entry("{\"dtype\":\"U8\",\"shape\":[" + many_dims + "],\"data_offsets\":[0,4]}")},
      {"bad-offsets",
       one_entry("{\"dtype\":\"U8\",\"shape\":[4],\"data_offsets\":" + long_array + "}")},
      {"bad-json", "{\"" + big + "\\q\":1}"},
      {"duplicate-key", "{\"" + big + "\":1,\"" + big + "\":2}"},
  };
  for (const auto& [rule, h] : cases) {
    SCOPED_TRACE(rule);
    auto e = expect_rejected(file_with_header(h, 4), rule, "model.safetensors");
    EXPECT_LT(std::string(e.what()).size(), 1000u) << std::string(e.what()).substr(0, 300);
  }
}

// A JSON value followed by a NUL and junk: nlohmann's reader stops at the NUL, the reference
// (serde_json) rejects the trailing characters, and so must we.
TEST_F(CheckpointTest, RejectsNulAndJunkAfterHeaderJson) {
  const std::string json = "{" + header_entry("a", "U8", {4}, 0, 4) + "}";
  for (const std::string& tail :
       {std::string("\0", 1), std::string("\0junk", 5), std::string("  \0\0\0", 5),
        std::string("\x01"), std::string(" x")}) {
    SCOPED_TRACE(::testing::PrintToString(tail));
    expect_rejected(file_with_header(json + tail, 4), "bad-json", "model.safetensors");
  }
  // A NUL inside the JSON is named by its offset.
  auto e = expect_rejected(file_with_header(std::string("{\"a\0\":1}", 8), 0), "bad-json",
                           "model.safetensors");
  EXPECT_NE(e.detail().find("offset 3"), std::string::npos) << e.what();
}

// Runs Checkpoint::open(path) on another thread. Opening a FIFO for reading waits for a writer,
// so if the call is still blocked after a generous delay the test opens the FIFO for writing
// itself, which releases it, and fails instead of hanging.
CheckpointError expect_rejected_without_blocking(const fs::path& path, const fs::path& fifo,
                                                 const std::string& rule,
                                                 const std::string& file_name) {
  auto result =
      std::async(std::launch::async, [&] { return expect_rejected(path, rule, file_name); });
  if (result.wait_for(std::chrono::seconds(20)) == std::future_status::timeout) {
    ADD_FAILURE() << "Checkpoint::open(" << path << ") blocked on the FIFO " << fifo;
    const int fd = ::open(fifo.c_str(), O_WRONLY | O_NONBLOCK | O_CLOEXEC);
    EXPECT_GE(fd, 0);
    if (fd >= 0) ::close(fd);
  }
  return result.get();
}

TEST_F(CheckpointTest, RejectsFifo) {
  const fs::path fifo = dir_ / "pipe.safetensors";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  auto e = expect_rejected_without_blocking(fifo, fifo, "unreadable", "pipe.safetensors");
  EXPECT_NE(e.detail().find("is a FIFO, not a regular file"), std::string::npos) << e.what();
}

// ---------------------------------------------------------------------------------------------
// Valid single files.

TEST(DtypeTest, NamesRoundTripAndSizesMatchTheReference) {
  const std::vector<std::pair<std::string, unsigned>> reference = {
      {"BOOL", 8},        {"F4", 4},      {"F6_E2M3", 6}, {"F6_E3M2", 6}, {"U8", 8},
      {"I8", 8},          {"F8_E5M2", 8}, {"F8_E4M3", 8}, {"F8_E8M0", 8}, {"F8_E4M3FNUZ", 8},
      {"F8_E5M2FNUZ", 8}, {"I16", 16},    {"U16", 16},    {"F16", 16},    {"BF16", 16},
      {"I32", 32},        {"U32", 32},    {"F32", 32},    {"C64", 64},    {"F64", 64},
      {"I64", 64},        {"U64", 64}};
  ASSERT_EQ(reference.size(), static_cast<std::size_t>(kDtypeCount));
  for (int i = 0; i < kDtypeCount; ++i) {
    const auto d = static_cast<Dtype>(i);
    EXPECT_EQ(dtype_name(d), reference[i].first);
    EXPECT_EQ(dtype_bits(d), reference[i].second) << reference[i].first;
    EXPECT_EQ(parse_dtype(reference[i].first), d);
  }
  EXPECT_FALSE(parse_dtype("F17"));
  EXPECT_FALSE(parse_dtype("f32"));
  EXPECT_FALSE(parse_dtype(""));
}

TEST_F(CheckpointTest, OpensEveryDtype) {
  SafetensorsBuilder b;
  for (int i = 0; i < kDtypeCount; ++i) {
    const auto d = static_cast<Dtype>(i);
    b.add("t_" + std::string(dtype_name(d)), std::string(dtype_name(d)), {2, 4},
          8 * dtype_bits(d) / 8);
  }
  auto p = file("all.safetensors", b.bytes());
  auto c = Checkpoint::open(p);
  ASSERT_EQ(c.tensors().size(), static_cast<std::size_t>(kDtypeCount));
  for (int i = 0; i < kDtypeCount; ++i) {
    const auto d = static_cast<Dtype>(i);
    const auto& t = c.at("t_" + std::string(dtype_name(d)));
    EXPECT_EQ(t.dtype, d);
    EXPECT_EQ(t.shape, (std::vector<std::int64_t>{2, 4}));
    EXPECT_EQ(t.numel(), 8u);
    EXPECT_EQ(t.nbytes, dtype_bits(d));
  }
}

TEST_F(CheckpointTest, OpensSubByteDtypesThatFillWholeBytes) {
  SafetensorsBuilder b;
  b.add("f4", "F4", {2}, 1).add("f6a", "F6_E2M3", {4}, 3).add("f6b", "F6_E3M2", {2, 4}, 6);
  auto c = Checkpoint::open(file("sub.safetensors", b.bytes()));
  EXPECT_EQ(c.at("f4").nbytes, 1u);
  EXPECT_EQ(c.at("f6a").nbytes, 3u);
  EXPECT_EQ(c.at("f6b").nbytes, 6u);
  EXPECT_EQ(c.total_bytes(), 10u);
}

TEST_F(CheckpointTest, OpensScalar) {
  SafetensorsBuilder b;
  b.add("s", "F32", {}, 4);
  auto c = Checkpoint::open(file("scalar.safetensors", b.bytes()));
  const auto& t = c.at("s");
  EXPECT_TRUE(t.shape.empty());
  EXPECT_EQ(t.numel(), 1u);
  EXPECT_EQ(t.nbytes, 4u);
}

TEST_F(CheckpointTest, OpensZeroSizedTensors) {
  SafetensorsBuilder b;
  b.add("a", "F32", {0}, 0)
      .add("b", "F16", {3, 0, 2}, 0)
      .add("c", "U8", {3}, 3)
      .add("d", "I64", {0}, 0);
  auto c = Checkpoint::open(file("zero.safetensors", b.bytes()));
  ASSERT_EQ(c.tensors().size(), 4u);
  EXPECT_EQ(c.at("a").nbytes, 0u);
  EXPECT_EQ(c.at("b").numel(), 0u);
  EXPECT_EQ(c.at("b").shape, (std::vector<std::int64_t>{3, 0, 2}));
  EXPECT_EQ(c.at("d").offset, c.files()[0].header_bytes + 3);
  EXPECT_EQ(c.total_bytes(), 3u);

  SafetensorsBuilder only_empty;
  only_empty.add("e", "BF16", {0, 7}, 0);
  auto c2 = Checkpoint::open(file("only_empty.safetensors", only_empty.bytes()));
  EXPECT_EQ(c2.tensors().size(), 1u);
  EXPECT_EQ(c2.total_bytes(), 0u);
}

TEST_F(CheckpointTest, OpensEmptyHeader) {
  auto c = Checkpoint::open(file_with_header("{}", 0));
  EXPECT_TRUE(c.tensors().empty());
  EXPECT_EQ(c.total_bytes(), 0u);
  ASSERT_EQ(c.files().size(), 1u);
  EXPECT_EQ(c.files()[0].header_bytes, 10u);
  auto padded = Checkpoint::open(file_with_header("{}      ", 0, "padded.safetensors"));
  EXPECT_EQ(padded.files()[0].header_bytes, 16u);
}

TEST_F(CheckpointTest, ReadsMetadata) {
  SafetensorsBuilder b;
  b.metadata("format", "pt").metadata("note", "caf\xc3\xa9").add("w", "F32", {2}, 8);
  auto c = Checkpoint::open(file("meta.safetensors", b.bytes()));
  const auto& md = c.files()[0].metadata;
  ASSERT_EQ(md.size(), 2u);
  EXPECT_EQ(md.at("format"), "pt");
  EXPECT_EQ(md.at("note"), "caf\xc3\xa9");
  EXPECT_EQ(c.tensors().size(), 1u);  // __metadata__ is not a tensor
}

TEST_F(CheckpointTest, AcceptsTrailingWhitespacePadding) {
  const std::string h = "{" + header_entry("a", "U8", {4}, 0, 4) + "}" + std::string(13, ' ');
  auto c = Checkpoint::open(file_with_header(h, 4));
  EXPECT_EQ(c.files()[0].header_bytes, 8 + h.size());
  EXPECT_EQ(c.at("a").offset, 8 + h.size());
}

TEST_F(CheckpointTest, AcceptsLeadingWhitespace) {
  const std::string h = " \n\t\r{" + header_entry("a", "U8", {4}, 0, 4) + "}\n";
  auto c = Checkpoint::open(file_with_header(h, 4));
  EXPECT_EQ(c.at("a").nbytes, 4u);
}

TEST_F(CheckpointTest, AcceptsUtf8TensorNames) {
  const std::string name = "na\xc3\xafve.\xe6\x9d\x83\xe9\x87\x8d";
  const std::string h = "{" + header_entry(name, "U8", {4}, 0, 4) + "}";
  auto c = Checkpoint::open(file_with_header(h, 4));
  EXPECT_NE(c.find(name), nullptr);
}

TEST_F(CheckpointTest, OffsetsAreAbsoluteAndPointAtTheTensorBytes) {
  SafetensorsBuilder b;
  b.metadata("format", "pt")
      .add("x", "F32", {3, 5}, 60)
      .add("y", "BF16", {7}, 14)
      .add("z", "U8", {9}, 9);
  auto p = file("abs.safetensors", b.bytes());
  auto c = Checkpoint::open(p);
  const std::uint64_t data_start = 8 + b.header().size();
  EXPECT_EQ(c.files()[0].header_bytes, data_start);
  EXPECT_EQ(c.files()[0].file_size, b.bytes().size());
  EXPECT_EQ(c.files()[0].path, p);
  std::uint64_t rel = 0;
  for (const char* name : {"x", "y", "z"}) {
    const auto& t = c.at(name);
    EXPECT_EQ(t.file, 0u);
    EXPECT_EQ(t.offset, data_start + rel) << name;
    EXPECT_EQ(test::read_bytes(p, t.offset, t.nbytes), b.data().substr(rel, t.nbytes)) << name;
    rel += t.nbytes;
  }
  EXPECT_EQ(c.total_bytes(), 83u);
}

TEST_F(CheckpointTest, TensorsAreOrderedByOffsetNotByName) {
  const std::string h = "{" + header_entry("a", "U8", {4}, 6, 10) + "," +
                        header_entry("b", "U8", {2}, 4, 6) + "," +
                        header_entry("c", "U8", {4}, 0, 4) + "}";
  auto c = Checkpoint::open(file_with_header(h, 10));
  ASSERT_EQ(c.tensors().size(), 3u);
  EXPECT_EQ(c.tensors()[0].name, "c");
  EXPECT_EQ(c.tensors()[1].name, "b");
  EXPECT_EQ(c.tensors()[2].name, "a");
}

TEST_F(CheckpointTest, FindAndAt) {
  SafetensorsBuilder b;
  b.add("w", "F32", {1}, 4);
  auto p = file("one.safetensors", b.bytes());
  auto c = Checkpoint::open(p);
  EXPECT_EQ(c.source(), p);
  EXPECT_NE(c.find("w"), nullptr);
  EXPECT_EQ(c.find("v"), nullptr);
  try {
    c.at("v");
    ADD_FAILURE() << "at() of an absent name returned";
  } catch (const CheckpointError& e) {
    EXPECT_EQ(e.rule(), "no-such-tensor");
    EXPECT_EQ(e.tensor(), "v");
  }
}

TEST(ParseHeaderTest, OffsetsStayRelativeToTheDataSection) {
  const std::string h =
      "{" + header_entry("a", "U8", {4}, 0, 4) + "," + header_entry("b", "I16", {2}, 4, 8) + "}";
  auto parsed = parse_header(h, 8, "mem");
  ASSERT_EQ(parsed.tensors.size(), 2u);
  EXPECT_EQ(parsed.tensors[1].name, "b");
  EXPECT_EQ(parsed.tensors[1].offset, 4u);
  EXPECT_EQ(parsed.tensors[1].file, 0u);
  try {
    parse_header(h, 9, "in-memory header");
    ADD_FAILURE() << "trailing byte accepted";
  } catch (const CheckpointError& e) {
    EXPECT_EQ(e.rule(), "trailing-bytes");
    EXPECT_EQ(e.file(), "in-memory header");
  }
}

// A header the size of a very large model's (200,000 tensors, 13 MB) parses completely and in
// order; the parse is linear, see docs/PERFORMANCE.md.
TEST(ParseHeaderTest, ParsesTwoHundredThousandTensors) {
  constexpr std::uint64_t kCount = 200'000;
  // Names in an order unlike the offsets', so the sort by offset is exercised.
  std::string h = "{\"__metadata__\":{\"format\":\"pt\"}";
  std::uint64_t offset = 0;
  for (std::uint64_t i = 0; i < kCount; ++i) {
    const std::uint64_t nbytes = i % 2 ? 4 : 2;
    h += "," + header_entry("model.layers." + std::to_string((i * 7919) % kCount) + ".w",
                            i % 2 ? "F16" : "U8", {2}, offset, offset + nbytes);
    offset += nbytes;
  }
  h += "}";
  ASSERT_GT(h.size(), 13'000'000u);
  const auto parsed = parse_header(h, offset, "big.safetensors");
  ASSERT_EQ(parsed.tensors.size(), kCount);
  EXPECT_EQ(parsed.metadata.at("format"), "pt");
  std::uint64_t expected = 0;
  for (std::uint64_t i = 0; i < kCount; ++i) {
    const auto& t = parsed.tensors[i];
    ASSERT_EQ(t.offset, expected) << i;
    ASSERT_EQ(t.name, "model.layers." + std::to_string((i * 7919) % kCount) + ".w");
    ASSERT_EQ(t.dtype, i % 2 ? Dtype::F16 : Dtype::U8);
    expected += t.nbytes;
  }
  EXPECT_EQ(expected, offset);
}

// ---------------------------------------------------------------------------------------------
// Directories.

class ShardedCheckpointTest : public CheckpointTest {
 protected:
  // Two shards: a = {embed, layer0}, b = {layer1, norm}.
  void SetUp() override {
    CheckpointTest::SetUp();
    shard_a_.add("model.layers.0.w", "F32", {2, 2}, 16).add("model.embed.weight", "BF16", {4}, 8);
    shard_b_.add("model.norm.weight", "F32", {3}, 12).add("model.layers.1.w", "F16", {5}, 10);
    ckpt_ = dir_ / "ckpt";
    fs::create_directories(ckpt_);
  }
  void write_shards() {
    write_bytes(ckpt_ / "model-00001-of-00002.safetensors", shard_a_.bytes());
    write_bytes(ckpt_ / "model-00002-of-00002.safetensors", shard_b_.bytes());
  }
  static std::string standard_weight_map() {
    return "{\"model.layers.0.w\":\"model-00001-of-00002.safetensors\","
           "\"model.embed.weight\":\"model-00001-of-00002.safetensors\","
           "\"model.norm.weight\":\"model-00002-of-00002.safetensors\","
           "\"model.layers.1.w\":\"model-00002-of-00002.safetensors\"}";
  }
  void write_index(const std::string& weight_map) {
    write_bytes(ckpt_ / "model.safetensors.index.json",
                "{\"metadata\":{\"total_size\":1},\"weight_map\":" + weight_map + "}");
  }

  SafetensorsBuilder shard_a_, shard_b_;
  fs::path ckpt_;
};

TEST_F(ShardedCheckpointTest, OpensShardedDirectory) {
  write_shards();
  write_index(standard_weight_map());  // total_size is wrong on purpose: it is not the truth
  auto c = Checkpoint::open(ckpt_);
  ASSERT_EQ(c.files().size(), 2u);
  EXPECT_EQ(c.files()[0].path.filename(), "model-00001-of-00002.safetensors");
  EXPECT_EQ(c.files()[1].path.filename(), "model-00002-of-00002.safetensors");
  ASSERT_EQ(c.tensors().size(), 4u);
  EXPECT_EQ(c.tensors()[0].name, "model.layers.0.w");
  EXPECT_EQ(c.tensors()[1].name, "model.embed.weight");
  EXPECT_EQ(c.tensors()[2].name, "model.norm.weight");
  EXPECT_EQ(c.tensors()[3].name, "model.layers.1.w");
  EXPECT_EQ(c.at("model.norm.weight").file, 1u);
  EXPECT_EQ(c.total_bytes(), 46u);
  for (const auto& t : c.tensors()) {
    const auto& f = c.files()[t.file];
    const auto& builder = t.file == 0 ? shard_a_ : shard_b_;
    EXPECT_EQ(test::read_bytes(f.path, t.offset, t.nbytes),
              builder.data().substr(t.offset - f.header_bytes, t.nbytes))
        << t.name;
  }
}

TEST_F(ShardedCheckpointTest, OpensDirectoryWithOneFile) {
  write_bytes(ckpt_ / "model.safetensors", shard_a_.bytes());
  write_bytes(ckpt_ / "config.json", "{}");
  auto c = Checkpoint::open(ckpt_);
  ASSERT_EQ(c.files().size(), 1u);
  EXPECT_EQ(c.files()[0].path, ckpt_ / "model.safetensors");
  EXPECT_EQ(c.tensors().size(), 2u);
}

TEST_F(ShardedCheckpointTest, RejectsMissingShard) {
  write_bytes(ckpt_ / "model-00001-of-00002.safetensors", shard_a_.bytes());
  write_index(standard_weight_map());
  auto e = expect_rejected(ckpt_, "missing-shard", "model-00002-of-00002.safetensors");
  EXPECT_FALSE(e.tensor().empty());
  EXPECT_NE(std::string(e.what()).find(e.tensor()), std::string::npos) << e.what();
}

TEST_F(ShardedCheckpointTest, RejectsTensorMissingFromItsShard) {
  write_shards();
  write_index(
      "{\"model.layers.0.w\":\"model-00001-of-00002.safetensors\","
      "\"model.embed.weight\":\"model-00001-of-00002.safetensors\","
      "\"model.norm.weight\":\"model-00002-of-00002.safetensors\","
      "\"model.layers.1.w\":\"model-00002-of-00002.safetensors\","
      "\"lm_head.weight\":\"model-00002-of-00002.safetensors\"}");
  auto e = expect_rejected(ckpt_, "missing-tensor", "model-00002-of-00002.safetensors");
  EXPECT_EQ(e.tensor(), "lm_head.weight");
}

TEST_F(ShardedCheckpointTest, RejectsTensorMappedToTheWrongShard) {
  write_shards();
  write_index(
      "{\"model.layers.0.w\":\"model-00001-of-00002.safetensors\","
      "\"model.embed.weight\":\"model-00001-of-00002.safetensors\","
      "\"model.norm.weight\":\"model-00001-of-00002.safetensors\","
      "\"model.layers.1.w\":\"model-00002-of-00002.safetensors\"}");
  auto e = expect_rejected(ckpt_, "missing-tensor", "model-00001-of-00002.safetensors");
  EXPECT_EQ(e.tensor(), "model.norm.weight");
}

TEST_F(ShardedCheckpointTest, RejectsTensorDefinedInTwoShards) {
  shard_b_.add("model.embed.weight", "BF16", {4}, 8);
  write_shards();
  write_index(standard_weight_map());
  auto e = expect_rejected(ckpt_, "duplicate-tensor", "model-00002-of-00002.safetensors");
  EXPECT_EQ(e.tensor(), "model.embed.weight");
  EXPECT_NE(e.detail().find("model-00001-of-00002.safetensors"), std::string::npos);
}

TEST_F(ShardedCheckpointTest, RejectsTensorMissingFromTheIndex) {
  shard_b_.add("extra.weight", "U8", {1}, 1);
  write_shards();
  write_index(standard_weight_map());
  auto e = expect_rejected(ckpt_, "unindexed-tensor", "model-00002-of-00002.safetensors");
  EXPECT_EQ(e.tensor(), "extra.weight");
}

TEST_F(ShardedCheckpointTest, RejectsIndexThatIsNotJson) {
  write_shards();
  write_bytes(ckpt_ / "model.safetensors.index.json", "{\"weight_map\": {");
  expect_rejected(ckpt_, "bad-index", "model.safetensors.index.json");
  write_bytes(ckpt_ / "model.safetensors.index.json", "{\"weight_map\":{\"a\":\"x\",\"a\":\"y\"}}");
  expect_rejected(ckpt_, "bad-index", "model.safetensors.index.json");
}

TEST_F(ShardedCheckpointTest, RejectsIndexWithoutWeightMap) {
  write_shards();
  write_bytes(ckpt_ / "model.safetensors.index.json", "{\"metadata\":{\"total_size\":46}}");
  expect_rejected(ckpt_, "bad-index", "model.safetensors.index.json");
  write_bytes(ckpt_ / "model.safetensors.index.json", "{\"weight_map\":[]}");
  expect_rejected(ckpt_, "bad-index", "model.safetensors.index.json");
  write_index("{\"model.layers.0.w\":1}");
  expect_rejected(ckpt_, "bad-index", "model.safetensors.index.json");
}

TEST_F(ShardedCheckpointTest, RejectsShardPathEscapingTheDirectory) {
  write_shards();
  write_bytes(dir_ / "outside.safetensors", shard_a_.bytes());
  for (const std::string shard :
       {"../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors", ""}) {
    SCOPED_TRACE(shard);
    write_index("{\"model.layers.0.w\":\"" + shard + "\"}");
    auto e = expect_rejected(ckpt_, "bad-shard-path", "model.safetensors.index.json");
    EXPECT_EQ(e.tensor(), "model.layers.0.w");
  }
}

TEST_F(ShardedCheckpointTest, RejectsBrokenShardNamingTheShard) {
  write_bytes(ckpt_ / "model-00001-of-00002.safetensors", shard_a_.bytes());
  const std::string b = shard_b_.bytes();
  write_bytes(ckpt_ / "model-00002-of-00002.safetensors", b.substr(0, b.size() - 3));
  write_index(standard_weight_map());
  expect_rejected(ckpt_, "offsets-beyond-eof", "model-00002-of-00002.safetensors");
}

TEST_F(ShardedCheckpointTest, RejectsShardThatIsADirectory) {
  write_bytes(ckpt_ / "model-00001-of-00002.safetensors", shard_a_.bytes());
  fs::create_directories(ckpt_ / "model-00002-of-00002.safetensors");
  write_index(standard_weight_map());
  expect_rejected(ckpt_, "unreadable", "model-00002-of-00002.safetensors");
}

TEST_F(ShardedCheckpointTest, RejectsShardThatIsAFifo) {
  write_bytes(ckpt_ / "model-00001-of-00002.safetensors", shard_a_.bytes());
  const fs::path fifo = ckpt_ / "model-00002-of-00002.safetensors";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  write_index(standard_weight_map());
  auto e = expect_rejected_without_blocking(ckpt_, fifo, "unreadable",
                                            "model-00002-of-00002.safetensors");
  EXPECT_NE(e.detail().find("is a FIFO, not a regular file"), std::string::npos) << e.what();
}

TEST_F(ShardedCheckpointTest, RejectsIndexThatIsAFifo) {
  write_shards();
  const fs::path fifo = ckpt_ / "model.safetensors.index.json";
  ASSERT_EQ(::mkfifo(fifo.c_str(), 0600), 0);
  auto e =
      expect_rejected_without_blocking(ckpt_, fifo, "unreadable", "model.safetensors.index.json");
  EXPECT_NE(e.detail().find("is a FIFO, not a regular file"), std::string::npos) << e.what();
}

TEST_F(ShardedCheckpointTest, RejectsIndexThatCannotBeRead) {
  write_shards();
  fs::create_directories(ckpt_ / "model.safetensors.index.json");
  expect_rejected(ckpt_, "unreadable", "model.safetensors.index.json");
}

TEST_F(ShardedCheckpointTest, RejectsDirectoryWithTwoFilesAndNoIndex) {
  write_shards();
  auto e = expect_rejected(ckpt_, "ambiguous-directory", "ckpt");
  EXPECT_NE(e.detail().find("model-00001-of-00002.safetensors"), std::string::npos);
}

TEST_F(ShardedCheckpointTest, RejectsDirectoryWithoutCheckpoint) {
  write_bytes(ckpt_ / "config.json", "{}");
  expect_rejected(ckpt_, "no-checkpoint", "ckpt");
}

}  // namespace
}  // namespace lema::io
