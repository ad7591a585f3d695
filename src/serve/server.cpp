// The server: request validation and the OpenAI response shapes (HTTP handler threads), and
// the scheduler (one inference thread, continuous batching over Session::forward_cached_batch).
#include "serve/server.h"

#include <httplib.h>
#include <pthread.h>
#include <signal.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <ctime>
#include <deque>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "subllm/error.h"

namespace subllm::serve {
namespace {

using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

// A request the client got wrong: 400 with an OpenAI-style error body naming the field.
struct BadRequest {
  std::string message, param;
};

// ---------------------------------------------------------------------------------------
// One sequence's channel between its HTTP handler thread and the inference thread.
struct Job {
  // Set by the handler before queueing; read-only afterwards.
  std::vector<int32_t> prompt;
  GenerateOptions opt;
  bool prompt_has_text = false;
  int index = 0;  // the choice it answers

  std::atomic<bool> cancelled{false};  // the client went away: the loop frees the slot

  // Written by the inference thread under `mu`, read by the handler.
  std::mutex mu;
  std::condition_variable cv;
  std::string text;                              // settled text not yet taken
  std::vector<TokenRecord> records;              // generated tokens not yet taken
  std::vector<TokenRecord> prompt_records;       // once the prompt is in
  bool prompt_ready = false, prompt_taken = false;
  bool finished = false;
  std::string error;                             // the pass failed (500)
  std::string finish_reason;                     // "stop" or "length"
  GenerateStats stats;
  Clock::time_point queued, first_token;
};

// Counters for /metrics.
struct Metrics {
  std::atomic<long> requests{0}, completed{0}, invalid{0}, rejected{0}, cancelled{0};
  std::atomic<long> prompt_tokens{0}, generated_tokens{0}, steps{0};
  std::atomic<int> active{0}, last_batch{0}, queue{0};
  std::mutex rate_mu;
  std::deque<std::pair<Clock::time_point, int>> recent;  // generated tokens per step, last 10 s
  void add_generated(int n) {
    generated_tokens += n;
    const auto now = Clock::now();
    std::lock_guard<std::mutex> g(rate_mu);
    recent.emplace_back(now, n);
    while (!recent.empty() && now - recent.front().first > std::chrono::seconds(10)) recent.pop_front();
  }
  double tokens_per_s() {
    std::lock_guard<std::mutex> g(rate_mu);
    const auto now = Clock::now();
    while (!recent.empty() && now - recent.front().first > std::chrono::seconds(10)) recent.pop_front();
    if (recent.empty()) return 0;
    long n = 0;
    for (auto& r : recent) n += r.second;
    const double span = std::max(1.0, std::chrono::duration<double>(now - recent.front().first).count());
    return n / span;
  }
};

// ---------------------------------------------------------------------------------------
// The scheduler: admits queued jobs into free slots between passes, runs one batched pass of
// every active slot (a decode token, or a prefill chunk), samples, publishes.
class Scheduler {
 public:
  Scheduler(LoadedModel& lm, const ServeOptions& opt, Metrics& metrics) : lm_(lm), opt_(opt), metrics_(metrics) {}

  // Runs the inference loop on the calling thread until stop(). The thread that loaded the
  // model runs it, so the OpenMP team of the kernels stays that thread's.
  void run() { loop(); }
  void stop() {
    {
      std::lock_guard<std::mutex> g(mu_);
      stopping_ = true;
    }
    cv_.notify_all();
  }

  // Queues all of a request's jobs, or none: false when the queue cannot take them.
  bool submit(const std::vector<std::shared_ptr<Job>>& jobs) {
    {
      std::lock_guard<std::mutex> g(mu_);
      if (stopping_ || outstanding_ + jobs.size() > (size_t)(opt_.parallel + opt_.queue)) return false;
      for (auto& j : jobs) {
        j->queued = Clock::now();
        queue_.push_back(j);
      }
      outstanding_ += jobs.size();
      metrics_.queue = (int)queue_.size();
    }
    cv_.notify_all();
    return true;
  }

 private:
  struct Slot {
    std::shared_ptr<Job> job;
    std::unique_ptr<Decoding> dec;
    size_t records_sent = 0;
  };

  static void finish(Job& j, const std::string& error) {
    {
      std::lock_guard<std::mutex> g(j.mu);
      j.finished = true;
      j.error = error;
    }
    j.cv.notify_all();
  }

