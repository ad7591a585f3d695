// MMLU, BBH and AGIEval as the SUBLLM authors run them (fewshot_eval/fewshot.py): their
// folder layouts, their prompts byte for byte, greedy generation and their scoring.
#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <set>

#include "eval/shared_prefix.h"
#include "kernels/select_kernels.h"
#include "subllm/documents.h"
#include "subllm/error.h"
#include "subllm/suites.h"

namespace subllm {
namespace {

namespace fs = std::filesystem;
using json = nlohmann::json;
using Clock = std::chrono::steady_clock;

std::string read_file_text(const fs::path& path, const std::string& what) {
  std::ifstream in(path, std::ios::binary);
  check(in.good(), "cannot read " + what + " " + path.string());
  std::string s((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  check(!in.bad(), "cannot read " + what + " " + path.string());
  return s;
}

bool is_dir(const fs::path& p) {
  std::error_code ec;
  return fs::is_directory(p, ec);
}

// Files of `dir` whose names end in `suffix`, sorted by name.
std::vector<std::string> files_ending(const fs::path& dir, const std::string& suffix) {
  std::vector<std::string> out;
  std::error_code ec;
  for (const auto& e : fs::directory_iterator(dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.size() >= suffix.size() && name.compare(name.size() - suffix.size(), suffix.size(), suffix) == 0)
      out.push_back(name);
  }
  check(!ec, "cannot list " + dir.string() + ": " + ec.message());
  std::sort(out.begin(), out.end());
  return out;
}

// Keeps the subjects asked for (all when none), in sorted order; an unknown name is an error
// listing what the folder has.
std::vector<std::string> select_subjects(std::vector<std::string> found, const std::vector<std::string>& wanted,
                                         const std::string& where) {
  std::sort(found.begin(), found.end());  // several files may name one subject ("math.jsonl", "math.v2.jsonl")
  found.erase(std::unique(found.begin(), found.end()), found.end());
  check(!found.empty(), where + " holds no subjects: see docs/EVAL.md for the layout and where to get the data");
  if (wanted.empty()) return found;
  for (const auto& w : wanted)
    if (std::find(found.begin(), found.end(), w) == found.end()) {
      std::string names;
      for (size_t i = 0; i < found.size() && i < 12; ++i) names += (i ? ", " : "") + found[i];
      if (found.size() > 12) names += ", ... (" + std::to_string(found.size()) + " in all)";
      throw Error("--subjects: '" + w + "' is not in " + where + ": it has " + names);
    }
  std::vector<std::string> out;
  for (const auto& f : found)
    if (std::find(wanted.begin(), wanted.end(), f) != wanted.end()) out.push_back(f);
  return out;
}

std::string common_prefix(const std::vector<std::string>& texts) {
  if (texts.empty()) return "";
  std::string p = texts[0];
  for (const auto& t : texts) p.resize(std::mismatch(p.begin(), p.end(), t.begin(), t.end()).first - p.begin());
  return p;
}

// ---------------------------------------------------------------------------------------
// pandas.read_csv(header=None)

struct CsvCell {
  std::string text;
  bool quoted = false;
};

// Records of a csv file: comma separated, '"' quotes with "" inside, LF, CRLF or CR line
// ends, empty lines skipped.
std::vector<std::vector<CsvCell>> csv_records(const std::string& text, const std::string& path) {
  std::vector<std::vector<CsvCell>> rows;
  size_t i = text.rfind("\xEF\xBB\xBF", 0) == 0 ? 3 : 0;
  while (i < text.size()) {
    // Empty lines and lines of only spaces and tabs are skipped (skip_blank_lines).
    size_t j = i;
    while (j < text.size() && (text[j] == ' ' || text[j] == '\t')) ++j;
    if (j == text.size() || text[j] == '\n' || text[j] == '\r') {
      i = j == text.size() ? j : j + (text.compare(j, 2, "\r\n") == 0 ? 2 : 1);
      continue;
    }
    std::vector<CsvCell> row;
    for (;;) {
      CsvCell cell;
      if (i < text.size() && text[i] == '"') {
        cell.quoted = true;
        for (++i;; ++i) {
          check(i < text.size(), "csv file " + path + ": a quoted field is never closed (row " +
                                     std::to_string(rows.size() + 1) + "): close it with '\"'");
          if (text[i] != '"') {
            cell.text += text[i];
          } else if (i + 1 < text.size() && text[i + 1] == '"') {
            cell.text += '"';
            ++i;
          } else {
            ++i;
            break;
          }
        }
      }
      while (i < text.size() && text[i] != ',' && text[i] != '\n' && text[i] != '\r') cell.text += text[i++];
      row.push_back(std::move(cell));
      if (i < text.size() && text[i] == ',') {
        ++i;
        continue;
      }
      if (i < text.size()) i += text.compare(i, 2, "\r\n") == 0 ? 2 : 1;
      break;
    }
    rows.push_back(std::move(row));
  }
  return rows;
}

bool is_na_word(const std::string& s) {
  static const std::set<std::string> kNa = {"",     "#N/A", "#N/A N/A", "#NA",  "-1.#IND", "-1.#QNAN", "-NaN",
                                            "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A",     "NA",       "NULL",
                                            "NaN",  "None", "n/a",     "nan",  "null"};
  return kNa.count(s) > 0;
}

std::string trim_blanks(const std::string& s) {
  const size_t b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  return b == std::string::npos ? "" : s.substr(b, e - b + 1);
}

bool is_int_text(const std::string& raw) {
  const std::string s = trim_blanks(raw);
  const size_t d = !s.empty() && (s[0] == '+' || s[0] == '-') ? 1 : 0;
  return d < s.size() && s.size() - d <= 18 && std::all_of(s.begin() + (long)d, s.end(), [](char c) {
           return c >= '0' && c <= '9';
         });
}

bool is_float_text(const std::string& raw) {
  const std::string s = trim_blanks(raw);
  size_t i = 0, digits = 0;
  if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
  while (i < s.size() && std::isdigit((unsigned char)s[i])) ++i, ++digits;
  if (i < s.size() && s[i] == '.')
    for (++i; i < s.size() && std::isdigit((unsigned char)s[i]); ++i) ++digits;
  if (digits == 0) return false;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '+' || s[i] == '-')) ++i;
    const size_t e = i;
    while (i < s.size() && std::isdigit((unsigned char)s[i])) ++i;
    if (i == e) return false;
  }
  return i == s.size();
}

// Python's repr of a float: the shortest digits that read back the same, fixed notation for
// exponents -4..15 ("1.0", "0.0001"), else "1e-05", "1.5e+16".
std::string python_float_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v < 0 ? "-inf" : "inf";
  char buf[64];
  const auto res = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  const size_t e_at = sci.find('e');
  const int exp = std::atoi(sci.c_str() + e_at + 1);
  std::string mant = sci.substr(0, e_at);
  const bool neg = mant[0] == '-';
  if (neg) mant.erase(0, 1);
  std::string digits = mant.substr(0, 1) + (mant.size() > 2 ? mant.substr(2) : "");
  std::string out;
  if (exp >= 16 || exp < -4) {
    out = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    char e[16];
    std::snprintf(e, sizeof e, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    out += e;
  } else if (exp < 0) {
    out = "0." + std::string((size_t)(-exp - 1), '0') + digits;
  } else {
    if (digits.size() <= (size_t)exp + 1) digits.append((size_t)exp + 1 - digits.size(), '0');
    out = digits.substr(0, (size_t)exp + 1) + "." + (digits.size() > (size_t)exp + 1 ? digits.substr((size_t)exp + 1) : "0");
  }
  return (neg ? "-" : "") + out;
}

std::string python_int_text(const std::string& raw) {
  return std::to_string(std::strtoll(trim_blanks(raw).c_str(), nullptr, 10));
}

}  // namespace

