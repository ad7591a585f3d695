// Run folders, data folders and trainer state under bad inputs: nothing of the user's is lost
// and every refusal names the input and the fix.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
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
namespace {

using testing::error_of;
using testing::prepare_tiny;
using testing::read_all;
using testing::TempDir;
using testing::write_file;
namespace fs = std::filesystem;
using json = nlohmann::json;

struct CliResult {
  int code = -1;  // exit status, or 128 + the signal that ended it
  std::string output;
};

// Runs the CLI in `cwd` with stdout and stderr captured. file_limit > 0 caps the size of every
// file it writes (RLIMIT_FSIZE) with SIGXFSZ ignored, so a write past it fails with EFBIG the
// way a write to a full disk fails with ENOSPC, without privileges.
CliResult run_cli(std::vector<std::string> args, const std::string& cwd = "", rlim_t file_limit = 0) {
  args.insert(args.begin(), SUBLLM_CLI_PATH);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  int fds[2];
  if (pipe(fds) != 0) return {};
  const pid_t pid = fork();
  if (pid == 0) {
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    close(fds[0]);
    close(fds[1]);
    if (!cwd.empty() && chdir(cwd.c_str()) != 0) _exit(126);
    if (file_limit > 0) {
      signal(SIGXFSZ, SIG_IGN);
      const rlimit limit{file_limit, file_limit};
      setrlimit(RLIMIT_FSIZE, &limit);
    }
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(fds[1]);
  CliResult r;
  char buf[4096];
  for (ssize_t got; (got = read(fds[0], buf, sizeof buf)) > 0;) r.output.append(buf, (size_t)got);
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

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

std::vector<json> read_metrics(const std::string& run) {
  std::vector<json> out;
  std::ifstream in(fs::path(run) / "metrics.jsonl");
  std::string line;
  while (std::getline(in, line)) out.push_back(json::parse(line));
  return out;
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

// ---- data folder -----------------------------------------------------------------------------

// ---- Ctrl-C ----------------------------------------------------------------------------------

}  // namespace
}  // namespace subllm
