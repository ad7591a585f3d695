// Run folders, data folders and trainer state under bad inputs: nothing of the user's is lost
// and every refusal names the input and the fix.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <nlohmann/json.hpp>
#include <thread>

#include "subllm/checkpoint.h"
#include "subllm/prepare.h"
#include "subllm/trainer.h"
#include "test_util.h"

namespace subllm {
namespace hardening_runs_tests {

using testing::CliResult;
using testing::error_of;
using testing::prepare_tiny;
using testing::read_metrics;
using testing::read_all;
using testing::run_cli;
using testing::TempDir;
using testing::write_file;
namespace fs = std::filesystem;
using json = nlohmann::json;

// A model small enough that a CLI run of a few hundred steps takes a second or two.
std::vector<std::string> tiny_cli(const std::string& data, int steps, int dim = 16, int heads = 2) {
  return {"train", "--data", data, "--dim", std::to_string(dim), "--layers", "1", "--heads", std::to_string(heads),
          "--batch", "2", "--seq", "16",
          "--steps", std::to_string(steps), "--eval-every", "0", "--eval-batches", "1", "-t", "1", "-q"};
}

std::vector<std::string> with(std::vector<std::string> args, const std::vector<std::string>& more) {
  args.insert(args.end(), more.begin(), more.end());
  return args;
}

long checkpoint_step(const std::string& dir) {
  return json::parse(read_all(dir + "/trainer_state.json"))["step"].get<long>();
}

std::vector<std::string> leftovers(const std::string& run) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(run))
    if (e.path().filename().string().find(".tmp") != std::string::npos) out.push_back(e.path().string());
  return out;
}

TrainOptions tiny_run(const std::string& data, const std::string& out) {
  TrainOptions o;
  o.data_dir = data;
  o.out_dir = out;
  o.model.vocab_size = 400;
  o.model.dim = 16;
  o.model.ffn_dim = 32;
  o.model.n_layers = 1;
  o.model.n_heads = 2;
  o.batch = 2;
  o.seq = 16;
  o.steps = 10;
  o.eval_every = 0;
  o.eval_batches = 1;
  o.ckpt_every = 5;
  o.threads = 1;
  o.quiet = true;
  return o;
}

// ---- run folders -----------------------------------------------------------------------------

TEST(HardeningRuns, ResumeWithoutOutContinuesTheRunInPlace) {
  TempDir tmp("hruns");
  const std::string data = prepare_tiny(tmp), run = tmp.file("run");
  ASSERT_EQ(run_cli(with(tiny_cli(data, 10), {"-o", run}), tmp.path()).code, 0);
  const CliResult r = run_cli(with(tiny_cli(data, 20), {"--resume", run}), tmp.path());
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_FALSE(fs::exists(tmp.file("runs/default"))) << "the resumed run went to the default folder";
  EXPECT_EQ(checkpoint_step(find_checkpoint(run)), 20);
  EXPECT_EQ(read_metrics(run).size(), 20u);
}

TEST(HardeningRuns, ResumeIntoAnotherFolderForksIntoANewOneOnly) {
  TempDir tmp("hruns");
  const std::string data = prepare_tiny(tmp), run = tmp.file("run"), fork = tmp.file("fork");
  ASSERT_EQ(run_cli(with(tiny_cli(data, 10), {"-o", run}), tmp.path()).code, 0);
  const CliResult r = run_cli(with(tiny_cli(data, 20), {"--resume", run, "-o", fork}), tmp.path());
  ASSERT_EQ(r.code, 0) << r.output;
  // The fork carries the history it continues; the original run is left as it was.
  const auto forked = read_metrics(fork);
  ASSERT_EQ(forked.size(), 20u);
  EXPECT_EQ(forked.front()["loss"], read_metrics(run).front()["loss"]);
  EXPECT_EQ(read_metrics(run).size(), 10u);
  EXPECT_EQ(checkpoint_step(find_checkpoint(run)), 10);
  // A fork into a folder that holds a run of its own is refused.
  const CliResult again = run_cli(with(tiny_cli(data, 30), {"--resume", run, "-o", fork}), tmp.path());
  EXPECT_NE(again.code, 0);
  EXPECT_NE(again.output.find(fork), std::string::npos) << again.output;
  EXPECT_NE(again.output.find("--overwrite"), std::string::npos) << again.output;
  EXPECT_EQ(read_metrics(fork).size(), 20u);
}