std::vector<std::vector<std::string>> read_pandas_csv(const std::string& path) {
  const std::string text = read_file_text(path, "csv file");
  check(is_valid_utf8(text), "csv file " + path + " is not UTF-8 text");
  const auto rows = csv_records(text, path);
  check(!rows.empty(), "csv file " + path + " has no rows");
  const size_t cols = rows[0].size();
  for (size_t r = 0; r < rows.size(); ++r)
    check(rows[r].size() <= cols, "csv file " + path + ": row " + std::to_string(r + 1) + " has " +
                                      std::to_string(rows[r].size()) + " fields, the first row " +
                                      std::to_string(cols) + " (quote fields that contain commas)");
  std::vector<std::vector<std::string>> out(rows.size(), std::vector<std::string>(cols));
  for (size_t c = 0; c < cols; ++c) {
    // The column's type, as pandas infers it from every row.
    bool any_na = false, all_int = true, all_bool = true, all_num = true;
    for (const auto& row : rows) {
      if (c >= row.size() || is_na_word(row[c].text)) {
        any_na = true;
        continue;
      }
      const std::string& s = row[c].text;
      all_int = all_int && is_int_text(s);
      all_num = all_num && (is_int_text(s) || is_float_text(s));
      all_bool = all_bool && (s == "True" || s == "False" || s == "TRUE" || s == "FALSE" || s == "true" || s == "false");
    }
    for (size_t r = 0; r < rows.size(); ++r) {
      std::string& cell = out[r][c];
      if (c >= rows[r].size() || is_na_word(rows[r][c].text)) {
        cell = "nan";
        continue;
      }
      const std::string& s = rows[r][c].text;
      if (all_bool) cell = (s[0] == 'T' || s[0] == 't') ? "True" : "False";
      else if (all_int && !any_na) cell = python_int_text(s);
      else if (all_num) cell = python_float_repr(std::strtod(trim_blanks(s).c_str(), nullptr));
      else cell = s;
    }
  }
  return out;
}

