#include <gtest/gtest.h>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"

using namespace lema;

TEST(ParseSize, PlainBytesAndUnits) {
  EXPECT_EQ(parse_size("4096"), 4096u);
  EXPECT_EQ(parse_size("64MiB"), 64_MiB);
  EXPECT_EQ(parse_size("64 MiB"), 64_MiB);
  EXPECT_EQ(parse_size("2KiB"), 2_KiB);
  EXPECT_EQ(parse_size("1GiB"), 1_GiB);
  EXPECT_EQ(parse_size("1.5GiB"), 1_GiB + 512_MiB);
  EXPECT_EQ(parse_size("3m"), 3_MiB);
  EXPECT_EQ(parse_size("0"), 0u);
}

TEST(ParseSize, RejectsMalformedWithTheSettingName) {
  for (const char* bad :
       {"", "MiB", "12 parsecs", "1.2.3", "-4", "99999999999999999999", "20000000TiB"}) {
    try {
      parse_size(bad, "--budget");
      FAIL() << "accepted '" << bad << "'";
    } catch (const InvalidArgument& e) {
      EXPECT_NE(std::string(e.what()).find("--budget"), std::string::npos) << e.what();
    }
  }
}

TEST(FormatSize, ReadsLikeAPerson) {
  EXPECT_EQ(format_size(512), "512 B");
  EXPECT_EQ(format_size(64_MiB), "64 MiB");
  EXPECT_EQ(format_size(1_GiB + 512_MiB), "1.50 GiB");
}
