// Parsing of the layout string (`structure` in config.json) into a segment tree.
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "subllm/config.h"
#include "subllm/error.h"

namespace subllm {
namespace {

// Echo of the structure with a caret under `pos` (0-based). Unprintable bytes are replaced
// so that the caret stays aligned with the character it points at.
std::string caret_lines(const std::string& text, size_t pos) {
  std::string shown = text;
  for (char& ch : shown) {
    unsigned char u = static_cast<unsigned char>(ch);
    if (u < 0x20 || u >= 0x7f) ch = '?';
  }
  return "  " + shown + "\n  " + std::string(pos, ' ') + "^\n";
}

[[noreturn]] void fail_at(const std::string& text, size_t pos, const std::string& what, const std::string& fix) {
  // Positions are reported 1-based, as a person counts characters.
  throw Error("invalid structure: " + what + " at position " + std::to_string(pos + 1) + "\n" +
              caret_lines(text, pos) + "fix: " + fix);
}

std::string describe_char(char ch) {
  unsigned char u = static_cast<unsigned char>(ch);
  if (ch == ' ') return "' ' (space)";
  if (ch == '\t') return "'\\t' (tab)";
  if (ch == '\n') return "'\\n' (newline)";
  if (u < 0x20 || u >= 0x7f) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "byte 0x%02x", u);
    return buf;
  }
  return std::string("'") + ch + "'";
}

std::string format_float(float v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", static_cast<double>(v));
  return buf;
}

}  // namespace

Structure parse_structure(const std::string& text, int expected_blocks, const std::vector<float>& retentions) {
  if (text.empty()) {
    throw Error("invalid structure: the structure string is empty\nfix: write one 'T' per transformer block, e.g. \"" +
                std::string(static_cast<size_t>(expected_blocks > 0 ? expected_blocks : 1), 'T') + "\"");
  }

  Structure st;
  st.segments.emplace_back();  // root: defaults already say parent -1, depth 0, retention 1

  // Per open segment: its index and the position of its '('.
  struct Open {
    int segment;
    size_t pos;
  };
  std::vector<Open> stack{{0, 0}};
  std::vector<size_t> open_pos;  // position of '(' per subsampler, for retention errors
  std::vector<int> blocks_below;  // blocks anywhere inside each segment, to reject empty ones
  blocks_below.push_back(0);
  int bypasses_closed = 0;

  for (size_t i = 0; i < text.size(); ++i) {
    char ch = text[i];
    Segment& cur = st.segments[static_cast<size_t>(stack.back().segment)];
    if (ch == 'T') {
      cur.items.push_back({true, st.num_blocks++});
      for (const Open& o : stack) blocks_below[static_cast<size_t>(o.segment)]++;
    } else if (ch == '(') {
      int parent = stack.back().segment;
      int idx = static_cast<int>(st.segments.size());
      Segment seg;
      seg.parent = parent;
      seg.depth = static_cast<int>(stack.size());
      seg.subsampler = st.num_subsamplers++;
      cur.items.push_back({false, idx});  // before push_back below may reallocate `cur`
      st.segments.push_back(std::move(seg));
      blocks_below.push_back(0);
      open_pos.push_back(i);
      stack.push_back({idx, i});
    } else if (ch == ')') {
      if (stack.size() == 1) fail_at(text, i, "unbalanced ')'", "every ')' must close an earlier '('");
      const Open& o = stack.back();
      st.segments[static_cast<size_t>(o.segment)].bypass = bypasses_closed++;
      // A segment with no block anywhere inside would subsample and upsample around nothing;
      // "((T))" is accepted (the outer segment holds a block below), "()" and "(())" are not.
      if (blocks_below[static_cast<size_t>(o.segment)] == 0) {
        fail_at(text, o.pos, "empty segment (no 'T' between this '(' and its ')')",
                "put at least one 'T' inside every pair of parentheses, or remove the pair");
      }
      stack.pop_back();
    } else {
      fail_at(text, i, "invalid character " + describe_char(ch),
              "use only 'T' (block), '(' (subsampler) and ')' (upsampler), with no spaces");
    }
  }
  if (stack.size() > 1) {
    fail_at(text, stack.back().pos, "unbalanced '(' (never closed)", "add the matching ')' or remove this '('");
  }

  if (st.num_blocks != expected_blocks) {
    throw Error("structure has " + std::to_string(st.num_blocks) + " 'T' blocks but decoder_layers is " +
                std::to_string(expected_blocks) + ": make them equal\n  structure: \"" + text + "\"");
  }

  if (st.num_subsamplers > 0) {
    const size_t n = static_cast<size_t>(st.num_subsamplers);
    if (retentions.empty()) {
      throw Error("structure \"" + text + "\" has " + std::to_string(n) +
                  " subsampler(s) but downsampling_factor_denominator is missing: set it to the fraction of "
                  "tokens each subsampler keeps, e.g. \"0.64\"");
    }
    if (retentions.size() != 1 && retentions.size() != n) {
      throw Error("downsampling_factor_denominator has " + std::to_string(retentions.size()) +
                  " values but structure \"" + text + "\" has " + std::to_string(n) +
                  " subsamplers: give one value for all of them or exactly one per '('");
    }
    for (size_t j = 0; j < retentions.size(); ++j) {
      float r = retentions[j];
      // Written so that NaN fails too.
      if (!(r > 0.0f && r <= 1.0f)) {
        std::string which = retentions.size() == 1 ? "" : " (subsampler " + std::to_string(j) + ")";
        throw Error("invalid structure: downsampling_factor_denominator value " + format_float(r) + which +
                    " is outside (0, 1] at position " + std::to_string(open_pos[j] + 1) + "\n" +
                    caret_lines(text, open_pos[j]) +
                    "fix: it is the fraction of tokens a subsampler keeps, e.g. 0.64");
      }
    }
    for (size_t j = 0; j < n; ++j) {
      st.segments[j + 1].retention = retentions.size() == 1 ? retentions[0] : retentions[j];
    }
  }
  return st;
}

}  // namespace subllm