// ---------------------------------------------------------------------------------------
// Suites

Suite parse_suite(const std::string& name) {
  if (name == "mmlu") return Suite::Mmlu;
  if (name == "bbh") return Suite::Bbh;
  if (name == "agieval") return Suite::Agieval;
  throw Error("unknown suite '" + name + "': the suites are mmlu, bbh and agieval");
}

const char* suite_name(Suite s) { return s == Suite::Mmlu ? "mmlu" : s == Suite::Bbh ? "bbh" : "agieval"; }

int suite_max_new_tokens(Suite s) { return s == Suite::Mmlu ? 3 : s == Suite::Bbh ? 1024 : 60; }

// ---------------------------------------------------------------------------------------
// MMLU

namespace {
constexpr const char* kLetters = "ABCD";
}

std::string mmlu_format_subject(const std::string& subject) {
  std::string out;
  size_t pos = 0;
  for (;;) {
    const size_t us = subject.find('_', pos);
    out += " " + subject.substr(pos, us == std::string::npos ? std::string::npos : us - pos);
    if (us == std::string::npos) return out;
    pos = us + 1;
  }
}

std::string mmlu_format_example(const std::vector<std::string>& row, bool include_answer) {
  check(row.size() >= 3 && row.size() <= 6, "an MMLU row has a question, one to four choices and an answer");
  std::string p = row[0];
  const size_t k = row.size() - 2;
  for (size_t j = 0; j < k; ++j) p += std::string("\n") + kLetters[j] + ". " + row[j + 1];
  p += "\nAnswer:";
  if (include_answer) p += " " + row[k + 1] + "\n\n";
  return p;
}

std::string mmlu_prompt(const std::string& subject, const std::vector<std::vector<std::string>>& dev, int shots,
                        const std::vector<std::string>& test_row) {
  check(shots >= 0 && (size_t)shots <= dev.size(), "MMLU " + subject + ": " + std::to_string(shots) +
                                                       " shots need as many dev rows, there are " +
                                                       std::to_string(dev.size()));
  std::string p = "The following are multiple choice questions (with answers) about " + mmlu_format_subject(subject) +
                  ".\n\n";
  for (int i = 0; i < shots; ++i) p += mmlu_format_example(dev[(size_t)i], true);
  return p + mmlu_format_example(test_row, false);
}

