#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "subllm/config.h"
#include "subllm/error.h"

namespace subllm {
namespace structure_tests {

// Runs the parser expecting an Error and returns its message ("" when nothing was thrown,
// which makes the caller's substring checks fail).
std::string parse_error(const std::string& text, int blocks, const std::vector<float>& r = {0.64f}) {
  try {
    parse_structure(text, blocks, r);
  } catch (const Error& e) {
    return e.what();
  }
  return "";
}

std::vector<int> block_items(const Segment& s) {
  std::vector<int> out;
  for (const SegmentItem& it : s.items) out.push_back(it.is_block ? it.index : -1 - it.index);
  return out;
}

TEST(Structure, PaperLayoutTwoNestedSubsamplers) {
  Structure st = parse_structure("TTTTT(TTTTT(TTTT)TTTTT)TTTTT", 24, {0.64f});
  EXPECT_EQ(st.num_blocks, 24);
  EXPECT_EQ(st.num_subsamplers, 2);
  EXPECT_FALSE(st.is_plain());
  ASSERT_EQ(st.segments.size(), 3u);

  const Segment& root = st.segments[0];
  EXPECT_EQ(root.parent, -1);
  EXPECT_EQ(root.depth, 0);
  EXPECT_EQ(root.subsampler, -1);
  EXPECT_FLOAT_EQ(root.retention, 1.0f);
  // Blocks 0-4, child segment 1, blocks 19-23 (child segments are encoded as -1 - index).
  EXPECT_EQ(block_items(root), (std::vector<int>{0, 1, 2, 3, 4, -2, 19, 20, 21, 22, 23}));

  const Segment& mid = st.segments[1];
  EXPECT_EQ(mid.parent, 0);
  EXPECT_EQ(mid.depth, 1);
  EXPECT_EQ(mid.subsampler, 0);
  EXPECT_FLOAT_EQ(mid.retention, 0.64f);
  EXPECT_EQ(block_items(mid), (std::vector<int>{5, 6, 7, 8, 9, -3, 14, 15, 16, 17, 18}));

  const Segment& inner = st.segments[2];
  EXPECT_EQ(inner.parent, 1);
  EXPECT_EQ(inner.depth, 2);
  EXPECT_EQ(inner.subsampler, 1);
  EXPECT_FLOAT_EQ(inner.retention, 0.64f);
  EXPECT_EQ(block_items(inner), (std::vector<int>{10, 11, 12, 13}));
}

TEST(Structure, SingleSubsampler) {
  Structure st = parse_structure("TTT(TTT)TTT", 9, {0.5f});
  ASSERT_EQ(st.segments.size(), 2u);
  EXPECT_EQ(st.num_subsamplers, 1);
  EXPECT_EQ(block_items(st.segments[0]), (std::vector<int>{0, 1, 2, -2, 6, 7, 8}));
  EXPECT_EQ(block_items(st.segments[1]), (std::vector<int>{3, 4, 5}));
  EXPECT_EQ(st.segments[1].parent, 0);
  EXPECT_EQ(st.segments[1].depth, 1);
  EXPECT_FLOAT_EQ(st.segments[1].retention, 0.5f);
}

TEST(Structure, MinimalNestingWithPerSubsamplerRetentions) {
  Structure st = parse_structure("T(T(T)T)T", 5, {0.8f, 0.5f});
  ASSERT_EQ(st.segments.size(), 3u);
  EXPECT_EQ(block_items(st.segments[0]), (std::vector<int>{0, -2, 4}));
  EXPECT_EQ(block_items(st.segments[1]), (std::vector<int>{1, -3, 3}));
  EXPECT_EQ(block_items(st.segments[2]), (std::vector<int>{2}));
  EXPECT_EQ(st.segments[2].parent, 1);
  EXPECT_EQ(st.segments[2].depth, 2);
  EXPECT_FLOAT_EQ(st.segments[1].retention, 0.8f);
  EXPECT_FLOAT_EQ(st.segments[2].retention, 0.5f);
}

TEST(Structure, SiblingSubsamplersNumberedByOpeningParen) {
  Structure st = parse_structure("T(T)T(T(T))", 5, {0.9f, 0.8f, 0.7f});
  ASSERT_EQ(st.segments.size(), 4u);
  EXPECT_EQ(block_items(st.segments[0]), (std::vector<int>{0, -2, 2, -3}));
  EXPECT_EQ(st.segments[2].subsampler, 1);
  EXPECT_EQ(st.segments[3].subsampler, 2);
  EXPECT_EQ(st.segments[3].parent, 2);
  EXPECT_FLOAT_EQ(st.segments[3].retention, 0.7f);
}

TEST(Structure, SegmentHoldingOnlyAChildSegmentIsAccepted) {
  Structure st = parse_structure("T((T))", 2, {0.5f});
  ASSERT_EQ(st.segments.size(), 3u);
  EXPECT_EQ(block_items(st.segments[1]), (std::vector<int>{-3}));
  EXPECT_EQ(block_items(st.segments[2]), (std::vector<int>{1}));
}

TEST(Structure, PlainLlamaNeedsNoRetentions) {
  Structure st = parse_structure("TTTTTTTT", 8, {});
  EXPECT_TRUE(st.is_plain());
  EXPECT_EQ(st.num_blocks, 8);
  ASSERT_EQ(st.segments.size(), 1u);
  EXPECT_EQ(block_items(st.segments[0]), (std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7}));
}

TEST(Structure, UnbalancedCloseShowsCaret) {
  std::string msg = parse_error("TTTT)T", 5);
  EXPECT_EQ(msg,
            "invalid structure: unbalanced ')' at position 5\n"
            "  TTTT)T\n"
            "      ^\n"
            "fix: every ')' must close an earlier '('");
}

TEST(Structure, UnbalancedOpenPointsAtUnclosedParen) {
  std::string msg = parse_error("TT(T(T)T", 5);
  EXPECT_NE(msg.find("unbalanced '('"), std::string::npos) << msg;
  EXPECT_NE(msg.find("position 3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("  TT(T(T)T\n    ^\n"), std::string::npos) << msg;
}

TEST(Structure, EmptySegmentsAreRejected) {
  std::string msg = parse_error("TT()TT", 4);
  EXPECT_NE(msg.find("empty segment"), std::string::npos) << msg;
  EXPECT_NE(msg.find("position 3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("  TT()TT\n    ^\n"), std::string::npos) << msg;

  std::string nested = parse_error("T(())T", 2);
  EXPECT_NE(nested.find("empty segment"), std::string::npos) << nested;
  EXPECT_NE(nested.find("position 3"), std::string::npos) << nested;
}

TEST(Structure, BlockCountMustMatchLayers) {
  std::string msg = parse_error("TTTTTTTTTT", 12);
  EXPECT_NE(msg.find("structure has 10 'T' blocks but decoder_layers is 12: make them equal"), std::string::npos) << msg;
  EXPECT_NE(msg.find("TTTTTTTTTT"), std::string::npos) << msg;
  EXPECT_NE(parse_error("", 2).find("empty"), std::string::npos);
}

TEST(Structure, BadCharactersAreRejected) {
  std::string msg = parse_error("TTxT", 3);
  EXPECT_NE(msg.find("invalid character 'x' at position 3"), std::string::npos) << msg;
  EXPECT_NE(msg.find("  TTxT\n    ^\n"), std::string::npos) << msg;
  EXPECT_NE(parse_error("TT T", 3).find("space"), std::string::npos);
  EXPECT_NE(parse_error("tt", 2).find("invalid character 't'"), std::string::npos);
  EXPECT_NE(parse_error("TT\n", 2).find("invalid character"), std::string::npos);
}

TEST(Structure, RetentionsMustBeInUnitInterval) {
  std::string zero = parse_error("T(T)T", 3, {0.0f});
  EXPECT_NE(zero.find("outside (0, 1]"), std::string::npos) << zero;
  EXPECT_NE(zero.find("  T(T)T\n   ^\n"), std::string::npos) << zero;
  EXPECT_NE(parse_error("T(T)T", 3, {1.5f}).find("1.5 is outside (0, 1]"), std::string::npos);
  EXPECT_NE(parse_error("T(T)T", 3, {-0.5f}).find("-0.5 is outside"), std::string::npos);
  EXPECT_NE(parse_error("T(T)T", 3, {std::numeric_limits<float>::quiet_NaN()}).find("outside"), std::string::npos);
  // Per-subsampler value: the caret points at the second '('.
  std::string second = parse_error("T(T(T)T)T", 5, {0.5f, 2.0f});
  EXPECT_NE(second.find("subsampler 1"), std::string::npos) << second;
  EXPECT_NE(second.find("  T(T(T)T)T\n     ^\n"), std::string::npos) << second;
  // 1 itself is allowed (keep everything).
  EXPECT_NO_THROW(parse_structure("T(T)T", 3, {1.0f}));
}

TEST(Structure, RetentionListLength) {
  std::string missing = parse_error("T(T)T", 3, {});
  EXPECT_NE(missing.find("downsampling_factor_denominator"), std::string::npos) << missing;
  std::string wrong = parse_error("T(T(T)T)T", 5, {0.5f, 0.5f, 0.5f});
  EXPECT_NE(wrong.find("has 3 values"), std::string::npos) << wrong;
  EXPECT_NE(wrong.find("2 subsamplers"), std::string::npos) << wrong;
  EXPECT_NE(parse_error("T(T(T)T)T(T)", 6, {0.5f, 0.5f}).find("has 2 values"), std::string::npos);
}

}  // namespace structure_tests
}  // namespace subllm
