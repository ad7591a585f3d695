// Answer extraction of the authors' BBH and AGIEval scoring (fewshot_eval/fewshot.py,
// agieval_post_process_and_evaluation.py) and the MATH answer normalisation it uses
// (math_equivalence.py, after hendrycks/math), written from their documented behaviour.
#include <algorithm>
#include <cctype>
#include <set>

#include "subllm/error.h"
#include "subllm/suites.h"

namespace subllm {
namespace {

bool contains(std::string_view s, std::string_view what) { return s.find(what) != std::string_view::npos; }

// Python's s.split(sep) (sep non-empty).
std::vector<std::string> split_all(std::string_view s, std::string_view sep) {
  std::vector<std::string> out;
  size_t pos = 0;
  for (size_t hit; (hit = s.find(sep, pos)) != std::string_view::npos; pos = hit + sep.size())
    out.emplace_back(s.substr(pos, hit - pos));
  out.emplace_back(s.substr(pos));
  return out;
}

std::string replace_all(std::string s, std::string_view from, std::string_view to) {
  std::string out;
  size_t pos = 0;
  for (size_t hit; (hit = s.find(from, pos)) != std::string::npos; pos = hit + from.size())
    out.append(s, pos, hit - pos).append(to);
  return out.append(s, pos, std::string::npos);
}

// Bytes of the UTF-8 code point starting at s[i] (1 for a stray byte).
size_t cp_bytes(std::string_view s, size_t i) {
  const unsigned char c = (unsigned char)s[i];
  const size_t n = c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
  return i + n <= s.size() ? n : 1;
}

uint32_t cp_at(std::string_view s, size_t i) {
  const size_t n = cp_bytes(s, i);
  const unsigned char c = (unsigned char)s[i];
  uint32_t cp = n == 1 ? c : n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | ((unsigned char)s[i + k] & 0x3F);
  return cp;
}

size_t cp_count(std::string_view s) {
  size_t n = 0;
  for (size_t i = 0; i < s.size(); i += cp_bytes(s, i)) ++n;
  return n;
}

std::string lstrip_spaces(std::string s) { return s.erase(0, std::min(s.find_first_not_of(' '), s.size())); }

// Python's \w outside ASCII, approximated by blocks: letters and numbers of any script are
// word characters; punctuation, symbols, spaces and combining marks are not.
bool is_word_cp(uint32_t c) {
  if (c < 0x80) return std::isalnum((int)c) || c == '_';
  if (c <= 0xBF) return c == 0xAA || c == 0xB2 || c == 0xB3 || c == 0xB5 || c == 0xB9 || c == 0xBA || (c >= 0xBC && c <= 0xBE);
  if (c == 0xD7 || c == 0xF7 || (c >= 0x300 && c <= 0x36F)) return false;
  if ((c >= 0x2000 && c <= 0x206F) || (c >= 0x20A0 && c <= 0x20CF) || (c >= 0x2190 && c <= 0x23FF) ||
      (c >= 0x2500 && c <= 0x27BF) || (c >= 0x2E00 && c <= 0x2E7F) || (c >= 0xFE30 && c <= 0xFE4F) || c == 0xFFFD)
    return false;
  if (c >= 0x3000 && c <= 0x303F)
    return (c >= 0x3005 && c <= 0x3007) || (c >= 0x3021 && c <= 0x3029) || (c >= 0x3031 && c <= 0x3035) ||
           (c >= 0x3038 && c <= 0x303C);
  if (c >= 0xFF00 && c <= 0xFF65)
    return (c >= 0xFF10 && c <= 0xFF19) || (c >= 0xFF21 && c <= 0xFF3A) || (c >= 0xFF41 && c <= 0xFF5A);
  return true;
}

bool is_word_at(std::string_view s, size_t i) { return i < s.size() && is_word_cp(cp_at(s, i)); }
bool is_digit(char c) { return c >= '0' && c <= '9'; }

// ---------------------------------------------------------------------------------------
// AGIEval subsets

const std::vector<std::string> kEnglishQa = {"lsat-ar", "lsat-lr", "lsat-rc", "logiqa-en", "sat-math", "sat-en",
                                             "aqua-rat", "sat-en-without-passage", "gaokao-english"};
const std::vector<std::string> kChineseQa = {"logiqa-zh",       "jec-qa-kd",       "jec-qa-ca",      "gaokao-chinese",
                                             "gaokao-geography", "gaokao-history",  "gaokao-biology", "gaokao-chemistry",
                                             "gaokao-physics",   "gaokao-mathqa"};
const std::vector<std::string> kMathCloze = {"math", "gaokao-mathcloze"};
const std::vector<std::string> kMultipleAnswers = {"jec-qa-kd", "jec-qa-ca", "gaokao-physics"};

bool among(const std::vector<std::string>& names, const std::string& n) {
  return std::find(names.begin(), names.end(), n) != names.end();
}

// The first of A-F anywhere ("" when none), their find_first_capital_letter.
std::string first_capital_a_to_f(std::string_view s) {
  for (char c : s)
    if (c >= 'A' && c <= 'F') return std::string(1, c);
  return "";
}

// re.search("<marker>.*?([A-G])"): the first marker with a letter A-G later on its line.
std::optional<std::string> letter_after(std::string_view s, std::string_view marker) {
  for (size_t at = s.find(marker); at != std::string_view::npos; at = s.find(marker, at + 1))
    for (size_t i = at + marker.size(); i < s.size() && s[i] != '\n'; ++i)
      if (s[i] >= 'A' && s[i] <= 'G') return std::string(1, s[i]);
  return std::nullopt;
}

// Their remove_few_shot_prefix: the text after the last answer phrase, stripped.
std::string remove_answer_prefix(std::string s) {
  for (std::string_view prefix : {"The answer is therefore", "\xE7\xAD\x94\xE6\xA1\x88\xE6\x98\xAF", "The answer is"}) {
    if (s.rfind(prefix, 0) == 0) {
      s = py_strip(std::string_view(s).substr(prefix.size()));
    } else if (contains(s, prefix)) {
      s = py_strip(std::string_view(s).substr(s.rfind(prefix) + prefix.size()));
    }
  }
  return s;
}

// The last \boxed{...} (or \fbox{...}) with balanced braces; none when it never closes.
std::optional<std::string> last_boxed(const std::string& s) {
  size_t idx = s.rfind("\\boxed");
  if (idx == std::string::npos) idx = s.rfind("\\fbox");
  if (idx == std::string::npos) return std::nullopt;
  int open = 0;
  for (size_t i = idx; i < s.size(); ++i) {
    if (s[i] == '{') ++open;
    if (s[i] == '}' && --open == 0) return s.substr(idx, i + 1 - idx);
  }
  return std::nullopt;
}

std::optional<std::string> unbox(const std::optional<std::string>& s) {
  const std::string left = "\\boxed{";
  if (!s || s->rfind(left, 0) != 0 || s->back() != '}') return std::nullopt;
  std::string answer = s->substr(left.size(), s->size() - left.size() - 1);
  if (contains(answer, "=")) answer = lstrip_spaces(split_all(answer, "=").back());
  return answer;
}

// re.findall(r"\$(.*)\$") keeps, per line with two dollars, what lies between its first and
// last dollar; the last such line's answer, after its last "=".
std::optional<std::string> answer_between_dollars(const std::string& s) {
  std::optional<std::string> last;
  for (const std::string& line : split_all(s, "\n")) {
    const size_t a = line.find('$'), b = line.rfind('$');
    if (a != std::string::npos && b > a) last = line.substr(a + 1, b - a - 1);
  }
  if (last && contains(*last, "=")) last = lstrip_spaces(split_all(*last, "=").back());
  return last;
}

// Length of a match of (?:\$)?\d+(?:\.\d+)?(?![\w\d]) at s[i] (0: none). Digits are ASCII.
size_t number_match_at(std::string_view s, size_t i) {
  size_t j = i;
  if (j < s.size() && s[j] == '$') ++j;
  size_t k = j;
  while (k < s.size() && is_digit(s[k])) ++k;
  if (k == j) return 0;
  if (k < s.size() && s[k] == '.') {
    size_t f = k + 1;
    while (f < s.size() && is_digit(s[f])) ++f;
    if (f > k + 1 && !is_word_at(s, f)) return f - i;
  }
  // Shorter digit runs would end before a digit, which the lookahead refuses.
  return is_word_at(s, k) ? 0 : k - i;
}

std::optional<std::string> answer_without_dollars(const std::string& s) {
  if (contains(s, "=")) {
    std::string last = lstrip_spaces(split_all(s, "=").back());
    last.erase(last.find_last_not_of('.') + 1);
    if (contains(last, "\\")) last = split_all(last, "\\")[0];
    return last;
  }
  std::optional<std::string> last;
  for (size_t i = 0; i < s.size();) {
    const size_t n = number_match_at(s, i);
    if (n) {
      last = s.substr(i, n);
      i += n;
    } else {
      ++i;
    }
  }
  return last;
}

// ---------------------------------------------------------------------------------------
// math_equivalence

std::optional<std::string> fix_fracs(const std::string& string) {
  const std::vector<std::string> parts = split_all(string, "\\frac");
  std::string out = parts[0];
  for (size_t p = 1; p < parts.size(); ++p) {
    const std::string& sub = parts[p];
    out += "\\frac";
    if (sub.empty()) return std::nullopt;  // their sub[0] raises
    if (sub[0] == '{') {
      out += sub;
      continue;
    }
    if (cp_count(sub) < 2) return string;
    const size_t la = cp_bytes(sub, 0), lb = cp_bytes(sub, la);
    const std::string a = sub.substr(0, la), b = sub.substr(la, lb), rest = sub.substr(la + lb);
    out += b != "{" ? "{" + a + "}{" + b + "}" + rest : "{" + a + "}" + b + rest;
  }
  return out;
}

std::optional<std::string> fix_sqrt(const std::string& string) {
  if (!contains(string, "\\sqrt")) return string;
  const std::vector<std::string> parts = split_all(string, "\\sqrt");
  std::string out = parts[0];
  for (size_t p = 1; p < parts.size(); ++p) {
    const std::string& sub = parts[p];
    if (sub.empty()) return std::nullopt;
    if (sub[0] != '{') {
      const size_t la = cp_bytes(sub, 0);
      out += "\\sqrt{" + sub.substr(0, la) + "}" + sub.substr(la);
    } else {
      out += "\\sqrt" + sub;
    }
  }
  return out;
}

// "a/b" with both the canonical form of integers becomes \frac{a}{b}.
std::string fix_a_slash_b(const std::string& string) {
  const std::vector<std::string> parts = split_all(string, "/");
  if (parts.size() != 2) return string;
  auto canonical_int = [](const std::string& t) {
    const size_t d = !t.empty() && t[0] == '-' ? 1 : 0;
    if (d == t.size() || !std::all_of(t.begin() + (long)d, t.end(), is_digit)) return false;
    if (t[d] == '0') return t.size() == 1;  // "0" only: int("07") prints 7, int("-0") prints 0
    return true;
  };
  if (!canonical_int(parts[0]) || !canonical_int(parts[1])) return string;
  return "\\frac{" + parts[0] + "}{" + parts[1] + "}";
}

}  // namespace

// ---------------------------------------------------------------------------------------
// BBH

bool bbh_is_multiple_choice(const std::string& task) {
  static const std::vector<std::string> kMultipleChoice = {
      "temporal_sequences",
      "disambiguation_qa",
      "date_understanding",
      "tracking_shuffled_objects_three_objects",
      "penguins_in_a_table",
      "geometric_shapes",
      "snarks",
      "ruin_names",
      "tracking_shuffled_objects_seven_objects",
      "tracking_shuffled_objects_five_objects",
      "logical_deduction_three_objects",
      "hyperbaton",
      "logical_deduction_five_objects",
      "logical_deduction_seven_objects",
      "movie_recommendation",
      "salient_translation_error_detection",
      "reasoning_about_colored_objects"};
  return among(kMultipleChoice, task);
}

namespace {
constexpr std::string_view kAnswerIs = "answer is ";

// Python's text.split('answer is ')[1]: the text between the first and second phrase.
std::optional<std::string_view> after_answer_phrase(std::string_view text) {
  const size_t first = text.find(kAnswerIs);
  if (first == std::string_view::npos) return std::nullopt;
  const size_t begin = first + kAnswerIs.size();
  const size_t second = text.find(kAnswerIs, begin);
  return text.substr(begin, second == std::string_view::npos ? std::string_view::npos : second - begin);
}
}  // namespace

std::string bbh_mcq_postprocess(std::string_view text) {
  std::string ans(text);
  if (auto seg = after_answer_phrase(text)) ans = py_strip(*seg);
  for (size_t i = 0; i + 1 < ans.size(); ++i)
    if (ans[i] == '(' && ans[i + 1] >= 'A' && ans[i + 1] <= 'Z') return std::string(1, ans[i + 1]);
  for (char c : ans)
    if (c >= 'A' && c <= 'Z') return std::string(1, c);
  return ans;
}

std::string bbh_freeform_postprocess(std::string_view text) {
  std::string ans(text);
  if (auto seg = after_answer_phrase(text)) ans = py_strip(*seg);
  ans = ans.substr(0, ans.find('\n'));
  if (!ans.empty() && ans.back() == '.') ans.pop_back();
  return ans;
}

std::string bbh_prediction(std::string_view generated, bool multiple_choice) {
  return bbh_freeform_postprocess(multiple_choice ? bbh_mcq_postprocess(generated) : std::string(generated));
}

bool bbh_answer_settled(std::string_view generated, bool multiple_choice) {
  const size_t first = generated.find(kAnswerIs);
  if (first == std::string_view::npos) return false;
  const std::string_view rest = generated.substr(first + kAnswerIs.size());
  if (rest.find(kAnswerIs) != std::string_view::npos) return true;  // the answer's text is closed
  if (multiple_choice) {
    // The first "(X" of the answer's text wins whatever follows it.
    for (size_t i = 0; i + 1 < rest.size(); ++i)
      if (rest[i] == '(' && rest[i + 1] >= 'A' && rest[i + 1] <= 'Z') return true;
    return false;
  }
  // Free form: the answer's first line (after leading whitespace) has ended, and not in
  // whitespace, which their strip keeps or drops depending on whether more text follows.
  const size_t start = py_space_prefix(rest);
  const size_t nl = start < rest.size() ? rest.find('\n', start) : std::string_view::npos;
  if (nl == std::string_view::npos) return false;
  const std::string_view line = rest.substr(start, nl - start);
  return py_strip(line).size() == line.size();
}

// ---------------------------------------------------------------------------------------
// AGIEval

bool agieval_known_subset(const std::string& dataset) {
  return among(kEnglishQa, dataset) || among(kChineseQa, dataset) || among(kMathCloze, dataset);
}

SuiteAnswer agieval_parse_math_answer(std::string_view text) {
  const std::string s = remove_answer_prefix(std::string(text));
  std::optional<std::string> answer;
  if (contains(s, "\\boxed")) {
    answer = unbox(last_boxed(s));
  } else {
    answer = answer_between_dollars(s);
    if (!answer || answer->empty()) answer = answer_without_dollars(s);
  }
  SuiteAnswer a;
  a.none = !answer.has_value();
  if (answer) a.text = *answer;
  return a;
}

SuiteAnswer agieval_post_process(const std::string& dataset, const std::string& setting, std::string_view prediction) {
  if (among(kMathCloze, dataset)) return agieval_parse_math_answer(prediction);
  if (among(kMultipleAnswers, dataset)) {
    SuiteAnswer a;
    a.is_list = true;
    for (char c : prediction)
      if (c >= 'A' && c <= 'F') a.list.emplace_back(1, c);
    return a;
  }
  if (contains(setting, "zero-shot")) return SuiteAnswer::of(first_capital_a_to_f(prediction));
  const bool english = among(kEnglishQa, dataset);
  check(english || among(kChineseQa, dataset),
        "AGIEval subset '" + dataset + "' has no few-shot answer parser: the known subsets are the authors' "
        "(lsat-*, logiqa-*, sat-*, aqua-rat, gaokao-*, jec-qa-*, math); run it zero-shot (--shots 0)");
  const auto letter = letter_after(prediction, english ? "answer is " : "\xE7\xAD\x94\xE6\xA1\x88\xE6\x98\xAF");
  return SuiteAnswer::of(letter ? *letter : first_capital_a_to_f(prediction));
}

std::optional<std::string> math_strip_string(const std::string& input) {
  std::string s = replace_all(input, "\n", "");
  s = replace_all(s, "\\!", "");
  s = replace_all(s, "\\\\", "\\");
  s = replace_all(s, "tfrac", "frac");
  s = replace_all(s, "dfrac", "frac");
  s = replace_all(s, "\\left", "");
  s = replace_all(s, "\\right", "");
  s = replace_all(s, "^{\\circ}", "");
  s = replace_all(s, "^\\circ", "");
  s = replace_all(s, "\\$", "");
  if (contains(s, "\\text{ ")) {  // units on the right
    const auto parts = split_all(s, "\\text{ ");
    if (parts.size() != 2) return std::nullopt;
    s = parts[0];
  }
  s = replace_all(s, "\\%", "");
  s = replace_all(s, " .", " 0.");
  s = replace_all(s, "{.", "{0.");
  if (s.empty()) return s;
  if (s[0] == '.') s = "0" + s;
  if (const auto eq = split_all(s, "="); eq.size() == 2 && cp_count(eq[0]) <= 2) s = eq[1];  // "k = 3"
  auto sq = fix_sqrt(s);
  if (!sq) return std::nullopt;
  s = replace_all(*sq, " ", "");
  auto fr = fix_fracs(s);
  if (!fr) return std::nullopt;
  s = *fr;
  if (s == "0.5") s = "\\frac{1}{2}";
  return fix_a_slash_b(s);
}

bool math_is_equiv(const SuiteAnswer& a, const SuiteAnswer& b) {
  if (a.none || b.none) return a.none && b.none;
  if (a.is_list || b.is_list) return a.is_list == b.is_list && a.list == b.list;
  const auto sa = math_strip_string(a.text), sb = math_strip_string(b.text);
  if (!sa || !sb) return a.text == b.text;  // their fallback when normalising raises
  return *sa == *sb;
}

bool agieval_is_correct(const std::string& dataset, const SuiteAnswer& prediction, const SuiteAnswer& label) {
  if (among(kMultipleAnswers, dataset)) {
    if (prediction.none || label.none) return false;  // their set() never equals {} (a dict)
    auto as_set = [](const SuiteAnswer& x) {
      return x.is_list ? std::set<std::string>(x.list.begin(), x.list.end()) : std::set<std::string>{x.text};
    };
    return as_set(prediction) == as_set(label);
  }
  if (among(kMathCloze, dataset)) return math_is_equiv(prediction, label);
  if (prediction.none || label.none) return prediction.none && label.none;
  if (prediction.is_list || label.is_list) return prediction.is_list == label.is_list && prediction.list == label.list;
  return prediction.text == label.text;
}

}  // namespace subllm