namespace {

void check_mmlu_rows(const std::vector<std::vector<std::string>>& rows, const std::string& path, bool answers) {
  const size_t cols = rows.empty() ? 0 : rows[0].size();
  check(cols >= 3 && cols <= 6, "MMLU file " + path + " has " + std::to_string(cols) +
                                    " columns: each row is question, choices (one to four), answer letter");
  if (!answers) return;
  for (size_t r = 0; r < rows.size(); ++r) {
    const std::string& a = rows[r].back();
    check(a.size() == 1 && a[0] >= 'A' && a[0] < 'A' + (char)(cols - 2),
          "MMLU file " + path + ": row " + std::to_string(r + 1) + " answers '" + a + "'; the answer is a letter A.." +
              std::string(1, (char)('A' + cols - 3)) + " naming one of its choices");
  }
}

SuiteData load_mmlu(const fs::path& dir, const SuiteLoadOptions& o) {
  fs::path root = dir;
  if (!is_dir(root / "test") && is_dir(root / "data" / "test")) root /= "data";
  check(is_dir(root / "test") && is_dir(root / "dev"),
        "MMLU folder " + dir.string() + " needs dev/ and test/ (<subject>_dev.csv, <subject>_test.csv): give the MMLU "
        "data folder of the authors' eval_data (eval_data/MMLU/data)");
  SuiteData d;
  d.suite = Suite::Mmlu;
  d.shots = o.shots < 0 ? 5 : o.shots;
  std::vector<std::string> found;
  for (const auto& f : files_ending(root / "test", "_test.csv")) found.push_back(f.substr(0, f.size() - 9));
  d.subjects = select_subjects(found, o.subjects, (root / "test").string());
  for (const auto& subject : d.subjects) {
    const fs::path dev_path = root / "dev" / (subject + "_dev.csv"), test_path = root / "test" / (subject + "_test.csv");
    check(fs::exists(dev_path), "MMLU subject " + subject + " has no dev file " + dev_path.string() +
                                    ": its demonstrations are the first rows of that file");
    const auto dev = read_pandas_csv(dev_path.string());
    const auto test = read_pandas_csv(test_path.string());
    check_mmlu_rows(dev, dev_path.string(), true);
    check_mmlu_rows(test, test_path.string(), true);
    check((size_t)d.shots <= dev.size(), "--shots " + std::to_string(d.shots) + ": MMLU dev file " + dev_path.string() +
                                             " has only " + std::to_string(dev.size()) + " rows");
    std::string shared = mmlu_prompt(subject, dev, d.shots, {"", "", "", ""});
    shared.resize(shared.size() - std::string("\nA. \nB. \nAnswer:").size());
    d.shared.push_back(shared);
    for (size_t r = 0; r < test.size(); ++r) {
      SuiteItem it;
      it.subject = subject;
      it.prompt = mmlu_prompt(subject, dev, d.shots, test[r]);
      it.label = SuiteAnswer::of(test[r].back());
      it.where = test_path.string() + " row " + std::to_string(r + 1);
      d.items.push_back(std::move(it));
    }
  }
  return d;
}

}  // namespace

// ---------------------------------------------------------------------------------------
// BBH

std::string bbh_cot_prompt(const std::string& file_text, const std::string& path) {
  const std::string sep = "-----\n";
  const size_t a = file_text.find(sep);
  check(a != std::string::npos, "BBH cot-prompts file " + path +
                                    " has no \"-----\" line: the worked examples follow the first one");
  const size_t b = file_text.find(sep, a + sep.size());
  return file_text.substr(a + sep.size(), b == std::string::npos ? std::string::npos : b - a - sep.size());
}

std::string bbh_prompt(const std::string& cot_prompt, const std::string& input) {
  return "Follow the given examples and answer the question.\n" + cot_prompt + "\n\nQ:" + input +
         "\nA: Let's think step by step.";
}

