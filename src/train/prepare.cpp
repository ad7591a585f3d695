#include "subllm/prepare.h"

#include <signal.h>
#include <stdlib.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <sstream>
#include <thread>

#include "subllm/dataset.h"
#include "subllm/documents.h"
#include "subllm/error.h"
#include "subllm/tokenizer.h"

namespace subllm {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;
using Log = std::function<void(const std::string&)>;

double seconds_since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::string format_mb(int64_t bytes) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f MB", bytes / 1e6);
  return buf;
}

std::string format_seconds(double s) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f s", s);
  return buf;
}

// ---------------------------------------------------------------------------------------
// Reading documents

struct Source {
  std::string path;   // where to read it
  std::string label;  // how the manifest names it
};

// Every regular file below `dir`, walked one folder at a time so that a folder that cannot be
// listed is the one the error names (symbolic links to folders are not followed).
void list_files(const fs::path& dir, std::vector<std::string>& found) {
  std::error_code ec;
  for (auto it = fs::directory_iterator(dir, ec); !ec && it != fs::directory_iterator(); it.increment(ec)) {
    std::error_code type_ec;
    if (it->is_directory(type_ec) && !it->is_symlink(type_ec)) list_files(it->path(), found);
    else if (it->is_regular_file(type_ec)) found.push_back(it->path().string());
  }
  check(!ec, "cannot list input folder " + dir.string() + ": " + ec.message() + " (check its permissions)");
}

// Expands the inputs to files: folders recursively, each folder's files in path order.
std::vector<Source> expand_inputs(const std::vector<std::string>& inputs, const fs::path& out_dir) {
  std::vector<Source> files;
  std::error_code ec;
  const fs::path out_abs = fs::weakly_canonical(out_dir, ec);
  auto inside_output = [&](const fs::path& p) {
    // A data folder prepared earlier sits beside its text often enough; its files are not text.
    const fs::path abs = fs::weakly_canonical(p, ec);
    auto [a, b] = std::mismatch(out_abs.begin(), out_abs.end(), abs.begin(), abs.end());
    return !out_abs.empty() && a == out_abs.end();
  };
  for (const auto& input : inputs) {
    const fs::path p = input;
    if (fs::is_directory(p, ec)) {
      std::vector<std::string> found;
      list_files(p, found);
      found.erase(std::remove_if(found.begin(), found.end(), inside_output), found.end());
      std::sort(found.begin(), found.end());
      for (auto& f : found) files.push_back({f, f});
    } else if (fs::is_regular_file(p, ec)) {
      files.push_back({input, input});
    } else if (fs::exists(p, ec)) {
      throw Error("input " + input + " is neither a file nor a folder");
    } else {
      throw Error("input " + input + " not found: pass text files, folders or .jsonl files");
    }
  }
  return files;
}

// ---------------------------------------------------------------------------------------
// The output folder

// Builds into OUT.tmp-XXXXXX beside OUT and swaps it in at commit(); until then a failure
// removes every trace, including parent folders this run created.
class Staging {
 public:
  explicit Staging(const std::string& out) {
    out_ = fs::path(out).lexically_normal();
    if (!out_.has_filename()) out_ = out_.parent_path();  // "data/default/"
    check(!out_.empty() && out_.filename() != "." && out_.filename() != "..",
          "output folder '" + out + "' must name a folder, e.g. -o data/default");
    std::error_code ec;
    if (fs::exists(out_, ec)) {
      check(fs::is_directory(out_, ec), "output " + out_.string() + " exists and is not a folder: choose another -o");
      const bool empty = fs::is_empty(out_, ec);
      check(empty || fs::exists(out_ / "manifest.json", ec),
            "output folder " + out_.string() +
                " exists and is not a subllm data folder (no manifest.json); it would be replaced, so choose "
                "another -o or remove it");
    }
    fs::path parent = out_.parent_path();
    if (parent.empty()) parent = ".";
    // The outermost missing ancestor, to remove again if this run fails.
    for (fs::path p = parent; !p.empty() && !fs::exists(p, ec); p = p.parent_path()) {
      created_.push_back(p);
      if (p == p.parent_path()) break;
    }
    fs::create_directories(parent, ec);
    if (ec || !fs::is_directory(parent)) {
      remove_created();
      throw Error("cannot create output folder " + out_.string() + ": " +
                  (ec ? ec.message() : parent.string() + " is not a folder") + ": choose a writable -o");
    }
    remove_stale_siblings();
    std::string pattern = out_.string() + ".tmp-" + std::to_string(::getpid()) + "-XXXXXX";
    if (::mkdtemp(pattern.data()) == nullptr) {
      const int err = errno;
      remove_created();
      throw Error("cannot write output folder " + out_.string() + " (creating " + pattern + ": " +
                  std::strerror(err) + "): choose a writable -o");
    }
    tmp_ = pattern;
  }
  ~Staging() {
    if (committed_) return;
    std::error_code ec;
    fs::remove_all(tmp_, ec);
    remove_created();
  }
  Staging(const Staging&) = delete;
  Staging& operator=(const Staging&) = delete;

