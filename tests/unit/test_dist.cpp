// The communicator: shard bounds, the one-process communicator, and every MPI collective
// between two real ranks (DistMpi starts this binary under mpirun; the DistRankChild tests run
// in those ranks and skip themselves elsewhere).
#include <gtest/gtest.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <climits>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#include "backend/backend.h"
#include "dist/communicator.h"
#include "dist/mpi_communicator.h"
#include "subllm/prepare.h"
#include "test_util.h"

namespace subllm {
namespace dist_tests {

using testing::error_of;

// ---- shard_bounds ------------------------------------------------------------------------------

TEST(ShardBounds, KnownSplits) {
  EXPECT_EQ(shard_bounds(64, 4, 16), (std::vector<int64_t>{0, 16, 32, 48, 64}));
  EXPECT_EQ(shard_bounds(100, 3, 16), (std::vector<int64_t>{0, 32, 64, 100}));
  EXPECT_EQ(shard_bounds(10, 3, 1), (std::vector<int64_t>{0, 3, 6, 10}));
  EXPECT_EQ(shard_bounds(10, 4, 16), (std::vector<int64_t>{0, 0, 0, 0, 10}));
  EXPECT_EQ(shard_bounds(77, 1, 16), (std::vector<int64_t>{0, 77}));
  EXPECT_EQ(shard_bounds(0, 3, 16), (std::vector<int64_t>{0, 0, 0, 0}));
  EXPECT_EQ(shard_bounds(1000, 2), (std::vector<int64_t>{0, 496, 1000}));  // align 16 by default
}

TEST(ShardBounds, TileAlignAndBalance) {
  for (int64_t n = 0; n <= 300; ++n)
    for (int ranks = 1; ranks <= 5; ++ranks)
      for (int64_t align : {1, 4, 16}) {
        const auto b = shard_bounds(n, ranks, align);
        ASSERT_EQ(b.size(), size_t(ranks) + 1);
        ASSERT_EQ(b.front(), 0);
        ASSERT_EQ(b.back(), n);
        for (int r = 0; r < ranks; ++r) {
          ASSERT_LE(b[r], b[r + 1]) << n << " " << ranks << " " << align;
          if (r > 0) {
            ASSERT_EQ(b[r] % align, 0);
          }
          const int64_t len = b[r + 1] - b[r];
          ASSERT_LE(std::llabs(len - n / ranks), align) << n << " " << ranks << " " << align << " rank " << r;
        }
      }
}

TEST(ShardBounds, HugeLengthsDoNotOverflow) {
  const int64_t n = (int64_t(1) << 62) + 5;
  const auto b = shard_bounds(n, 3, 16);
  ASSERT_EQ(b.size(), 4u);
  EXPECT_EQ(b[3], n);
  EXPECT_EQ(b[1] % 16, 0);
  EXPECT_LE(b[1], n / 3);
  EXPECT_GT(b[1], n / 3 - 16);
  EXPECT_LT(b[1], b[2]);
}

TEST(ShardBounds, RefusesBadArguments) {
  EXPECT_NE(error_of([] { shard_bounds(-1, 2); }), "");
  EXPECT_NE(error_of([] { shard_bounds(10, 0); }), "");
  EXPECT_NE(error_of([] { shard_bounds(10, 2, 0); }), "");
}

// ---- launcher detection and the one-process communicator ----------------------------------------

// Sets or clears an environment variable for the scope, then restores it.
class ScopedEnv {
 public:
  ScopedEnv(const char* name, const char* value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = std::string(old);
    if (value)
      setenv(name, value, 1);
    else
      unsetenv(name);
  }
  ~ScopedEnv() {
    if (old_)
      setenv(name_.c_str(), old_->c_str(), 1);
    else
      unsetenv(name_.c_str());
  }

