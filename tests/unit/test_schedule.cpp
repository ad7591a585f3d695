// Eden's epoch as the trainer feeds it: the data seen so far, fractional (the default), or
// the passes completed (`--eden-epoch completed`), against the formula worked out here.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "subllm/dataset.h"
#include "subllm/eden.h"
#include "subllm/error.h"
#include "subllm/prepare.h"
#include "subllm/schedule.h"
#include "test_util.h"

namespace subllm {
namespace schedule_tests {

using testing::error_of;
using testing::TempDir;

// Eden written out: b counts the step about to be taken from 1, e the epochs that count.
double eden_by_hand(double base, long b, double e, double B, double E, int warmup, double start) {
  const double w = b >= warmup ? 1.0 : start + (1.0 - start) * (double)b / warmup;
  return base * std::pow(1.0 + (double)b * b / (B * B), -0.25) * std::pow(1.0 + e * e / (E * E), -0.25) * w;
}

LrSchedule recorded_run_schedule() {
  // docs/RESULTS.md's ScaledAdam runs: --recipe paper with 50 warm-up steps from 0.5,
  // B = 5000, E = a third of the run (400 steps of 8 x 512 tokens over 2.84 M tokens).
  LrSchedule lr;
  lr.kind = "eden";
  lr.base_lr = 0.045f;
  lr.warmup_steps = 50;
  lr.eden.lr_batches = 5000;
  lr.eden.lr_epochs = 400.0 * 4096 / 2.84e6 / 3.0;
  return lr;
}

TEST(EdenEpoch, FractionalCountsTheDataSeenCompletedOnlyWholePasses) {
  LrSchedule lr;
  lr.kind = "eden";
  lr.base_lr = 0.04f;
  lr.warmup_steps = 20;
  lr.eden.lr_batches = 300;
  lr.eden.lr_epochs = 0.7;
  lr.eden.warmup_start = 0.5f;
  EXPECT_EQ(lr.eden.epoch_mode, EdenEpoch::Fractional);  // the paper's reading is the default
  for (long step : {0L, 9L, 19L, 20L, 250L})
    for (double epoch : {0.0, 0.25, 0.999, 1.0, 1.6, 2.0, 3.75}) {
      lr.eden.epoch_mode = EdenEpoch::Fractional;
      EXPECT_NEAR(lr.at(step, epoch), eden_by_hand(0.04, step + 1, epoch, 300, 0.7, 20, 0.5), 1e-8)
          << "fractional, step " << step << " epoch " << epoch;
      lr.eden.epoch_mode = EdenEpoch::Completed;
      EXPECT_NEAR(lr.at(step, epoch), eden_by_hand(0.04, step + 1, std::floor(epoch), 300, 0.7, 20, 0.5), 1e-8)
          << "completed, step " << step << " epoch " << epoch;
    }
  // Eden2 has no epoch term, so the count does not matter.
  lr.kind = "eden2";
  lr.eden.epoch_mode = EdenEpoch::Fractional;
  const float a = lr.at(100, 2.5);
  lr.eden.epoch_mode = EdenEpoch::Completed;
  EXPECT_EQ(lr.at(100, 2.5), a);

  EXPECT_EQ(parse_eden_epoch("fractional"), EdenEpoch::Fractional);
  EXPECT_EQ(parse_eden_epoch("completed"), EdenEpoch::Completed);
  EXPECT_STREQ(eden_epoch_name(EdenEpoch::Completed), "completed");
  EXPECT_NE(error_of([] { parse_eden_epoch("whole"); }).find("fractional or completed"), std::string::npos);
}

TEST(EdenEpoch, TheRecordedSubEpochRunDiffersByAlmostHalf) {
  // The last step (index 399) of the recorded 0.58-epoch run: data seen 399 x 4096 tokens.
  LrSchedule lr = recorded_run_schedule();
  const double seen = 399.0 * 4096 / 2.84e6;
  EXPECT_NEAR(lr.at(399, seen), 0.0253, 5e-5);
  lr.eden.epoch_mode = EdenEpoch::Completed;
  EXPECT_NEAR(lr.at(399, seen), 0.0449, 5e-5);  // still in the first pass: e = 0
}

// `subllm train --eden-epoch MODE` on a corpus it passes over more than twice: each step's
// logged lr against the formula with e = the data seen before the step (or its floor).
std::vector<double> logged_lrs(const std::string& data, const std::string& run, const std::string& mode, int steps) {
  const std::string cmd = std::string(SUBLLM_CLI_PATH) + " train --data " + data + " --out " + run +
                          " --dim 16 --layers 1 --heads 2 --batch 4 --seq 32 --steps " + std::to_string(steps) +
                          " --optimizer scaled-adam --schedule eden --lr 0.045 --warmup 10 --warmup-start 0.5"
                          " --lr-batches 30 --lr-epochs 0.5 --eval-every 0 --ckpt-every 100000 -t 2 -q" +
                          (mode.empty() ? "" : " --eden-epoch " + mode) + " > " + run + ".log 2>&1";
  const int status = std::system(cmd.c_str());
  EXPECT_EQ(status, 0) << cmd << "\n" << testing::read_all(run + ".log");
  std::vector<double> lrs;
  std::ifstream in(run + "/metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) lrs.push_back(nlohmann::json::parse(line).at("lr").get<double>());
  return lrs;
}

TEST(EdenEpoch, TrainFlagChoosesTheCount) {
  TempDir tmp("schedule");
  const std::string data = testing::prepare_tiny(tmp, 16, 6);
  const double per_epoch = (double)TokenDataset(tmp.file("data/manifest.json"), "train").num_tokens();
  const double per_step = 4 * 32;
  const int steps = (int)std::ceil(2.3 * per_epoch / per_step);
  ASSERT_LT(steps, 400) << "the corpus grew: keep this test short";

  const auto frac = logged_lrs(data, tmp.file("frac"), "", steps);
  const auto comp = logged_lrs(data, tmp.file("comp"), "completed", steps);
  ASSERT_EQ((int)frac.size(), steps);
  ASSERT_EQ((int)comp.size(), steps);
  int differ = 0;
  for (int s = 0; s < steps; ++s) {
    const double seen = s * per_step / per_epoch;
    EXPECT_NEAR(frac[s], eden_by_hand(0.045, s + 1, seen, 30, 0.5, 10, 0.5), 2e-6 * frac[s]) << "step " << s;
    EXPECT_NEAR(comp[s], eden_by_hand(0.045, s + 1, std::floor(seen), 30, 0.5, 10, 0.5), 2e-6 * comp[s])
        << "step " << s;
    differ += comp[s] != frac[s];
  }
  EXPECT_GT(differ, steps / 2);
}

}  // namespace schedule_tests
}  // namespace subllm
