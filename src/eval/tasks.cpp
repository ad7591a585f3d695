// Few-shot task definitions, prompt formatting, the authors' random choices, and the
// spam-assassin task builder.
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <random>

#include "subllm/documents.h"
#include "subllm/error.h"
#include "subllm/eval.h"
#include "subllm/rng.h"
#include "subllm/tokenizer.h"

namespace subllm {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;

std::string read_text_file(const std::string& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  check(in.good(), "cannot read " + what + " " + path);
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  check(!in.bad(), "cannot read " + what + " " + path);
  return s;
}

// Written beside the target and renamed, so a reader never sees half a file.
void write_file_atomic(const fs::path& path, const std::string& text) {
  const fs::path tmp = path.string() + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    check(out.good(), "cannot write " + tmp.string() + ": choose a writable output folder");
    out << text;
    out.close();
    check(out.good(), "cannot write " + tmp.string() + ": check free disk space");
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) {
    fs::remove(tmp, ec);
    throw Error("cannot move " + tmp.string() + " to " + path.string());
  }
}

// ---------------------------------------------------------------------------------------
// Templates

struct TemplatePiece {
  bool placeholder = false;
  std::string text;  // literal text, or the placeholder's name
};

bool is_ident_start(char c) { return std::isalpha((unsigned char)c) || c == '_'; }
bool is_ident_char(char c) { return std::isalnum((unsigned char)c) || c == '_'; }

// `{name}` with an identifier inside is a placeholder; any other brace is literal text, so
// JSON-looking templates need no escaping.
std::vector<TemplatePiece> parse_template(const std::string& t) {
  std::vector<TemplatePiece> out;
  std::string lit;
  size_t i = 0;
  while (i < t.size()) {
    if (t[i] == '{' && i + 1 < t.size() && is_ident_start(t[i + 1])) {
      size_t j = i + 1;
      while (j < t.size() && is_ident_char(t[j])) ++j;
      if (j < t.size() && t[j] == '}') {
        if (!lit.empty()) out.push_back({false, std::move(lit)});
        lit.clear();
        out.push_back({true, t.substr(i + 1, j - i - 1)});
        i = j + 1;
        continue;
      }
    }
    lit += t[i++];
  }
  if (!lit.empty()) out.push_back({false, std::move(lit)});
  return out;
}

int field_index(const FewshotTask& task, const std::string& name) {
  for (size_t i = 0; i < task.fields.size(); ++i)
    if (task.fields[i] == name) return (int)i;
  return -1;
}

std::string fill(const FewshotTask& task, const std::vector<TemplatePiece>& pieces, const FewshotExample& ex,
                 const std::string* label) {
  std::string out;
  for (const auto& p : pieces) {
    if (!p.placeholder) {
      out += p.text;
    } else if (p.text == "label") {
      check(label != nullptr, "task " + task.name + ": the query template must not contain {label}");
      out += *label;
    } else {
      const int f = field_index(task, p.text);
      check(f >= 0 && f < (int)ex.fields.size(), "task " + task.name + ": unknown placeholder {" + p.text + "}");
      out += task.strip_fields ? py_strip(ex.fields[f]) : ex.fields[f];
    }
  }
  return out;
}

// The demo template's pieces before {label}, with trailing spaces and tabs of the last
// literal taken off into `gap`.
std::vector<TemplatePiece> query_pieces(const FewshotTask& task, std::string* gap) {
  std::vector<TemplatePiece> pieces = parse_template(task.demo_template), out;
  for (const auto& p : pieces) {
    if (p.placeholder && p.text == "label") break;
    out.push_back(p);
  }
  std::string removed;
  if (!out.empty() && !out.back().placeholder) {
    std::string& s = out.back().text;
    const size_t keep = s.find_last_not_of(" \t") + 1;  // npos + 1 == 0: all blank
    removed = s.substr(keep);
    s.erase(keep);
    if (s.empty()) out.pop_back();
  }
  if (gap) *gap = removed;
  return out;
}

// ---------------------------------------------------------------------------------------
// UTF-8 helpers for Python's notion of whitespace

