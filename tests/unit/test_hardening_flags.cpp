// Numeric flags outside their range are refused before any work starts, with the flag and its valid
// range named; output files are checked before long work and never left half-written.
#include <gtest/gtest.h>

#include <string>
#include <vector>

#include "test_util.h"

namespace subllm {
namespace hardening_flags_tests {

using testing::CliResult;
using testing::run_cli_line;
using testing::TempDir;

struct BadFlag {
  std::string args;      // after `subllm`
  std::string flag;      // named in the message
  std::string interval;  // the valid range, as the message writes it
};

void PrintTo(const BadFlag& b, std::ostream* os) { *os << "subllm " << b.args; }

class RangeCheckedFlag : public ::testing::TestWithParam<BadFlag> {};

TEST_P(RangeCheckedFlag, IsRefusedWithItsRange) {
  const BadFlag& b = GetParam();
  // The model and data folders do not exist: the flag must be refused before anything reads them.
  const CliResult r = run_cli_line(b.args);
  EXPECT_NE(r.code, 0) << b.args << "\n" << r.output;
  EXPECT_NE(r.output.find(b.flag), std::string::npos) << b.args << "\n" << r.output;
  EXPECT_NE(r.output.find(b.interval), std::string::npos) << b.args << "\n" << r.output;
}

const char* const kGen = "generate -m /nonexistent/model ";
const char* const kTrain = "train --data /nonexistent/data -o /nonexistent/run ";

INSTANTIATE_TEST_SUITE_P(
    Cli, RangeCheckedFlag,
    ::testing::Values(
        BadFlag{std::string(kGen) + "-n 0", "--n-predict", "[1, inf)"},
        BadFlag{std::string(kGen) + "-n -5", "--n-predict", "[1, inf)"},
        BadFlag{std::string(kGen) + "--temp -1", "--temp", "[0, inf)"},
        BadFlag{std::string(kGen) + "--temp nan", "--temp", "[0, inf)"},
        BadFlag{std::string(kGen) + "--temp 1e999", "--temp", "[0, inf)"},
        BadFlag{std::string(kGen) + "--top-p 2", "--top-p", "(0, 1]"},
        BadFlag{std::string(kGen) + "--top-p 0", "--top-p", "(0, 1]"},
        BadFlag{std::string(kGen) + "--top-p -1", "--top-p", "(0, 1]"},
        BadFlag{std::string(kGen) + "--top-k -1", "--top-k", "[0, inf)"},
        BadFlag{std::string(kGen) + "--repeat-penalty 0", "--repeat-penalty", "(0, inf)"},
        BadFlag{std::string(kGen) + "--repeat-penalty -2", "--repeat-penalty", "(0, inf)"},
        BadFlag{std::string(kGen) + "--keep-threshold nan", "--keep-threshold", "(-inf, inf)"},
        BadFlag{std::string(kGen) + "-t -1", "--threads", "[0, 4096]"},
        BadFlag{std::string(kTrain) + "--lr nan", "--lr", "(0, inf)"},
        BadFlag{std::string(kTrain) + "--lr -1", "--lr", "(0, inf)"},
        BadFlag{std::string(kTrain) + "--adam-eps 0", "--adam-eps", "(0, inf)"},
        BadFlag{std::string(kTrain) + "--tokens -5", "--tokens", "[1, inf)"},
        BadFlag{std::string(kTrain) + "--beta1 1.5", "--beta1", "[0, 1)"},
        BadFlag{std::string(kTrain) + "--beta2 1", "--beta2", "[0, 1)"},
        BadFlag{std::string(kTrain) + "--warmup -5", "--warmup", "[0, inf)"},
        BadFlag{std::string(kTrain) + "--steps 0", "--steps", "[1, inf)"},
        BadFlag{std::string(kTrain) + "--batch 0", "--batch", "[1, inf)"},
        BadFlag{std::string(kTrain) + "--seq -3", "--seq", "[1, inf)"},
        BadFlag{std::string(kTrain) + "--keep 0", "--keep", "[1, inf)"},
        BadFlag{std::string(kTrain) + "--min-lr-ratio 2", "--min-lr-ratio", "[0, 1]"},
        BadFlag{std::string(kTrain) + "--weight-decay -0.1", "--weight-decay", "[0, inf)"},
        BadFlag{std::string(kTrain) + "--balancer-window 0.5", "--balancer-window", "(0, 0.5)"},
        BadFlag{std::string(kTrain) + "--layers 0", "--layers", "[1, inf)"},
        BadFlag{std::string(kTrain) + "--eval-every -1", "--eval-every", "[0, inf)"},
        BadFlag{"eval ppl -m /nonexistent --data /nonexistent --max-tokens -1", "--max-tokens", "[0, inf)"},
        BadFlag{"bench paper --lengths 256,0", "--lengths", "[1, inf)"},
        BadFlag{"prepare -o /nonexistent/data --shard-tokens 0", "--shard-tokens", "[1, inf)"},
        BadFlag{"plot /nonexistent/run -o /nonexistent/x.png --width 5", "--width", "[64, 16384]"}));

TEST(RangeCheckedFlags, OrderedPairIsChecked) {
  const CliResult r = run_cli_line(std::string(kTrain) + "--param-min-rms 0.5 --param-max-rms 0.1");
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("--param-min-rms must be below --param-max-rms"), std::string::npos) << r.output;
}

TEST(FewshotPredictions, UnwritablePathFailsBeforeTheModelLoads) {
  TempDir tmp("flags");
  testing::write_file(tmp.file("items.jsonl"), "{\"text\": \"good\", \"label\": 0}\n");
  const std::string items = tmp.file("items.jsonl");
  // The model folder does not exist either: the predictions path is the first error.
  const CliResult r = run_cli_line("eval fewshot -m /nonexistent/model --task sst2 --train " + items + " --test " + items +
                           " --predictions " + tmp.file("no/such/folder/p.jsonl"));
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find("cannot write --predictions"), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("/nonexistent/model"), std::string::npos) << r.output;
}

TEST(FewshotPredictions, FailedRunLeavesNoFile) {
  TempDir tmp("flags");
  testing::write_file(tmp.file("items.jsonl"), "{\"text\": \"good\", \"label\": 0}\n");
  const std::string items = tmp.file("items.jsonl");
  const CliResult r = run_cli_line("eval fewshot -m /nonexistent/model --task sst2 --train " + items + " --test " + items +
                           " --predictions " + tmp.file("p.jsonl"));
  EXPECT_NE(r.code, 0);
  // Neither the file nor its temporary is left behind by the failed evaluation.
  for (const auto& e : std::filesystem::directory_iterator(tmp.path()))
    EXPECT_EQ(e.path().filename().string().rfind("p.jsonl", 0), std::string::npos) << e.path();
}

}  // namespace hardening_flags_tests
}  // namespace subllm
