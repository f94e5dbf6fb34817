#include "lema/runtime/layout.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <fstream>
#include <random>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "lema/io/checkpoint.hpp"
#include "lema/runtime/address_space.hpp"
#include "runtime_fixture.hpp"

namespace lema::test {
namespace {

using runtime::FillExtent;
using runtime::Layout;
using runtime::PageId;

// A tensor table in a scrambled "file order", as writers produce.
std::vector<io::TensorInfo> table(const ModelShape& m, std::uint32_t files, unsigned seed) {
  auto specs = model_tensors(m);
  std::mt19937 rng(seed);
  std::shuffle(specs.begin(), specs.end(), rng);
  std::vector<io::TensorInfo> out;
  std::vector<std::uint64_t> cursor(files, 64);
  for (std::size_t i = 0; i < specs.size(); ++i) {
    io::TensorInfo t;
    t.name = specs[i].name;
    t.dtype = io::Dtype::U8;
    t.shape = {static_cast<std::int64_t>(specs[i].nbytes)};
    t.file = static_cast<std::uint32_t>(i % files);
    t.offset = cursor[t.file];
    t.nbytes = specs[i].nbytes;
    cursor[t.file] += t.nbytes;
    out.push_back(t);
  }
  return out;
}

std::vector<std::filesystem::path> file_names(std::uint32_t n) {
  std::vector<std::filesystem::path> f;
  for (std::uint32_t i = 0; i < n; ++i) f.emplace_back("shard" + std::to_string(i));
  return f;
}

int rank_in_layer(const std::string& name) {
  static const char* kOrder[] = {"input_layernorm", "q_proj",  "k_proj",
                                 "v_proj",          "o_proj",  "post_attention_layernorm",
                                 "gate_proj",       "up_proj", "down_proj"};
  for (int i = 0; i < 9; ++i)
    if (name.find(kOrder[i]) != std::string::npos) return i;
  return 9;
}

TEST(PageSize, DefaultIsGranularityAndMultiplesMustBePowersOfTwo) {
  EXPECT_EQ(runtime::resolve_page_size(std::nullopt, 2_MiB), 2_MiB);
  EXPECT_EQ(runtime::resolve_page_size(8_MiB, 2_MiB), 8_MiB);
  EXPECT_EQ(runtime::resolve_page_size(2_MiB, 2_MiB), 2_MiB);
  for (std::uint64_t bad : {1_MiB, 6_MiB, 3_MiB, std::uint64_t{0}}) {
    try {
      runtime::resolve_page_size(bad, 2_MiB, "--page-size");
      FAIL() << bad;
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("--page-size"), std::string::npos) << e.what();
    }
    try {
      runtime::resolve_page_size(bad, 2_MiB);  // a C++ caller: the option field
      FAIL() << bad;
    } catch (const InvalidArgument& e) {
      EXPECT_EQ(std::string(e.what()).rfind("page_size ", 0), 0u) << e.what();
    }
  }
}

class LayoutProperties : public ::testing::TestWithParam<std::tuple<std::uint64_t, int, unsigned>> {
};

TEST_P(LayoutProperties, LayerMajorAlignedPageAlignedGroupsAndExtentsCoverEveryByte) {
  const auto [page_size, files, seed] = GetParam();
  ModelShape m;
  m.layers = 5;
  const auto tensors = table(m, static_cast<std::uint32_t>(files), seed);
  const Layout layout =
      Layout::plan(tensors, file_names(static_cast<std::uint32_t>(files)), page_size);
  const auto& placed = layout.tensors();
  ASSERT_EQ(placed.size(), tensors.size());

  // Order: embedding, layers 0..N-1 in execution order, model.norm, lm_head, others.
  EXPECT_EQ(placed.front().name, "model.embed_tokens.weight");
  std::size_t i = 1;
  for (int l = 0; l < m.layers; ++l) {
    const std::string prefix = "model.layers." + std::to_string(l) + ".";
    int last_rank = -1;
    std::string last_name;
    ASSERT_TRUE(placed[i].name.starts_with(prefix)) << placed[i].name;
    EXPECT_EQ(placed[i].offset % page_size, 0u) << "layer " << l << " group not page-aligned";
    while (i < placed.size() && placed[i].name.starts_with(prefix)) {
      const int r = rank_in_layer(placed[i].name);
      EXPECT_TRUE(r > last_rank || (r == last_rank && r == 9 && placed[i].name > last_name))
          << placed[i].name;
      last_rank = r;
      last_name = placed[i].name;
      ++i;
    }
  }
  ASSERT_EQ(placed[i].name, "model.norm.weight");
  EXPECT_EQ(placed[i].offset % page_size, 0u);
  EXPECT_EQ(placed[i + 1].name, "lm_head.weight");
  EXPECT_EQ(placed[i + 2].name, "zz_extra.scale");

  std::uint64_t end = 0;
  for (const auto& t : placed) {
    EXPECT_EQ(t.offset % runtime::kTensorAlignment, 0u) << t.name;
    EXPECT_GE(t.offset, end) << t.name << " overlaps its predecessor";
    end = t.offset + t.nbytes;
  }
  EXPECT_EQ(layout.virtual_bytes(), align_up(end, page_size));

  // Extents: sorted and disjoint inside each page, adding up to the tensor bytes, and every
  // tensor byte (sampled) is filled from its own file byte.
  std::uint64_t total_fill = 0;
  for (PageId p = 0; p < layout.page_count(); ++p) {
    std::uint64_t cursor = 0;
    std::uint64_t fill = 0;
    for (const FillExtent& e : layout.extents(p)) {
      EXPECT_GE(e.page_offset, cursor);
      EXPECT_LE(e.page_offset + e.length, page_size);
      cursor = e.page_offset + e.length;
      fill += e.length;
    }
    EXPECT_EQ(fill, layout.page_fill_bytes(p));
    total_fill += fill;
  }
  EXPECT_EQ(total_fill, layout.tensor_bytes());
  auto source_of = [&](std::uint64_t vaddr) -> std::pair<std::uint32_t, std::uint64_t> {
    const auto page = static_cast<PageId>(vaddr / page_size);
    const std::uint64_t in_page = vaddr % page_size;
    for (const FillExtent& e : layout.extents(page))
      if (in_page >= e.page_offset && in_page < e.page_offset + e.length)
        return {e.file, e.file_offset + (in_page - e.page_offset)};
    return {~0u, 0};
  };
  for (const auto& info : tensors) {
    const auto* t = layout.find(info.name);
    ASSERT_NE(t, nullptr);
    EXPECT_EQ(t->nbytes, info.nbytes);
    for (std::uint64_t k = 0; k < info.nbytes; k = k * 3 + 1) {
      const auto [file, offset] = source_of(t->offset + k);
      ASSERT_EQ(file, info.file) << info.name << " byte " << k;
      ASSERT_EQ(offset, info.offset + k) << info.name << " byte " << k;
    }
    const auto [file, offset] = source_of(t->offset + info.nbytes - 1);
    EXPECT_EQ(file, info.file);
    EXPECT_EQ(offset, info.offset + info.nbytes - 1);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, LayoutProperties,
                         ::testing::Combine(::testing::Values(2_MiB, 4_MiB),
                                            ::testing::Values(1, 3), ::testing::Values(1u, 7u)));

TEST(Layout, SmallPagesSpanTensorsAndShards) {
  ModelShape m;
  m.layers = 2;
  const auto tensors = table(m, 2, 3);
  // Pages smaller than a tensor and tensors straddling pages: 4 KiB pages.
  const Layout layout = Layout::plan(tensors, file_names(2), 4096);
  std::size_t multi_file_pages = 0;
  for (PageId p = 0; p < layout.page_count(); ++p) {
    const auto ex = layout.extents(p);
    for (std::size_t i = 1; i < ex.size(); ++i)
      if (ex[i].file != ex[0].file) ++multi_file_pages;
  }
  EXPECT_GT(multi_file_pages, 0u);
  EXPECT_EQ(layout.find("nope"), nullptr);
}

TEST(Layout, ExtentsReconstructTheFileBytes) {
  TempDir dir("layout");
  ModelShape m;
  m.shards = 2;
  const auto path = write_model(dir.path(), m);
  const auto ckpt = io::Checkpoint::open(path);
  const Layout layout = Layout::plan(ckpt, 2_MiB);
  std::vector<std::byte> image(layout.virtual_bytes(), std::byte{0});
  for (PageId p = 0; p < layout.page_count(); ++p) {
    for (const FillExtent& e : layout.extents(p)) {
      std::ifstream in(layout.files()[e.file], std::ios::binary);
      in.seekg(static_cast<std::streamoff>(e.file_offset));
      in.read(reinterpret_cast<char*>(image.data() + p * layout.page_size() + e.page_offset),
              static_cast<std::streamsize>(e.length));
      ASSERT_TRUE(in);
    }
  }
  for (const auto& info : ckpt.tensors()) {
    const auto* t = layout.find(info.name);
    ASSERT_NE(t, nullptr);
    const auto expect = file_bytes(ckpt, info);
    ASSERT_EQ(std::memcmp(image.data() + t->offset, expect.data(), expect.size()), 0) << info.name;
  }
}

TEST(AddressSpace, PageArithmetic) {
  auto backend = runtime::make_host_backend();
  ModelShape m;
  const auto tensors = table(m, 1, 1);
  runtime::AddressSpace space(*backend, Layout::plan(tensors, file_names(1), 2_MiB));
  EXPECT_EQ(space.size(), space.layout().virtual_bytes());
  EXPECT_TRUE(space.contains(space.base()));
  EXPECT_TRUE(space.contains(space.base() + space.size() - 1));
  EXPECT_FALSE(space.contains(space.base() + space.size()));
  EXPECT_FALSE(space.contains(&m));
  const auto q = space.tensor("model.layers.1.self_attn.q_proj.weight");
  EXPECT_EQ(q.data,
            space.base() + space.layout().find("model.layers.1.self_attn.q_proj.weight")->offset);
  EXPECT_THROW(space.tensor("missing"), InvalidArgument);
  EXPECT_FALSE(space.find("missing").has_value());

  EXPECT_EQ(space.page_of(space.base() + 2_MiB), 1u);
  EXPECT_EQ(space.page_address(2), space.base() + 4_MiB);
  auto r = space.pages_of(space.base() + 2_MiB - 1, 2);
  EXPECT_EQ(r.first, 0u);
  EXPECT_EQ(r.count, 2u);
  r = space.pages_of(space.base() + 2_MiB, 2_MiB);
  EXPECT_EQ(r.first, 1u);
  EXPECT_EQ(r.count, 1u);
  EXPECT_TRUE(space.pages_of(space.base(), 0).empty());
  EXPECT_THROW(space.pages_of(space.base() + space.size() - 1, 2), InvalidArgument);
  EXPECT_THROW(space.pages_of(&m, 1), InvalidArgument);
}

}  // namespace
}  // namespace lema::test