  const fs::path& tmp() const { return tmp_; }
  const fs::path& out() const { return out_; }

  void commit() {
    std::error_code ec;
    fs::path old;
    if (fs::exists(out_, ec)) {
      old = make_temp_folder(out_.string() + ".old-" + std::to_string(::getpid()) + "-", "folder");
      fs::remove(old, ec);
      fs::rename(out_, old, ec);
      check(!ec, "cannot move the earlier " + out_.string() + " aside: " + ec.message());
    }
    fs::rename(tmp_, out_, ec);
    if (ec) {
      std::error_code ec2;
      if (!old.empty()) fs::rename(old, out_, ec2);
      throw Error("cannot move the new data folder into place at " + out_.string() + ": " + ec.message());
    }
    committed_ = true;
    if (!old.empty() && keep_foreign_files(old)) fs::remove_all(old, ec);
  }

 private:
  // A run killed by a signal (Ctrl-C) cannot clean up after itself; the next run does, for
  // runs whose process is gone. The pid in the name tells them apart from a live run.
  void remove_stale_siblings() {
    std::error_code ec;
    const std::string base = out_.filename().string();
    fs::path parent = out_.parent_path();
    if (parent.empty()) parent = ".";
    for (const auto& e : fs::directory_iterator(parent, ec)) {
      const std::string name = e.path().filename().string();
      for (const char* kind : {".tmp-", ".old-"}) {
        const std::string prefix = base + kind;
        if (name.rfind(prefix, 0) != 0) continue;
        const long pid = std::strtol(name.c_str() + prefix.size(), nullptr, 10);
        if (pid <= 0 || pid == ::getpid() || ::kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue;
        // An aside copy of the previous folder is only garbage once a folder is in place again.
        if (std::string(kind) == ".old-" && !fs::exists(out_, ec)) continue;
        fs::remove_all(e.path(), ec);
      }
    }
  }

  // What `subllm prepare` writes into a data folder; anything else there is the user's.
  static bool written_by_prepare(const std::string& name) {
    if (name == "manifest.json" || name == "tokenizer.model" || name == "tokenizer_train.txt") return true;
    for (const char* split : {"train_", "valid_"})
      if (name.rfind(split, 0) == 0 && name.find(".bin") != std::string::npos) return true;
    return false;
  }

  // Moves the user's files from the earlier folder (now at `old`) into the new one; false,
  // with a warning naming `old`, when one cannot be moved, so that `old` is kept.
  bool keep_foreign_files(const fs::path& old) {
    std::error_code ec;
    bool all_moved = true;
    for (const auto& e : fs::directory_iterator(old, ec)) {
      const fs::path name = e.path().filename();
      if (written_by_prepare(name.string())) continue;
      std::error_code move_ec;
      if (fs::exists(out_ / name, move_ec)) move_ec = std::make_error_code(std::errc::file_exists);
      else fs::rename(e.path(), out_ / name, move_ec);
      if (move_ec) all_moved = false;
    }
    if (ec || !all_moved)
      std::fprintf(stderr, "warning: some files of the earlier %s could not be moved into the new one; they stay in %s\n",
                   out_.string().c_str(), old.string().c_str());
    return !ec && all_moved;
  }

  void remove_created() {
    std::error_code ec;
    for (const auto& p : created_) fs::remove(p, ec);  // deepest first; only if still empty
  }

  fs::path out_, tmp_;
  std::vector<fs::path> created_;
  bool committed_ = false;
};

// ---------------------------------------------------------------------------------------
// Writing a split

struct ShardEntry {
  std::string file;
  int64_t tokens, documents;
};

// Cuts one split's token stream into shards of at most `shard_tokens`; a document may
// continue into the next shard and is counted where its eos lands.
class SplitWriter {
 public:
  SplitWriter(fs::path dir, std::string name, int vocab_size, int64_t shard_tokens)
      : dir_(std::move(dir)), name_(std::move(name)), vocab_(vocab_size), shard_tokens_(shard_tokens) {}