namespace {

// Appends the items of bbh/<file>; returns the text its prompts start with.
std::string load_bbh_file(const fs::path& dir, const std::string& file, const std::string& task,
                          std::vector<SuiteItem>& items) {
  std::string cot_name = file;  // their file.replace(".json", ".txt")
  for (size_t at; (at = cot_name.find(".json")) != std::string::npos;) cot_name.replace(at, 5, ".txt");
  const fs::path cot_path = dir / "cot-prompts" / cot_name, test_path = dir / "bbh" / file;
  check(fs::exists(cot_path), "BBH task " + task + " has no worked examples " + cot_path.string());
  const std::string cot = bbh_cot_prompt(read_file_text(cot_path, "BBH cot-prompts file"), cot_path.string());
  json j;
  try {
    j = json::parse(read_file_text(test_path, "BBH task file"));
  } catch (const json::exception& e) {
    throw Error("BBH task file " + test_path.string() + " is not valid JSON: " + e.what());
  }
  const std::string hint = " (the file holds {\"examples\": [{\"input\": \"...\", \"target\": \"...\"}, ...]})";
  check(j.is_object() && j.contains("examples") && j["examples"].is_array(),
        "BBH task file " + test_path.string() + " has no \"examples\" list" + hint);
  const bool mc = bbh_is_multiple_choice(task);
  size_t n = 0;
  for (const auto& ex : j["examples"]) {
    const std::string where = test_path.string() + " example " + std::to_string(n++);
    check(ex.is_object() && ex.contains("input") && ex["input"].is_string() && ex.contains("target") &&
              ex["target"].is_string(),
          where + ": needs string \"input\" and \"target\"" + hint);
    SuiteItem it;
    it.subject = task;
    it.prompt = bbh_prompt(cot, ex["input"].get<std::string>());
    const std::string target = ex["target"].get<std::string>();
    it.label = SuiteAnswer::of(mc ? bbh_mcq_postprocess(target) : target);
    it.where = where;
    items.push_back(std::move(it));
  }
  const std::string head = bbh_prompt(cot, "");
  return head.substr(0, head.size() - std::string("\nA: Let's think step by step.").size());
}

SuiteData load_bbh(const fs::path& dir, const SuiteLoadOptions& o) {
  check(o.shots < 0, "BBH prompts are the worked examples of its cot-prompts files: --shots does not apply to it");
  check(is_dir(dir / "bbh") && is_dir(dir / "cot-prompts"),
        "BBH folder " + dir.string() + " needs bbh/ (<task>.json) and cot-prompts/ (<task>.txt): give the BBH folder "
        "of the authors' eval_data (eval_data/BBH)");
  SuiteData d;
  d.suite = Suite::Bbh;
  d.shots = 3;
  const auto files = files_ending(dir / "bbh", ".json");
  std::vector<std::string> found;
  for (const auto& f : files) found.push_back(f.substr(0, f.find('.')));
  d.subjects = select_subjects(found, o.subjects, (dir / "bbh").string());
  for (const auto& task : d.subjects) {
    std::vector<std::string> heads;  // what this task's prompts start with, per file
    for (const auto& file : files)
      if (file.substr(0, file.find('.')) == task) heads.push_back(load_bbh_file(dir, file, task, d.items));
    d.shared.push_back(common_prefix(heads));
  }
  return d;
}

// ---------------------------------------------------------------------------------------
// AGIEval

SuiteAnswer agieval_label(const json& l, const std::string& where) {
  SuiteAnswer a;
  if (l.is_null()) {
    a.none = true;
  } else if (l.is_string()) {
    a.text = l.get<std::string>();
  } else if (l.is_array()) {
    a.is_list = true;
    for (const auto& v : l) {
      check(v.is_string(), where + ": \"label\" lists non-strings; give letters such as [\"A\", \"C\"]");
      a.list.push_back(v.get<std::string>());
    }
  } else {
    throw Error(where + ": \"label\" must be a string, a list of strings or null");
  }
  return a;
}

SuiteData load_agieval(const fs::path& dir, const SuiteLoadOptions& o) {
  SuiteData d;
  d.suite = Suite::Agieval;
  d.shots = std::max(o.shots, 0);
  d.setting = d.shots > 0 ? "few-shot" : "zero-shot";
  const fs::path base = is_dir(dir / "experiment_input") ? dir / "experiment_input" : dir;
  const fs::path folder = base / d.setting;
  check(is_dir(folder), "AGIEval folder " + dir.string() + " has no experiment_input/" + d.setting +
                            "/ (<subset>.jsonl): give the AGIEval folder of the authors' eval_data (eval_data/AGIEval)");
  std::vector<std::string> found;
  const auto files = files_ending(folder, ".jsonl");
  for (const auto& f : files) found.push_back(f.substr(0, f.find('.')));
  d.subjects = select_subjects(found, o.subjects, folder.string());
  for (const auto& subset : d.subjects) {
    check(d.setting == "zero-shot" || agieval_known_subset(subset),
          "AGIEval subset '" + subset + "' has no few-shot answer parser in the authors' scoring: run it with "
          "--shots 0, or leave it out with --subjects");
    std::vector<std::string> contexts;
    for (const auto& f : files) {
      if (f.substr(0, f.find('.')) != subset) continue;
      const std::string path = (folder / f).string();
      const std::string text = read_file_text(path, "AGIEval file");
      size_t pos = 0, line_no = 0;
      while (pos < text.size()) {
        size_t end = text.find('\n', pos);
        if (end == std::string::npos) end = text.size();
        const std::string line = text.substr(pos, end - pos);
        pos = end + 1;
        ++line_no;
        if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
        const std::string where = path + ":" + std::to_string(line_no);
        const std::string hint = " (each line: {\"context\": \"prompt\", \"label\": \"B\" or [\"A\", \"C\"]})";
        json j;
        try {
          j = json::parse(line);
        } catch (const json::exception& e) {
          throw Error(where + ": malformed JSON: " + e.what() + hint);
        }
        check(j.is_object() && j.contains("context") && j["context"].is_string(),
              where + ": needs a string \"context\"" + hint);
        check(j.contains("label"), where + ": needs a \"label\"" + hint);
        SuiteItem it;
        it.subject = subset;
        it.prompt = j["context"].get<std::string>();
        it.label = agieval_label(j["label"], where);
        it.where = where;
        contexts.push_back(it.prompt);
        d.items.push_back(std::move(it));
      }
    }
    d.shared.push_back(common_prefix(contexts));
  }
  return d;
}

// ---------------------------------------------------------------------------------------
// Generation

// Whether text generated so far already fixes the item's extracted answer.
bool settled(const SuiteData& d, const SuiteItem& it, const std::string& text) {
  switch (d.suite) {
    case Suite::Mmlu: {  // the first line, after leading whitespace, is complete
      const size_t start = py_space_prefix(text);
      return start < text.size() && text.find('\n', start) != std::string::npos;
    }
    case Suite::Bbh:
      return bbh_answer_settled(text, bbh_is_multiple_choice(it.subject));
    case Suite::Agieval: {
      if (d.setting != "zero-shot" || it.subject == "math" || it.subject == "gaokao-mathcloze") return false;
      // Zero-shot single answers are the first letter A-F; multiple answers read it all.
      const SuiteAnswer a = agieval_post_process(it.subject, d.setting, text);
      return !a.is_list && !a.text.empty();
    }
  }
  return false;
}

class SuiteRunner {
 public:
  SuiteRunner(Model& m, const Tokenizer& tok, int max_new)
      : m_(m), tok_(tok), V_(m.config().vocab_size), context_(m.config().context), max_new_(max_new) {}

