#pragma once
// The chart as a list of shapes in pixel coordinates, laid out once (plot.cpp) and then drawn by
// cairo (plot_cairo.cpp) onto a PNG, SVG or PDF surface, so every format shows the same chart.
#include <cstdint>
#include <string>
#include <vector>

#include "subllm/plot.h"

namespace subllm::plot_detail {

struct Rgb {
  uint8_t r = 0, g = 0, b = 0;
};

struct Pt {
  double x = 0, y = 0;
};

enum class Anchor { start, middle, end };

struct Shape {
  enum class Kind { rect, line, dot, text };
  Kind kind = Kind::line;
  std::vector<Pt> pts;  // rect: top-left and bottom-right corners; line: the polyline; dot, text: anchor point
  Rgb fill, stroke;
  bool filled = false, stroked = false;
  double width = 1;          // stroke width
  double opacity = 1;        // of fill and stroke alike
  double radius = 0;         // dot
  std::vector<double> dash;  // line: on/off lengths in pixels; empty: solid
  bool clip = false;         // kept inside the data area
  // Text: `pts[0]` is the start, middle or end of the baseline; vertical text reads bottom to top.
  std::string text;
  double font_px = 12;
  Anchor anchor = Anchor::start;
  bool vertical = false;
  bool bold = false;
};

struct Scene {
  int width = 0, height = 0;
  Rgb background{255, 255, 255};
  double clip_left = 0, clip_top = 0, clip_right = 0, clip_bottom = 0;
  std::vector<Shape> shapes;  // in drawing order
};

// The one font every chart is drawn in. Text is measured with cairo in this font, so the layout
// fits the drawn text exactly in every format.
inline constexpr const char* kFontFamily = "DejaVu Sans";
inline constexpr const char* kFontPackage = "fonts-dejavu-core";

double text_width(const std::string& text, double font_px, bool bold);
double cap_height(double font_px);  // height of a capital above the baseline
double descent(double font_px);     // how far the font reaches below the baseline

// The whole file in `format`: PNG bytes, SVG text or a PDF document.
std::string render_scene(const Scene& scene, PlotFormat format);

}  // namespace subllm::plot_detail
