// PNG writing without zlib: the image data goes into "stored" deflate blocks, which need no
// compression, only the zlib framing, the Adler-32 of the data and a CRC-32 per chunk.
#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "subllm/error.h"
#include "subllm/plot.h"

namespace subllm {
namespace {

std::array<uint32_t, 256> make_crc_table() {
  std::array<uint32_t, 256> table{};
  for (uint32_t n = 0; n < 256; ++n) {
    uint32_t c = n;
    for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    table[n] = c;
  }
  return table;
}

uint32_t crc32(const uint8_t* data, size_t n) {
  static const std::array<uint32_t, 256> table = make_crc_table();
  uint32_t c = 0xFFFFFFFFu;
  for (size_t i = 0; i < n; ++i) c = table[(c ^ data[i]) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

uint32_t adler32(const uint8_t* data, size_t n) {
  const uint32_t mod = 65521;
  uint32_t a = 1, b = 0;
  // 5552 bytes is the longest run whose sums cannot overflow 32 bits before the modulo.
  while (n > 0) {
    const size_t block = n < 5552 ? n : 5552;
    for (size_t i = 0; i < block; ++i) {
      a += data[i];
      b += a;
    }
    a %= mod;
    b %= mod;
    data += block;
    n -= block;
  }
  return (b << 16) | a;
}

void put_u32(std::vector<uint8_t>& out, uint32_t v) {
  out.push_back((uint8_t)(v >> 24));
  out.push_back((uint8_t)(v >> 16));
  out.push_back((uint8_t)(v >> 8));
  out.push_back((uint8_t)v);
}

void put_chunk(std::vector<uint8_t>& out, const char type[4], const std::vector<uint8_t>& body) {
  put_u32(out, (uint32_t)body.size());
  const size_t start = out.size();
  out.insert(out.end(), type, type + 4);
  out.insert(out.end(), body.begin(), body.end());
  put_u32(out, crc32(out.data() + start, out.size() - start));
}

}  // namespace

std::vector<uint8_t> encode_png_rgb(const std::vector<uint8_t>& rgb, int width, int height) {
  check(width > 0 && height > 0, "a PNG needs a positive width and height");
  const size_t row = (size_t)width * 3;
  check(rgb.size() == row * (size_t)height, "PNG pixel buffer size does not match width x height x 3");

  // Scanlines, each led by filter type 0 (none).
  std::vector<uint8_t> raw;
  raw.reserve((row + 1) * (size_t)height);
  for (int y = 0; y < height; ++y) {
    raw.push_back(0);
    raw.insert(raw.end(), rgb.begin() + (ptrdiff_t)(row * y), rgb.begin() + (ptrdiff_t)(row * (y + 1)));
  }

  std::vector<uint8_t> z;
  z.reserve(raw.size() + raw.size() / 65535 * 5 + 16);
  z.push_back(0x78);  // deflate, 32 KiB window
  z.push_back(0x01);  // no preset dictionary, fastest level; 0x7801 is a multiple of 31 as zlib requires
  size_t pos = 0;
  do {
    const size_t len = raw.size() - pos < 65535 ? raw.size() - pos : 65535;
    const bool last = pos + len == raw.size();
    z.push_back(last ? 1 : 0);  // BFINAL, BTYPE 00 (stored); the rest of the byte is padding
    z.push_back((uint8_t)(len & 0xFF));
    z.push_back((uint8_t)(len >> 8));
    z.push_back((uint8_t)(~len & 0xFF));
    z.push_back((uint8_t)((~len >> 8) & 0xFF));
    z.insert(z.end(), raw.begin() + (ptrdiff_t)pos, raw.begin() + (ptrdiff_t)(pos + len));
    pos += len;
  } while (pos < raw.size());
  put_u32(z, adler32(raw.data(), raw.size()));

  std::vector<uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
  std::vector<uint8_t> ihdr;
  put_u32(ihdr, (uint32_t)width);
  put_u32(ihdr, (uint32_t)height);
  ihdr.push_back(8);  // bits per channel
  ihdr.push_back(2);  // colour type: RGB
  ihdr.push_back(0);  // compression: deflate
  ihdr.push_back(0);  // filter method 0
  ihdr.push_back(0);  // no interlace
  put_chunk(png, "IHDR", ihdr);
  put_chunk(png, "IDAT", z);
  put_chunk(png, "IEND", {});
  return png;
}

}  // namespace subllm