  // Hands what the step settled to the job's handler.
  void publish(Slot& s) {
    Job& j = *s.job;
    Decoding& d = *s.dec;
    std::string text = d.take_text();
    // A token's depth is known once it has gone through the model, one step after it was
    // sampled: with depths asked for, the newest token waits for the next step.
    const auto& recs = d.records();
    size_t ready = recs.size();
    if (j.opt.record_depth && !d.done() && ready > 0) --ready;
    {
      std::lock_guard<std::mutex> g(j.mu);
      j.text += text;
      if (!j.prompt_ready && !d.prefilling()) {
        j.prompt_ready = true;
        j.prompt_records = d.prompt_records();
      }
      for (; s.records_sent < ready; ++s.records_sent) j.records.push_back(recs[s.records_sent]);
      if (j.first_token == Clock::time_point{} && !recs.empty()) j.first_token = Clock::now();
      if (d.done()) {
        j.finished = true;
        j.finish_reason = d.stopped_by_string() || d.ended_by_eos() ? "stop" : "length";
        j.stats = d.stats();
      }
    }
    j.cv.notify_all();
  }

  void loop() {
    const int V = lm_.model->config().vocab_size;
    Session& session = lm_.model->session();
    std::vector<Slot> slots;
    std::vector<float> logits;
    for (;;) {
      {
        std::unique_lock<std::mutex> lock(mu_);
        if (slots.empty()) cv_.wait(lock, [&] { return stopping_ || !queue_.empty(); });
        if (stopping_) break;
        // New requests join between passes.
        while ((int)slots.size() < opt_.parallel && !queue_.empty()) {
          std::shared_ptr<Job> job = queue_.front();
          queue_.pop_front();
          if (job->cancelled) {
            --outstanding_;
            ++metrics_.cancelled;
            finish(*job, "cancelled");
            continue;
          }
          try {
            slots.push_back(Slot{job, std::make_unique<Decoding>(session, lm_.tokenizer, job->prompt, job->opt,
                                                                 job->prompt_has_text)});
          } catch (const std::exception& e) {
            --outstanding_;
            finish(*job, e.what());
          }
        }
        metrics_.queue = (int)queue_.size();
      }
      // Slots whose client went away are freed before the pass.
      for (size_t i = 0; i < slots.size();)
        if (slots[i].job->cancelled) {
          ++metrics_.cancelled;
          finish(*slots[i].job, "cancelled");
          release(slots, i);
        } else {
          ++i;
        }
      metrics_.active = (int)slots.size();
      if (slots.empty()) continue;

      std::vector<Session::CachedStep> steps;
      size_t rows = 0;
      for (Slot& s : slots) {
        steps.push_back(s.dec->next_step(opt_.prefill_chunk));
        rows += s.dec->step_rows();
      }
      logits.resize(rows * (size_t)V);
      try {
        session.forward_cached_batch(steps, logits.data());
      } catch (const std::exception& e) {
        // A failed pass leaves the caches unusable: every active request ends with the error.
        for (Slot& s : slots) finish(*s.job, std::string("the model pass failed: ") + e.what());
        while (!slots.empty()) release(slots, slots.size() - 1);
        metrics_.active = 0;
        continue;
      }
      ++metrics_.steps;
      metrics_.last_batch = (int)steps.size();
      float* row = logits.data();
      int generated = 0;
      for (Slot& s : slots) {
        const int r = s.dec->step_rows();
        const bool was_prefilling = s.dec->prefilling();
        const size_t before = s.dec->records().size();
        s.dec->take_logits(row);
        row += (size_t)r * V;
        generated += (int)(s.dec->records().size() - before);
        if (was_prefilling && !s.dec->prefilling()) metrics_.prompt_tokens += (long)s.job->prompt.size();
        publish(s);
      }
      metrics_.add_generated(generated);
      for (size_t i = 0; i < slots.size();)
        if (slots[i].dec->done()) {
          ++metrics_.completed;
          release(slots, i);
        } else {
          ++i;
        }
      metrics_.active = (int)slots.size();
    }
    for (Slot& s : slots) finish(*s.job, "the server is shutting down");
    std::lock_guard<std::mutex> g(mu_);
    for (auto& j : queue_) finish(*j, "the server is shutting down");
  }

  void release(std::vector<Slot>& slots, size_t i) {
    slots.erase(slots.begin() + (long)i);
    std::lock_guard<std::mutex> g(mu_);
    --outstanding_;
  }

