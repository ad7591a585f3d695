// End to end, data-parallel training under mpirun (OpenMPI): two ranks train exactly what one
// rank with --grad-accum 2 trains (every loss, the final weights and the optimizer state bit for
// bit, with and without --shard-optimizer); killing one rank ends the job with an error within
// 30 s, and its checkpoint resumes exactly on two ranks or on one; two "hosts" made of network
// namespaces joined by a veth pair train over TCP exactly as one host does.
//
// Every child runs with one thread (-t 1, OMP_NUM_THREADS=1), under a time limit after which it
// and everything it started are killed and the test fails saying so.
#include <gtest/gtest.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstring>
#include <map>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <thread>

#include "cuda_test_util.h"
#include "subllm/checkpoint.h"
#include "subllm/prepare.h"
#include "test_util.h"

extern char** environ;

namespace subllm {
namespace dist_train_tests {

using testing::read_all;
using testing::TempDir;
namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

constexpr double kRunTimeoutS = 120;  // any one training run, on 2 loaded cores
constexpr double kAbortLimitS = 30;   // a job with a dead rank must be over within this

double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// ---- child processes --------------------------------------------------------------------------

bool on_path(const std::string& program) {
  const char* path = std::getenv("PATH");
  std::stringstream dirs(path ? path : "/usr/bin:/bin");
  std::string dir;
  while (std::getline(dirs, dir, ':'))
    if (!dir.empty() && access((dir + "/" + program).c_str(), X_OK) == 0) return true;
  return false;
}

// This process's environment, plus one thread per process, OpenMPI's consent to run as root
// (only when we are root) and `extra` ("NAME=VALUE" each).
std::vector<std::string> child_env(const std::vector<std::string>& extra) {
  std::map<std::string, std::string> env;
  auto set = [&](const std::string& kv) {
    const size_t eq = kv.find('=');
    if (eq != std::string::npos) env[kv.substr(0, eq)] = kv.substr(eq + 1);
  };
  for (char** e = environ; *e; ++e) set(*e);
  set("OMP_NUM_THREADS=1");
  if (geteuid() == 0) {
    set("OMPI_ALLOW_RUN_AS_ROOT=1");
    set("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1");
  }
  for (const auto& kv : extra) set(kv);
  std::vector<std::string> out;
  for (const auto& [k, v] : env) out.push_back(k + "=" + v);
  return out;
}

// Starts args[0] (looked up on PATH) in its own process group, stdout and stderr to `log`.
pid_t spawn_logged(const std::vector<std::string>& args, const std::string& log,
                   const std::vector<std::string>& extra_env = {}) {
  const std::vector<std::string> env = child_env(extra_env);
  std::vector<char*> argv, envp;
  for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
  argv.push_back(nullptr);
  for (const auto& e : env) envp.push_back(const_cast<char*>(e.c_str()));
  envp.push_back(nullptr);
  const int out = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  const pid_t pid = fork();
  if (pid == 0) {
    setpgid(0, 0);
    const int in = open("/dev/null", O_RDONLY);
    dup2(in, 0);
    dup2(out, 1);
    dup2(out, 2);
    execvpe(argv[0], argv.data(), envp.data());
    dprintf(2, "cannot run %s: %s\n", argv[0], std::strerror(errno));
    _exit(127);
  }
  close(out);
  return pid;
}

// Parent of every live process, from /proc/PID/stat.
std::map<pid_t, pid_t> parents() {
  std::map<pid_t, pid_t> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator("/proc", ec)) {
    const std::string name = e.path().filename().string();
    if (name.empty() || name.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::string stat = read_all("/proc/" + name + "/stat");
    const size_t close_paren = stat.rfind(')');  // the command name may hold spaces and parens
    if (close_paren == std::string::npos) continue;
    std::istringstream rest(stat.substr(close_paren + 1));
    std::string state;
    pid_t ppid = 0;
    if (rest >> state >> ppid) out[(pid_t)std::stol(name)] = ppid;
  }
  return out;
}

std::vector<pid_t> descendants(pid_t root) {
  const auto pp = parents();
  std::vector<pid_t> out;
  std::vector<pid_t> todo = {root};
  while (!todo.empty()) {
    const pid_t p = todo.back();
    todo.pop_back();
    for (const auto& [child, parent] : pp)
      if (parent == p) {
        out.push_back(child);
        todo.push_back(child);
      }
  }
  return out;
}

std::string proc_comm(pid_t pid) {
  std::string s = read_all("/proc/" + std::to_string(pid) + "/comm");
  while (!s.empty() && s.back() == '\n') s.pop_back();
  return s;
}

// The value of `name` in the environment process `pid` started with ("" when absent).
std::string proc_env(pid_t pid, const std::string& name) {
  const std::string env = read_all("/proc/" + std::to_string(pid) + "/environ");
  size_t at = 0;
  while (at < env.size()) {
    const size_t end = std::min(env.find('\0', at), env.size());
    const std::string kv = env.substr(at, end - at);
    if (kv.rfind(name + "=", 0) == 0) return kv.substr(name.size() + 1);
    at = end + 1;
  }
  return "";
}

// SIGKILL to pid and to every process it started (each by its id), repeated while new ones appear.
void kill_tree(pid_t pid) {
  std::set<pid_t> killed;
  for (int round = 0; round < 5; ++round) {
    std::vector<pid_t> victims = descendants(pid);
    victims.push_back(pid);
    bool any = false;
    for (pid_t v : victims)
      if (killed.insert(v).second) {
        kill(v, SIGKILL);
        any = true;
      }
    if (!any) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

struct Outcome {
  bool timed_out = false;
  int status = 0;
  double seconds = 0;
  std::string log;  // the child's stdout and stderr
};

std::string describe(int status) {
  if (WIFEXITED(status)) return "exited with status " + std::to_string(WEXITSTATUS(status));
  if (WIFSIGNALED(status)) return std::string("killed by signal ") + strsignal(WTERMSIG(status));
  return "ended with wait status " + std::to_string(status);
}

// Waits up to `timeout_s` for pid; past it, kills pid's tree and reports a timeout.
Outcome wait_for(pid_t pid, const std::string& log, double timeout_s, Clock::time_point t0 = Clock::now()) {
  Outcome r;
  for (;;) {
    const pid_t done = waitpid(pid, &r.status, WNOHANG);
    if (done == pid) break;
    if (since(t0) > timeout_s) {
      kill_tree(pid);
      waitpid(pid, &r.status, 0);
      r.timed_out = true;
      break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  r.seconds = since(t0);
  r.log = read_all(log);
  return r;
}

Outcome run(const std::vector<std::string>& args, const std::string& log, double timeout_s = kRunTimeoutS,
            const std::vector<std::string>& extra_env = {}) {
  const auto t0 = Clock::now();
  return wait_for(spawn_logged(args, log, extra_env), log, timeout_s, t0);
}

std::string seconds(double s) {
  char b[32];
  std::snprintf(b, sizeof b, "%.1f s", s);
  return b;
}

std::string tail(const std::string& s, size_t n = 4000) { return s.size() <= n ? s : "…" + s.substr(s.size() - n); }

std::string joined(const std::vector<std::string>& args) {
  std::string s;
  for (const auto& a : args) s += (s.empty() ? "" : " ") + a;
  return s;
}

// Success when the child exited with status 0 in time; otherwise what happened and its output.
::testing::AssertionResult succeeded(const Outcome& r, const std::string& what) {
  if (!r.timed_out && WIFEXITED(r.status) && WEXITSTATUS(r.status) == 0) return ::testing::AssertionSuccess();
  auto f = ::testing::AssertionFailure() << what << ": ";
  if (r.timed_out)
    f << "did not finish within " << seconds(r.seconds) << " and was killed";
  else
    f << describe(r.status) << " after " << seconds(r.seconds);
  return f << "\n--- output ---\n" << tail(r.log);
}

template <class... Lists>
std::vector<std::string> concat(const std::vector<std::string>& a, const Lists&... rest) {
  std::vector<std::string> out = a;
  (out.insert(out.end(), rest.begin(), rest.end()), ...);
  return out;
}

// ---- training runs ----------------------------------------------------------------------------

using testing::prepare_tiny;
using testing::read_metrics;

// One `subllm train` command line: the tiny model of test_train's tiny_run (d 32, SwiGLU 64,
// 4 heads; 2 blocks, or the 5-block nested SUBLLM T(T(T)T)T), micro-batches of 2 × 32 tokens.
struct Job {
  std::string data, out, resume;
  int steps = 20;
  int grad_accum = 1;
  int ckpt_every = 0;  // 0: the final checkpoint only
  bool nested = false;
  bool shard = false;
  std::string optimizer = "adamw";  // adamw | scaled-adam
  std::string device = "cpu";
  int dim = 32, ffn = 64, batch = 2, seq = 32;
};

// The program under test: $SUBLLM_CLI when set (a build copied to another machine), else the
// one built with these tests.
std::string cli_path() {
  const char* env = std::getenv("SUBLLM_CLI");
  return env && *env ? env : SUBLLM_CLI_PATH;
}

Job tiny_job(const std::string& data, const std::string& out) {
  Job j;
  j.data = data;
  j.out = out;
  return j;
}

std::vector<std::string> train_args(const Job& j) {
  std::vector<std::string> a = {cli_path(), "train", "--device", j.device, "--data", j.data, "--out", j.out,
                                "--dim", std::to_string(j.dim), "--ffn", std::to_string(j.ffn), "--heads", "4",
                                "--batch", std::to_string(j.batch), "--seq", std::to_string(j.seq),
                                "--steps", std::to_string(j.steps), "--grad-accum", std::to_string(j.grad_accum),
                                "--ckpt-every", std::to_string(j.ckpt_every), "--keep", "3",
                                "--eval-every", "0", "--eval-batches", "2", "--warmup", "5", "-t", "1", "-q"};
  if (j.nested)
    a.insert(a.end(), {"--structure", "T(T(T)T)T", "--retention", "0.6,0.5"});
  else
    a.insert(a.end(), {"--layers", "2"});
  if (j.optimizer == "adamw")
    a.insert(a.end(), {"--optimizer", "adamw", "--lr", "3e-3"});
  else  // the paper's recipe; ScaledAdam's clipping threshold, 0.9 × the median gradient norm
        // recomputed every 5 steps, clips most steps after the fifth
    a.insert(a.end(), {"--optimizer", j.optimizer, "--schedule", "eden", "--lr", "0.045", "--lr-batches", "20",
                       "--lr-epochs", "0.5", "--clipping-update-period", "5", "--clipping-scale", "0.9"});
  if (j.shard) a.push_back("--shard-optimizer");
  if (!j.resume.empty()) a.insert(a.end(), {"--resume", j.resume});
  return a;
}

// mpirun on this host: ranks may outnumber cores and are not pinned (tests may run side by side).
std::vector<std::string> mpirun(int np) {
  return {"mpirun", "-np", std::to_string(np), "--oversubscribe", "--bind-to", "none", "-x", "OMP_NUM_THREADS"};
}

std::string checkpoint_file(const std::string& run, int step, const std::string& file) {
  char name[64];
  std::snprintf(name, sizeof name, "checkpoint-%08d/", step);
  return (fs::path(run) / (name + file)).string();
}

// Byte equality of two files, with a short account of the first difference (never the bytes).
::testing::AssertionResult same_bytes(const std::string& a, const std::string& b) {
  if (!fs::exists(a)) return ::testing::AssertionFailure() << a << " does not exist";
  if (!fs::exists(b)) return ::testing::AssertionFailure() << b << " does not exist";
  const std::string x = read_all(a), y = read_all(b);
  if (x.empty()) return ::testing::AssertionFailure() << a << " is empty";
  if (x == y) return ::testing::AssertionSuccess();
  size_t at = 0;
  while (at < x.size() && at < y.size() && x[at] == y[at]) ++at;
  return ::testing::AssertionFailure() << a << " (" << x.size() << " bytes) and " << b << " (" << y.size()
                                       << " bytes) differ from byte " << at;
}

// The per-step numbers that must agree exactly between two runs of the same global batch.
// (The SUBLLM score statistics are not among them: they describe the last micro-batch each
// process saw, which differs between one rank and two.)
::testing::AssertionResult same_steps(const std::vector<json>& a, const std::vector<json>& b) {
  if (a.size() != b.size())
    return ::testing::AssertionFailure() << "metrics have " << a.size() << " and " << b.size() << " steps";
  for (size_t i = 0; i < a.size(); ++i)
    for (const char* key : {"step", "loss", "lr", "grad_norm", "clip", "clip_quartiles"}) {
      if (!a[i].contains(key) && !b[i].contains(key)) continue;
      if (!a[i].contains(key) || !b[i].contains(key) || a[i][key] != b[i][key])
        return ::testing::AssertionFailure()
               << "step " << i + 1 << ": " << key << " differs: " << a[i].value(key, json()).dump() << " vs "
               << b[i].value(key, json()).dump();
    }
  return ::testing::AssertionSuccess();
}

// Every step of a 2-rank run says so and reports a communication share in [0, 1].
void expect_two_rank_metrics(const std::vector<json>& m) {
  for (size_t i = 0; i < m.size(); ++i) {
    ASSERT_TRUE(m[i].contains("world_size")) << "step " << i + 1 << ": " << m[i].dump();
    EXPECT_EQ(m[i]["world_size"].get<int>(), 2) << "step " << i + 1;
    ASSERT_TRUE(m[i].contains("comm_share")) << "step " << i + 1 << ": " << m[i].dump();
    const double share = m[i]["comm_share"].get<double>();
    EXPECT_TRUE(share >= 0.0 && share <= 1.0) << "step " << i + 1 << ": comm_share " << share;
  }
}

long state_value(const std::string& checkpoint, const char* key) {
  const json st = json::parse(read_all(checkpoint + "/trainer_state.json"));
  return st.at(key).get<long>();
}

// The names in a folder, sorted.
std::vector<std::string> entries(const std::string& dir) {
  std::vector<std::string> out;
  for (const auto& e : fs::directory_iterator(dir)) out.push_back(e.path().filename().string());
  std::sort(out.begin(), out.end());
  return out;
}

void report_time(const char* what, double seconds) {
  std::printf("[   TIME   ] %s: %.1f s\n", what, seconds);
}

#define SKIP_WITHOUT_MPIRUN() \
  if (!on_path("mpirun")) GTEST_SKIP() << "mpirun (OpenMPI) is not on the PATH: install openmpi-bin"

// ---- 1. two ranks = one rank with --grad-accum 2 ----------------------------------------------

void check_two_ranks_equal_one(bool nested, bool shard, const std::string& optimizer) {
  const auto t0 = Clock::now();
  TempDir tmp("dist");
  Job one = tiny_job(prepare_tiny(tmp), tmp.file("one"));
  one.grad_accum = 2;
  one.nested = nested;
  one.optimizer = optimizer;
  Job two = one;
  two.out = tmp.file("two");
  two.grad_accum = 1;
  two.shard = shard;

  const Outcome r1 = run(train_args(one), tmp.file("one.log"));
  ASSERT_TRUE(succeeded(r1, "1 rank with --grad-accum 2: " + joined(train_args(one))));
  const auto cmd2 = concat(mpirun(2), train_args(two));
  const Outcome r2 = run(cmd2, tmp.file("two.log"));
  ASSERT_TRUE(succeeded(r2, "2 ranks: " + joined(cmd2)));
  report_time("1 rank", r1.seconds);
  report_time("2 ranks", r2.seconds);

  const auto m1 = read_metrics(one.out), m2 = read_metrics(two.out);
  ASSERT_EQ(m1.size(), 20u);
  EXPECT_TRUE(same_steps(m1, m2));
  expect_two_rank_metrics(m2);
  if (optimizer == "scaled-adam") {  // the clipping, which both ranks must agree on, did act
    int clipped = 0;
    for (const auto& m : m1) clipped += m["clip"].get<double>() < 1.0;
    EXPECT_GT(clipped, 0) << "ScaledAdam never clipped, so the test does not check the clipping's agreement";
  }
  EXPECT_TRUE(same_bytes(checkpoint_file(one.out, 20, "model.safetensors"),
                         checkpoint_file(two.out, 20, "model.safetensors")));
  // Sharded: the state gathered from both ranks is the unsharded state.
  EXPECT_TRUE(same_bytes(checkpoint_file(one.out, 20, "optimizer.safetensors"),
                         checkpoint_file(two.out, 20, "optimizer.safetensors")));
  const std::string ck2 = checkpoint_file(two.out, 20, "");
  EXPECT_EQ(state_value(ck2, "world_size"), 2);
  EXPECT_EQ(state_value(ck2, "grad_accum"), 1);
  // Rank 0 alone writes: the run folder and its checkpoint hold what a 1-rank run's hold.
  EXPECT_EQ(entries(two.out), entries(one.out));
  EXPECT_EQ(entries(ck2), entries(checkpoint_file(one.out, 20, "")));
  report_time("whole test", since(t0));
}

TEST(DistTrain, TwoRanksEqualOneRankWithGradAccumLlama) {
  SKIP_WITHOUT_MPIRUN();
  check_two_ranks_equal_one(false, false, "adamw");
}

TEST(DistTrain, TwoRanksEqualOneRankWithGradAccumLlamaSharded) {
  SKIP_WITHOUT_MPIRUN();
  check_two_ranks_equal_one(false, true, "adamw");
}

TEST(DistTrain, TwoRanksEqualOneRankWithGradAccumNestedSubllm) {
  SKIP_WITHOUT_MPIRUN();
  check_two_ranks_equal_one(true, false, "scaled-adam");
}

TEST(DistTrain, TwoRanksEqualOneRankWithGradAccumNestedSubllmSharded) {
  SKIP_WITHOUT_MPIRUN();
  check_two_ranks_equal_one(true, true, "scaled-adam");
}

// ---- 2. one rank killed: the job ends; the checkpoint resumes exactly ----------------------------

TEST(DistTrain, SigkillOneRankThenResumeMatchesUninterrupted) {
  SKIP_WITHOUT_MPIRUN();
  const auto t0 = Clock::now();
  TempDir tmp("dist");
  Job job = tiny_job(prepare_tiny(tmp), tmp.file("full"));
  job.steps = 30;
  job.ckpt_every = 5;
  // Longer steps than the other tests' (d 64, 4 × 64 tokens), so the kill lands mid-run.
  job.dim = 64;
  job.ffn = 128;
  job.batch = 4;
  job.seq = 64;

  const auto full_cmd = concat(mpirun(2), train_args(job));
  const Outcome full = run(full_cmd, tmp.file("full.log"));
  ASSERT_TRUE(succeeded(full, "uninterrupted 2-rank run: " + joined(full_cmd)));
  report_time("uninterrupted 2-rank run", full.seconds);

  // The victim: the same run; once its step-10 checkpoint exists, SIGKILL rank 1.
  Job victim_job = job;
  victim_job.out = tmp.file("killed");
  const auto victim_cmd = concat(mpirun(2), train_args(victim_job));
  const auto t_start = Clock::now();
  const pid_t mpirun_pid = spawn_logged(victim_cmd, tmp.file("killed.log"));
  pid_t victim = 0;
  std::vector<pid_t> ranks;  // the local ranks are mpirun's children
  int status = 0;
  bool ended_early = false;
  while (since(t_start) < kRunTimeoutS) {
    if (waitpid(mpirun_pid, &status, WNOHANG) == mpirun_pid) {
      ended_early = true;
      break;
    }
    if (ranks.size() < 2) {
      ranks.clear();
      for (pid_t p : descendants(mpirun_pid))
        if (proc_comm(p) == "subllm" && !proc_env(p, "OMPI_COMM_WORLD_RANK").empty()) ranks.push_back(p);
      for (pid_t p : ranks)
        if (proc_env(p, "OMPI_COMM_WORLD_RANK") == "1") victim = p;
    }
    if (victim != 0 && fs::is_directory(checkpoint_file(victim_job.out, 10, ""))) break;
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  if (ended_early)
    FAIL() << "the run ended (" << describe(status) << ") before its step-10 checkpoint could be seen; output:\n"
           << tail(read_all(tmp.file("killed.log")));
  if (victim == 0 || !fs::is_directory(checkpoint_file(victim_job.out, 10, ""))) {
    kill_tree(mpirun_pid);
    waitpid(mpirun_pid, &status, 0);
    FAIL() << (victim == 0 ? "found no process of rank 1 under mpirun" : "no step-10 checkpoint") << " within "
           << kRunTimeoutS << " s; output:\n"
           << tail(read_all(tmp.file("killed.log")));
  }
  const size_t steps_at_kill = read_metrics(victim_job.out).size();
  const auto t_kill = Clock::now();
  ASSERT_EQ(kill(victim, SIGKILL), 0) << std::strerror(errno);
  // The other rank must not wait forever in a collective: the job ends, non-zero, within 30 s.
  const Outcome aborted = wait_for(mpirun_pid, tmp.file("killed.log"), 2 * kAbortLimitS, t_kill);
  ASSERT_FALSE(aborted.timed_out) << "mpirun was still running " << seconds(aborted.seconds)
                                  << " after rank 1 was killed; output:\n"
                                  << tail(aborted.log);
  report_time("job end after the kill", aborted.seconds);
  EXPECT_LT(aborted.seconds, kAbortLimitS) << "the job took too long to end after rank 1 was killed";
  // No rank outlives mpirun (one that does is killed here, by its id).
  for (pid_t p : ranks)
    if (proc_comm(p) == "subllm" && !proc_env(p, "OMPI_COMM_WORLD_RANK").empty()) {
      ADD_FAILURE() << "rank process " << p << " outlived mpirun";
      kill(p, SIGKILL);
    }
  ASSERT_FALSE(WIFEXITED(aborted.status) && WEXITSTATUS(aborted.status) == 0)
      << "mpirun exited with status 0 although rank 1 was killed (" << steps_at_kill
      << " steps were logged at the kill); output:\n"
      << tail(aborted.log);
  const bool names_it = aborted.log.find("signal 9") != std::string::npos ||
                        aborted.log.find("Killed") != std::string::npos ||
                        aborted.log.find("killed") != std::string::npos;
  EXPECT_TRUE(names_it) << "the job's output does not say that a rank was killed:\n" << tail(aborted.log);

  const std::string ck = find_checkpoint(victim_job.out);
  const long resumed_from = state_value(ck, "step");
  ASSERT_GE(resumed_from, 10);
  ASSERT_LT(resumed_from, 30) << "the run completed before the kill took effect";
  std::printf("[   INFO   ] killed at %zu logged steps; resuming from %s\n", steps_at_kill, ck.c_str());
  fs::copy(victim_job.out, tmp.file("copy"), fs::copy_options::recursive);

  // Resumed on 2 ranks: the uninterrupted run, bit for bit.
  Job resume2 = victim_job;
  resume2.resume = victim_job.out;
  const auto resume2_cmd = concat(mpirun(2), train_args(resume2));
  const Outcome r2 = run(resume2_cmd, tmp.file("resume2.log"));
  ASSERT_TRUE(succeeded(r2, "2-rank resume: " + joined(resume2_cmd)));
  report_time("2-rank resume", r2.seconds);
  EXPECT_TRUE(same_steps(read_metrics(job.out), read_metrics(victim_job.out)));
  EXPECT_TRUE(same_bytes(checkpoint_file(job.out, 30, "model.safetensors"),
                         checkpoint_file(victim_job.out, 30, "model.safetensors")));

  // The same checkpoint resumed on 1 rank with --grad-accum 2 (same global batch): the same bytes.
  Job resume1 = victim_job;
  resume1.out = resume1.resume = tmp.file("copy");
  resume1.grad_accum = 2;
  const Outcome r1 = run(train_args(resume1), tmp.file("resume1.log"));
  ASSERT_TRUE(succeeded(r1, "1-rank resume with --grad-accum 2: " + joined(train_args(resume1))));
  report_time("1-rank resume", r1.seconds);
  EXPECT_TRUE(same_steps(read_metrics(job.out), read_metrics(resume1.out)));
  EXPECT_TRUE(same_bytes(checkpoint_file(job.out, 30, "model.safetensors"),
                         checkpoint_file(resume1.out, 30, "model.safetensors")));
  EXPECT_EQ(state_value(checkpoint_file(resume1.out, 30, ""), "world_size"), 1);
  report_time("whole test", since(t0));
}

// ---- 3. two hosts over TCP ----------------------------------------------------------------------

// Two network namespaces joined by a veth pair: "hosts" ADDRESS(0) and ADDRESS(1) on the subnet
// SUBNET, each with its loopback up. Destroyed (with the veth pair) when this goes out of scope.
class TwoHosts {
 public:
  explicit TwoHosts(const TempDir& tmp) : tmp_(tmp) {
    const std::string id = std::to_string(getpid());
    ns_[0] = "subllm_h0_" + id;
    ns_[1] = "subllm_h1_" + id;
    veth_[0] = "sl" + id + "a";  // interface names have at most 15 characters
    veth_[1] = "sl" + id + "b";
    const std::string net = "10.213." + std::to_string(1 + getpid() % 250) + ".";
    addr_[0] = net + "1";
    addr_[1] = net + "2";
    subnet_ = net + "0/24";
  }
  ~TwoHosts() {
    for (int h = 0; h < 2; ++h)
      if (made_[h]) ip({"netns", "del", ns_[h]});
  }
  TwoHosts(const TwoHosts&) = delete;
  TwoHosts& operator=(const TwoHosts&) = delete;

  // Builds the network. Returns "" when it is up; otherwise why not, and sets *refused when the
  // system does not let this process do it (not root, no CAP_NET_ADMIN, no veth driver).
  std::string build(bool* refused) {
    const std::vector<std::vector<std::string>> steps = {
        {"netns", "add", ns_[0]},
        {"netns", "add", ns_[1]},
        {"link", "add", veth_[0], "netns", ns_[0], "type", "veth", "peer", "name", veth_[1], "netns", ns_[1]},
        {"-n", ns_[0], "addr", "add", addr_[0] + "/24", "dev", veth_[0]},
        {"-n", ns_[1], "addr", "add", addr_[1] + "/24", "dev", veth_[1]},
        {"-n", ns_[0], "link", "set", "lo", "up"},
        {"-n", ns_[1], "link", "set", "lo", "up"},
        {"-n", ns_[0], "link", "set", veth_[0], "up"},
        {"-n", ns_[1], "link", "set", veth_[1], "up"}};
    for (size_t i = 0; i < steps.size(); ++i) {
      const Outcome r = ip(steps[i]);
      const auto ok = succeeded(r, "ip " + joined(steps[i]));
      if (i < 2) made_[i] = ok;
      if (ok) continue;
      *refused = r.log.find("not permitted") != std::string::npos ||
                 r.log.find("Permission denied") != std::string::npos ||
                 r.log.find("Unknown device type") != std::string::npos;
      return ok.message();
    }
    return "";
  }
  const std::string& ns(int h) const { return ns_[h]; }
  const std::string& addr(int h) const { return addr_[h]; }
  const std::string& subnet() const { return subnet_; }

 private:
  Outcome ip(const std::vector<std::string>& args) const {
    return run(concat({"ip"}, args), tmp_.file("ip.log"), 20);
  }
  const TempDir& tmp_;
  std::string ns_[2], veth_[2], addr_[2], subnet_;
  bool made_[2] = {false, false};
};

TEST(DistTrain, AcrossTwoHostsOverTcp) {
  SKIP_WITHOUT_MPIRUN();
  if (!on_path("ip")) GTEST_SKIP() << "the ip command (iproute2) is not on the PATH";
  const auto t0 = Clock::now();
  TempDir tmp("dist");
  TwoHosts hosts(tmp);
  bool refused = false;
  const std::string why = hosts.build(&refused);
  if (refused) GTEST_SKIP() << "this process may not build two network namespaces joined by veth (needs root or "
                               "CAP_NET_ADMIN): " << why;
  // Building the hosts is the machine's part (iproute2, namespaces); inside a chroot, for one,
  // `ip -n` cannot remount / and fails. That is no fault of the code under test.
  if (!why.empty()) GTEST_SKIP() << "this machine could not build two hosts from network namespaces: " << why;

  Job local = tiny_job(prepare_tiny(tmp), tmp.file("local"));
  const auto local_cmd = concat(mpirun(2), train_args(local));
  const Outcome rl = run(local_cmd, tmp.file("local.log"));
  ASSERT_TRUE(succeeded(rl, "2 ranks on one host: " + joined(local_cmd)));

  // mpirun starts in host 0's namespace; host 1's daemon is started through the agent, which
  // enters host 1's namespace. Only TCP between the two addresses joins them.
  Job remote = local;
  remote.out = tmp.file("remote");
  const std::string agent = std::string(SUBLLM_SOURCE_DIR) + "/tests/netns_mpi_agent.sh";
  const auto remote_cmd = concat(
      std::vector<std::string>{"ip", "netns", "exec", hosts.ns(0)}, mpirun(2),
      std::vector<std::string>{"--host", hosts.addr(0) + "," + hosts.addr(1), "--mca", "plm_rsh_agent",
                               "/bin/sh " + agent,  // the script need not be executable
                               "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", hosts.subnet(), "--mca",
                               "oob_tcp_if_include", hosts.subnet()},
      train_args(remote));
  const std::string agent_log = tmp.file("agent.log");
  const Outcome rr = run(remote_cmd, tmp.file("remote.log"), kRunTimeoutS,
                         {"SUBLLM_NETNS_HOSTS=" + hosts.addr(0) + "=" + hosts.ns(0) + " " + hosts.addr(1) + "=" +
                              hosts.ns(1),
                          "SUBLLM_NETNS_AGENT_LOG=" + agent_log});
  ASSERT_TRUE(succeeded(rr, "2 ranks on two hosts: " + joined(remote_cmd)));
  report_time("2 ranks on one host", rl.seconds);
  report_time("2 ranks on two hosts", rr.seconds);
  // The second host's daemon really went through the agent into its namespace.
  EXPECT_NE(read_all(agent_log).find(hosts.addr(1) + " " + hosts.ns(1)), std::string::npos)
      << "the agent did not start host 1: " << read_all(agent_log);

  const auto ml = read_metrics(local.out), mr = read_metrics(remote.out);
  ASSERT_EQ(ml.size(), 20u);
  EXPECT_TRUE(same_steps(ml, mr));
  expect_two_rank_metrics(mr);
  EXPECT_TRUE(same_bytes(checkpoint_file(local.out, 20, "model.safetensors"),
                         checkpoint_file(remote.out, 20, "model.safetensors")));
  EXPECT_TRUE(same_bytes(checkpoint_file(local.out, 20, "optimizer.safetensors"),
                         checkpoint_file(remote.out, 20, "optimizer.safetensors")));
  report_time("whole test", since(t0));
}

// ---- on a GPU: the NCCL communicator -------------------------------------------------------------

// One rank under mpirun takes the NCCL path (its communicator, reductions and agreement) and
// trains as a plain run does; GPU results agree to rounding (the embedding's backward adds with
// atomics), so losses are compared within 1e-3 relative.
TEST(CudaDistTrain, NcclOneRankMatchesAPlainRun) {
  SKIP_WITHOUT_MPIRUN();
  SUBLLM_REQUIRE_DEVICE("cuda");
  TempDir tmp("dist_nccl");
  Job plain = tiny_job(prepare_tiny(tmp), tmp.file("plain"));
  plain.device = "cuda";
  plain.nested = true;
  Job ranked = plain;
  ranked.out = tmp.file("ranked");
  const Outcome r1 = run(train_args(plain), tmp.file("plain.log"));
  ASSERT_TRUE(succeeded(r1, "plain: " + joined(train_args(plain))));
  const auto cmd = concat(mpirun(1), train_args(ranked));
  const Outcome r2 = run(cmd, tmp.file("ranked.log"));
  ASSERT_TRUE(succeeded(r2, "mpirun -np 1: " + joined(cmd)));
  const auto a = read_metrics(plain.out), b = read_metrics(ranked.out);
  ASSERT_EQ(a.size(), 20u);
  ASSERT_EQ(b.size(), 20u);
  for (size_t i = 0; i < a.size(); ++i)
    EXPECT_NEAR(b[i]["loss"].get<double>(), a[i]["loss"].get<double>(), 1e-3 * a[i]["loss"].get<double>())
        << "step " << i + 1;
}

}  // namespace dist_train_tests
}  // namespace subllm