// Decodes the code point at s[i] (s is valid UTF-8 or the byte is taken as is).
uint32_t decode_at(std::string_view s, size_t i, size_t* len) {
  const unsigned char c = (unsigned char)s[i];
  int n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
  if (i + n > s.size()) n = 1;
  uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
  for (int k = 1; k < n; ++k) cp = (cp << 6) | ((unsigned char)s[i + k] & 0x3F);
  *len = (size_t)n;
  return cp;
}

// Python's str.isspace(): bidi classes WS, B, S and category Zs.
bool is_py_space(uint32_t c) {
  return (c >= 0x09 && c <= 0x0D) || (c >= 0x1C && c <= 0x20) || c == 0x85 || c == 0xA0 || c == 0x1680 ||
         (c >= 0x2000 && c <= 0x200A) || c == 0x2028 || c == 0x2029 || c == 0x202F || c == 0x205F || c == 0x3000;
}

// ---------------------------------------------------------------------------------------
// The spam task

constexpr const char* kSpamFolders[] = {"easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2"};
int spam_label_of(const std::string& folder) { return folder.rfind("spam", 0) == 0 ? 1 : 0; }

std::string spam_source_dir(const SpamTaskOptions& o, const std::function<void(const std::string&)>& log) {
  if (!o.source_dir.empty()) return o.source_dir;
  const std::string cache = o.cache_dir.empty() ? default_cache_dir() : o.cache_dir;
  // The package is unpacked whole; its State of the Union files locate the package root.
  const auto files = default_corpus_files(cache, log);
  check(!files.empty(), "the corpus cache " + cache + " holds no package files: delete it and try again");
  const fs::path package = fs::path(files.front()).parent_path().parent_path().parent_path();
  return (package / "spam-assassin" / "data").string();
}

struct Email {
  std::string text, source;
  int label = 0;
};

void shuffle(std::vector<Email>& v, Rng& rng) {
  for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[rng.below(i)]);
}

