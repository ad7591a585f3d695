// End to end: prepare a tiny corpus, train, and resume exactly after SIGKILL and Ctrl-C.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <functional>
#include <nlohmann/json.hpp>
#include <thread>

#include "subllm/dataset.h"
#include "subllm/prepare.h"
#include "subllm/safetensors.h"
#include "subllm/trainer.h"
#include "test_util.h"

namespace subllm {
namespace train_tests {

using testing::error_of;
using testing::read_all;
using testing::TempDir;
namespace fs = std::filesystem;

using testing::prepare_tiny;

TrainOptions tiny_run(const std::string& data, const std::string& out) {
  TrainOptions o;
  o.data_dir = data;
  o.out_dir = out;
  o.model.vocab_size = 400;
  o.model.dim = 32;
  o.model.ffn_dim = 64;
  o.model.n_layers = 2;
  o.model.n_heads = 4;
  o.batch = 4;
  o.seq = 32;
  o.steps = 30;
  o.lr.base_lr = 3e-3f;
  o.lr.warmup_steps = 5;
  o.eval_every = 10;
  o.eval_batches = 2;
  o.ckpt_every = 10;
  o.quiet = true;
  return o;
}

std::vector<nlohmann::json> read_metrics(const std::string& run) {
  std::vector<nlohmann::json> out;
  std::ifstream in(fs::path(run) / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) out.push_back(nlohmann::json::parse(line));
  return out;
}

TEST(Train, LossFallsAndCheckpointsAreComplete) {
  TempDir tmp("train");
  const std::string data = prepare_tiny(tmp);
  TrainResult r = train(tiny_run(data, tmp.file("run")));
  EXPECT_EQ(r.steps_done, 30);
  auto m = read_metrics(tmp.file("run"));
  ASSERT_EQ(m.size(), 30u);
  const double first = m.front()["loss"], last = m.back()["loss"];
  EXPECT_LT(last, first - 1.0) << "loss did not fall: " << first << " -> " << last;
  EXPECT_GT(r.val_loss, 0.f);
  EXPECT_TRUE(m[9].contains("val_loss"));
  // keep_last = 2: checkpoints 20 and 30 remain, each complete.
  EXPECT_FALSE(fs::exists(tmp.file("run/checkpoint-00000010")));
  for (const char* f : {"config.json", "model.safetensors", "optimizer.safetensors", "tokenizer.model", "trainer_state.json"})
    EXPECT_TRUE(fs::exists(tmp.path() / "run/checkpoint-00000030" / f)) << f;
  EXPECT_EQ(find_checkpoint(tmp.file("run")), tmp.file("run/checkpoint-00000030"));
}

// A run resumed from its step-10 checkpoint repeats the uninterrupted run bit for bit.
void check_resume_is_exact(const std::function<void(TrainOptions&)>& configure) {
  TempDir tmp("train");
  const std::string data = prepare_tiny(tmp);
  TrainOptions full = tiny_run(data, tmp.file("full"));
  configure(full);
  train(full);
  TrainOptions part = tiny_run(data, tmp.file("part"));
  configure(part);
  part.keep_last = 5;
  train(part);
  fs::remove_all(tmp.file("part/checkpoint-00000020"));
  fs::remove_all(tmp.file("part/checkpoint-00000030"));
  TrainOptions resumed = tiny_run(data, "");
  configure(resumed);
  resumed.resume = tmp.file("part");
  train(resumed);
  auto a = read_metrics(tmp.file("full")), b = read_metrics(tmp.file("part"));
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) EXPECT_EQ(a[i]["loss"].get<double>(), b[i]["loss"].get<double>()) << "step " << i + 1;
  EXPECT_EQ(read_all(tmp.file("full/checkpoint-00000030/model.safetensors")),
            read_all(tmp.file("part/checkpoint-00000030/model.safetensors")));
  EXPECT_EQ(read_all(tmp.file("full/checkpoint-00000030/optimizer.safetensors")),
            read_all(tmp.file("part/checkpoint-00000030/optimizer.safetensors")));
  // A SUBLLM logs its subsamplers' score statistics every step; LLaMA has none.
  const size_t subsamplers = full.model.retentions.size();
  for (const auto& m : a) {
    ASSERT_EQ(m.contains("score_above"), subsamplers > 0);
    if (subsamplers == 0) continue;
    for (const char* key : {"score_above", "score_rms", "kept_weight"}) ASSERT_EQ(m[key].size(), subsamplers) << key;
    for (size_t j = 0; j < subsamplers; ++j) {
      EXPECT_GE(m["score_above"][j].get<double>(), 0.0);
      EXPECT_LE(m["score_above"][j].get<double>(), 1.0);
      EXPECT_GT(m["score_rms"][j].get<double>(), 0.0);
      EXPECT_GE(m["kept_weight"][j].get<double>(), 0.0);
      EXPECT_LE(m["kept_weight"][j].get<double>(), 1.0);
    }
  }
}

TEST(Train, ResumeInProcessContinuesBitForBit) {
  check_resume_is_exact([](TrainOptions&) {});
}

TEST(Train, ResumeIsExactWithScaledAdamEdenAndSubsamplers) {
  check_resume_is_exact([](TrainOptions& o) {
    o.optimizer = "scaled_adam";
    o.lr.kind = "eden";
    o.lr.base_lr = 0.045f;
    o.lr.eden.lr_batches = 20;
    o.lr.eden.lr_epochs = 0.5;
    o.model.structure = "T(T)";
    o.model.retentions = {0.6f};
  });
}

// Runs the CLI in a child process; returns its pid.
pid_t spawn(const std::vector<std::string>& args) {
  pid_t pid = fork();
  if (pid == 0) {
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    int devnull = open("/dev/null", O_WRONLY);
    dup2(devnull, 1);
    dup2(devnull, 2);
    execv(argv[0], argv.data());
    _exit(127);
  }
  return pid;
}

std::vector<std::string> cli_train_args(const std::string& data, const std::string& out, int steps) {
  return {SUBLLM_CLI_PATH, "train", "--data", data, "--out", out, "--dim", "64", "--layers", "2", "--heads", "4",
          "--batch", "8", "--seq", "64", "--steps", std::to_string(steps), "--ckpt-every", "10", "--eval-every", "0",
          "--keep", "3", "--lr", "3e-3", "--warmup", "5", "-t", "2"};
}

// Waits until the run's metrics show at least `step` steps; false if the child ended first.
bool wait_for_step(pid_t pid, const std::string& run, long step) {
  for (int i = 0; i < 60000; ++i) {
    int status;
    if (waitpid(pid, &status, WNOHANG) == pid) return false;
    std::ifstream in(fs::path(run) / "metrics.jsonl");
    long lines = 0;
    std::string line;
    while (std::getline(in, line)) ++lines;
    if (lines >= step) return true;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  return false;
}

TEST(Train, SigkillMidRunThenResumeMatchesUninterruptedRun) {
  TempDir tmp("train");
  const std::string data = prepare_tiny(tmp);
  const int steps = 200;
  pid_t full = spawn(cli_train_args(data, tmp.file("full"), steps));
  int status = 0;
  waitpid(full, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);

  pid_t victim = spawn(cli_train_args(data, tmp.file("killed"), steps));
  ASSERT_TRUE(wait_for_step(victim, tmp.file("killed"), 25)) << "the run ended before it could be killed";
  kill(victim, SIGKILL);
  waitpid(victim, &status, 0);
  ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL);
  const long reached = (long)read_metrics(tmp.file("killed")).size();
  ASSERT_LT(reached, steps);

  auto resume_args = cli_train_args(data, tmp.file("killed"), steps);
  resume_args.push_back("--resume");
  resume_args.push_back(tmp.file("killed"));
  pid_t resumed = spawn(resume_args);
  waitpid(resumed, &status, 0);
  ASSERT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0);

