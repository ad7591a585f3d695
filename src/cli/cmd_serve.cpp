// `subllm serve`: an OpenAI-compatible server with continuous batching, and its page.
#include <cstdio>
#include <filesystem>

#include "cli/commands.h"
#include "serve/server.h"
#include "subllm/error.h"
#include "subllm/generate.h"
#include "subllm/threads.h"

namespace subllm::cli {
namespace {

struct ServeCli {
  std::string model_dir;
  std::string device = "cpu";
  std::string dtype, kv_dtype;
  std::string alias;
  serve::ServeOptions opt;
  int threads = 0;
  float keep_threshold = 0.0f;
};

int run_serve(ServeCli& c) {
  set_num_threads(c.threads);
  LoadedModel lm = load_model_dir(c.model_dir, c.device, c.dtype, c.kv_dtype);
  if (c.opt.context > 0) {
    check(c.opt.context <= lm.model->config().context,
          "-c " + std::to_string(c.opt.context) + " is beyond the model's context of " +
              std::to_string(lm.model->config().context) + " tokens: give at most that");
  }
  lm.model->knobs().keep_threshold = c.keep_threshold;
  c.opt.model_name = c.alias.empty() ? std::filesystem::path(lm.dir).lexically_normal().filename().string() : c.alias;
  if (c.opt.model_name.empty()) c.opt.model_name = "subllm";
  c.opt.on_listening = [&](const std::string& host, int port) {
    std::printf("subllm serve: model '%s' (%s) on http://%s:%d/ with %d slots\n", c.opt.model_name.c_str(),
                lm.model->structure().is_plain() ? "LLaMA" : "SUBLLM", host.c_str(), port, c.opt.parallel);
    std::fflush(stdout);
  };
  serve::serve(lm, c.opt);
  return 0;
}

}  // namespace

void add_serve_command(CLI::App& app, Runner& run) {
  auto c = std::make_shared<ServeCli>();
  auto* s = app.add_subcommand("serve", "Serve a model over HTTP (OpenAI-compatible API, continuous batching, a page at /)");
  s->add_option("-m,--model", c->model_dir, "model folder (a checkpoint) or run folder (its newest checkpoint)")
      ->required();
  s->add_option("--host", c->opt.host, "address to listen on")->capture_default_str();
  s->add_option("--port", c->opt.port, "port to listen on (0: any free port, printed at start)")
      ->capture_default_str()
      ->check(interval("[0, 65535]"));
  s->add_option("--parallel", c->opt.parallel, "slots: sequences decoded together in one pass")
      ->capture_default_str()
      ->check(interval("[1, 256]"));
  s->add_option("--queue", c->opt.queue, "requests that may wait for a slot (beyond: 503)")
      ->capture_default_str()
      ->check(interval("[0, 4096]"));
  s->add_option("--prefill-chunk", c->opt.prefill_chunk, "prompt tokens of one sequence per pass")
      ->capture_default_str()
      ->check(interval("[1, 1048576]"));
  s->add_option("-c,--ctx-size", c->opt.context, "context (0: the model's; it cannot be larger)")
      ->capture_default_str()
      ->check(interval("[0, 1048576]"));
  s->add_option("--alias", c->alias, "the model id clients name (default: the model folder's name)");
  s->add_option("--keep-threshold", c->keep_threshold,
                "SUBLLM: default keep threshold (requests may set their own keep_threshold)")
      ->capture_default_str()
      ->check(interval("(-inf, inf)"));
  add_device_option(s, c->device);
  add_dtype_options(s, c->dtype, c->kv_dtype);
  add_threads_option(s, c->threads);
  s->callback([&run, c] { run = [c] { return run_serve(*c); }; });
}

}  // namespace subllm::cli