  std::vector<int32_t> encode_doc(const std::string& text) const {
    std::vector<int32_t> ids{tok_.eos_id()};  // every document follows an end-of-document token
    for (int32_t t : tok_.encode(text)) ids.push_back(t);
    return ids;
  }

  // Prefills the text every prompt of a subject starts with once; prompts whose tokens start
  // with it continue from a copy of that cache.
  void set_prefix(const std::string& shared) { prefix_.set(encode_doc(shared), max_new_); }

  // The authors' tokenizer cut prompts from the left (truncation_side='left') to leave room
  // for the generated tokens, keeping the start token.
  std::vector<int32_t> prompt_ids(const std::string& prompt, bool* truncated) const {
    std::vector<int32_t> ids = encode_doc(prompt);
    const size_t room = (size_t)(context_ - max_new_);
    *truncated = ids.size() > room;
    if (*truncated) ids.erase(ids.begin() + 1, ids.end() - (long)(room - 1));
    return ids;
  }

  template <class Done>
  std::string generate(const std::vector<int32_t>& ids, Done done) {
    SequenceCache cache;
    std::vector<float> logits;
    prefix_.prefill(ids, cache, logits);
    std::vector<int32_t> out;
    std::string text;
    for (int step = 0; step < max_new_; ++step) {
      const int32_t id = kernels::argmax(logits.data(), (int)logits.size());
      if (id == tok_.eos_id()) break;
      out.push_back(id);
      text = tok_.decode(out);
      if (done(text) || step + 1 == max_new_ || cache.length >= context_) break;
      m_.forward_cached(cache, &id, 1, logits.data(), false);
    }
    return text;
  }

