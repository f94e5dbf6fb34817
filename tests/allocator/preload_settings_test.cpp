// The hook's size parser (allocator/preload/src/settings.cpp, allocation-free) against the
// project's lema::parse_size, which reads --budget: the same text means the same bytes, and what
// one refuses the other refuses.
#include <gtest/gtest.h>

#include <cstdlib>
#include <string>

#include "lema/base/error.hpp"
#include "lema/base/units.hpp"
#include "settings.hpp"

namespace {

TEST(PreloadSettings, SizesParseAsTheBudgetFlagDoes) {
  for (const char* text :
       {"0", "4096", "1M", "1m", "64MiB", "64 MiB", " 2G ", "1.5GiB", "1.5 gb", "3T", "512k",
        "512KB", "7b", "0.5M", "0.001K", "1844674407370955159", "17179869183G", "16777215T",
        "1.000000001G"}) {
    SCOPED_TRACE(text);
    std::uint64_t got = 0;
    ASSERT_TRUE(lema::preload::parse_size(text, &got));
    EXPECT_EQ(got, lema::parse_size(text));
  }
}

TEST(PreloadSettings, MalformedOrOverflowingSizesAreRefusedByBoth) {
  for (const char* text : {"", " ", "M", "12X", "1.5.2M", "-5G", "1 2M", "64MiBs", "0x10",
                           "18446744073709551615", "17179869184G", "16777216T", "1e9"}) {
    SCOPED_TRACE(text);
    std::uint64_t got = 0;
    EXPECT_FALSE(lema::preload::parse_size(text, &got));
    EXPECT_THROW(lema::parse_size(text), lema::InvalidArgument);
  }
}

TEST(PreloadSettings, ABadSettingTurnsTheHookToPassThrough) {
  ::setenv("LEMA_PRELOAD_LOG", "off", 1);
  ::setenv("LEMA_BUDGET", "64M", 1);
  ::setenv("LEMA_PRELOAD_THRESHOLD", "4M", 1);
  lema::preload::Settings good = lema::preload::read_settings();
  EXPECT_TRUE(good.managed);
  EXPECT_EQ(good.budget, 64u << 20);
  EXPECT_EQ(good.threshold, 4u << 20);
  ::setenv("LEMA_PRELOAD_TABLE", "100", 1);
  EXPECT_EQ(lema::preload::read_settings().table_entries, 128u);  // rounded up to a power of 2
  ::setenv("LEMA_PRELOAD_THRESHOLD", "4 furlongs", 1);
  EXPECT_FALSE(lema::preload::read_settings().managed);
  for (const char* name : {"LEMA_PRELOAD_LOG", "LEMA_BUDGET", "LEMA_PRELOAD_THRESHOLD",
                           "LEMA_PRELOAD_TABLE"})
    ::unsetenv(name);
}

}  // namespace