  void add_document(const std::vector<int32_t>& tokens) {
    size_t pos = 0;
    while (pos < tokens.size()) {
      if (!cur_) open();
      const auto n = (size_t)std::min<int64_t>((int64_t)(tokens.size() - pos), shard_tokens_ - cur_->count());
      cur_->append(tokens.data() + pos, (int64_t)n);
      pos += n;
      if (pos == tokens.size()) ++cur_docs_;
      if (cur_->count() == shard_tokens_) finish();
    }
    ++documents_;
    tokens_ += (int64_t)tokens.size();
  }
  void close() {
    if (cur_) finish();
  }
  const std::vector<ShardEntry>& entries() const { return entries_; }
  int64_t documents() const { return documents_; }
  int64_t tokens() const { return tokens_; }

 private:
  void open() {
    char buf[32];
    std::snprintf(buf, sizeof buf, "_%03zu.bin", entries_.size());
    cur_file_ = name_ + buf;
    cur_ = std::make_unique<ShardWriter>((dir_ / cur_file_).string(), vocab_);
  }
  void finish() {
    cur_->close();
    entries_.push_back({cur_file_, cur_->count(), cur_docs_});
    cur_.reset();
    cur_docs_ = 0;
  }

  fs::path dir_;
  std::string name_, cur_file_;
  int vocab_;
  int64_t shard_tokens_;
  std::unique_ptr<ShardWriter> cur_;
  int64_t cur_docs_ = 0, documents_ = 0, tokens_ = 0;
  std::vector<ShardEntry> entries_;
};

nlohmann::ordered_json entries_json(const std::vector<ShardEntry>& entries) {
  nlohmann::ordered_json a = nlohmann::ordered_json::array();
  for (const auto& e : entries) a.push_back({{"file", e.file}, {"tokens", e.tokens}, {"documents", e.documents}});
  return a;
}

// Encodes documents on all cores; sentencepiece's encoder is safe to share between threads.
void encode_batch(const Tokenizer& tok, const std::vector<std::string>& docs, std::vector<std::vector<int32_t>>& out) {
  out.assign(docs.size(), {});
  const int threads = (int)std::clamp<unsigned>(std::thread::hardware_concurrency(), 1, 8);
  std::atomic<size_t> next{0};
  std::exception_ptr failure;
  std::atomic<bool> failed{false};
  auto work = [&] {
    try {
      while (!failed) {
        const size_t i = next++;
        if (i >= docs.size()) break;
        out[i] = tok.encode(docs[i]);
      }
    } catch (...) {
      if (!failed.exchange(true)) failure = std::current_exception();
    }
  };
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
  if (failure) std::rethrow_exception(failure);
}

}  // namespace

