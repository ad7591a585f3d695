#pragma once
// Helpers for the server tests: a running `subllm serve` on a free loopback port, HTTP with
// curl, small model folders with random weights.
#include <poll.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <mutex>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <vector>

#include "subllm/config.h"
#include "subllm/model.h"
#include "subllm/prepare.h"
#include "test_util.h"

namespace subllm::testing {

// `subllm serve -m dir --port 0 -t 1 extra...` (one kernel thread: the tests run many processes
// side by side on a few cores), started at construction (which waits for the
// "listening" line), stopped with SIGTERM at destruction.
class ServerProcess {
 public:
  explicit ServerProcess(const std::string& model_dir, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {SUBLLM_CLI_PATH, "serve", "-m", model_dir, "--port", "0", "-t", "1"};
    args.insert(args.end(), extra.begin(), extra.end());
    std::vector<char*> argv;
    for (auto& a : args) argv.push_back(a.data());
    argv.push_back(nullptr);
    int fds[2];
    if (pipe(fds) != 0) return;
    pid_ = fork();
    if (pid_ == 0) {
      dup2(fds[1], 1);
      dup2(fds[1], 2);
      close(fds[0]);
      close(fds[1]);
      alarm(600);
      execv(argv[0], argv.data());
      _exit(127);
    }
    close(fds[1]);
    fd_ = fds[0];
    // The first line names the address; give the model up to a minute to load.
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (port_ == 0 && std::chrono::steady_clock::now() < deadline) {
      pollfd p{fd_, POLLIN, 0};
      if (poll(&p, 1, 200) <= 0) continue;
      char buf[4096];
      const ssize_t got = read(fd_, buf, sizeof buf);
      if (got <= 0) break;
      std::lock_guard<std::mutex> g(mu_);
      log_.append(buf, (size_t)got);
      const size_t at = log_.find("http://127.0.0.1:");
      if (at != std::string::npos && log_.find('/', at + 17) != std::string::npos)
        port_ = std::atoi(log_.c_str() + at + 17);
    }
    drain_ = std::thread([this] {
      char buf[4096];
      for (ssize_t got; (got = read(fd_, buf, sizeof buf)) > 0;) {
        std::lock_guard<std::mutex> g(mu_);
        log_.append(buf, (size_t)got);
      }
    });
  }
  ~ServerProcess() { stop(); }
  ServerProcess(const ServerProcess&) = delete;
  ServerProcess& operator=(const ServerProcess&) = delete;

  // SIGTERM, then the exit status (128 + signal when a signal ended it; SIGKILL after 20 s).
  int stop() {
    if (pid_ <= 0) return status_;
    kill(pid_, SIGTERM);
    int st = 0;
    for (int i = 0; i < 200; ++i) {
      if (waitpid(pid_, &st, WNOHANG) == pid_) break;
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
      if (i == 199) {
        kill(pid_, SIGKILL);
        waitpid(pid_, &st, 0);
      }
    }
    status_ = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
    pid_ = -1;
    if (drain_.joinable()) drain_.join();
    close(fd_);
    return status_;
  }
  bool alive() const { return pid_ > 0 && kill(pid_, 0) == 0 && waitpid(pid_, nullptr, WNOHANG) == 0; }
  int port() const { return port_; }
  pid_t pid() const { return pid_; }
  std::string url(const std::string& path = "/") const { return "http://127.0.0.1:" + std::to_string(port_) + path; }
  std::string log() {
    std::lock_guard<std::mutex> g(mu_);
    return log_;
  }
  // Resident memory of the server (kB), from /proc.
  long rss_kb() const {
    std::ifstream in("/proc/" + std::to_string(pid_) + "/status");
    for (std::string line; std::getline(in, line);)
      if (line.rfind("VmRSS:", 0) == 0) return std::atol(line.c_str() + 6);
    return -1;
  }