TEST(HardeningRuns, NewRunIntoAFolderHoldingARunIsRefusedWithoutOverwrite) {
  TempDir tmp("hruns");
  const std::string data = prepare_tiny(tmp), run = tmp.file("run");
  ASSERT_EQ(run_cli(with(tiny_cli(data, 30), {"-o", run, "--ckpt-every", "10"}), tmp.path()).code, 0);
  const std::string config_before = read_all(run + "/config.json");
  const CliResult refused = run_cli(with(tiny_cli(data, 10, 32), {"-o", run}), tmp.path());
  EXPECT_NE(refused.code, 0);
  EXPECT_NE(refused.output.find(run), std::string::npos) << refused.output;
  EXPECT_NE(refused.output.find("checkpoint-00000030"), std::string::npos) << "say what is there: " << refused.output;
  EXPECT_NE(refused.output.find("--overwrite"), std::string::npos) << refused.output;
  EXPECT_EQ(read_all(run + "/config.json"), config_before);
  EXPECT_EQ(read_metrics(run).size(), 30u);
  // --overwrite replaces the old run: its checkpoints go, and --keep keeps the new one.
  const CliResult r = run_cli(with(tiny_cli(data, 10, 32), {"-o", run, "--keep", "1", "--overwrite"}),
                              tmp.path());
  ASSERT_EQ(r.code, 0) << r.output;
  EXPECT_EQ(list_checkpoints(run), std::vector<std::string>{run + "/checkpoint-00000010"});
  EXPECT_EQ(read_metrics(run).size(), 10u);
}

TEST(HardeningRuns, CheckpointsAreOrderedByTheStepInTheirName) {
  TempDir tmp("hruns");
  for (const char* name : {"checkpoint-100000000", "checkpoint-99999999", "checkpoint-7"})
    write_file(tmp.file(std::string(name) + "/trainer_state.json"), "{}");
  const auto all = list_checkpoints(tmp.path().string());
  ASSERT_EQ(all.size(), 3u);
  EXPECT_EQ(fs::path(all[0]).filename(), "checkpoint-7");
  EXPECT_EQ(fs::path(all[2]).filename(), "checkpoint-100000000");
  EXPECT_EQ(find_checkpoint(tmp.path().string()), all[2]);
}

// ---- write failures --------------------------------------------------------------------------

TEST(HardeningRuns, AFailedMetricsWriteStopsTrainingWithACheckpoint) {
  TempDir tmp("hruns");
  const std::string data = prepare_tiny(tmp), run = tmp.file("run");
  // Every checkpoint file fits under 64 kB; metrics.jsonl outgrows it after a few hundred steps.
  const CliResult r =
      run_cli(with(tiny_cli(data, 3000, 8, 1), {"-o", run, "--ckpt-every", "0"}),
              tmp.path(), 64 << 10);
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("metrics.jsonl"), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("checkpoint saved"), std::string::npos) << r.output;
  // No record cut mid-line; the checkpoint holds the step whose record could not be written.
  const auto metrics = read_metrics(run);
  ASSERT_GT(metrics.size(), 10u);
  ASSERT_LT(metrics.size(), 3000u);
  EXPECT_EQ(checkpoint_step(find_checkpoint(run)), (long)metrics.size() + 1);
  EXPECT_TRUE(leftovers(run).empty());
}

TEST(HardeningRuns, AFailedSaveLeavesNoTemporaryFolder) {
  TempDir tmp("hruns");
  const std::string data = prepare_tiny(tmp), run = tmp.file("run");
  const CliResult r = run_cli(with(tiny_cli(data, 3, 64), {"-o", run}), tmp.path(), 16 << 10);
  EXPECT_EQ(r.code, 1) << r.output;
  EXPECT_NE(r.output.find("checkpoint-00000003"), std::string::npos) << r.output;
  EXPECT_TRUE(leftovers(run).empty()) << leftovers(run).front();
  EXPECT_TRUE(list_checkpoints(run).empty());
}