std::string to_jsonl(const std::vector<Email>& v) {
  std::string out;
  for (const auto& e : v) out += json{{"text", e.text}, {"label", e.label}, {"source", e.source}}.dump() + "\n";
  return out;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// Tasks

std::vector<std::string> builtin_task_names() {
  return {"sst2", "yelp", "amazon", "agnews", "dbpedia", "tweet_hate", "spam"};
}

// Templates, label words and generation lengths follow the authors' fewshot_eval/fewshot.py.
FewshotTask builtin_task(const std::string& name) {
  FewshotTask t;
  t.name = name;
  t.fields = {"text"};
  t.separator = "\n\n";
  if (name == "sst2" || name == "yelp") {
    t.demo_template = "text: {text} sentiment: {label}";
    t.labels = name == "sst2" ? std::vector<std::string>{"positive", "negative"}
                              : std::vector<std::string>{"negative", "positive"};
    t.max_new_tokens = 3;
  } else if (name == "amazon") {
    t.fields = {"title", "content"};
    t.demo_template = "Title: {title}. Content: {content} Sentiment: {label}";
    t.labels = {"negative", "positive"};
    t.max_new_tokens = 3;
  } else if (name == "agnews") {
    t.demo_template = "Article: {text} Category: {label}";
    t.labels = {"world", "sports", "business", "science"};
    t.max_new_tokens = 4;
  } else if (name == "dbpedia") {
    t.fields = {"title", "content"};
    t.demo_template = "Title: {title}. Content: {content}\nCategory: {label}";
    t.labels = {"Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder", "MeanOfTransportation",
                "Building", "NaturalPlace", "Village", "Animal", "Plant", "Album", "Film", "WrittenWork"};
    t.max_new_tokens = 8;
  } else if (name == "tweet_hate") {
    // The authors' code ends every demonstration with a single newline and writes the test
    // item with a space, not a newline, before "Label:"; kept as they ran it.
    t.demo_template = "Text: {text}\nLabel: {label}";
    t.separator = "\n";
    t.query_template = "Text: {text} Label:";
    t.labels = {"Non-hate", "Hate"};
    t.max_new_tokens = 6;
  } else if (name == "spam") {
    t.demo_template = "Email: {text}\nLabel: {label}";
    t.labels = {"ham", "spam"};
    t.max_new_tokens = 3;
  } else {
    std::string names;
    for (const auto& n : builtin_task_names()) names += (names.empty() ? "" : ", ") + n;
    throw Error("unknown task '" + name + "': the built-in tasks are " + names +
                "; describe another with --task-spec FILE.json");
  }
  return t;
}

void validate_task(const FewshotTask& t) {
  const std::string who = "task " + (t.name.empty() ? std::string("(unnamed)") : t.name);
  check(t.labels.size() >= 2, who + ": give at least two label words");
  for (size_t i = 0; i < t.labels.size(); ++i) {
    check(!py_strip(t.labels[i]).empty() && py_strip(t.labels[i]) == t.labels[i],
          who + ": label " + std::to_string(i) + " ('" + t.labels[i] +
              "') must be non-empty without surrounding whitespace: predictions are stripped before matching");
    check(t.labels[i].find('\n') == std::string::npos, who + ": label " + std::to_string(i) + " has a newline");
    for (size_t j = 0; j < i; ++j)
      check(t.labels[i] != t.labels[j], who + ": labels " + std::to_string(j) + " and " + std::to_string(i) +
                                            " are both '" + t.labels[i] +
                                            "': a generated answer could only ever match the first; give each "
                                            "label its own word");
  }
  for (size_t i = 0; i < t.fields.size(); ++i) {
    check(!t.fields[i].empty() && t.fields[i] != "label", who + ": field names must be non-empty and not 'label'");
    for (size_t j = 0; j < i; ++j) check(t.fields[i] != t.fields[j], who + ": field '" + t.fields[i] + "' is listed twice");
  }
  std::vector<bool> used(t.fields.size(), false);
  auto scan = [&](const std::string& tmpl, const std::string& key, int want_labels) {
    int labels = 0;
    for (const auto& p : parse_template(tmpl)) {
      if (!p.placeholder) continue;
      if (p.text == "label") {
        ++labels;
        continue;
      }
      const int f = field_index(t, p.text);
      check(f >= 0, who + ": " + key + " names {" + p.text + "}, which is not among the fields");
      used[f] = true;
    }
    check(labels == want_labels, who + ": " + key + " must contain {label} " +
                                     (want_labels ? "exactly once" : "nowhere (the test item has no label)"));
  };
  scan(t.demo_template, "the template", 1);
  if (!t.query_template.empty()) scan(t.query_template, "query_template", 0);
  for (size_t i = 0; i < t.fields.size(); ++i)
    check(used[i], who + ": field '" + t.fields[i] + "' is never used by the template");
  check(t.max_new_tokens >= 0, who + ": max_new_tokens must not be negative");
}

FewshotTask load_task_spec(const std::string& path) {
  const std::string text = read_text_file(path, "task spec");
  json j;
  try {
    j = json::parse(text);
  } catch (const json::exception& e) {
    throw Error("task spec " + path + " is not valid JSON: " + e.what());
  }
  check(j.is_object(), "task spec " + path + " must be a JSON object");
  static const char* known[] = {"name", "template", "separator", "query_template", "labels", "fields",
                                "max_new_tokens", "strip_fields"};
  for (const auto& [key, value] : j.items()) {
    (void)value;
    check(std::find(std::begin(known), std::end(known), key) != std::end(known),
          "task spec " + path + ": unknown key \"" + key +
              "\" (keys: name, template, separator, query_template, labels, fields, max_new_tokens, strip_fields)");
  }
  auto str = [&](const char* key, std::string& out, bool required) {
    if (!j.contains(key)) {
      check(!required, "task spec " + path + ": missing key \"" + key + "\"");
      return;
    }
    check(j[key].is_string(), "task spec " + path + ": \"" + key + "\" must be a string");
    out = j[key].get<std::string>();
  };
  auto strings = [&](const char* key, std::vector<std::string>& out) {
    check(j.contains(key), "task spec " + path + ": missing key \"" + key + "\"");
    check(j[key].is_array(), "task spec " + path + ": \"" + key + "\" must be a list of strings");
    out.clear();
    for (const auto& v : j[key]) {
      check(v.is_string(), "task spec " + path + ": \"" + key + "\" must be a list of strings");
      out.push_back(v.get<std::string>());
    }
  };
  FewshotTask t;
  t.name = fs::path(path).stem().string();
  str("name", t.name, false);
  str("template", t.demo_template, true);
  str("separator", t.separator, false);
  str("query_template", t.query_template, false);
  strings("labels", t.labels);
  if (j.contains("fields"))
    strings("fields", t.fields);
  else
    t.fields = {"text"};
  if (j.contains("max_new_tokens")) {
    check(j["max_new_tokens"].is_number_integer(), "task spec " + path + ": \"max_new_tokens\" must be an integer");
    t.max_new_tokens = j["max_new_tokens"].get<int>();
    t.max_new_tokens_exact = t.max_new_tokens > 0;  // 0 keeps the default, the label-length budget
  }
  if (j.contains("strip_fields")) {
    check(j["strip_fields"].is_boolean(), "task spec " + path + ": \"strip_fields\" must be true or false");
    t.strip_fields = j["strip_fields"].get<bool>();
  }
  try {
    validate_task(t);
  } catch (const Error& e) {
    throw Error("task spec " + path + ": " + e.what());
  }
  return t;
}

std::vector<FewshotExample> load_fewshot_jsonl(const std::string& path, const FewshotTask& task) {
  const std::string text = read_text_file(path, "few-shot data");
  std::vector<FewshotExample> out;
  size_t pos = 0, line_no = 0;
  const std::string hint = " (each line: a JSON object with " + [&] {
    std::string s;
    for (const auto& f : task.fields) s += "\"" + f + "\" (string), ";
    return s;
  }() + "\"label\" (integer 0.." + std::to_string(task.labels.size() - 1) + ") for task " + task.name + ")";
  while (pos < text.size()) {
    size_t end = text.find('\n', pos);
    if (end == std::string::npos) end = text.size();
    std::string_view line(text.data() + pos, end - pos);
    pos = end + 1;
    ++line_no;
    if (line_no == 1 && line.substr(0, 3) == "\xEF\xBB\xBF") line.remove_prefix(3);
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    const std::string where = path + ":" + std::to_string(line_no);
    const size_t bad = utf8_error_offset(line);
    check(bad == line.size(), where + ": not UTF-8 (byte " + std::to_string(bad + 1) + " of the line)");
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      throw Error(where + ": malformed JSON: " + e.what() + hint);
    }
    check(j.is_object(), where + ": not a JSON object" + hint);
    FewshotExample ex;
    for (const auto& f : task.fields) {
      check(j.contains(f), where + ": missing field \"" + f + "\"" + hint);
      check(j[f].is_string(), where + ": field \"" + f + "\" is not a string" + hint);
      ex.fields.push_back(j[f].get<std::string>());
    }
    check(j.contains("label"), where + ": missing field \"label\"" + hint);
    const json& l = j["label"];
    long long label = -1;
    if (l.is_number_integer()) {
      label = l.get<long long>();
    } else if (l.is_number_float() && std::floor(l.get<double>()) == l.get<double>() && std::fabs(l.get<double>()) < 1e9) {
      label = (long long)l.get<double>();
    } else {
      throw Error(where + ": \"label\" is not an integer" + hint);
    }
    check(label >= 0 && label < (long long)task.labels.size(),
          where + ": label " + std::to_string(label) + " is outside the task's labels 0.." +
              std::to_string(task.labels.size() - 1));
    ex.label = (int)label;
    ex.line = (int64_t)line_no;
    out.push_back(std::move(ex));
  }
  check(!out.empty(), "few-shot data " + path + " has no examples");
  return out;
}

