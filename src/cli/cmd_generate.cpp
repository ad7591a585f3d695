// `subllm generate`: text from a trained model, streamed as it is produced.
#include <cstdio>
#include <fstream>
#include <sstream>

#include "cli/commands.h"
#include "subllm/bench.h"
#include "subllm/error.h"
#include "subllm/generate.h"
#include "subllm/threads.h"

namespace subllm::cli {
namespace {

struct GenerateCli {
  std::string model_dir;
  std::string device = "cpu";
  std::string dtype, kv_dtype;
  std::string prompt;
  std::string prompt_file;
  GenerateOptions opt;
  int threads = 0;
  float keep_threshold = 0.0f;
  bool stats = false;
};

void print_stats(const GenerateStats& s, const Model& m) {
  std::fprintf(stderr, "\n--- stats\n");
  std::fprintf(stderr, "prompt tokens       %d\n", s.prompt_tokens);
  std::fprintf(stderr, "prefill             %.1f tokens/s\n", s.prefill_tokens_per_s());
  std::fprintf(stderr, "time to first token %.1f ms\n", 1e3 * s.first_token_s);
  std::fprintf(stderr, "generated tokens    %d\n", s.generated_tokens);
  std::fprintf(stderr, "decode              %.1f tokens/s\n", s.decode_tokens_per_s());
  for (size_t j = 0; j < s.retention.size(); ++j)
    std::fprintf(stderr, "retention %-9zu %.3f (configured %.2f)\n", j, s.retention[j],
                 m.structure().segments[j + 1].retention);
  const ModelConfig& c = m.config();
  std::fprintf(stderr, "kv heads            %d of %d query heads (%d values per cached row of a block)\n", c.kv_heads(),
               c.n_heads, 2 * c.kv_dim());
  std::fprintf(stderr, "kv cache            %.2f MB (LLaMA would hold %.2f MB, x%.3f)\n", s.kv_cache_bytes / 1048576.0,
               s.kv_cache_bytes_llama / 1048576.0,
               s.kv_cache_bytes_llama ? (double)s.kv_cache_bytes / s.kv_cache_bytes_llama : 0.0);
  std::fprintf(stderr, "weights             %s\n",
               m.weights().mapped() ? "mapped from the file (read on use, shared with the page cache)" : "loaded (a copy)");
  std::fprintf(stderr, "peak rss            %.1f MB\n", peak_rss_mb());
}

// Far more text than any context holds; the bound makes a device such as /dev/zero end
// with an error instead of filling memory.
constexpr size_t kMaxPromptFileBytes = size_t(64) << 20;

std::string read_prompt_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  check((bool)in, "cannot read prompt file '" + path + "'");
  std::string text;
  char buf[65536];
  while (in.read(buf, sizeof buf) || in.gcount() > 0) {
    text.append(buf, (size_t)in.gcount());
    check(text.size() <= kMaxPromptFileBytes,
          "prompt file '" + path + "' is larger than 64 MiB: give a text file of prompts, one per line");
  }
  check(!in.bad(), "cannot read prompt file '" + path + "' (is it a regular file?)");
  return text;
}

int run_generate(GenerateCli& c) {
  set_num_threads(c.threads);
  // The prompt file first: its errors are cheaper to find than loading the model.
  std::vector<std::string> prompts;
  if (!c.prompt_file.empty()) {
    std::istringstream lines(read_prompt_file(c.prompt_file));
    for (std::string line; std::getline(lines, line);)
      if (!line.empty()) prompts.push_back(line);
    check(!prompts.empty(), "prompt file '" + c.prompt_file + "' has no prompts (one per line)");
  }
  LoadedModel lm = load_model_dir(c.model_dir, c.device, c.dtype, c.kv_dtype);
  lm.model->knobs().keep_threshold = c.keep_threshold;
  Generator gen(*lm.model, lm.tokenizer);
  if (!c.prompt_file.empty()) {
    std::vector<GenerateStats> stats;
    auto texts = gen.generate_interleaved(prompts, c.opt, &stats);
    for (size_t i = 0; i < texts.size(); ++i) {
      std::printf("=== %zu: %s\n%s%s\n", i + 1, prompts[i].c_str(), prompts[i].c_str(), texts[i].c_str());
      if (c.stats) print_stats(stats[i], *lm.model);
    }
    return 0;
  }
  std::printf("%s", c.prompt.c_str());
  std::fflush(stdout);
  GenerateStats st;
  gen.generate(
      c.prompt, c.opt,
      [](const std::string& piece) {
        std::fwrite(piece.data(), 1, piece.size(), stdout);
        std::fflush(stdout);
      },
      &st);
  std::printf("\n");
  if (c.stats) print_stats(st, *lm.model);
  return 0;
}

}  // namespace

void add_generate_command(CLI::App& app, Runner& run) {
  auto c = std::make_shared<GenerateCli>();
  auto* g = app.add_subcommand("generate", "Generate text with a trained model (KV cache, streamed output)");
  g->add_option("-m,--model", c->model_dir, "model folder (a checkpoint) or run folder (its newest checkpoint)")
      ->required();
  auto* p = g->add_option("-p,--prompt", c->prompt, "prompt text (empty: start a new document)");
  g->add_option("-f,--file", c->prompt_file, "prompts, one per line, generated interleaved (one token each per round)")->excludes(p);
  g->add_option("-n,--n-predict", c->opt.max_new_tokens, "tokens to generate at most")
      ->capture_default_str()
      ->check(interval("[1, inf)"));
  g->add_option("--temp", c->opt.sampling.temperature, "temperature (0: greedy)")
      ->capture_default_str()
      ->check(interval("[0, inf)"));
  g->add_option("--top-k", c->opt.sampling.top_k, "sample among the k likeliest (0: all)")
      ->capture_default_str()
      ->check(interval("[0, inf)"));
  g->add_option("--top-p", c->opt.sampling.top_p, "nucleus: smallest set with this probability")
      ->capture_default_str()
      ->check(interval("(0, 1]"));
  g->add_option("--repeat-penalty", c->opt.sampling.repeat_penalty, "penalty on recent tokens (1: off)")
      ->capture_default_str()->check(interval("(0, inf)"));
  g->add_option("--repeat-last-n", c->opt.sampling.repeat_last_n, "tokens the penalty looks back")
      ->capture_default_str()
      ->check(interval("[0, inf)"));
  g->add_option("-s,--seed", c->opt.sampling.seed, "seed of the sampler")->capture_default_str();
  add_device_option(g, c->device);
  add_dtype_options(g, c->dtype, c->kv_dtype);
  g->add_option("--stop", c->opt.stop, "stop when this text appears (repeatable)");
  g->add_flag("--truncate", c->opt.truncate, "drop the start of a prompt longer than the context allows");
  g->add_flag("!--no-eos-stop", c->opt.stop_at_eos, "keep generating past the end-of-document token");
  g->add_option("--keep-threshold", c->keep_threshold, "SUBLLM: keep tokens scoring above this (higher: faster)")
      ->capture_default_str()->check(interval("(-inf, inf)"));
  add_threads_option(g, c->threads);
  g->add_flag("--stats", c->stats, "print speed, retention and KV-cache size to stderr");
  g->callback([&run, c] { run = [c] { return run_generate(*c); }; });
}

}  // namespace subllm::cli
