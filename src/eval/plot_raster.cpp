// Draws a chart scene into RGB pixels: anti-aliased lines and dots from the distance of each pixel
// centre to the shape, crisp rectangles from exact pixel overlap, text from the bitmap font.
#include <algorithm>
#include <cmath>
#include <vector>

#include "eval/font.h"
#include "eval/plot_scene.h"

namespace subllm::plot_detail {

int raster_font_scale(double font_px) { return std::max(1, (int)std::lround(font_px / 10.5)); }

double text_width(const std::string& text, double font_px, TextBackend backend) {
  if (backend == TextBackend::svg) return 0.6 * font_px * (double)text.size();
  const int k = raster_font_scale(font_px);
  const size_t n = font::printable(text).size();
  return n == 0 ? 0 : (double)(n * font::kAdvance - 1) * k;
}

double cap_height(double font_px, TextBackend backend) {
  return backend == TextBackend::svg ? 0.72 * font_px : (double)font::kAscent * raster_font_scale(font_px);
}

double descent(double font_px, TextBackend backend) {
  return backend == TextBackend::svg ? 0.22 * font_px
                                     : (double)(font::kHeight - font::kAscent) * raster_font_scale(font_px);
}

namespace {

struct Box {
  int x0, y0, x1, y1;  // half-open pixel range
};

class Canvas {
 public:
  explicit Canvas(const Scene& s)
      : w_(s.width), h_(s.height), px_((size_t)w_ * h_ * 3), cover_((size_t)w_ * h_, 0.f) {
    for (size_t i = 0; i < (size_t)w_ * h_; ++i) {
      px_[3 * i] = s.background.r;
      px_[3 * i + 1] = s.background.g;
      px_[3 * i + 2] = s.background.b;
    }
    clip_ = {std::max(0, (int)std::floor(s.clip_left)), std::max(0, (int)std::floor(s.clip_top)),
             std::min(w_, (int)std::ceil(s.clip_right)), std::min(h_, (int)std::ceil(s.clip_bottom))};
    clip_f_[0] = s.clip_left;
    clip_f_[1] = s.clip_top;
    clip_f_[2] = s.clip_right;
    clip_f_[3] = s.clip_bottom;
  }

  void draw(const Shape& sh) {
    switch (sh.kind) {
      case Shape::Kind::rect: rect(sh); break;
      case Shape::Kind::line: polyline(sh); break;
      case Shape::Kind::dot: dot(sh); break;
      case Shape::Kind::text: text(sh); break;
    }
  }

  std::vector<uint8_t> pixels() const {
    std::vector<uint8_t> out(px_.size());
    for (size_t i = 0; i < px_.size(); ++i) out[i] = (uint8_t)std::clamp(std::lround(px_[i]), 0L, 255L);
    return out;
  }

 private:
  Box bounds(bool clip) const { return clip ? clip_ : Box{0, 0, w_, h_}; }

  void blend(int x, int y, Rgb c, double a) {
    if (a <= 0) return;
    a = std::min(a, 1.0);
    float* p = &px_[3 * ((size_t)y * w_ + x)];
    p[0] += (float)((c.r - p[0]) * a);
    p[1] += (float)((c.g - p[1]) * a);
    p[2] += (float)((c.b - p[2]) * a);
  }

  // Area of pixel (x, y) inside [x0, x1] x [y0, y1].
  static double overlap(int x, int y, double x0, double y0, double x1, double y1) {
    const double ox = std::min<double>(x + 1, x1) - std::max<double>(x, x0);
    const double oy = std::min<double>(y + 1, y1) - std::max<double>(y, y0);
    return ox > 0 && oy > 0 ? ox * oy : 0;
  }

  void fill_box(double x0, double y0, double x1, double y1, Rgb c, double a, bool clip) {
    if (clip) {
      x0 = std::max(x0, clip_f_[0]);
      y0 = std::max(y0, clip_f_[1]);
      x1 = std::min(x1, clip_f_[2]);
      y1 = std::min(y1, clip_f_[3]);
    }
    const Box b = bounds(clip);
    const int ix0 = std::max(b.x0, (int)std::floor(x0)), ix1 = std::min(b.x1, (int)std::ceil(x1));
    const int iy0 = std::max(b.y0, (int)std::floor(y0)), iy1 = std::min(b.y1, (int)std::ceil(y1));
    for (int y = iy0; y < iy1; ++y)
      for (int x = ix0; x < ix1; ++x) blend(x, y, c, a * overlap(x, y, x0, y0, x1, y1));
  }

  void rect(const Shape& sh) {
    const double x0 = sh.pts[0].x, y0 = sh.pts[0].y, x1 = sh.pts[1].x, y1 = sh.pts[1].y;
    if (sh.filled) fill_box(x0, y0, x1, y1, sh.fill, sh.opacity, sh.clip);
    if (sh.stroked) {
      const double h = sh.width / 2;
      fill_box(x0 - h, y0 - h, x1 + h, y0 + h, sh.stroke, sh.opacity, sh.clip);
      fill_box(x0 - h, y1 - h, x1 + h, y1 + h, sh.stroke, sh.opacity, sh.clip);
      fill_box(x0 - h, y0 + h, x0 + h, y1 - h, sh.stroke, sh.opacity, sh.clip);
      fill_box(x1 - h, y0 + h, x1 + h, y1 - h, sh.stroke, sh.opacity, sh.clip);
    }
  }