  LoadedModel& lm_;
  const ServeOptions& opt_;
  Metrics& metrics_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::shared_ptr<Job>> queue_;
  size_t outstanding_ = 0;  // jobs queued or in a slot: at most parallel + queue
  bool stopping_ = false;
};

// ---------------------------------------------------------------------------------------
// Request parsing.

const json* field(const json& body, const char* name) {
  auto it = body.find(name);
  return it == body.end() || it->is_null() ? nullptr : &*it;
}

double number_in(const json& body, const char* name, double def, double lo, double hi) {
  const json* v = field(body, name);
  if (!v) return def;
  if (!v->is_number()) throw BadRequest{std::string("'") + name + "' must be a number", name};
  const double x = v->get<double>();
  if (!std::isfinite(x) || x < lo || x > hi)
    throw BadRequest{std::string("'") + name + "' must be between " + json(lo).dump() + " and " + json(hi).dump(), name};
  return x;
}

long integer_in(const json& body, const char* name, long def, long lo, long hi) {
  const json* v = field(body, name);
  if (!v) return def;
  if (!v->is_number_integer() && !(v->is_number_float() && std::floor(v->get<double>()) == v->get<double>()))
    throw BadRequest{std::string("'") + name + "' must be an integer", name};
  const double x = v->get<double>();
  if (!(x >= (double)lo && x <= (double)hi))
    throw BadRequest{std::string("'") + name + "' must be between " + std::to_string(lo) + " and " + std::to_string(hi), name};
  return (long)x;
}

bool boolean(const json& body, const char* name, bool def) {
  const json* v = field(body, name);
  if (!v) return def;
  if (!v->is_boolean()) throw BadRequest{std::string("'") + name + "' must be true or false", name};
  return v->get<bool>();
}

constexpr size_t kMaxPrompts = 16;
constexpr size_t kMaxStops = 4;
constexpr size_t kMaxStopBytes = 256;

// What every generation request shares: the model name, sampling, stops and our extensions.
struct Common {
  GenerateOptions opt;
  bool stream = false;
  bool echo = false;
};

Common parse_common(const json& body, const ServeOptions& so, const Model& model) {
  Common c;
  if (const json* m = field(body, "model")) {
    if (!m->is_string()) throw BadRequest{"'model' must be a string", "model"};
    if (m->get<std::string>() != so.model_name)
      throw BadRequest{"unknown model '" + m->get<std::string>() + "': this server runs '" + so.model_name +
                           "' (GET /v1/models)", "model"};
  }
  const int context = so.context > 0 ? so.context : model.config().context;
  GenerateOptions& o = c.opt;
  o.max_new_tokens = (int)integer_in(body, "max_tokens", 16, 1, 1L << 30);
  if (o.max_new_tokens >= context)
    throw BadRequest{"'max_tokens' is " + std::to_string(o.max_new_tokens) + " but the model's context holds " +
                         std::to_string(context) + " tokens with the prompt: ask for fewer", "max_tokens"};
  o.sampling.temperature = (float)number_in(body, "temperature", 1.0, 0, 100);
  o.sampling.top_p = (float)number_in(body, "top_p", 1.0, 1e-6, 1);
  o.sampling.top_k = (int)integer_in(body, "top_k", 0, 0, 1L << 30);
  o.sampling.seed = (uint64_t)integer_in(body, "seed", 0, -(1L << 53), 1L << 53);
  o.sampling.repeat_penalty = (float)number_in(body, "repeat_penalty", 1.0, 1e-3, 100);
  if (const json* n = field(body, "n"); n && (*n != 1))
    throw BadRequest{"'n' must be 1: one completion per prompt (send a list of prompts for several)", "n"};
  if (const json* s = field(body, "stop")) {
    std::vector<std::string> stops;
    if (s->is_string()) {
      stops.push_back(s->get<std::string>());
    } else if (s->is_array()) {
      for (const auto& x : *s) {
        if (!x.is_string()) throw BadRequest{"'stop' must be a string or a list of strings", "stop"};
        stops.push_back(x.get<std::string>());
      }
    } else {
      throw BadRequest{"'stop' must be a string or a list of strings", "stop"};
    }
    if (stops.size() > kMaxStops) throw BadRequest{"'stop' holds at most 4 strings", "stop"};
    for (auto& x : stops)
      if (x.empty() || x.size() > kMaxStopBytes)
        throw BadRequest{"each 'stop' string must hold 1 to 256 bytes", "stop"};
    o.stop = stops;
  }
  c.stream = boolean(body, "stream", false);
  c.echo = boolean(body, "echo", false);
  o.stop_at_eos = !boolean(body, "ignore_eos", false);
  o.record_depth = boolean(body, "return_tokens", false);
  // The speed/quality knob of SUBLLM models: one threshold, or one per subsampler.
  const int subsamplers = model.structure().num_subsamplers;
  if (const json* k = field(body, "keep_threshold")) {
    if (k->is_number()) {
      const double x = k->get<double>();
      if (!std::isfinite(x) || std::fabs(x) > 1e6) throw BadRequest{"'keep_threshold' must be a finite number", "keep_threshold"};
      o.keep_thresholds.assign(subsamplers, (float)x);
    } else if (k->is_array()) {
      if ((int)k->size() != subsamplers)
        throw BadRequest{"'keep_threshold' as a list needs one number per subsampler (" + std::to_string(subsamplers) + ")",
                         "keep_threshold"};
      for (const auto& x : *k) {
        if (!x.is_number() || !std::isfinite(x.get<double>()) || std::fabs(x.get<double>()) > 1e6)
          throw BadRequest{"'keep_threshold' values must be finite numbers", "keep_threshold"};
        o.keep_thresholds.push_back(x.get<float>());
      }
    } else {
      throw BadRequest{"'keep_threshold' must be a number or a list of numbers", "keep_threshold"};
    }
  }
  return c;
}

// Tokens of one prompt: the document-start token, then the text; too long for the context
// with max_tokens is the client's error.
std::vector<int32_t> prompt_ids(const LoadedModel& lm, const std::string& text, const GenerateOptions& o,
                                int context) {
  std::vector<int32_t> ids{lm.tokenizer.eos_id()};
  for (int32_t t : lm.tokenizer.encode(text)) ids.push_back(t);
  if ((int)ids.size() + o.max_new_tokens > context)
    throw BadRequest{"the prompt has " + std::to_string(ids.size()) + " tokens; with 'max_tokens' " +
                         std::to_string(o.max_new_tokens) + " that exceeds the context of " + std::to_string(context) +
                         " tokens: shorten the prompt or lower max_tokens",
                     "max_tokens"};
  return ids;
}

std::string dump(const json& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

json error_body(const std::string& message, const std::string& type, const std::string& param = "") {
  json e = {{"message", message}, {"type", type}, {"param", param.empty() ? json() : json(param)}, {"code", json()}};
  return json{{"error", e}};
}

void send_error(httplib::Response& res, int status, const std::string& message, const std::string& type,
                const std::string& param = "") {
  res.status = status;
  res.set_content(dump(error_body(message, type, param)), "application/json");
}

// The chat template: our models are not chat-tuned, so the conversation becomes plain text
// they can continue (documented in README.md):
//   <system content>\n\n            (when there is a system message)
//   User: <content>\nAssistant: <content>\n ...
//   User: <content>\nAssistant:
// and generation stops at "\nUser:".
std::string chat_prompt(const json& body) {
  const json* msgs = field(body, "messages");
  if (!msgs || !msgs->is_array() || msgs->empty())
    throw BadRequest{"'messages' must be a non-empty list of {role, content}", "messages"};
  if (msgs->size() > 256) throw BadRequest{"'messages' holds at most 256 messages", "messages"};
  std::string text;
  for (const auto& m : *msgs) {
    if (!m.is_object()) throw BadRequest{"each message must be an object {role, content}", "messages"};
    const json* role = field(m, "role");
    const json* content = field(m, "content");
    if (!role || !role->is_string()) throw BadRequest{"each message needs a string 'role'", "messages"};
    std::string body_text;
    if (content && content->is_string()) {
      body_text = content->get<std::string>();
    } else if (content && content->is_array()) {  // [{type: "text", text: ...}, ...]
      for (const auto& part : *content) {
        if (!part.is_object() || !part.contains("text") || !part["text"].is_string())
          throw BadRequest{"message content parts must be {type: \"text\", text: string}", "messages"};
        body_text += part["text"].get<std::string>();
      }
    } else {
      throw BadRequest{"each message needs a string 'content'", "messages"};
    }
    const std::string r = role->get<std::string>();
    if (r == "system" || r == "developer")
      text += body_text + "\n\n";
    else if (r == "user")
      text += "User: " + body_text + "\n";
    else if (r == "assistant")
      text += "Assistant: " + body_text + "\n";
    else
      throw BadRequest{"unknown role '" + r + "': use system, user or assistant", "messages"};
  }
  return text + "Assistant:";
}

json usage_of(const std::vector<std::shared_ptr<Job>>& jobs) {
  long prompt = 0, completion = 0;
  size_t kv = 0;
  for (auto& j : jobs) {
    prompt += j->stats.prompt_tokens;
    completion += j->stats.generated_tokens;
    kv += j->stats.kv_cache_bytes;
  }
  json u = {{"prompt_tokens", prompt}, {"completion_tokens", completion}, {"total_tokens", prompt + completion}};
  if (!jobs.empty() && !jobs[0]->stats.retention.empty()) {
    // SUBLLM: the kept fraction at each subsampler, and the key/value cache bytes held.
    json r = json::array();
    for (auto& j : jobs) r.push_back(j->stats.retention);
    u["retention"] = jobs.size() == 1 ? r[0] : r;
  }
  u["kv_cache_bytes"] = kv;
  return u;
}

// One token of `return_tokens`: its id, the text it completed and how deep it went.
json token_json(const TokenRecord& t) {
  json j = {{"id", t.id}, {"text", t.text}, {"depth", t.depth}};
  if (!std::isnan(t.logprob)) j["logprob"] = t.logprob;
  return j;
}

// A token as it reads inside a text: its piece with the word-start mark as a space (byte and
// control pieces as decode renders them alone).
std::string token_surface(const Tokenizer& tok, int32_t id) {
  if (tok.is_byte(id) || tok.is_control(id) || tok.is_unknown(id)) return tok.decode({id});
  const std::string piece = tok.id_to_piece(id);
  const std::string mark = "\xe2\x96\x81";  // U+2581, sentencepiece's word-start mark
  std::string out;
  for (size_t i = 0; i < piece.size();) {
    if (piece.compare(i, mark.size(), mark) == 0) {
      out += ' ';
      i += mark.size();
    } else {
      out += piece[i++];
    }
  }
  return out;
}

// OpenAI's legacy logprobs object for a run of tokens starting at byte `offset` of the text.
void add_logprobs(json& lp, const Tokenizer& tok, const std::vector<TokenRecord>& recs, size_t& offset) {
  for (const auto& t : recs) {
    lp["tokens"].push_back(t.text);
    lp["token_logprobs"].push_back(std::isnan(t.logprob) ? json() : json(t.logprob));
    json top = json::object();
    for (auto& [id, l] : t.top) top[token_surface(tok, id)] = l;
    lp["top_logprobs"].push_back(t.top.empty() && std::isnan(t.logprob) ? json() : top);
    lp["text_offset"].push_back(offset);
    offset += t.text.size();
  }
}

json empty_logprobs() {
  return json{{"tokens", json::array()}, {"token_logprobs", json::array()}, {"top_logprobs", json::array()},
              {"text_offset", json::array()}};
}

std::atomic<long> g_ids{0};
std::string new_id(const char* prefix) { return std::string(prefix) + std::to_string(++g_ids) + "-" + std::to_string(::time(nullptr)); }

// ---------------------------------------------------------------------------------------
class Server {
 public:
  Server(LoadedModel& lm, const ServeOptions& opt) : lm_(lm), opt_(opt), sched_(lm, opt, metrics_) {}

  void run() {
    httplib::Server svr;
    const int threads = opt_.parallel + opt_.queue + 16;
    svr.new_task_queue = [threads] { return new httplib::ThreadPool((size_t)threads); };
    svr.set_payload_max_length(opt_.max_body_bytes);
    svr.set_keep_alive_max_count(1000);
    svr.set_read_timeout(30);
    svr.set_write_timeout(30);
    svr.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr) {
      send_error(res, 500, "internal error", "server_error");
    });
    svr.Get("/", [](const httplib::Request&, httplib::Response& res) { res.set_content(kPageHtml, "text/html; charset=utf-8"); });
    svr.Get("/health", [](const httplib::Request&, httplib::Response& res) {
      res.set_content(R"({"status":"ok"})", "application/json");
    });
    svr.Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
      const auto& c = lm_.model->config();
      json m = {{"id", opt_.model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "subllm"},
                {"context", opt_.context > 0 ? opt_.context : c.context}, {"structure", lm_.model->structure().is_plain() ? "llama" : "subllm"}};
      res.set_content(dump(json{{"object", "list"}, {"data", json::array({m})}}), "application/json");
    });
    svr.Get("/metrics", [this](const httplib::Request&, httplib::Response& res) { res.set_content(metrics_text(), "text/plain; version=0.0.4"); });
    svr.Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) { handle(req, res, false); });
    svr.Post("/v1/chat/completions", [this](const httplib::Request& req, httplib::Response& res) { handle(req, res, true); });
    svr.set_error_handler([](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty()) return;
      if (res.status == 404)
        send_error(res, 404, "no route " + req.method + " " + req.path + ": see GET /v1/models, POST /v1/completions, "
                                                                           "POST /v1/chat/completions, GET /health, GET /metrics",
                   "invalid_request_error");
      else if (res.status == 413)
        send_error(res, 413, "request body too large", "invalid_request_error");
      else if (res.status >= 400)
        send_error(res, res.status, "bad request", "invalid_request_error");
    });

    int port = opt_.port;
    if (port == 0) {
      port = svr.bind_to_any_port(opt_.host);
      check(port > 0, "cannot listen on " + opt_.host + ": pick another --host");
    } else {
      check(svr.bind_to_port(opt_.host, port),
            "cannot listen on " + opt_.host + ":" + std::to_string(port) + " (in use?): pick another --port");
    }
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGTERM);
    if (opt_.on_listening) opt_.on_listening(opt_.host, port);
    std::thread http([&svr] { svr.listen_after_bind(); });
    // SIGINT/SIGTERM end the server: a thread waits for them (they are blocked everywhere else)
    // and stops the scheduler and httplib.
    std::thread watcher([this, &svr, set] {
      int sig = 0;
      sigwait(&set, &sig);
      sched_.stop();
      svr.stop();
    });
    sched_.run();
    http.join();
    watcher.join();
  }

 private:
  void handle(const httplib::Request& req, httplib::Response& res, bool chat) {
    ++metrics_.requests;
    std::vector<std::shared_ptr<Job>> jobs;
    Common c;
    try {
      json body;
      try {
        body = json::parse(req.body);
      } catch (const json::exception& e) {
        throw BadRequest{std::string("the body is not valid JSON (") + e.what() + ")", ""};
      }
      if (!body.is_object()) throw BadRequest{"the body must be a JSON object", ""};
      c = parse_common(body, opt_, *lm_.model);
      std::vector<std::string> prompts;
      if (chat) {
        prompts.push_back(chat_prompt(body));
        c.opt.stop.push_back("\nUser:");
        if (c.echo) throw BadRequest{"'echo' is for /v1/completions", "echo"};
      } else {
        const json* p = field(body, "prompt");
        if (!p) throw BadRequest{"'prompt' is required: a string or a list of strings", "prompt"};
        if (p->is_string()) {
          prompts.push_back(p->get<std::string>());
        } else if (p->is_array() && !p->empty() && p->size() <= kMaxPrompts) {
          for (const auto& x : *p) {
            if (!x.is_string()) throw BadRequest{"'prompt' must be a string or a list of strings", "prompt"};
            prompts.push_back(x.get<std::string>());
          }
        } else {
          throw BadRequest{"'prompt' must be a string or a list of 1 to 16 strings", "prompt"};
        }
      }
      if (chat) {
        if (boolean(body, "logprobs", false))
          throw BadRequest{"'logprobs' is served on /v1/completions only (send the chat template as a prompt)",
                           "logprobs"};
      } else if (field(body, "logprobs")) {
        c.opt.top_logprobs = (int)integer_in(body, "logprobs", 0, 0, 5);
      }
      if (c.echo && c.opt.top_logprobs >= 0) c.opt.prompt_logprobs = true;
      if ((int)prompts.size() > opt_.parallel + opt_.queue)
        throw BadRequest{"more prompts than the server's slots and queue hold", "prompt"};
      for (size_t i = 0; i < prompts.size(); ++i) {
        auto j = std::make_shared<Job>();
        j->opt = c.opt;
        j->opt.sampling.seed = c.opt.sampling.seed + i;
        j->prompt = prompt_ids(lm_, prompts[i], c.opt, opt_.context > 0 ? opt_.context : lm_.model->config().context);
        j->prompt_has_text = !prompts[i].empty();
        j->index = (int)i;
        jobs.push_back(j);
      }
    } catch (const BadRequest& e) {
      ++metrics_.invalid;
      send_error(res, 400, e.message, "invalid_request_error", e.param);
      return;
    }
    if (!sched_.submit(jobs)) {
      ++metrics_.rejected;
      send_error(res, 503, "the server is busy: every slot is taken and the queue is full; retry later",
                 "server_busy");
      return;
    }
    if (c.stream)
      stream(res, jobs, c, chat);
    else
      respond(res, jobs, c, chat);
  }

  // Non-streamed: waits for every job, then one JSON object.
  void respond(httplib::Response& res, std::vector<std::shared_ptr<Job>>& jobs, const Common& c, bool chat) {
    json choices = json::array();
    for (auto& j : jobs) {
      std::unique_lock<std::mutex> lock(j->mu);
      j->cv.wait(lock, [&] { return j->finished; });
    }
    for (auto& j : jobs)
      if (!j->error.empty()) {
        for (auto& k : jobs) k->cancelled = true;
        send_error(res, 500, j->error, "server_error");
        return;
      }
    const Tokenizer& tok = lm_.tokenizer;
    for (auto& j : jobs) {
      json ch = {{"index", j->index}, {"finish_reason", j->finish_reason}};
      std::string prompt_text;
      for (size_t i = 1; i < j->prompt_records.size(); ++i) prompt_text += j->prompt_records[i].text;
      if (chat) {
        ch["message"] = {{"role", "assistant"}, {"content", j->text}};
        ch["logprobs"] = json();
      } else {
        ch["text"] = (c.echo ? prompt_text : "") + j->text;
        if (c.opt.top_logprobs >= 0) {
          json lp = empty_logprobs();
          size_t offset = 0;
          if (c.echo)
            add_logprobs(lp, tok, std::vector<TokenRecord>(j->prompt_records.begin() + 1, j->prompt_records.end()), offset);
          add_logprobs(lp, tok, j->records, offset);
          ch["logprobs"] = lp;
        } else {
          ch["logprobs"] = json();
        }
      }
      if (c.opt.record_depth) {
        json pt = json::array(), gt = json::array();
        for (size_t i = 1; i < j->prompt_records.size(); ++i) pt.push_back(token_json(j->prompt_records[i]));
        for (auto& t : j->records) gt.push_back(token_json(t));
        ch["prompt_tokens"] = pt;
        ch["tokens"] = gt;
      }
      choices.push_back(ch);
    }
    json out = {{"id", new_id(chat ? "chatcmpl-" : "cmpl-")}, {"object", chat ? "chat.completion" : "text_completion"},
                {"created", (long)::time(nullptr)}, {"model", opt_.model_name}, {"choices", choices},
                {"usage", usage_of(jobs)}};
    res.set_content(dump(out), "application/json");
  }

  // Streamed: server-sent events, a chunk whenever a job settles text (or tokens).
  void stream(httplib::Response& res, std::vector<std::shared_ptr<Job>> jobs, Common c, bool chat) {
    const std::string id = new_id(chat ? "chatcmpl-" : "cmpl-");
    const long created = (long)::time(nullptr);
    auto sent_role = std::make_shared<std::vector<bool>>(jobs.size(), false);
    auto finished_sent = std::make_shared<std::vector<bool>>(jobs.size(), false);
    res.set_header("Cache-Control", "no-cache");
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, jobs, c, chat, id, created, sent_role, finished_sent](size_t, httplib::DataSink& sink) {
          const Tokenizer& tok = lm_.tokenizer;
          auto send = [&](const json& chunk) {
            const std::string s = "data: " + dump(chunk) + "\n\n";
            return sink.write(s.data(), s.size());
          };
          auto base = [&](json choice) {
            return json{{"id", id}, {"object", chat ? "chat.completion.chunk" : "text_completion"},
                        {"created", created}, {"model", opt_.model_name}, {"choices", json::array({choice})}};
          };
          // Wait for anything new from any job (or the client leaving).
          for (;;) {
            bool any_news = false, all_done = true;
            for (size_t k = 0; k < jobs.size(); ++k) {
              Job& j = *jobs[k];
              std::string text;
              std::vector<TokenRecord> recs, prompt_recs;
              bool prompt_now = false, finished;
              std::string error, reason;
              {
                std::lock_guard<std::mutex> g(j.mu);
                text.swap(j.text);
                recs.swap(j.records);
                if (j.prompt_ready && !j.prompt_taken) {
                  j.prompt_taken = prompt_now = true;
                  prompt_recs = j.prompt_records;
                }
                finished = j.finished;
                error = j.error;
                reason = j.finish_reason;
              }
              if (!finished) all_done = false;
              if (!error.empty()) {
                json e = error_body(error, "server_error");
                const std::string s = "data: " + dump(e) + "\n\n";
                sink.write(s.data(), s.size());
                for (auto& x : jobs) x->cancelled = true;
                sink.done();
                return true;
              }
              const bool first = !(*sent_role)[k];
              if (!text.empty() || !recs.empty() || prompt_now || first || (finished && !(*finished_sent)[k])) {
                json ch = {{"index", j.index}, {"finish_reason", json()}};
                std::string prompt_text;
                if (prompt_now && c.echo)
                  for (size_t i = 1; i < prompt_recs.size(); ++i) prompt_text += prompt_recs[i].text;
                if (chat) {
                  json delta = json::object();
                  if (first) delta["role"] = "assistant";
                  if (!text.empty()) delta["content"] = text;
                  ch["delta"] = delta;
                  ch["logprobs"] = json();
                } else {
                  ch["text"] = prompt_text + text;
                  if (c.opt.top_logprobs >= 0) {
                    json lp = empty_logprobs();
                    size_t offset = 0;
                    if (prompt_now && c.echo)
                      add_logprobs(lp, tok, std::vector<TokenRecord>(prompt_recs.begin() + 1, prompt_recs.end()), offset);
                    add_logprobs(lp, tok, recs, offset);
                    ch["logprobs"] = lp;
                  } else {
                    ch["logprobs"] = json();
                  }
                }
                if (c.opt.record_depth) {
                  json gt = json::array();
                  for (auto& t : recs) gt.push_back(token_json(t));
                  ch["tokens"] = gt;
                  if (prompt_now) {
                    json pt = json::array();
                    for (size_t i = 1; i < prompt_recs.size(); ++i) pt.push_back(token_json(prompt_recs[i]));
                    ch["prompt_tokens"] = pt;
                  }
                }
                (*sent_role)[k] = true;
                json chunk = base(ch);
                if (finished && !(*finished_sent)[k]) {
                  chunk["choices"][0]["finish_reason"] = reason;
                  (*finished_sent)[k] = true;
                  if (jobs.size() == 1) chunk["usage"] = usage_of(jobs);
                }
                if (!send(chunk)) {
                  for (auto& x : jobs) x->cancelled = true;
                  return false;
                }
                any_news = true;
              }
            }
            if (all_done) {
              bool everything_sent = true;
              for (bool b : *finished_sent) everything_sent = everything_sent && b;
              if (everything_sent) {
                if (jobs.size() > 1) {
                  json u = {{"id", id}, {"object", chat ? "chat.completion.chunk" : "text_completion"},
                            {"created", created}, {"model", opt_.model_name}, {"choices", json::array()},
                            {"usage", usage_of(jobs)}};
                  send(u);
                }
                const std::string d = "data: [DONE]\n\n";
                sink.write(d.data(), d.size());
                sink.done();
                return true;
              }
            }
            if (any_news) return true;
            // Nothing new: wait on the first unfinished job, checking the connection now and then.
            for (auto& jp : jobs) {
              std::unique_lock<std::mutex> lock(jp->mu);
              if (jp->finished && jp->text.empty() && jp->records.empty()) continue;
              jp->cv.wait_for(lock, std::chrono::milliseconds(100), [&] {
                return jp->finished || !jp->text.empty() || !jp->records.empty() || (jp->prompt_ready && !jp->prompt_taken);
              });
              break;
            }
            if (!sink.is_writable()) {
              for (auto& x : jobs) x->cancelled = true;
              return false;
            }
          }
        },
        [jobs](bool) {
          // The response ended, completely or not: whatever still runs is freed.
          for (auto& j : jobs) j->cancelled = true;
        });
  }

  std::string metrics_text() {
    std::string s;
    auto add = [&](const char* name, const char* type, const char* help, double v) {
      s += std::string("# HELP ") + name + " " + help + "\n# TYPE " + name + " " + type + "\n" + name + " " +
           json(v).dump() + "\n";
    };
    add("subllm_requests_total", "counter", "Generation requests received.", (double)metrics_.requests);
    add("subllm_requests_completed_total", "counter", "Sequences generated to their end.", (double)metrics_.completed);
    add("subllm_requests_invalid_total", "counter", "Requests refused with 400.", (double)metrics_.invalid);
    add("subllm_requests_rejected_total", "counter", "Requests refused with 503 (queue full).", (double)metrics_.rejected);
    add("subllm_requests_cancelled_total", "counter", "Sequences stopped because the client went away.",
        (double)metrics_.cancelled);
    add("subllm_prompt_tokens_total", "counter", "Prompt tokens processed.", (double)metrics_.prompt_tokens);
    add("subllm_generated_tokens_total", "counter", "Tokens generated.", (double)metrics_.generated_tokens);
    add("subllm_passes_total", "counter", "Batched model passes run.", (double)metrics_.steps);
    add("subllm_queue_length", "gauge", "Requests waiting for a slot.", (double)metrics_.queue);
    add("subllm_active_slots", "gauge", "Sequences being generated.", (double)metrics_.active);
    add("subllm_slots", "gauge", "Slots (--parallel).", (double)opt_.parallel);
    add("subllm_batch_size", "gauge", "Sequences in the last pass.", (double)metrics_.last_batch);
    add("subllm_tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
        metrics_.tokens_per_s());
    return s;
  }

  LoadedModel& lm_;
  const ServeOptions& opt_;
  Metrics metrics_;
  Scheduler sched_;
};

}  // namespace

void serve(LoadedModel& model, const ServeOptions& opt) {
  check(opt.parallel >= 1, "--parallel must be at least 1");
  check(opt.queue >= 0, "--queue must be 0 or more");
  // Block the stop signals before any thread starts, so only the watcher receives them.
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGINT);
  sigaddset(&set, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  // A client closing its socket while we write must not end the process.
  signal(SIGPIPE, SIG_IGN);
  Server server(model, opt);
  server.run();
}

}  // namespace subllm::serve