 private:
  pid_t pid_ = -1;
  int fd_ = -1, port_ = 0, status_ = -1;
  std::mutex mu_;
  std::string log_;
  std::thread drain_;
};

struct HttpResult {
  int status = 0;     // HTTP status (0: no response)
  std::string body;
};

// One request with curl: `body` empty means GET. Extra curl arguments go before the URL.
inline HttpResult http(const std::string& url, const std::string& body = "", std::vector<std::string> extra = {}) {
  std::vector<std::string> args = {"/usr/bin/curl", "-s", "-N", "--max-time", "120", "-w", "\n%{http_code}"};
  if (!body.empty()) {
    args.insert(args.end(), {"-H", "Content-Type: application/json", "--data-binary", body});
  }
  args.insert(args.end(), extra.begin(), extra.end());
  args.push_back(url);
  CliResult r = run_program(args);
  HttpResult h;
  const size_t nl = r.output.rfind('\n');
  if (nl == std::string::npos) return h;
  h.status = std::atoi(r.output.c_str() + nl + 1);
  h.body = r.output.substr(0, nl);
  return h;
}

inline nlohmann::json post_json(const ServerProcess& s, const std::string& path, const nlohmann::json& body,
                                int* status = nullptr) {
  HttpResult h = http(s.url(path), body.dump());
  if (status) *status = h.status;
  return nlohmann::json::parse(h.body, nullptr, false);
}

// The data events of a server-sent-event stream, parsed ("[DONE]" kept as a string).
inline std::vector<nlohmann::json> sse_events(const std::string& body) {
  std::vector<nlohmann::json> out;
  size_t at = 0;
  while ((at = body.find("data: ", at)) != std::string::npos) {
    const size_t end = body.find("\n\n", at);
    const std::string data = body.substr(at + 6, end == std::string::npos ? std::string::npos : end - at - 6);
    out.push_back(data == "[DONE]" ? nlohmann::json("[DONE]") : nlohmann::json::parse(data, nullptr, false));
    if (end == std::string::npos) break;
    at = end + 2;
  }
  return out;
}

// A model folder (config.json, model.safetensors, tokenizer.model) with random weights whose
// scores spread around 0 (so subsamplers keep some tokens and drop others), on the tokenizer
// of a 400-piece prepared corpus under tmp.
inline std::string random_model_dir(const TempDir& tmp, const std::string& name, const std::string& structure,
                                    std::vector<float> retentions, int dim = 32, int context = 256) {
  if (!fs::exists(tmp.file("data/tokenizer.model"))) {
    write_corpus(tmp.path() / "corpus", 40);
    PrepareOptions p;
    p.inputs = {(tmp.path() / "corpus").string()};
    p.out_dir = tmp.file("data");
    p.vocab_size = 400;
    p.log = [](const std::string&) {};
    prepare_data(p);
  }
  ModelConfig c;
  c.vocab_size = 400;
  c.dim = dim;
  c.ffn_dim = dim * 3 / 2;
  c.n_heads = 4;
  c.context = context;
  c.structure = structure;
  c.n_layers = (int)std::count(structure.begin(), structure.end(), 'T');
  c.retentions = std::move(retentions);
  Model m(c);
  m.init_weights(7);
  Rng r(7);
  for (const auto& p : m.params()) {
    float* w = m.param_data() + p.offset;
    if (p.name.find("to_scores") != std::string::npos)
      for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)(1.5 * r.normal());
    else if (p.shape.size() == 2 && p.name.find("embed") == std::string::npos)
      for (int64_t i = 0; i < p.numel; ++i) w[i] = (float)(0.08 * r.normal());
  }
  const std::string dir = tmp.file(name);
  fs::create_directories(dir);
  m.save(dir + "/model.safetensors");
  save_config(m.config(), dir + "/config.json");
  fs::copy_file(tmp.file("data/tokenizer.model"), dir + "/tokenizer.model");
  return dir;
}

// A metric's value from /metrics (-1 when absent).
inline double metric(const ServerProcess& s, const std::string& name) {
  HttpResult h = http(s.url("/metrics"));
  size_t at = 0;
  while ((at = h.body.find(name + " ", at)) != std::string::npos) {
    if (at == 0 || h.body[at - 1] == '\n') return std::atof(h.body.c_str() + at + name.size() + 1);
    at += name.size();
  }
  return -1;
}

}  // namespace subllm::testing