  auto a = read_metrics(tmp.file("full")), b = read_metrics(tmp.file("killed"));
  ASSERT_EQ(a.size(), (size_t)steps);
  ASSERT_EQ(b.size(), (size_t)steps);
  for (int i = 0; i < steps; ++i) ASSERT_EQ(a[i]["loss"].get<double>(), b[i]["loss"].get<double>()) << "step " << i + 1;
  char last[64];
  std::snprintf(last, sizeof last, "checkpoint-%08d/model.safetensors", steps);
  EXPECT_EQ(read_all(tmp.file(std::string("full/") + last)), read_all(tmp.file(std::string("killed/") + last)));
}

TEST(Train, CtrlCSavesACheckpointAndExits130) {
  TempDir tmp("train");
  const std::string data = prepare_tiny(tmp);
  pid_t pid = spawn(cli_train_args(data, tmp.file("run"), 100000));
  ASSERT_TRUE(wait_for_step(pid, tmp.file("run"), 3));
  kill(pid, SIGINT);
  int status = 0;
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 130);
  const std::string ck = find_checkpoint(tmp.file("run"));
  auto state = nlohmann::json::parse(read_all(ck + "/trainer_state.json"));
  EXPECT_EQ(state["step"].get<long>(), (long)read_metrics(tmp.file("run")).size());
}