// ---- prepare -o ------------------------------------------------------------------------------

TEST(HardeningRuns, PrepareKeepsTheFilesItDidNotWrite) {
  TempDir tmp("hruns");
  const std::string data = prepare_tiny(tmp);
  write_file(data + "/notes.txt", "mine");
  write_file(data + "/extra/more.txt", "also mine");
  PrepareOptions p;
  p.inputs = {tmp.file("corpus")};
  p.out_dir = data;
  p.vocab_size = 350;
  p.valid_every = 10;
  p.log = [](const std::string&) {};
  prepare_data(p);
  EXPECT_EQ(read_all(data + "/notes.txt"), "mine");
  EXPECT_EQ(read_all(data + "/extra/more.txt"), "also mine");
  EXPECT_EQ(json::parse(read_all(data + "/manifest.json"))["vocab_size"].get<int>(), 350);
}

// ---- trainer state ---------------------------------------------------------------------------

// Trains 10 steps into tmp/run, edits its newest trainer_state.json and returns the message
// of resuming it.
std::string resume_with_state(const std::function<void(json&)>& edit) {
  TempDir tmp("hruns");
  const std::string data = prepare_tiny(tmp), run = tmp.file("run");
  train(tiny_run(data, run));
  const std::string path = find_checkpoint(run) + "/trainer_state.json";
  json st = json::parse(read_all(path));
  edit(st);
  write_file(path, st.dump());
  TrainOptions o = tiny_run(data, run);
  o.steps = 20;
  o.resume = run;
  return error_of([&] { train(o); });
}