  // Coverage of the whole polyline is gathered first (the maximum over its segments) and
  // blended once, so joints where segments overlap do not come out darker.
  void polyline(const Shape& sh) {
    if (sh.pts.empty() || !sh.stroked) return;
    const Box b = bounds(sh.clip);
    const double half = sh.width / 2;
    Box touched{w_, h_, 0, 0};
    auto segment = [&](Pt p, Pt q) {
      const int x0 = std::max(b.x0, (int)std::floor(std::min(p.x, q.x) - half - 1));
      const int x1 = std::min(b.x1, (int)std::ceil(std::max(p.x, q.x) + half + 1));
      const int y0 = std::max(b.y0, (int)std::floor(std::min(p.y, q.y) - half - 1));
      const int y1 = std::min(b.y1, (int)std::ceil(std::max(p.y, q.y) + half + 1));
      if (x0 >= x1 || y0 >= y1) return;
      touched = {std::min(touched.x0, x0), std::min(touched.y0, y0), std::max(touched.x1, x1),
                 std::max(touched.y1, y1)};
      const double dx = q.x - p.x, dy = q.y - p.y, len2 = dx * dx + dy * dy;
      for (int y = y0; y < y1; ++y) {
        for (int x = x0; x < x1; ++x) {
          const double cx = x + 0.5 - p.x, cy = y + 0.5 - p.y;
          const double t = len2 > 0 ? std::clamp((cx * dx + cy * dy) / len2, 0.0, 1.0) : 0.0;
          const double ex = cx - t * dx, ey = cy - t * dy;
          // A line thinner than a pixel keeps its full width's worth of ink by fading, not vanishing.
          const double cov = std::clamp(half + 0.5 - std::sqrt(ex * ex + ey * ey), 0.0, 1.0) *
                             std::min(1.0, sh.width);
          float& c = cover_[(size_t)y * w_ + x];
          c = std::max(c, (float)cov);
        }
      }
    };
    if (sh.pts.size() == 1) segment(sh.pts[0], sh.pts[0]);
    for (size_t i = 1; i < sh.pts.size(); ++i) segment(sh.pts[i - 1], sh.pts[i]);
    for (int y = touched.y0; y < touched.y1; ++y) {
      for (int x = touched.x0; x < touched.x1; ++x) {
        float& c = cover_[(size_t)y * w_ + x];
        blend(x, y, sh.stroke, c * sh.opacity);
        c = 0;
      }
    }
  }

  void dot(const Shape& sh) {
    const Pt c = sh.pts[0];
    const Box b = bounds(sh.clip);
    const double r = sh.radius;
    const int x0 = std::max(b.x0, (int)std::floor(c.x - r - 1)), x1 = std::min(b.x1, (int)std::ceil(c.x + r + 1));
    const int y0 = std::max(b.y0, (int)std::floor(c.y - r - 1)), y1 = std::min(b.y1, (int)std::ceil(c.y + r + 1));
    for (int y = y0; y < y1; ++y) {
      for (int x = x0; x < x1; ++x) {
        const double d = std::hypot(x + 0.5 - c.x, y + 0.5 - c.y);
        blend(x, y, sh.fill, sh.opacity * std::clamp(r + 0.5 - d, 0.0, 1.0));
      }
    }
  }

  void text(const Shape& sh) {
    const std::string s = font::printable(sh.text);
    if (s.empty()) return;
    const int k = raster_font_scale(sh.font_px);
    const double w = text_width(s, sh.font_px, TextBackend::raster);
    const double shift = sh.anchor == Anchor::start ? 0 : sh.anchor == Anchor::middle ? w / 2 : w;
    // Pen position of the first glyph's top-left corner, in text space (u along the text, v down).
    const int u0 = (int)std::lround(-shift);
    const int v0 = -font::kAscent * k;
    const int ax = (int)std::lround(sh.pts[0].x), ay = (int)std::lround(sh.pts[0].y);
    auto put = [&](int u, int v) {
      // Vertical text is turned a quarter left: u runs up the image, v runs right.
      const int x = sh.vertical ? ax + v : ax + u;
      const int y = sh.vertical ? ay - u : ay + v;
      if (x >= 0 && x < w_ && y >= 0 && y < h_) blend(x, y, sh.fill, sh.opacity);
    };
    for (size_t i = 0; i < s.size(); ++i) {
      const font::Glyph& g = font::glyph((unsigned char)s[i]);
      const int gu = u0 + (int)i * font::kAdvance * k;
      for (int row = 0; row < font::kHeight; ++row) {
        for (int col = 0; col < font::kWidth; ++col) {
          if (!(g[row] >> (font::kWidth - 1 - col) & 1)) continue;
          for (int dy = 0; dy < k; ++dy) {
            for (int dx = 0; dx < k + (sh.bold ? 1 : 0); ++dx) put(gu + col * k + dx, v0 + row * k + dy);
          }
        }
      }
    }
  }

  int w_, h_;
  std::vector<float> px_;
  std::vector<float> cover_;
  Box clip_;
  double clip_f_[4];
};

}  // namespace

std::vector<uint8_t> rasterize(const Scene& scene) {
  Canvas canvas(scene);
  for (const Shape& sh : scene.shapes) canvas.draw(sh);
  return canvas.pixels();
}

}  // namespace subllm::plot_detail
