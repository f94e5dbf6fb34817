// --dist-backend: auto follows the training device (NCCL on CUDA where the build has it, Gloo
// otherwise); nccl on the CPU, nccl in a build without it and unknown names are refused with
// an InvalidArgument naming the setting (Note [Backend choice]).
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

#include "lema/base/error.hpp"
#include "lema/trainer/dist_backend.hpp"

namespace lema::trainer {
namespace {

using ::testing::HasSubstr;

std::string refusal(const char* choice, const char* device, bool has_nccl) {
  try {
    choose_dist_backend(choice, device, has_nccl);
  } catch (const InvalidArgument& e) {
    return e.what();
  }
  return "(accepted)";
}

TEST(DistBackend, AutoPicksNcclOnCudaAndGlooOnTheCpu) {
  EXPECT_EQ(choose_dist_backend("auto", "cpu", true), DistBackend::kGloo);
  EXPECT_EQ(choose_dist_backend("auto", "cuda", true), DistBackend::kNccl);
  EXPECT_EQ(choose_dist_backend("auto", "cuda:1", true), DistBackend::kNccl);
}

TEST(DistBackend, AutoFallsBackToGlooWhereTheBuildHasNoNccl) {
  EXPECT_EQ(choose_dist_backend("auto", "cuda", false), DistBackend::kGloo);
  EXPECT_EQ(choose_dist_backend("auto", "cpu", false), DistBackend::kGloo);
}

TEST(DistBackend, NamedBackendsAreKept) {
  EXPECT_EQ(choose_dist_backend("gloo", "cpu", true), DistBackend::kGloo);
  EXPECT_EQ(choose_dist_backend("gloo", "cuda", true), DistBackend::kGloo);
  EXPECT_EQ(choose_dist_backend("nccl", "cuda:0", true), DistBackend::kNccl);
  EXPECT_STREQ(dist_backend_name(DistBackend::kNccl), "nccl");
  EXPECT_STREQ(dist_backend_name(DistBackend::kGloo), "gloo");
}

TEST(DistBackend, NcclOnTheCpuIsRefusedInOneLine) {
  const std::string why = refusal("nccl", "cpu", true);
  EXPECT_THAT(why, HasSubstr("--dist-backend nccl"));
  EXPECT_THAT(why, HasSubstr("--device cpu"));
  EXPECT_EQ(why.find('\n'), std::string::npos);
}

TEST(DistBackend, NcclWithoutNcclInTheBuildIsRefusedInOneLine) {
  const std::string why = refusal("nccl", "cuda", false);
  EXPECT_THAT(why, HasSubstr("this build of LEMA has no NCCL"));
  EXPECT_EQ(why.find('\n'), std::string::npos);
}

TEST(DistBackend, UnknownNamesAreRefused) {
  EXPECT_THAT(refusal("mpi", "cpu", true), HasSubstr("--dist-backend mpi: give auto, gloo or nccl"));
  EXPECT_THAT(refusal("", "cuda", true), HasSubstr("give auto, gloo or nccl"));
  EXPECT_THAT(refusal("NCCL", "cuda", true), HasSubstr("give auto, gloo or nccl"));
}

}  // namespace
}  // namespace lema::trainer