PrepareSummary prepare_data(const PrepareOptions& o) {
  const auto t0 = Clock::now();
  const Log log = o.log ? o.log : [](const std::string& s) { std::fprintf(stderr, "%s\n", s.c_str()); };
  check(o.valid_every >= 2, "--valid-every must be at least 2 (every k-th document is held out), got " +
                                std::to_string(o.valid_every));
  check(o.shard_tokens > 0, "--shard-tokens must be positive, got " + std::to_string(o.shard_tokens));
  check(!o.tokenizer.empty() || o.vocab_size >= Tokenizer::kMinVocab,
        "--vocab " + std::to_string(o.vocab_size) + " is too small: " + Tokenizer::min_vocab_reason() +
            ": use a larger --vocab, at least " + std::to_string(Tokenizer::kMinVocab));

  // Cheap checks first, so a typo fails before any heavy work.
  std::vector<Source> sources = expand_inputs(o.inputs, o.out_dir);
  std::optional<Tokenizer> given;
  if (!o.tokenizer.empty()) {
    given = Tokenizer::load(o.tokenizer);
    check(given->eos_id() >= 0, "tokenizer " + o.tokenizer + " has no eos token, which ends every document");
  }
  Staging staging(o.out_dir);
  const fs::path tmp = staging.tmp();

  if (o.inputs.empty()) {
    const std::string cache = o.cache_dir.empty() ? default_cache_dir() : o.cache_dir;
    const std::string root = (fs::path(cache) / kDefaultCorpusFolder / "package").string();
    for (auto& f : default_corpus_files(cache, log)) {
      sources.push_back({f, std::string(kDefaultCorpusPackage) + "/" + fs::relative(f, root).string()});
    }
  }

  // Pass 1: find the documents, assign splits, and gather the training text for the tokenizer.
  PrepareSummary sum;
  std::vector<Source> used;
  std::vector<bool> usable(sources.size(), false);
  int64_t docs = 0, train_bytes = 0, total_bytes = 0;
  const fs::path train_text = tmp / "tokenizer_train.txt";
  std::ofstream text_out;
  if (!given) {
    text_out.open(train_text, std::ios::binary);
    check(text_out.good(), "cannot write " + train_text.string());
  }
  log("reading " + std::to_string(sources.size()) + " input file(s)");
  auto last_log = Clock::now();
  for (size_t i = 0; i < sources.size(); ++i) {
    auto file_docs = read_documents(sources[i].path);
    if (file_docs.bad_utf8_at != std::string::npos) {
      log("warning: skipping " + sources[i].path + ": not UTF-8 text (bad byte at offset " +
          std::to_string(file_docs.bad_utf8_at) + ")");
      sum.skipped.push_back(sources[i].path);
      continue;
    }
    usable[i] = true;
    used.push_back(sources[i]);
    for (const auto& d : file_docs.docs) {
      const bool valid = (docs + 1) % o.valid_every == 0;
      ++docs;
      total_bytes += (int64_t)d.size();
      if (valid) continue;
      train_bytes += (int64_t)d.size();
      if (!given) text_out << d << '\n';
    }
    if (seconds_since(last_log) > 2) {
      log("  read " + std::to_string(i + 1) + "/" + std::to_string(sources.size()) + " files");
      last_log = Clock::now();
    }
  }
  if (!given) {
    text_out.close();
    check(text_out.good(), "cannot write " + train_text.string() + " (disk full?)");
  }
  if (docs == 0) {
    if (!sum.skipped.empty() && used.empty())
      throw Error("no usable text: all " + std::to_string(sum.skipped.size()) +
                  " input files were skipped as not UTF-8 (e.g. " + sum.skipped[0] + "); pass UTF-8 text files");
    throw Error("no usable text: the inputs hold no text (empty or blank files, or .jsonl lines with empty \"text\")");
  }
  const int64_t valid_docs = docs / o.valid_every;
  check(valid_docs > 0, "only " + std::to_string(docs) + " document(s), fewer than --valid-every " +
                            std::to_string(o.valid_every) +
                            ", so the validation split would be empty: add documents (a .jsonl file gives one per "
                            "line) or lower --valid-every (2 at least)");
  log("found " + std::to_string(docs) + " documents (" + std::to_string(docs - valid_docs) + " train, " +
      std::to_string(valid_docs) + " valid), " + format_mb(total_bytes) + " of text");

  // The tokenizer: trained on the training split only, so validation text stays unseen.
  const fs::path model_path = tmp / "tokenizer.model";
  if (given) {
    std::error_code ec;
    fs::copy_file(o.tokenizer, model_path, ec);
    check(!ec, "cannot copy tokenizer " + o.tokenizer + " to " + model_path.string() + ": " + ec.message());
  } else {
    const auto tt = Clock::now();
    log("training tokenizer: BPE, vocab " + std::to_string(o.vocab_size) + ", on " + format_mb(train_bytes) +
        " of training text");
    Tokenizer::train({train_text.string()}, model_path.string(), o.vocab_size, o.seed);
    std::error_code ec;
    fs::remove(train_text, ec);
    log("tokenizer trained in " + format_seconds(seconds_since(tt)));
  }
  const Tokenizer tok = Tokenizer::load(model_path.string());
  const int32_t eos = tok.eos_id();

  // Pass 2: encode in batches of documents, in order, each document followed by eos.
  SplitWriter train(tmp, "train", tok.vocab_size(), o.shard_tokens);
  SplitWriter valid(tmp, "valid", tok.vocab_size(), o.shard_tokens);
  const auto te = Clock::now();
  last_log = te;
  std::vector<std::string> batch;
  std::vector<bool> batch_valid;
  std::vector<std::vector<int32_t>> encoded;
  int64_t batch_bytes = 0, doc_index = 0;
  auto flush_batch = [&] {
    encode_batch(tok, batch, encoded);
    for (size_t k = 0; k < batch.size(); ++k) {
      encoded[k].push_back(eos);
      (batch_valid[k] ? valid : train).add_document(encoded[k]);
    }
    batch.clear();
    batch_valid.clear();
    batch_bytes = 0;
    if (seconds_since(last_log) > 2) {
      log("  encoded " + std::to_string(doc_index) + "/" + std::to_string(docs) + " documents, " +
          std::to_string(train.tokens() + valid.tokens()) + " tokens");
      last_log = Clock::now();
    }
  };
  log("encoding");
  for (size_t i = 0; i < sources.size(); ++i) {
    if (!usable[i]) continue;
    auto file_docs = read_documents(sources[i].path);
    check(file_docs.bad_utf8_at == std::string::npos,
          "input " + sources[i].path + " changed while being prepared: run again");
    for (auto& d : file_docs.docs) {
      batch_bytes += (int64_t)d.size();
      batch_valid.push_back((doc_index + 1) % o.valid_every == 0);
      batch.push_back(std::move(d));
      ++doc_index;
      if (batch_bytes > (8 << 20)) flush_batch();
    }
  }
  flush_batch();
  check(doc_index == docs, "inputs changed while being prepared: run again");
  train.close();
  valid.close();
  log("encoded " + std::to_string(train.tokens() + valid.tokens()) + " tokens in " +
      format_seconds(seconds_since(te)));

  nlohmann::ordered_json manifest = {
      {"format", kManifestFormat},
      {"tokenizer", "tokenizer.model"},
      {"vocab_size", tok.vocab_size()},
      {"pad_id", tok.pad_id()},
      {"bos_id", tok.bos_id()},
      {"eos_id", tok.eos_id()},
      {"train", entries_json(train.entries())},
      {"valid", entries_json(valid.entries())},
      {"documents", {{"train", train.documents()}, {"valid", valid.documents()}}},
      {"valid_every", o.valid_every},
      {"seed", o.seed},
      {"shard_tokens", o.shard_tokens},
  };
  nlohmann::ordered_json names = nlohmann::ordered_json::array();
  for (const auto& s : used) names.push_back(s.label);
  manifest["sources"] = names;
  if (!sum.skipped.empty()) manifest["skipped"] = sum.skipped;
  {
    std::ofstream out(tmp / "manifest.json");
    out << manifest.dump(2) << '\n';
    out.close();
    check(out.good(), "cannot write " + (tmp / "manifest.json").string() + " (disk full?)");
  }
  staging.commit();

  sum.out_dir = staging.out().string();
  sum.documents_train = train.documents();
  sum.documents_valid = valid.documents();
  sum.tokens_train = train.tokens();
  sum.tokens_valid = valid.tokens();
  sum.shards_train = (int)train.entries().size();
  sum.shards_valid = (int)valid.entries().size();
  sum.vocab_size = tok.vocab_size();
  for (const auto& s : used) sum.sources.push_back(s.label);
  sum.seconds = seconds_since(t0);
  return sum;
}

}  // namespace subllm
