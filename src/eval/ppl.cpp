// Perplexity over non-overlapping windows of held-out tokens.
#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>

#include "subllm/dataset.h"
#include "subllm/documents.h"
#include "subllm/error.h"
#include "subllm/eval.h"

namespace subllm {
namespace {

namespace fs = std::filesystem;
using Clock = std::chrono::steady_clock;

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  check(in.good(), "cannot read " + path);
  return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

bool is_data_folder(const fs::path& p) {
  std::error_code ec;
  if (fs::is_directory(p, ec)) return fs::exists(p / "manifest.json", ec);
  return p.filename() == "manifest.json" && fs::is_regular_file(p, ec);
}

// The documents of a text or .jsonl file, as `subllm prepare` reads them; evaluation data
// that is not UTF-8 is an error rather than a skipped file.
std::vector<std::string> documents_of(const std::string& path) {
  FileDocuments f = read_documents(path);
  check(f.bad_utf8_at == std::string::npos,
        "input " + path + " is not UTF-8 text (byte " + std::to_string(f.bad_utf8_at) + ")");
  return std::move(f.docs);
}

}  // namespace

std::vector<int32_t> load_eval_tokens(const std::vector<std::string>& inputs, const Tokenizer& tok,
                                      const std::string& split, int64_t max_tokens) {
  check(!inputs.empty(), "no evaluation data: pass a data folder of `subllm prepare` or text/.jsonl files");
  std::vector<int32_t> out;
  auto full = [&] { return max_tokens > 0 && (int64_t)out.size() >= max_tokens; };
  auto add_document = [&](const std::string& doc) {
    for (int32_t t : tok.encode(doc)) out.push_back(t);
    out.push_back(tok.eos_id());
  };
  for (const auto& input : inputs) {
    if (full()) break;
    const fs::path p = input;
    std::error_code ec;
    if (is_data_folder(p)) {
      TokenDataset ds(input, split);
      check(read_bytes(ds.tokenizer_path()) == read_bytes(tok.path()),
            "data folder " + input + " was tokenized with " + ds.tokenizer_path() +
                ", which differs from the model's tokenizer " + tok.path() +
                ": evaluate the text itself (text or .jsonl files) instead");
      int64_t n = ds.num_tokens();
      if (max_tokens > 0) n = std::min<int64_t>(n, max_tokens - (int64_t)out.size());
      const size_t at = out.size();
      out.resize(at + (size_t)n);
      ds.read(0, n, out.data() + at);
    } else if (fs::is_directory(p, ec)) {
      std::vector<std::string> files;
      for (auto it = fs::recursive_directory_iterator(p, ec); !ec && it != fs::recursive_directory_iterator();
           it.increment(ec))
        if (it->is_regular_file(ec)) files.push_back(it->path().string());
      check(!ec, "cannot list " + input + ": " + ec.message());
      std::sort(files.begin(), files.end());
      for (const auto& f : files) {
        if (full()) break;
        for (const auto& d : documents_of(f)) add_document(d);
      }
    } else {
      check(fs::is_regular_file(p, ec), "evaluation input " + input +
                                            " not found: pass a data folder of `subllm prepare`, text files, folders "
                                            "or .jsonl files");
      for (const auto& d : documents_of(input)) add_document(d);
    }
  }
  if (max_tokens > 0 && (int64_t)out.size() > max_tokens) out.resize((size_t)max_tokens);
  return out;
}

PplResult evaluate_ppl(Model& model, const std::vector<int32_t>& tokens, const PplOptions& o) {
  const int context = model.config().context;
  const int T = o.seq > 0 ? o.seq : context;
  check(T <= context, "--seq " + std::to_string(T) + " exceeds the model's context of " + std::to_string(context) +
                          " tokens (tokens_per_sample)");
  check(o.batch > 0, "--batch must be positive, got " + std::to_string(o.batch));
  int64_t predict = (int64_t)tokens.size() - 1;
  if (o.max_tokens > 0) predict = std::min(predict, o.max_tokens);
  check(predict >= 1, "the evaluation data has " + std::to_string(tokens.size()) +
                          " tokens: at least two are needed to predict one");

  const auto t0 = Clock::now();
  if (o.mode == Mode::Train) model.set_train_context(0, o.seed);
  model.reset_retention_stats();
  const int nsub = model.structure().num_subsamplers;
  std::vector<double> seen(nsub, 0), kept(nsub, 0);  // training mode: from the fixed top-k lengths

  PplResult r;
  r.mode = o.mode;
  r.seq = T;
  double total = 0;
  int64_t done = 0;
  std::vector<int32_t> in, tg;
  const int64_t full_windows = predict / T;
  const int tail = (int)(predict % T);
  auto run = [&](int64_t first_window, int b, int len) {
    in.resize((size_t)b * len);
    tg.resize((size_t)b * len);
    for (int i = 0; i < b; ++i) {
      const int64_t start = (first_window + i) * (int64_t)T;
      std::copy_n(tokens.begin() + start, len, in.begin() + (int64_t)i * len);
      std::copy_n(tokens.begin() + start + 1, len, tg.begin() + (int64_t)i * len);
    }
    const double mean = model.forward(in.data(), tg.data(), b, len, nullptr, o.mode);
    total += mean * b * len;
    done += (int64_t)b * len;
    r.windows += b;
    if (o.mode == Mode::Train && nsub > 0) {
      const auto lengths = model.segment_lengths(len);
      const auto& segs = model.structure().segments;
      for (size_t s = 1; s < segs.size(); ++s) {
        seen[segs[s].subsampler] += (double)b * lengths[segs[s].parent];
        kept[segs[s].subsampler] += (double)b * lengths[s];
      }
    }
    if (o.progress) o.progress(done, predict);
  };
  for (int64_t w = 0; w < full_windows; w += o.batch) run(w, (int)std::min<int64_t>(o.batch, full_windows - w), T);
  if (tail > 0) run(full_windows, 1, tail);

  r.tokens = done;
  r.loss = total / (double)done;
  r.perplexity = std::exp(r.loss);
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  r.tokens_per_s = r.seconds > 0 ? done / r.seconds : 0;
  if (o.mode == Mode::Inference) {
    r.retention = model.retention();
  } else {
    for (int j = 0; j < nsub; ++j) r.retention.push_back(seen[j] > 0 ? kept[j] / seen[j] : 0.0);
  }
  return r;
}

DecodeSpeed measure_decode_speed(Model& model, const std::vector<int32_t>& tokens, int prompt, int decode) {
  check(prompt >= 1 && decode >= 1, "the decode measurement needs a prompt and at least one decoded token");
  check(prompt + decode <= model.config().context,
        "prompt " + std::to_string(prompt) + " + " + std::to_string(decode) + " decoded tokens exceed the model's context of " +
            std::to_string(model.config().context) + " tokens: lower --speed-prompt or --speed-decode");
  check((int64_t)tokens.size() >= prompt + decode,
        "the evaluation data has " + std::to_string(tokens.size()) + " tokens; the decode measurement needs " +
            std::to_string(prompt + decode) + ": lower --speed-prompt or --speed-decode");
  std::vector<float> logits((size_t)model.config().vocab_size);
  DecodeSpeed d;
  d.prompt = prompt;
  d.decoded = decode;
  // Round 0 warms the workspaces up; the fastest of the timed rounds counts, so a busy
  // moment of the machine does not decide the figure.
  for (int round = 0; round < 4; ++round) {
    SequenceCache cache = model.new_cache(prompt + decode);
    const auto t0 = Clock::now();
    model.forward_cached(cache, tokens.data(), prompt, logits.data(), false);
    const auto t1 = Clock::now();
    for (int i = 0; i < decode; ++i) model.forward_cached(cache, tokens.data() + prompt + i, 1, logits.data(), false);
    const auto t2 = Clock::now();
    d.kv_cache_bytes = cache.bytes();
    if (round == 0) continue;
    d.prefill_tokens_per_s = std::max(d.prefill_tokens_per_s, prompt / std::chrono::duration<double>(t1 - t0).count());
    d.decode_tokens_per_s = std::max(d.decode_tokens_per_s, decode / std::chrono::duration<double>(t2 - t1).count());
  }
  return d;
}

}  // namespace subllm
