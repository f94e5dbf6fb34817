// The safetensors writer: byte-exact against the reference writer, atomic replacement, and
// streaming of tensors larger than its buffer.
#include <gtest/gtest.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <stdexcept>
#include <string>
#include <vector>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/io/safetensors_writer.hpp"

namespace fs = std::filesystem;
using lema::io::Dtype;
using lema::io::TensorToWrite;
using lema::operator""_MiB;

namespace {

class WriterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() /
           ("lema_writer_test_" + std::to_string(::getpid()) + "_" +
            ::testing::UnitTest::GetInstance()->current_test_info()->name());
    fs::remove_all(dir_);
    fs::create_directories(dir_);
  }
  void TearDown() override { fs::remove_all(dir_); }

  std::vector<std::string> entries() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(dir_)) names.push_back(e.path().filename());
    std::sort(names.begin(), names.end());
    return names;
  }

  fs::path dir_;
};

std::string read_all(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

// A tensor whose bytes are given in full.
TensorToWrite bytes_tensor(std::string name, Dtype dtype, std::vector<std::int64_t> shape,
                           std::vector<unsigned char> bytes) {
  return {std::move(name), dtype, std::move(shape),
          [bytes = std::move(bytes)](std::span<std::byte> out, std::uint64_t offset) {
            ASSERT_LE(offset + out.size(), bytes.size());
            std::memcpy(out.data(), bytes.data() + offset, out.size());
          }};
}

TEST_F(WriterTest, MatchesTheReferenceWriterByteForByte) {
  // Produced by the reference package (safetensors 0.8.0, safetensors.torch.save) for
  //   {"b": f32 [[1,2],[3,4]], "a": i8 [1,2,3], "c": bf16 [1.5], "z": f16 zeros(0,3),
  //    "s": i64 scalar 7}, metadata {"format": "pt"}
  const std::string expected_header =
      R"({"__metadata__":{"format":"pt"},"s":{"dtype":"I64","shape":[],"data_offsets":[0,8]},)"
      R"("b":{"dtype":"F32","shape":[2,2],"data_offsets":[8,24]},)"
      R"("c":{"dtype":"BF16","shape":[1],"data_offsets":[24,26]},)"
      R"("z":{"dtype":"F16","shape":[0,3],"data_offsets":[26,26]},)"
      R"("a":{"dtype":"I8","shape":[3],"data_offsets":[26,29]}}     )";
  const std::vector<unsigned char> expected_data = {7,   0,  0,   0,  0, 0, 0,   0,  // s
                                                    0,   0,  128, 63, 0, 0, 0,   64,
                                                    0,   0,  64,  64, 0, 0, 128, 64,  // b
                                                    192, 63,                          // c
                                                    1,   2,  3};                      // a
  std::string expected = std::string("\x38\x01\x00\x00\x00\x00\x00\x00", 8) + expected_header +
                         std::string(expected_data.begin(), expected_data.end());
  ASSERT_EQ(expected.size(), 349u);

  std::vector<TensorToWrite> tensors;
  tensors.push_back(bytes_tensor("b", Dtype::F32, {2, 2},
                                 {0, 0, 128, 63, 0, 0, 0, 64, 0, 0, 64, 64, 0, 0, 128, 64}));
  tensors.push_back(bytes_tensor("a", Dtype::I8, {3}, {1, 2, 3}));
  tensors.push_back(bytes_tensor("c", Dtype::BF16, {1}, {192, 63}));
  tensors.push_back(bytes_tensor("z", Dtype::F16, {0, 3}, {}));
  tensors.push_back(bytes_tensor("s", Dtype::I64, {}, {7, 0, 0, 0, 0, 0, 0, 0}));
  lema::io::write_safetensors(dir_ / "ref.safetensors", std::move(tensors), {{"format", "pt"}});

  EXPECT_EQ(read_all(dir_ / "ref.safetensors"), expected);
  EXPECT_EQ(entries(), std::vector<std::string>{"ref.safetensors"});
}

TEST_F(WriterTest, EmptyFileIsTheReferenceEmptyFile) {
  // serialize({}, None) in the reference: "{}" padded to 8.
  lema::io::write_safetensors(dir_ / "empty.safetensors", {});
  EXPECT_EQ(read_all(dir_ / "empty.safetensors"),
            std::string("\x08\x00\x00\x00\x00\x00\x00\x00{}      ", 16));
}

TEST_F(WriterTest, OrdersByDescendingDtypeThenName) {
  // The order the reference writer produced for one element of each of these dtypes.
  const std::vector<std::pair<std::string, Dtype>> expected = {
      {"l", Dtype::U64},     {"d", Dtype::I64},     {"c", Dtype::F64},     {"m", Dtype::C64},
      {"f", Dtype::F32},     {"e", Dtype::I32},     {"b", Dtype::BF16},    {"a", Dtype::F16},
      {"k", Dtype::F8_E8M0}, {"i", Dtype::F8_E4M3}, {"j", Dtype::F8_E5M2}, {"h", Dtype::U8},
      {"g", Dtype::BOOL}};
  std::vector<TensorToWrite> tensors;
  for (auto it = expected.rbegin(); it != expected.rend(); ++it) {
    tensors.push_back({it->first, it->second, {1}, [](std::span<std::byte> out, std::uint64_t) {
                         std::memset(out.data(), 0, out.size());
                       }});
  }
  lema::io::write_safetensors(dir_ / "order.safetensors", std::move(tensors));
  const std::string file = read_all(dir_ / "order.safetensors");
  std::uint64_t n = 0;
  std::memcpy(&n, file.data(), 8);
  auto header = nlohmann::ordered_json::parse(file.substr(8, n));
  std::vector<std::string> names;
  for (const auto& [key, value] : header.items()) names.push_back(key);
  ASSERT_EQ(names.size(), expected.size());
  for (std::size_t i = 0; i < names.size(); ++i) EXPECT_EQ(names[i], expected[i].first);
  EXPECT_EQ(n % 8, 0u);
}

TEST_F(WriterTest, StreamsALargeTensorInBoundedPieces) {
  // 20 MiB + 3: more than the writer's buffer, not a multiple of it.
  const std::uint64_t size = 20_MiB + 3;
  std::uint64_t expected_offset = 0, largest_piece = 0, calls = 0;
  std::vector<TensorToWrite> tensors;
  tensors.push_back({"big",
                     Dtype::U8,
                     {static_cast<std::int64_t>(size)},
                     [&](std::span<std::byte> out, std::uint64_t offset) {
                       EXPECT_EQ(offset, expected_offset);  // increasing, no gaps
                       for (std::size_t i = 0; i < out.size(); ++i) {
                         out[i] = static_cast<std::byte>((offset + i) * 2654435761u >> 13);
                       }
                       expected_offset += out.size();
                       largest_piece = std::max<std::uint64_t>(largest_piece, out.size());
                       ++calls;
                     }});
  tensors.push_back(bytes_tensor("small", Dtype::U8, {2}, {9, 8}));
  lema::io::write_safetensors(dir_ / "big.safetensors", std::move(tensors));
  EXPECT_EQ(expected_offset, size);
  EXPECT_GT(calls, 1u);
  EXPECT_LE(largest_piece, 8_MiB);

  const std::string file = read_all(dir_ / "big.safetensors");
  std::uint64_t n = 0;
  std::memcpy(&n, file.data(), 8);
  auto header = nlohmann::json::parse(file.substr(8, n));
  ASSERT_EQ(file.size(), 8 + n + size + 2);
  const auto begin = header["big"]["data_offsets"][0].get<std::uint64_t>();
  const char* data = file.data() + 8 + n + begin;
  for (std::uint64_t i = 0; i < size; i += 4099) {
    ASSERT_EQ(static_cast<unsigned char>(data[i]),
              static_cast<unsigned char>(i * 2654435761u >> 13))
        << "at " << i;
  }
  EXPECT_EQ(static_cast<unsigned char>(data[size - 1]),
            static_cast<unsigned char>((size - 1) * 2654435761u >> 13));
}

TEST_F(WriterTest, ReplacesTheTargetOnlyWhenComplete) {
  const fs::path target = dir_ / "model.safetensors";
  lema::io::write_file_atomically(target, "old contents");
  bool checked = false;
  std::vector<TensorToWrite> tensors;
  tensors.push_back({"t", Dtype::F32, {4}, [&](std::span<std::byte> out, std::uint64_t) {
                       // While the new file is being produced the old one is still in place,
                       // and the new bytes live under another name in the same directory.
                       EXPECT_EQ(read_all(target), "old contents");
                       EXPECT_EQ(entries().size(), 2u);
                       checked = true;
                       std::memset(out.data(), 0, out.size());
                     }});
  lema::io::write_safetensors(target, std::move(tensors));
  EXPECT_TRUE(checked);
  // {"t":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}} is 56 bytes, already aligned.
  EXPECT_EQ(read_all(target).size(), 8u + 56u + 16u);
  EXPECT_EQ(entries(), std::vector<std::string>{"model.safetensors"});
}

TEST_F(WriterTest, FailureLeavesTheOldFileAndNoTemporary) {
  const fs::path target = dir_ / "model.safetensors";
  lema::io::write_file_atomically(target, "old contents");
  std::vector<TensorToWrite> tensors;
  tensors.push_back({"t", Dtype::U8, {100}, [](std::span<std::byte>, std::uint64_t) {
                       throw std::runtime_error("generator failed");
                     }});
  EXPECT_THROW(lema::io::write_safetensors(target, std::move(tensors)), std::runtime_error);
  EXPECT_EQ(read_all(target), "old contents");
  EXPECT_EQ(entries(), std::vector<std::string>{"model.safetensors"});
}

TEST_F(WriterTest, WriteFileAtomicallyReplacesContents) {
  const fs::path target = dir_ / "config.json";
  lema::io::write_file_atomically(target, "first");
  lema::io::write_file_atomically(target, "second, longer");
  EXPECT_EQ(read_all(target), "second, longer");
  EXPECT_EQ(entries(), std::vector<std::string>{"config.json"});
}

TEST_F(WriterTest, MissingDirectoryIsASystemError) {
  EXPECT_THROW(lema::io::write_file_atomically(dir_ / "no" / "such" / "x", "x"), lema::SystemError);
  EXPECT_THROW(lema::io::write_safetensors(dir_ / "no" / "x.safetensors", {}), lema::SystemError);
}

TEST_F(WriterTest, RejectsBadTensorLists) {
  auto zero = [](std::span<std::byte> out, std::uint64_t) {
    std::memset(out.data(), 0, out.size());
  };
  std::vector<TensorToWrite> twice{{"x", Dtype::U8, {1}, zero}, {"x", Dtype::F32, {1}, zero}};
  EXPECT_THROW(lema::io::write_safetensors(dir_ / "a.safetensors", twice), lema::InvalidArgument);
  std::vector<TensorToWrite> reserved{{"__metadata__", Dtype::U8, {1}, zero}};
  EXPECT_THROW(lema::io::write_safetensors(dir_ / "a.safetensors", reserved),
               lema::InvalidArgument);
  std::vector<TensorToWrite> negative{{"x", Dtype::U8, {-1}, zero}};
  EXPECT_THROW(lema::io::write_safetensors(dir_ / "a.safetensors", negative),
               lema::InvalidArgument);
  std::vector<TensorToWrite> bad_utf8{{"\xff\xfe", Dtype::U8, {1}, zero}};
  EXPECT_THROW(lema::io::write_safetensors(dir_ / "a.safetensors", bad_utf8),
               lema::InvalidArgument);
  EXPECT_TRUE(entries().empty());
}

TEST(TensorNbytes, CountsBitsAndChecksOverflow) {
  using lema::io::tensor_nbytes;
  const std::vector<std::int64_t> scalar{}, empty{0, 3}, m{4096, 11008}, odd{3}, huge{1LL << 62, 4};
  EXPECT_EQ(tensor_nbytes(Dtype::F64, scalar), 8u);
  EXPECT_EQ(tensor_nbytes(Dtype::F16, empty), 0u);
  EXPECT_EQ(tensor_nbytes(Dtype::BF16, m), 4096u * 11008u * 2u);
  EXPECT_EQ(tensor_nbytes(Dtype::F4, std::vector<std::int64_t>{4}), 2u);
  EXPECT_EQ(tensor_nbytes(Dtype::F6_E2M3, std::vector<std::int64_t>{4}), 3u);
  EXPECT_THROW(tensor_nbytes(Dtype::F4, odd), lema::InvalidArgument);
  EXPECT_THROW(tensor_nbytes(Dtype::U8, huge), lema::InvalidArgument);
  EXPECT_THROW(tensor_nbytes(Dtype::F32, std::vector<std::int64_t>{1LL << 62}),
               lema::InvalidArgument);
}

}  // namespace
