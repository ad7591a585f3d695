// `subllm prepare`: text in, a data folder (tokenizer, token shards, manifest) out.
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "subllm/error.h"
#include "subllm/eval.h"
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

// `--task spam`: the few-shot task's train.jsonl / test.jsonl instead of token shards.
struct TaskCli {
  std::string task;
  int test_per_class = 200;
};

int prepare_task(const PrepareOptions& p, const TaskCli& t, bool out_given) {
  check(t.task == "spam", "unknown --task '" + t.task + "': the task prepare builds is spam");
  check(p.inputs.size() <= 1, "--task spam takes at most one input: a spam-assassin data folder");
  SpamTaskOptions o;
  o.out_dir = out_given ? p.out_dir : "data/spam";
  if (!p.inputs.empty()) o.source_dir = p.inputs[0];
  o.cache_dir = p.cache_dir;
  o.seed = p.seed;
  o.test_per_class = t.test_per_class;
  o.log = p.log;
  const SpamTaskSummary s = build_spam_task(o);
  std::printf("%-12s %s\n", "train", s.train_path.c_str());
  std::printf("%-12s %s\n", "test", s.test_path.c_str());
  std::printf("%-12s %s\n", "task spec", s.spec_path.c_str());
  std::printf("%-12s train %lld ham, %lld spam; test %lld ham, %lld spam\n", "e-mails", (long long)s.train_ham,
              (long long)s.train_spam, (long long)s.test_ham, (long long)s.test_spam);
  std::printf("%-12s %lld not UTF-8, %lld without a body\n", "skipped", (long long)s.skipped_non_utf8,
              (long long)s.skipped_empty);
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
      "training documents only, and every document ends with eos.\n"
      "--task spam instead writes the few-shot spam task (train.jsonl, test.jsonl, task.json; default -o data/spam) "
      "from the spam-assassin e-mails of the same npm package, or from the spam-assassin data folder given as input: "
      "text = the body's first ~400 characters, label 0 ham, 1 spam; a balanced test split picked with --seed.");
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
      ->capture_default_str()->check(interval("[2, inf)"));
  cmd->add_option("--seed", opts->seed, "seed for the tokenizer's sampling of training lines")->capture_default_str();
  cmd->add_option("--shard-tokens", opts->shard_tokens, "most tokens in one shard file")
      ->capture_default_str()
      ->check(interval("[1, inf)"));
  auto task = std::make_shared<TaskCli>();
  cmd->add_option("--task", task->task, "build a few-shot task instead of token shards: spam")
      ->check(CLI::IsMember({"spam"}));
  cmd->add_option("--test-per-class", task->test_per_class, "--task spam: test e-mails per class")
      ->capture_default_str()->check(interval("[1, inf)"));
  auto* out = cmd->get_option("--out");
  cmd->callback([&run, opts, task, out] {
    const bool out_given = out->count() > 0;
    run = [opts, task, out_given] { return task->task.empty() ? prepare(*opts) : prepare_task(*opts, *task, out_given); };
  });
}

}  // namespace subllm::cli
