#pragma once
// The chart as a list of shapes in pixel coordinates, laid out once and then written out by
// either backend (SVG text or the rasteriser), so both formats show the same chart.
#include <cstdint>
#include <string>
#include <vector>

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
  double width = 1;    // stroke width
  double opacity = 1;  // of fill and stroke alike
  double radius = 0;   // dot
  bool clip = false;   // kept inside the data area
  // Text: `pts[0]` is the start, middle or end of the baseline; vertical text reads bottom to top.
  std::string text;
  double font_px = 12;
  Anchor anchor = Anchor::start;
  bool vertical = false;
  bool bold = false;
  std::string tooltip;  // SVG only: shown on hover
};

struct Scene {
  int width = 0, height = 0;
  Rgb background{255, 255, 255};
  double clip_left = 0, clip_top = 0, clip_right = 0, clip_bottom = 0;
  std::vector<Shape> shapes;  // in drawing order
};

// Text is measured differently per backend: the SVG viewer's font is only estimated, the bitmap
// font is exact. Layout asks the backend it lays out for.
enum class TextBackend { svg, raster };
double text_width(const std::string& text, double font_px, TextBackend backend);
double cap_height(double font_px, TextBackend backend);
double descent(double font_px, TextBackend backend);
// Integer magnification of the bitmap font for a nominal font size.
int raster_font_scale(double font_px);

// RGB pixels, row-major from the top left.
std::vector<uint8_t> rasterize(const Scene& scene);

}  // namespace subllm::plot_detail