// ---------------------------------------------------------------------------------------
// Prompts

std::string format_demonstration(const FewshotTask& task, const FewshotExample& ex) {
  check(ex.label >= 0 && ex.label < (int)task.labels.size(), "task " + task.name + ": label out of range");
  return fill(task, parse_template(task.demo_template), ex, &task.labels[ex.label]) + task.separator;
}

std::string format_query(const FewshotTask& task, const FewshotExample& ex) {
  if (!task.query_template.empty()) return fill(task, parse_template(task.query_template), ex, nullptr);
  return fill(task, query_pieces(task, nullptr), ex, nullptr);
}

std::string label_gap(const FewshotTask& task) {
  std::string gap;
  query_pieces(task, &gap);
  return gap;
}

std::string build_prompt(const FewshotTask& task, const std::vector<const FewshotExample*>& demos,
                         const FewshotExample& query) {
  std::string p;
  for (const FewshotExample* d : demos) p += format_demonstration(task, *d);
  return p + format_query(task, query);
}

// ---------------------------------------------------------------------------------------
// Random choices

std::vector<size_t> numpy_shuffle_order(size_t n, uint32_t seed) {
  check(n < (size_t(1) << 32), "numpy_shuffle_order: too many items");
  // std::mt19937 seeded with an integer is MT19937 with init_genrand, as RandomState(int).
  std::mt19937 gen(seed);
  std::vector<size_t> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = i;
  for (size_t i = n; i-- > 1;) {
    uint64_t mask = i;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    mask |= mask >> 16;
    uint64_t j;
    do j = (uint64_t)gen() & mask;
    while (j > i);
    std::swap(v[i], v[j]);
  }
  return v;
}

