#pragma once
// A small bitmap font for text in rasterised charts, so PNG output needs no font library.
#include <array>
#include <cstdint>
#include <string>

namespace subllm::font {

// Every glyph is kWidth x kHeight pixels; rows [0, kAscent) sit above the baseline and the
// rest hold descenders. Characters advance by kAdvance pixels (one blank column between).
inline constexpr int kWidth = 5;
inline constexpr int kHeight = 9;
inline constexpr int kAscent = 7;
inline constexpr int kAdvance = kWidth + 1;

// Row bitmasks of one glyph, top row first; bit (kWidth - 1 - x) is pixel column x.
using Glyph = std::array<uint8_t, kHeight>;

// The glyph of printable ASCII `c`; anything else draws as '?'.
const Glyph& glyph(unsigned char c);

// Bytes of `text` as the font can draw them: one '?' per non-ASCII UTF-8 character,
// control characters dropped.
std::string printable(const std::string& text);

}  // namespace subllm::font
