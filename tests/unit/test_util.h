#pragma once
// Shared helpers for the unit tests: temporary folders, error capture, small corpora.
#include <unistd.h>

#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
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

}  // namespace subllm::testing