std::vector<size_t> choose_demonstrations(size_t n_train, int k, uint32_t seed) {
  std::vector<size_t> order = numpy_shuffle_order(n_train, seed);
  order.resize(std::min(order.size(), (size_t)std::max(k, 0)));
  return order;
}

std::vector<size_t> choose_test_items(size_t n, int64_t m) {
  if (m <= 0 || (size_t)m >= n) {
    std::vector<size_t> all(n);
    for (size_t i = 0; i < n; ++i) all[i] = i;
    return all;
  }
  std::vector<size_t> order = numpy_shuffle_order(n, 666);
  order.resize((size_t)m);
  return order;
}

// ---------------------------------------------------------------------------------------
// Predictions

size_t py_space_prefix(std::string_view s) {
  size_t b = 0, len = 0;
  while (b < s.size() && is_py_space(decode_at(s, b, &len))) b += len;
  return b;
}

std::string py_strip(std::string_view s) {
  const size_t b = py_space_prefix(s);
  size_t len = 0;
  size_t e = b;  // end of the last non-space code point
  for (size_t i = b; i < s.size(); i += len)
    if (!is_py_space(decode_at(s, i, &len))) e = i + len;
  return std::string(s.substr(b, e - b));
}

std::string normalise_prediction(std::string_view generated) {
  const std::string s = py_strip(generated);
  return py_strip(std::string_view(s).substr(0, s.find('\n')));
}

bool prediction_matches(std::string_view generated, std::string_view label) {
  return normalise_prediction(generated) == label;
}

// ---------------------------------------------------------------------------------------
// Spam

std::string email_body_excerpt(std::string_view raw, int max_chars) {
  // Headers end at the first empty line (CRLF or LF).
  size_t pos = 0;
  bool found = false;
  while (pos < raw.size()) {
    size_t end = raw.find('\n', pos);
    if (end == std::string_view::npos) break;
    std::string_view line = raw.substr(pos, end - pos);
    pos = end + 1;
    if (line.empty() || line == "\r") {
      found = true;
      break;
    }
  }
  if (!found) return "";
  std::string body;
  bool space = false;
  for (size_t i = pos; i < raw.size(); ++i) {
    const char c = raw[i];
    if (c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\f' || c == '\v') {
      space = !body.empty();
      continue;
    }
    if (space) body += ' ';
    space = false;
    body += c;
  }
  // Cut at a code point boundary, then back to the last word boundary if it is near.
  size_t i = 0, len = 0;
  int chars = 0;
  while (i < body.size() && chars < max_chars) {
    decode_at(body, i, &len);
    i += len;
    ++chars;
  }
  if (i < body.size()) {
    const size_t sp = body.rfind(' ', i);
    body.erase(sp != std::string::npos && sp >= i * 4 / 5 ? sp : i);
  }
  return body;
}

