#pragma once
// Turns text into a data folder for training: tokenizer.model, token shards per split and
// manifest.json (see dataset.h) from documents (see documents.h). The library side of
// `subllm prepare`.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "subllm/documents.h"

namespace subllm {

struct PrepareOptions {
  // Files, folders (every regular file below, in path order) and .jsonl files (one JSON object
  // per line with a "text" field, each line a document). Empty: the default corpus.
  std::vector<std::string> inputs;
  std::string out_dir = "data/default";
  int vocab_size = 8192;   // of the tokenizer trained here
  std::string tokenizer;   // an existing sentencepiece model to use instead of training one
  int valid_every = 20;    // every k-th document goes to the validation split
  uint64_t seed = 1;
  int64_t shard_tokens = 16777216;
  std::string cache_dir;   // for the default corpus; empty: $SUBLLM_CACHE_DIR, else data/cache
  // Progress lines and warnings (warnings start with "warning: "); null: stderr.
  std::function<void(const std::string&)> log;
};

struct PrepareSummary {
  std::string out_dir;
  int64_t documents_train = 0, documents_valid = 0;
  int64_t tokens_train = 0, tokens_valid = 0;
  int shards_train = 0, shards_valid = 0;
  int vocab_size = 0;
  std::vector<std::string> sources;  // the input files used, in document order
  std::vector<std::string> skipped;  // input files left out because they are not UTF-8
  double seconds = 0;
};

// Builds the data folder in a temporary sibling and moves it into place only when complete,
// replacing an earlier data folder at `out_dir` (files there that prepare does not write are
// moved into the new folder). Throws Error naming the input at fault.
PrepareSummary prepare_data(const PrepareOptions& options);

}  // namespace subllm