 private:
  std::string name_;
  std::optional<std::string> old_;
};

constexpr const char* kLauncherVars[] = {"OMPI_COMM_WORLD_SIZE", "PMIX_RANK", "PMI_RANK", "PMI_SIZE"};

TEST(Dist, LaunchedByMpiReadsTheLaunchersEnvironment) {
  ScopedEnv a(kLauncherVars[0], nullptr), b(kLauncherVars[1], nullptr), c(kLauncherVars[2], nullptr),
      d(kLauncherVars[3], nullptr);
  EXPECT_FALSE(launched_by_mpi());
  for (const char* var : kLauncherVars) {
    ScopedEnv set(var, "1");
    EXPECT_TRUE(launched_by_mpi()) << var;
  }
  ScopedEnv empty(kLauncherVars[0], "");
  EXPECT_FALSE(launched_by_mpi());
}

TEST(Dist, OneProcessIsOneRankAndEveryCollectiveIsTheIdentity) {
  if (launched_by_mpi()) GTEST_SKIP() << "this process runs under an MPI launcher";
  Communicator& c = communicator_for(cpu_backend());
  EXPECT_EQ(&c, &communicator_for(cpu_backend()));
  EXPECT_STREQ(c.name(), "local");
  EXPECT_EQ(c.rank(), 0);
  EXPECT_EQ(c.size(), 1);

  std::vector<float> x(1000);
  for (size_t i = 0; i < x.size(); ++i) x[i] = 0.5f * float(i) - 7;
  const std::vector<float> before = x;
  c.all_reduce_sum_start(vec(x.data(), 600));
  c.all_reduce_sum_start(mat(x.data() + 600, 20, 20));
  EXPECT_GE(c.wait_reductions(), 0.0);
  c.all_gather(vec(x.data(), 1000), {0, 1000});
  EXPECT_EQ(x, before);

  double h[3] = {1.5, -2, 1e300};
  c.all_reduce_sum_host(h, 3);
  EXPECT_EQ(h[0], 1.5);
  EXPECT_EQ(h[1], -2);
  EXPECT_EQ(h[2], 1e300);

  std::vector<float> full(1000, 0);
  c.gather_host(x.data(), full.data(), {0, 1000});
  EXPECT_EQ(full, before);
  c.gather_host(full.data(), full.data(), {0, 1000});  // in place
  EXPECT_EQ(full, before);

  char bytes[5] = {'a', 'b', 'c', 'd', 'e'};
  c.broadcast_host(bytes, 5);
  EXPECT_EQ(std::string(bytes, 5), "abcde");
  c.barrier();
  abort_job(3);  // one rank: returns
}

TEST(Dist, OneProcessRefusesMisusedViewsAndBounds) {
  if (launched_by_mpi()) GTEST_SKIP() << "this process runs under an MPI launcher";
  Communicator& c = communicator_for(cpu_backend());
  std::vector<double> d(8);
  EXPECT_NE(error_of([&] { c.all_reduce_sum_start(dvec(d.data(), 8)); }).find("F32"), std::string::npos);
  std::vector<float> x(64);
  EXPECT_NE(error_of([&] { c.all_reduce_sum_start(mat(x.data(), 4, 8, 16)); }).find("dense"), std::string::npos);
  EXPECT_NE(error_of([&] { c.all_gather(vec(x.data(), 64), {0, 32, 64}); }), "");
  EXPECT_NE(error_of([&] { c.all_gather(vec(x.data(), 64), {0, 63}); }), "");
  EXPECT_NE(error_of([&] { c.all_gather(vec(x.data(), 64), {1, 64}); }), "");
}

// ---- two ranks under mpirun ---------------------------------------------------------------------

bool is_rank_child() {
  const char* v = std::getenv("SUBLLM_DIST_CHILD");
  return v && *v;
}

// Known values: rank r's element i.
float value(int r, int64_t i) { return float((i % 1024) * (r + 1)) + (r == 0 ? 0.25f : 0.5f); }

// Every collective with known values. EXPECTs only: a rank that left early would leave the other
// waiting in a collective.
void exercise(Communicator& c, int64_t n_reduce) {
  const int r = c.rank(), p = c.size();
  EXPECT_EQ(p, 2);
  if (const char* env = std::getenv("OMPI_COMM_WORLD_RANK")) {
    EXPECT_EQ(r, std::atoi(env));
  }

  // Gradient sums: a dense matrix and a vector, started one after the other, waited together.
  {
    std::vector<float> x((size_t)n_reduce);
    for (int64_t i = 0; i < n_reduce; ++i) x[size_t(i)] = value(r, i);
    const int64_t rows = n_reduce / 2 / 1000, first = rows * 1000;
    c.all_reduce_sum_start(mat(x.data(), rows, 1000));
    c.all_reduce_sum_start(vec(x.data() + first, n_reduce - first));
    EXPECT_GE(c.wait_reductions(), 0.0);
    int64_t bad = 0, first_bad = -1;
    for (int64_t i = 0; i < n_reduce; ++i)
      if (x[size_t(i)] != value(0, i) + value(1, i) && bad++ == 0) first_bad = i;
    EXPECT_EQ(bad, 0) << "first wrong element " << first_bad << ": " << (first_bad >= 0 ? x[size_t(first_bad)] : 0);
    EXPECT_GE(c.wait_reductions(), 0.0);  // nothing pending
  }
  // All-gather with unequal slices, and with an empty one.
  for (const std::vector<int64_t>& bounds :
       {std::vector<int64_t>{0, 37, 1000}, std::vector<int64_t>{0, 0, 1000}, std::vector<int64_t>{0, 1000, 1000}}) {
    std::vector<float> x(1000, NAN);
    for (int64_t i = bounds[r]; i < bounds[r + 1]; ++i) x[size_t(i)] = value(r, i);
    c.all_gather(vec(x.data(), 1000), bounds);
    int64_t bad = 0;
    for (int owner = 0; owner < 2; ++owner)
      for (int64_t i = bounds[owner]; i < bounds[owner + 1]; ++i) bad += x[size_t(i)] != value(owner, i);
    EXPECT_EQ(bad, 0) << "bounds 0, " << bounds[1] << ", 1000";
  }
  // Host sums of doubles.
  {
    double h[3] = {double(r + 1), 0.5 * r, 1e10 * (r + 1)};
    c.all_reduce_sum_host(h, 3);
    EXPECT_EQ(h[0], 3.0);
    EXPECT_EQ(h[1], 0.5);
    EXPECT_EQ(h[2], 3e10);
  }
  // Gather to rank 0, from separate buffers and in place; `full` is ignored elsewhere.
  {
    const std::vector<int64_t> bounds{0, 5, 12};
    std::vector<float> local;
    for (int64_t i = bounds[r]; i < bounds[r + 1]; ++i) local.push_back(value(r, i));
    std::vector<float> full(12, -1);
    c.gather_host(local.data(), r == 0 ? full.data() : nullptr, bounds);
    std::vector<float> in_place(12, -1);
    std::copy(local.begin(), local.end(), in_place.begin() + bounds[r]);
    c.gather_host(in_place.data() + bounds[r], in_place.data(), bounds);
    if (r == 0) {
      for (int owner = 0; owner < 2; ++owner)
        for (int64_t i = bounds[owner]; i < bounds[owner + 1]; ++i) {
          EXPECT_EQ(full[size_t(i)], value(owner, i)) << i;
          EXPECT_EQ(in_place[size_t(i)], value(owner, i)) << i;
        }
    } else {
      EXPECT_EQ(full, std::vector<float>(12, -1));
    }
  }
  // Rank 0's bytes reach everyone.
  {
    std::vector<unsigned char> bytes(10007, 0);
    if (r == 0)
      for (size_t i = 0; i < bytes.size(); ++i) bytes[i] = (unsigned char)(i * 7 + 3);
    c.broadcast_host(bytes.data(), (int64_t)bytes.size());
    int64_t bad = 0;
    for (size_t i = 0; i < bytes.size(); ++i) bad += bytes[i] != (unsigned char)(i * 7 + 3);
    EXPECT_EQ(bad, 0);
  }
  c.barrier();
}

TEST(DistRankChild, EveryCollectiveOnTheCpuBackend) {
  if (!is_rank_child()) GTEST_SKIP() << "runs inside DistMpi.CollectivesAcrossTwoRanks";
  Communicator& c = communicator_for(cpu_backend());
  EXPECT_STREQ(c.name(), "mpi");
  exercise(c, 3'000'000);
}

// The paths for counts beyond int (several requests, slice-by-slice gathers, split broadcasts),
// reached with a small per-call limit.
TEST(DistRankChild, EveryCollectiveSplitIntoSmallCalls) {
  if (!is_rank_child()) GTEST_SKIP() << "runs inside DistMpi.CollectivesAcrossTwoRanks";
  MpiCommunicator c(7);
  exercise(c, 30'011);
}

TEST(DistRankChild, MisuseIsAnErrorNotACrash) {
  if (!is_rank_child()) GTEST_SKIP() << "runs inside DistMpi.CollectivesAcrossTwoRanks";
  Communicator& c = communicator_for(cpu_backend());
  std::vector<float> x(64);
  // Refused before any MPI call, identically on both ranks.
  EXPECT_NE(error_of([&] { c.all_gather(vec(x.data(), 64), {0, 64}); }).find("bounds"), std::string::npos);
  EXPECT_NE(error_of([&] { c.all_reduce_sum_start(mat(x.data(), 4, 8, 16)); }).find("dense"), std::string::npos);
  c.barrier();
}

// Rank 1 fails while rank 0 waits in a collective: abort_job must end both.
TEST(DistAbortChild, OneFailingRankEndsTheJob) {
  const char* mode = std::getenv("SUBLLM_DIST_CHILD");
  if (!mode || std::string(mode) != "abort") GTEST_SKIP() << "runs inside DistMpi.AbortJobEndsEveryRank";
  Communicator& c = communicator_for(cpu_backend());
  if (c.rank() == 1) abort_job(7);
  c.barrier();  // rank 0 stays here until the job is ended
  ADD_FAILURE() << "rank " << c.rank() << " left the barrier";
}

std::string executable_on_path(const std::string& name) {
  const char* path = std::getenv("PATH");
  std::string dirs = path ? path : "/usr/bin:/bin";
  size_t start = 0;
  while (start <= dirs.size()) {
    size_t end = dirs.find(':', start);
    if (end == std::string::npos) end = dirs.size();
    const std::string candidate = dirs.substr(start, end - start) + "/" + name;
    if (end > start && access(candidate.c_str(), X_OK) == 0) return candidate;
    start = end + 1;
  }
  return "";
}

// Runs args with stdout and stderr captured; kills its process group after timeout_s.
// Returns the wait status (-1 on timeout).
int run_captured(const std::vector<std::string>& args, int timeout_s, std::string& output) {
  int fds[2];
  if (pipe(fds) != 0) return -2;
  const pid_t pid = fork();
  if (pid == 0) {
    setpgid(0, 0);
    dup2(fds[1], 1);
    dup2(fds[1], 2);
    close(fds[0]);
    close(fds[1]);
    std::vector<char*> argv;
    for (const auto& a : args) argv.push_back(const_cast<char*>(a.c_str()));
    argv.push_back(nullptr);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(fds[1]);
  setpgid(pid, pid);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(timeout_s);
  bool timed_out = false;
  char buf[4096];
  for (;;) {
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now()).count();
    if (left <= 0) {
      timed_out = true;
      break;
    }
    pollfd pfd{fds[0], POLLIN, 0};
    if (poll(&pfd, 1, (int)std::min<long long>(left, 1000)) > 0) {
      const ssize_t got = read(fds[0], buf, sizeof buf);
      if (got <= 0) break;  // every writer closed: the job is over
      output.append(buf, size_t(got));
    }
  }
  if (timed_out) {
    kill(-pid, SIGTERM);  // mpirun passes it on to the ranks
    for (int i = 0; i < 50 && waitpid(pid, nullptr, WNOHANG) == 0; ++i) usleep(100'000);
    kill(-pid, SIGKILL);
  }
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  return timed_out ? -1 : status;
}

// mpirun running this binary as two ranks with the tests of `filter`; "" when mpirun is missing.
std::vector<std::string> two_rank_command(const std::string& filter) {
  const std::string mpirun = executable_on_path("mpirun");
  if (mpirun.empty()) return {};
  char self[4096];
  const ssize_t len = readlink("/proc/self/exe", self, sizeof self - 1);
  if (len <= 0) return {};
  self[len] = '\0';
  std::vector<std::string> args{mpirun, "-np", "2", "--oversubscribe", "--bind-to", "none"};
  if (geteuid() == 0) args.push_back("--allow-run-as-root");
  // Shared memory between the two local ranks, copying through a buffer (containers often
  // forbid the cross-process reads of CMA).
  for (const char* a : {"--mca", "btl", "self,vader", "--mca", "btl_vader_single_copy_mechanism", "none", "-x",
                        "SUBLLM_DIST_CHILD", "-x", "OMP_NUM_THREADS"})
    args.push_back(a);
  args.push_back(self);
  args.push_back("--gtest_filter=" + filter);
  args.push_back("--gtest_color=no");
  return args;
}

TEST(DistMpi, CollectivesAcrossTwoRanks) {
  if (is_rank_child() || launched_by_mpi()) GTEST_SKIP() << "already inside an MPI job";
  const auto args = two_rank_command("DistRankChild.*");
  if (args.empty()) GTEST_SKIP() << "mpirun not found on PATH: scripts/setup.sh installs openmpi-bin";
  ScopedEnv child("SUBLLM_DIST_CHILD", "1"), threads("OMP_NUM_THREADS", "1");

  std::string out;
  const int status = run_captured(args, 60, out);
  ASSERT_NE(status, -1) << "mpirun did not finish within 60 s; output:\n" << out;
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 0) << "mpirun status " << status << "; output:\n" << out;
  int passed = 0;
  for (size_t at = out.find("[  PASSED  ] 3 tests"); at != std::string::npos;
       at = out.find("[  PASSED  ] 3 tests", at + 1))
    ++passed;
  EXPECT_EQ(passed, 2) << "both ranks should pass all 3 DistRankChild tests; output:\n" << out;
  EXPECT_EQ(out.find("[  FAILED  ]"), std::string::npos) << out;
  EXPECT_EQ(out.find("[  SKIPPED ]"), std::string::npos) << out;
}

TEST(DistMpi, AbortJobEndsEveryRank) {
  if (is_rank_child() || launched_by_mpi()) GTEST_SKIP() << "already inside an MPI job";
  const auto args = two_rank_command("DistAbortChild.*");
  if (args.empty()) GTEST_SKIP() << "mpirun not found on PATH: scripts/setup.sh installs openmpi-bin";
  ScopedEnv child("SUBLLM_DIST_CHILD", "abort"), threads("OMP_NUM_THREADS", "1");
  std::string out;
  const int status = run_captured(args, 60, out);
  ASSERT_NE(status, -1) << "the job outlived its failing rank; output:\n" << out;
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) == 7) << "mpirun status " << status << "; output:\n" << out;
  EXPECT_EQ(out.find("left the barrier"), std::string::npos) << out;
  EXPECT_EQ(out.find("[  PASSED  ]"), std::string::npos) << out;
}

// srun without MPI's process manager would start N unrelated single-rank trainings: refused.
TEST(DistMpi, SrunWithoutAProcessManagerIsRefused) {
  if (is_rank_child() || launched_by_mpi()) GTEST_SKIP() << "already inside an MPI job";
  testing::TempDir tmp("srun");
  const std::string data = testing::prepare_tiny(tmp, 20);
  ScopedEnv tasks("SLURM_NTASKS", "2"), id("SLURM_PROCID", "1");
  std::string out;
  const int status = run_captured({SUBLLM_CLI_PATH, "train", "--data", data, "--out", tmp.file("run"), "-q"}, 60, out);
  EXPECT_TRUE(WIFEXITED(status) && WEXITSTATUS(status) != 0) << out;
  EXPECT_NE(out.find("srun --mpi=pmix"), std::string::npos) << out;
}

}  // namespace dist_tests
}  // namespace subllm
