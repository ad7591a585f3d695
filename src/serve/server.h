#pragma once
// `subllm serve`: an OpenAI-compatible HTTP server with continuous batching. One inference
// thread owns the model's Session; HTTP handler threads validate requests, queue them and
// wait on each request's channel (see docs/DESIGN.md, "The server").
#include <cstddef>
#include <functional>
#include <string>

#include "subllm/generate.h"

namespace subllm::serve {

struct ServeOptions {
  std::string host = "127.0.0.1";
  int port = 8080;              // 0: any free port (on_listening says which)
  int parallel = 8;             // slots: sequences decoded together in one pass
  int queue = 64;               // requests waiting for a slot; beyond it, 503
  int prefill_chunk = 256;      // prompt tokens of one sequence per pass, so others keep decoding
  int context = 0;              // tokens a sequence may hold, prompt and generated (0: the model's)
  size_t max_body_bytes = size_t(1) << 20;
  std::string model_name;       // the id /v1/models lists and requests name
  std::function<void(const std::string& host, int port)> on_listening;
};

// Serves until SIGINT or SIGTERM. Throws Error when the address cannot be bound.
void serve(LoadedModel& model, const ServeOptions& opt);

// The page at `/` (plain HTML and JavaScript, no build step).
extern const char* const kPageHtml;

}  // namespace subllm::serve