SpamTaskSummary build_spam_task(const SpamTaskOptions& o) {
  const auto log = o.log ? o.log : [](const std::string& s) { std::fprintf(stderr, "%s\n", s.c_str()); };
  check(o.test_per_class > 0, "--test-per-class must be positive, got " + std::to_string(o.test_per_class));
  check(o.max_chars > 0, "the body excerpt needs a positive length, got " + std::to_string(o.max_chars));
  const fs::path src = spam_source_dir(o, log);
  SpamTaskSummary s;
  std::vector<Email> by_class[2];
  for (const char* folder : kSpamFolders) {
    const fs::path dir = src / folder;
    std::error_code ec;
    check(fs::is_directory(dir, ec), "spam-assassin folder " + dir.string() +
                                         " not found: the source needs easy-ham-1, easy-ham-2, hard-ham-1, spam-1 "
                                         "and spam-2 folders of .txt e-mails");
    std::vector<std::string> files;
    for (const auto& e : fs::directory_iterator(dir, ec))
      if (e.is_regular_file(ec) && e.path().extension() == ".txt") files.push_back(e.path().string());
    check(!ec, "cannot list " + dir.string() + ": " + ec.message());
    std::sort(files.begin(), files.end());
    const int label = spam_label_of(folder);
    for (const auto& f : files) {
      const std::string raw = read_text_file(f, "e-mail");
      if (!is_valid_utf8(raw)) {
        ++s.skipped_non_utf8;
        continue;
      }
      std::string body = email_body_excerpt(raw, o.max_chars);
      if (body.empty()) {
        ++s.skipped_empty;
        continue;
      }
      by_class[label].push_back({std::move(body), std::string(folder) + "/" + fs::path(f).filename().string(), label});
    }
  }
  for (int c = 0; c < 2; ++c)
    check(by_class[c].size() >= 2, std::string("the spam-assassin source ") + src.string() + " has fewer than two usable " +
                                       (c ? "spam" : "ham") + " e-mails");
  Rng rng(o.seed);
  std::vector<Email> train, test;
  for (int c = 0; c < 2; ++c) {
    shuffle(by_class[c], rng);
    const size_t n_test = std::min((size_t)o.test_per_class, by_class[c].size() / 2);
    test.insert(test.end(), by_class[c].begin(), by_class[c].begin() + (long)n_test);
    train.insert(train.end(), by_class[c].begin() + (long)n_test, by_class[c].end());
    (c ? s.test_spam : s.test_ham) = (int64_t)n_test;
    (c ? s.train_spam : s.train_ham) = (int64_t)(by_class[c].size() - n_test);
  }
  shuffle(train, rng);
  shuffle(test, rng);

  const fs::path out = o.out_dir;
  std::error_code ec;
  fs::create_directories(out, ec);
  check(fs::is_directory(out, ec), "cannot create output folder " + out.string() + ": choose a writable -o");
  s.train_path = (out / "train.jsonl").string();
  s.test_path = (out / "test.jsonl").string();
  s.spec_path = (out / "task.json").string();
  write_file_atomic(s.train_path, to_jsonl(train));
  write_file_atomic(s.test_path, to_jsonl(test));
  const FewshotTask t = builtin_task("spam");
  // No "max_new_tokens": the label-length budget (longest + 2, at least 3) is the budget
  // --task spam uses, whereas a written value would be taken exactly.
  const json spec = {{"name", t.name},     {"template", t.demo_template}, {"separator", t.separator},
                     {"labels", t.labels}, {"fields", t.fields}};
  write_file_atomic(s.spec_path, spec.dump(2) + "\n");
  return s;
}

}  // namespace subllm
