// Drawing a chart's scene with cairo: one routine paints onto an image (PNG), SVG or PDF surface,
// text in DejaVu Sans through cairo's toy text API, checked for with fontconfig first.
#include <cairo-pdf.h>
#include <cairo-svg.h>
#include <cairo.h>
#include <fontconfig/fontconfig.h>

#include <cmath>
#include <memory>
#include <mutex>

#include "eval/plot_scene.h"
#include "subllm/error.h"

namespace subllm {

void check_plot_font(const std::string& family, const std::string& package) {
  check(FcInit() == FcTrue, "fontconfig failed to start: cannot look up the font '" + family + "' for plots");
  FcPattern* want = FcNameParse(reinterpret_cast<const FcChar8*>(family.c_str()));
  check(want != nullptr, "fontconfig cannot parse the font name '" + family + "'");
  FcConfigSubstitute(nullptr, want, FcMatchPattern);
  FcDefaultSubstitute(want);
  FcResult result = FcResultNoMatch;
  FcPattern* got = FcFontMatch(nullptr, want, &result);
  FcPatternDestroy(want);
  std::string matched;
  if (got) {
    FcChar8* name = nullptr;
    if (FcPatternGetString(got, FC_FAMILY, 0, &name) == FcResultMatch && name)
      matched = reinterpret_cast<const char*>(name);
    FcPatternDestroy(got);
  }
  check(matched == family, "the font '" + family + "' that plots are drawn in is not installed (fontconfig " +
                               (matched.empty() ? std::string("found no font at all") : "offers '" + matched + "'") +
                               "): install the package " + package + " (scripts/setup.sh does)");
}

namespace plot_detail {
namespace {

void require_font() {
  static std::once_flag once;
  static std::string error;
  std::call_once(once, [] {
    try {
      check_plot_font(kFontFamily, kFontPackage);
    } catch (const Error& e) {
      error = e.what();
    }
  });
  check(error.empty(), error);
}

void select_font(cairo_t* cr, double font_px, bool bold) {
  cairo_select_font_face(cr, kFontFamily, CAIRO_FONT_SLANT_NORMAL,
                         bold ? CAIRO_FONT_WEIGHT_BOLD : CAIRO_FONT_WEIGHT_NORMAL);
  cairo_set_font_size(cr, font_px);
}

// A 1x1 surface to measure text on.
struct Measurer {
  cairo_surface_t* surface = cairo_image_surface_create(CAIRO_FORMAT_ARGB32, 1, 1);
  cairo_t* cr = cairo_create(surface);
  ~Measurer() {
    cairo_destroy(cr);
    cairo_surface_destroy(surface);
  }
};

cairo_t* measurer() {
  require_font();
  thread_local Measurer m;
  return m.cr;
}

void set_colour(cairo_t* cr, Rgb c, double opacity) {
  cairo_set_source_rgba(cr, c.r / 255.0, c.g / 255.0, c.b / 255.0, opacity);
}

void draw(cairo_t* cr, const Scene& sc) {
  set_colour(cr, sc.background, 1);
  cairo_paint(cr);
  for (const Shape& sh : sc.shapes) {
    if (sh.pts.empty()) continue;
    cairo_save(cr);
    if (sh.clip) {
      cairo_rectangle(cr, sc.clip_left, sc.clip_top, sc.clip_right - sc.clip_left, sc.clip_bottom - sc.clip_top);
      cairo_clip(cr);
    }
    auto paint = [&] {
      if (sh.filled) {
        set_colour(cr, sh.fill, sh.opacity);
        if (sh.stroked) cairo_fill_preserve(cr);
        else cairo_fill(cr);
      }
      if (sh.stroked) {
        set_colour(cr, sh.stroke, sh.opacity);
        cairo_set_line_width(cr, sh.width);
        if (!sh.dash.empty()) cairo_set_dash(cr, sh.dash.data(), (int)sh.dash.size(), 0);
        cairo_stroke(cr);
      }
      cairo_new_path(cr);
    };
    switch (sh.kind) {
      case Shape::Kind::rect:
        cairo_rectangle(cr, sh.pts[0].x, sh.pts[0].y, sh.pts[1].x - sh.pts[0].x, sh.pts[1].y - sh.pts[0].y);
        paint();
        break;
      case Shape::Kind::line:
        // Curves (the clipped lines) get round ends and joins; grid, ticks and legend samples do not,
        // which is also how a reader of the SVG tells curves from the rest.
        if (sh.clip) {
          cairo_set_line_join(cr, CAIRO_LINE_JOIN_ROUND);
          cairo_set_line_cap(cr, CAIRO_LINE_CAP_ROUND);
        }
        cairo_move_to(cr, sh.pts[0].x, sh.pts[0].y);
        for (size_t i = 1; i < sh.pts.size(); ++i) cairo_line_to(cr, sh.pts[i].x, sh.pts[i].y);
        paint();
        break;
      case Shape::Kind::dot:
        cairo_new_sub_path(cr);
        cairo_arc(cr, sh.pts[0].x, sh.pts[0].y, sh.radius, 0, 2 * M_PI);
        paint();
        break;
      case Shape::Kind::text: {
        select_font(cr, sh.font_px, sh.bold);
        cairo_text_extents_t ext;
        cairo_text_extents(cr, sh.text.c_str(), &ext);
        const double shift = sh.anchor == Anchor::start ? 0 : sh.anchor == Anchor::middle ? ext.x_advance / 2
                                                                                          : ext.x_advance;
        cairo_translate(cr, sh.pts[0].x, sh.pts[0].y);
        if (sh.vertical) cairo_rotate(cr, -M_PI / 2);
        cairo_move_to(cr, -shift, 0);
        set_colour(cr, sh.fill, sh.opacity);
        cairo_show_text(cr, sh.text.c_str());
        cairo_new_path(cr);
        break;
      }
    }
    cairo_restore(cr);
  }
}

cairo_status_t append(void* closure, const unsigned char* data, unsigned int length) {
  static_cast<std::string*>(closure)->append(reinterpret_cast<const char*>(data), length);
  return CAIRO_STATUS_SUCCESS;
}

void check_status(cairo_status_t s, const char* what) {
  check(s == CAIRO_STATUS_SUCCESS, std::string("cairo failed to ") + what + ": " + cairo_status_to_string(s));
}

}  // namespace

double text_width(const std::string& text, double font_px, bool bold) {
  cairo_t* cr = measurer();
  select_font(cr, font_px, bold);
  cairo_text_extents_t ext;
  cairo_text_extents(cr, text.c_str(), &ext);
  return ext.x_advance;
}

double cap_height(double font_px) {
  cairo_t* cr = measurer();
  select_font(cr, font_px, false);
  cairo_text_extents_t ext;
  cairo_text_extents(cr, "H", &ext);
  return -ext.y_bearing;
}

double descent(double font_px) {
  cairo_t* cr = measurer();
  select_font(cr, font_px, false);
  cairo_font_extents_t ext;
  cairo_font_extents(cr, &ext);
  return ext.descent;
}

std::string render_scene(const Scene& sc, PlotFormat format) {
  require_font();
  std::string out;
  cairo_surface_t* surface = nullptr;
  switch (format) {
    case PlotFormat::png: surface = cairo_image_surface_create(CAIRO_FORMAT_RGB24, sc.width, sc.height); break;
    case PlotFormat::svg:
      surface = cairo_svg_surface_create_for_stream(append, &out, sc.width, sc.height);
      cairo_svg_surface_set_document_unit(surface, CAIRO_SVG_UNIT_PX);
      break;
    // One pixel of the layout is one PDF point.
    case PlotFormat::pdf: surface = cairo_pdf_surface_create_for_stream(append, &out, sc.width, sc.height); break;
  }
  std::unique_ptr<cairo_surface_t, void (*)(cairo_surface_t*)> owned(surface, cairo_surface_destroy);
  check_status(cairo_surface_status(surface), "create a drawing surface");
  cairo_t* cr = cairo_create(surface);
  draw(cr, sc);
  const cairo_status_t drawn = cairo_status(cr);
  cairo_destroy(cr);
  check_status(drawn, "draw the chart");
  if (format == PlotFormat::png) {
    check_status(cairo_surface_write_to_png_stream(surface, append, &out), "encode the PNG");
  } else {
    cairo_surface_finish(surface);  // writes the rest of the SVG / PDF
    check_status(cairo_surface_status(surface), "finish the document");
  }
  return out;
}

}  // namespace plot_detail
}  // namespace subllm
