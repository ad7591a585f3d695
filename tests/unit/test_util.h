#pragma once
// Shared helpers for the unit tests: temporary folders, error capture, small corpora.
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <cstdlib>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <nlohmann/json.hpp>
#include <sstream>
#include <string>
#include <vector>

#include "subllm/error.h"
#include "subllm/prepare.h"
#include "subllm/rng.h"

namespace subllm::testing {

namespace fs = std::filesystem;

// A fresh folder under the system temp dir, removed with everything in it at scope exit.
class TempDir {
 public:
  explicit TempDir(const std::string& tag = "test") {
    static std::atomic<int> counter{0};
    path_ = fs::temp_directory_path() /
            ("subllm_" + tag + "_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(path_);
    fs::create_directories(path_);
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }

 private:
  fs::path path_;
};

// The message of the subllm::Error that fn throws, or "" when it throws none.
inline std::string error_of(const std::function<void()>& fn) {
  try {
    fn();
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

inline void write_file(const std::string& path, const std::string& text) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream out(path, std::ios::binary);
  out << text;
}

inline std::string read_all(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

// Varied English sentences, a few with accents and numbers, so a tokenizer sees real merges.
inline std::string make_document(Rng& rng, int index) {
  static const std::vector<std::string> subjects = {
      "The old sailor", "A quiet student", "The government", "Our nation", "The young whale", "Every citizen",
      "The captain",    "A curious child", "The congress",   "The café owner", "My neighbour", "The river"};
  static const std::vector<std::string> verbs = {"watched", "remembered", "built", "carried", "questioned",
                                                 "followed", "described", "protected", "discovered", "answered"};
  static const std::vector<std::string> objects = {
      "the distant harbour", "a heavy burden",    "the small village",  "our common future", "the naïve plan",
      "the stormy ocean",    "a forgotten letter", "the public treasury", "the white mountain", "the long road home"};
  static const std::vector<std::string> endings = {"before dawn", "with great care", "for many years",
                                                   "in silence", "without fear", "at the end of the day"};
  std::string doc = "Document " + std::to_string(index) + ".";
  const int sentences = 6 + (int)rng.below(8);
  for (int s = 0; s < sentences; ++s) {
    doc += " " + subjects[rng.below(subjects.size())] + " " + verbs[rng.below(verbs.size())] + " " +
           objects[rng.below(objects.size())] + " " + endings[rng.below(endings.size())];
    if (rng.below(4) == 0) doc += ", in " + std::to_string(1790 + rng.below(230));
    doc += ".";
    if (rng.below(5) == 0) doc += "\n";
  }
  return doc + "\n";
}

// A corpus of `n` document files doc_000.txt... under `dir`; returns the texts in file order.
inline std::vector<std::string> write_corpus(const fs::path& dir, int n, uint64_t seed = 7) {
  Rng rng(seed);
  std::vector<std::string> docs;
  for (int i = 0; i < n; ++i) {
    docs.push_back(make_document(rng, i));
    char name[32];
    std::snprintf(name, sizeof name, "doc_%03d.txt", i);
    write_file((dir / name).string(), docs.back());
  }
  return docs;
}

// A data folder of `docs` generated documents (every `valid_every`-th held out) with a
// `vocab`-piece tokenizer, in tmp/data: the small corpus training tests run on.
inline std::string prepare_tiny(const TempDir& tmp, int docs = 60, int valid_every = 10, int vocab = 400) {
  write_corpus(tmp.path() / "corpus", docs);
  PrepareOptions p;
  p.inputs = {(tmp.path() / "corpus").string()};
  p.out_dir = tmp.file("data");
  p.vocab_size = vocab;
  p.valid_every = valid_every;
  p.log = [](const std::string&) {};
  prepare_data(p);
  return p.out_dir;
}

// The records of a run folder's metrics.jsonl, in order.
inline std::vector<nlohmann::json> read_metrics(const std::string& run) {
  std::vector<nlohmann::json> out;
  std::ifstream in(fs::path(run) / "metrics.jsonl");
  for (std::string line; std::getline(in, line);) out.push_back(nlohmann::json::parse(line));
  return out;
}

// How a run of the CLI ended and what it printed.
struct CliResult {
  int code = -1;         // exit status, or 128 + the signal that ended it (SIGALRM: over the time limit)
  std::string output;    // stdout and stderr together
  long peak_rss_kb = 0;  // its peak resident memory
};

// Runs the program args[0] with stdout and stderr captured, in `cwd` ("": the tests' own),
// killed after five minutes. file_limit > 0 caps the size of every file it writes
// (RLIMIT_FSIZE) with SIGXFSZ ignored, so a write past it fails with EFBIG the way a write to a
// full disk fails with ENOSPC. uid >= 0 runs it as that user (from root: permissions bind it).
inline CliResult run_program(std::vector<std::string> args, const std::string& cwd = "", rlim_t file_limit = 0,
                             int uid = -1) {
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
    if (uid >= 0 && (setgid((gid_t)uid) != 0 || setuid((uid_t)uid) != 0)) _exit(125);
    alarm(300);
    execv(argv[0], argv.data());
    _exit(127);
  }
  close(fds[1]);
  CliResult r;
  char buf[4096];
  for (ssize_t got; (got = read(fds[0], buf, sizeof buf)) > 0;) r.output.append(buf, (size_t)got);
  close(fds[0]);
  int status = 0;
  struct rusage ru {};
  wait4(pid, &status, 0, &ru);
  r.peak_rss_kb = ru.ru_maxrss;
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
  return r;
}

// The CLI with `args` ($SUBLLM_CLI when set, e.g. another build to compare with, else the one
// built with these tests), as run_program runs it.
inline CliResult run_cli(std::vector<std::string> args, const std::string& cwd = "", rlim_t file_limit = 0) {
  const char* env = std::getenv("SUBLLM_CLI");
  args.insert(args.begin(), env && *env ? env : SUBLLM_CLI_PATH);
  return run_program(args, cwd, file_limit);
}

// The same with the arguments as one line of words separated by spaces (no quoting).
inline CliResult run_cli_line(const std::string& line, const std::string& cwd = "", rlim_t file_limit = 0) {
  std::vector<std::string> args;
  std::istringstream words(line);
  for (std::string w; words >> w;) args.push_back(w);
  return run_cli(args, cwd, file_limit);
}

}  // namespace subllm::testing