 private:
  Model& m_;
  const Tokenizer& tok_;
  int V_, context_, max_new_;
  SharedPrefix prefix_{m_};
};

}  // namespace

SuiteData load_suite(Suite suite, const std::string& dir, const SuiteLoadOptions& o) {
  check(is_dir(dir), "--data-dir " + dir + " is not a folder: give the " + std::string(suite_name(suite)) +
                         " folder of the authors' eval_data (see docs/EVAL.md)");
  SuiteData d = suite == Suite::Mmlu ? load_mmlu(dir, o) : suite == Suite::Bbh ? load_bbh(dir, o) : load_agieval(dir, o);
  check(!d.items.empty(), "--data-dir " + dir + ": the " + std::string(suite_name(suite)) + " subjects chosen have no items");
  return d;
}

SuiteAnswer suite_extract(const SuiteData& d, const SuiteItem& it, std::string_view generated) {
  switch (d.suite) {
    case Suite::Mmlu: return SuiteAnswer::of(normalise_prediction(generated));
    case Suite::Bbh: return SuiteAnswer::of(bbh_prediction(generated, bbh_is_multiple_choice(it.subject)));
    case Suite::Agieval: return agieval_post_process(it.subject, d.setting, generated);
  }
  return {};
}

bool suite_correct(const SuiteData& d, const SuiteItem& it, const SuiteAnswer& extracted) {
  if (d.suite == Suite::Agieval) return agieval_is_correct(it.subject, extracted, it.label);
  return extracted.text == it.label.text;
}

SuiteResult evaluate_suite(Model& model, const Tokenizer& tok, const SuiteData& d, const SuiteOptions& o) {
  const auto t0 = Clock::now();
  SuiteResult r;
  r.suite = d.suite;
  r.setting = d.setting;
  r.shots = d.shots;
  r.max_new_tokens = o.max_new_tokens > 0 ? o.max_new_tokens : suite_max_new_tokens(d.suite);
  const int context = model.config().context;
  check(r.max_new_tokens < context, "--max-new-tokens " + std::to_string(r.max_new_tokens) +
                                        " leaves no room for a prompt in the model's context of " +
                                        std::to_string(context) + " tokens: give fewer");
  SuiteRunner runner(model, tok, r.max_new_tokens);
  const int64_t total = (int64_t)d.items.size();
  for (size_t s = 0; s < d.subjects.size(); ++s) {
    SuiteSubjectResult sr;
    sr.subject = d.subjects[s];
    runner.set_prefix(d.shared[s]);
    for (size_t i = 0; i < d.items.size(); ++i) {
      const SuiteItem& it = d.items[i];
      if (it.subject != sr.subject) continue;
      SuiteItemResult ir;
      ir.item = i;
      const std::vector<int32_t> ids = runner.prompt_ids(it.prompt, &ir.truncated);
      ir.prompt_tokens = (int)ids.size();
      ir.generated = runner.generate(ids, [&](const std::string& text) { return settled(d, it, text); });
      ir.extracted = suite_extract(d, it, ir.generated);
      ir.correct = suite_correct(d, it, ir.extracted);
      sr.correct += ir.correct;
      ++sr.total;
      r.truncated += ir.truncated;
      r.items.push_back(std::move(ir));
      if (o.progress) o.progress((int64_t)r.items.size(), total);
    }
    sr.accuracy = sr.total ? 100.0 * (double)sr.correct / (double)sr.total : 0;
    r.correct += sr.correct;
    r.total += sr.total;
    r.subject_mean += sr.accuracy;
    r.subjects.push_back(std::move(sr));
  }
  r.accuracy = r.total ? 100.0 * (double)r.correct / (double)r.total : 0;
  r.subject_mean = r.subjects.empty() ? 0 : r.subject_mean / (double)r.subjects.size();
  r.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  return r;
}

}  // namespace subllm