TEST(Train, SubllmKnobsReachTheModelAndTheState) {
  TempDir tmp("train");
  const std::string data = prepare_tiny(tmp);
  auto run = [&](const std::string& name, double balancer_prob) {
    TrainOptions o = tiny_run(data, tmp.file(name));
    o.steps = 10;
    o.model.structure = "T(T)";
    o.model.retentions = {0.6f};
    o.subllm.balancer_prob = ScheduledFloat(balancer_prob);
    o.subllm.balancer_grad_scale = 0.5f;
    o.subllm.balancer_window = 0.03f;
    o.subllm.balancer_counted = false;
    train(o);
    return read_metrics(tmp.file(name));
  };
  const auto on = run("on", 1.0), off = run("off", 0.0);
  ASSERT_EQ(on.size(), off.size());
  // The first step's loss precedes any update; the balancer's edit changes what follows.
  EXPECT_EQ(on[0]["loss"].get<double>(), off[0]["loss"].get<double>());
  bool differ = false;
  for (size_t i = 1; i < on.size(); ++i) differ |= on[i]["loss"].get<double>() != off[i]["loss"].get<double>();
  EXPECT_TRUE(differ) << "the balancer's probability did not reach the model";
  auto state = nlohmann::json::parse(read_all(find_checkpoint(tmp.file("on")) + "/trainer_state.json"));
  EXPECT_EQ(state["balancer_prob"].get<std::string>(), "0:1");
  EXPECT_NEAR(state["balancer_grad_scale"].get<double>(), 0.5, 1e-7);
  EXPECT_NEAR(state["balancer_window"].get<double>(), 0.03, 1e-7);
  EXPECT_EQ(state["balancer_fraction"].get<std::string>(), "gaussian");
  // Resuming it with the other balancer is refused, naming the flag that continues it.
  TrainOptions more = tiny_run(data, tmp.file("on"));
  more.steps = 12;
  more.model.structure = "T(T)";
  more.model.retentions = {0.6f};
  more.resume = tmp.file("on");
  ASSERT_TRUE(more.subllm.balancer_counted);
  const std::string msg = error_of([&] { train(more); });
  EXPECT_NE(msg.find("--balancer-fraction gaussian"), std::string::npos) << msg;
}

TEST(Train, BadInputsAreClearErrors) {
  TempDir tmp("train");
  const std::string data = prepare_tiny(tmp);
  // Missing data folder.
  EXPECT_NE(error_of([&] { train(tiny_run(tmp.file("nope"), tmp.file("run"))); }).find("nope"), std::string::npos);
  // Unwritable output folder (a path through a regular file).
  testing::write_file(tmp.file("plain"), "x");
  std::string msg = error_of([&] { train(tiny_run(data, tmp.file("plain/run"))); });
  EXPECT_NE(msg.find("plain/run"), std::string::npos) << msg;
  // Resuming with a different model.
  train([&] { auto o = tiny_run(data, tmp.file("run")); o.steps = 10; return o; }());
  TrainOptions other = tiny_run(data, tmp.file("run"));
  other.model.dim = 64;
  other.resume = tmp.file("run");
  msg = error_of([&] { train(other); });
  EXPECT_NE(msg.find("decoder_embed_dim differs"), std::string::npos) << msg;
  // A truncated checkpoint.
  const std::string ck = find_checkpoint(tmp.file("run"));
  fs::resize_file(ck + "/model.safetensors", fs::file_size(ck + "/model.safetensors") / 2);
  TrainOptions again = tiny_run(data, tmp.file("run"));
  again.resume = tmp.file("run");
  msg = error_of([&] { train(again); });
  EXPECT_NE(msg.find("model.safetensors"), std::string::npos) << msg;
  // A window longer than the corpus.
  TrainOptions huge = tiny_run(data, tmp.file("run2"));
  huge.seq = 1 << 20;
  msg = error_of([&] { train(huge); });
  EXPECT_NE(msg.find("--seq"), std::string::npos) << msg;
}

// A run resumed with another way of counting Eden's epoch would change its learning rate
// silently: refused, naming the flag to pass.
TEST(Train, ResumeKeepsTheEdenEpochCount) {
  TempDir tmp("train");
  const std::string data = prepare_tiny(tmp);
  TrainOptions first = tiny_run(data, tmp.file("run"));
  first.lr.kind = "eden";
  first.steps = 10;
  train(first);
  TrainOptions again = tiny_run(data, tmp.file("run"));
  again.lr.kind = "eden";
  again.lr.eden.epoch_mode = EdenEpoch::Completed;
  again.resume = tmp.file("run");
  const std::string msg = error_of([&] { train(again); });
  EXPECT_NE(msg.find("--eden-epoch fractional"), std::string::npos) << msg;
  again.lr.eden.epoch_mode = EdenEpoch::Fractional;
  EXPECT_EQ(train(again).steps_done, 30);
}

}  // namespace train_tests
}  // namespace subllm