TEST(HardeningRuns, ResumedStateFieldsAreRangeChecked) {
  std::string msg = resume_with_state([](json& st) { st["step"] = -7; });
  EXPECT_NE(msg.find("trainer_state.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("step -7"), std::string::npos) << msg;
  EXPECT_NE(msg.find("must lie in"), std::string::npos) << msg;
  msg = resume_with_state([](json& st) { st["world_size"] = 0; });
  EXPECT_NE(msg.find("world_size 0"), std::string::npos) << msg;
  msg = resume_with_state([](json& st) { st["seq"] = "long"; });
  EXPECT_NE(msg.find("seq"), std::string::npos) << msg;
  EXPECT_NE(msg.find("must be"), std::string::npos) << msg;
}

TEST(HardeningRuns, AMissingStateKeyIsNamedWithTheFile) {
  const std::string msg = resume_with_state([](json& st) { st.erase("batch"); });
  EXPECT_NE(msg.find("trainer_state.json"), std::string::npos) << msg;
  EXPECT_NE(msg.find("\"batch\""), std::string::npos) << msg;
  EXPECT_EQ(msg.find("not found"), std::string::npos) << msg;
  EXPECT_NE(msg.find("another checkpoint"), std::string::npos) << msg;
}

// ---- data folder -----------------------------------------------------------------------------

TEST(HardeningRuns, AMissingOrDamagedValidationShardIsAnError) {
  TempDir tmp("hruns");
  const std::string data = prepare_tiny(tmp);
  const std::string shard = data + "/valid_000.bin";
  const std::string bytes = read_all(shard);
  fs::resize_file(shard, fs::file_size(shard) / 2);
  std::string msg = error_of([&] { train(tiny_run(data, tmp.file("run"))); });
  EXPECT_NE(msg.find("valid_000.bin"), std::string::npos) << msg;
  EXPECT_NE(msg.find("--eval-batches 0"), std::string::npos) << msg;
  fs::remove(shard);
  msg = error_of([&] { train(tiny_run(data, tmp.file("run"))); });
  EXPECT_NE(msg.find("valid_000.bin"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(tmp.file("run/metrics.jsonl"))) << "the refused run wrote its folder";
  // Asking for no validation trains without it.
  TrainOptions o = tiny_run(data, tmp.file("run"));
  o.eval_batches = 0;
  const TrainResult r = train(o);
  EXPECT_EQ(r.steps_done, 10);
  EXPECT_LT(r.val_loss, 0);
}

TEST(HardeningRuns, AMissingOrGarbageTokenizerIsAnError) {
  TempDir tmp("hruns");
  const std::string data = prepare_tiny(tmp);
  write_file(data + "/tokenizer.model", "not a sentencepiece model");
  std::string msg = error_of([&] { train(tiny_run(data, tmp.file("run"))); });
  EXPECT_NE(msg.find("tokenizer.model"), std::string::npos) << msg;
  EXPECT_NE(msg.find("subllm prepare"), std::string::npos) << msg;
  fs::remove(data + "/tokenizer.model");
  msg = error_of([&] { train(tiny_run(data, tmp.file("run"))); });
  EXPECT_NE(msg.find("tokenizer.model"), std::string::npos) << msg;
  EXPECT_NE(msg.find("subllm prepare"), std::string::npos) << msg;
}

TEST(HardeningRuns, ResumingWithAnotherVocabularyNamesBothDataFolders) {
  TempDir tmp("hruns"), other("hruns_other");
  const std::string data = prepare_tiny(tmp), run = tmp.file("run");
  const std::string data2 = prepare_tiny(other, 60, 10, 500);
  ASSERT_EQ(run_cli(with(tiny_cli(data, 4), {"-o", run}), tmp.path()).code, 0);
  const CliResult r = run_cli(with(tiny_cli(data2, 8), {"--resume", run}), tmp.path());
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find(data2), std::string::npos) << r.output;
  EXPECT_NE(r.output.find("--data " + data), std::string::npos) << r.output;
  EXPECT_EQ(read_metrics(run).size(), 4u);
}

TEST(HardeningRuns, ResumingAPathThatDoesNotExistNamesIt) {
  TempDir tmp("hruns");
  const std::string missing = tmp.file("no-such-run");
  const CliResult r = run_cli({"train", "--resume", missing, "-q"}, tmp.path());
  EXPECT_NE(r.code, 0);
  EXPECT_NE(r.output.find(missing), std::string::npos) << r.output;
  EXPECT_EQ(r.output.find("manifest.json"), std::string::npos) << r.output;
}

// ---- Ctrl-C ----------------------------------------------------------------------------------

TEST(HardeningRuns, ASecondCtrlCStopsAtOnceWithoutACheckpoint) {
  TempDir tmp("hruns");
  const std::string data = prepare_tiny(tmp), run = tmp.file("run");
  // Steps of a second or more, so both signals land inside one step.
  std::vector<std::string> args = {SUBLLM_CLI_PATH, "train", "--data", data, "-o", run, "--dim", "256", "--layers",
                                   "4", "--batch", "16", "--seq", "256", "--steps", "1000", "--eval-every", "1000",
                                   "-t", "1"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const std::string log = tmp.file("log");
  const pid_t pid = fork();
  if (pid == 0) {
    const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    dup2(fd, 2);
    execv(argv[0], argv.data());
    _exit(127);
  }
  // Wait for the first step's record, then interrupt the second step twice.
  int status = 0;
  for (int i = 0; i < 600 && read_metrics(run).empty(); ++i) {
    ASSERT_EQ(waitpid(pid, &status, WNOHANG), 0) << read_all(log);
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  kill(pid, SIGINT);
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  kill(pid, SIGINT);
  waitpid(pid, &status, 0);
  ASSERT_TRUE(WIFEXITED(status));
  EXPECT_EQ(WEXITSTATUS(status), 130);
  // Had the second Ctrl-C been ignored, the step would have ended with a checkpoint.
  const std::string out = read_all(log);
  EXPECT_NE(out.find("no checkpoint"), std::string::npos) << out;
  EXPECT_TRUE(list_checkpoints(run).empty());
}

}  // namespace hardening_runs_tests
}  // namespace subllm
