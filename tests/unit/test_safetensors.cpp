#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "subllm/error.h"
#include "subllm/safetensors.h"
#include "test_util.h"

namespace subllm {
namespace safetensors_tests {

namespace fs = std::filesystem;

using testing::error_of;
using testing::TempDir;

#define EXPECT_CONTAINS(haystack, needle) \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << "message: " << (haystack)

std::string read_bytes(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream f(path, std::ios::binary);
  f.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[static_cast<size_t>(i)] = static_cast<char>((v >> (8 * i)) & 0xff);
  return s;
}

// A file with the given header text and `data_bytes` bytes of data (filled with 0x11).
std::string raw_file(const std::string& header, size_t data_bytes) {
  return le64(header.size()) + header + std::string(data_bytes, '\x11');
}

std::string open_error(const std::string& path) {
  return error_of([&] { SafetensorsFile f(path); });
}

TEST(Safetensors, RoundTripF32AndI32) {
  TempDir dir;
  std::string path = dir.file("model.safetensors");
  std::vector<float> w = {1.0f, -2.5f, 3.25f, 0.0f, 1e-30f, -7.0f};
  std::vector<int32_t> ids = {7, -1, 2147483647, 0, 42};
  std::vector<float> b = {9.0f};
  write_safetensors(path,
                    {{"z.weight", DType::F32, {2, 3}, w.data()},
                     {"a.ids", DType::I32, {5}, ids.data()},
                     {"m.scalar", DType::F32, {1}, b.data()}},
                    {{"format", "pt"}, {"step", "12"}});
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  SafetensorsFile f(path);
  EXPECT_EQ(f.path(), path);
  EXPECT_EQ(f.names(), (std::vector<std::string>{"a.ids", "m.scalar", "z.weight"}));
  EXPECT_TRUE(f.has("z.weight"));
  EXPECT_FALSE(f.has("nope"));
  EXPECT_EQ(f.metadata().at("format"), "pt");
  EXPECT_EQ(f.metadata().at("step"), "12");

  const SafetensorsEntry& e = f.get("z.weight");
  EXPECT_EQ(e.dtype, DType::F32);
  EXPECT_EQ(e.shape, (Shape{2, 3}));
  EXPECT_EQ(e.nbytes, 24u);
  std::vector<float> out(6, -1.0f);
  f.read_f32("z.weight", {2, 3}, out.data());
  EXPECT_EQ(out, w);

  const SafetensorsEntry& ie = f.get("a.ids");
  EXPECT_EQ(ie.dtype, DType::I32);
  ASSERT_EQ(ie.nbytes, ids.size() * 4);
  std::vector<int32_t> iout(ids.size());
  std::memcpy(iout.data(), ie.data, ie.nbytes);
  EXPECT_EQ(iout, ids);
  EXPECT_CONTAINS(error_of([&] { f.read_f32("a.ids", {5}, out.data()); }), "dtype I32");
}

TEST(Safetensors, LayoutIsSortedContiguousAndAligned) {
  TempDir dir;
  std::string path = dir.file("layout.safetensors");
  std::vector<uint16_t> h(3, 0x3c00);
  std::vector<float> f(5, 1.0f);
  write_safetensors(path, {{"b", DType::F32, {5}, f.data()}, {"a", DType::F16, {3}, h.data()}}, {{"k", "v"}});
  std::string bytes = read_bytes(path);
  ASSERT_GE(bytes.size(), 8u);
  uint64_t hlen = 0;
  for (int i = 7; i >= 0; --i) hlen = (hlen << 8) | static_cast<unsigned char>(bytes[static_cast<size_t>(i)]);
  EXPECT_EQ((8 + hlen) % 8, 0u);
  EXPECT_EQ(bytes.size(), 8 + hlen + 6 + 20);
  auto j = nlohmann::json::parse(bytes.substr(8, hlen));
  EXPECT_EQ(j["a"]["data_offsets"], nlohmann::json::array({0, 6}));
  EXPECT_EQ(j["b"]["data_offsets"], nlohmann::json::array({6, 26}));
  EXPECT_EQ(j["a"]["dtype"], "F16");
  EXPECT_EQ(j["b"]["shape"], nlohmann::json::array({5}));
  EXPECT_EQ(j["__metadata__"]["k"], "v");
  // Sorted by name in the header text too.
  EXPECT_LT(bytes.find("\"a\""), bytes.find("\"b\""));
}

TEST(Safetensors, EmptyAndZeroSizedTensors) {
  TempDir dir;
  std::string path = dir.file("empty.safetensors");
  write_safetensors(path, {});
  SafetensorsFile f(path);
  EXPECT_TRUE(f.names().empty());
  EXPECT_TRUE(f.metadata().empty());

  std::string path2 = dir.file("zero.safetensors");
  float one = 1.0f;
  write_safetensors(path2, {{"empty", DType::F32, {0, 4}, nullptr}, {"one", DType::F32, {}, &one}});
  SafetensorsFile g(path2);
  EXPECT_EQ(g.get("empty").nbytes, 0u);
  float x = 0.0f;
  g.read_f32("one", {}, &x);
  EXPECT_EQ(x, 1.0f);
}

TEST(Safetensors, Bf16Conversion) {
  TempDir dir;
  std::string path = dir.file("bf16.safetensors");
  std::vector<uint16_t> bits = {0x3f80, 0xc000, 0x3fc0, 0x0000, 0x8000, 0x7f80, 0xff80, 0x7fc0, 0x0001, 0x4049};
  write_safetensors(path, {{"t", DType::BF16, {static_cast<int64_t>(bits.size())}, bits.data()}});
  SafetensorsFile f(path);
  std::vector<float> out(bits.size());
  f.read_f32("t", {static_cast<int64_t>(bits.size())}, out.data());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(out[2], 1.5f);
  EXPECT_EQ(out[3], 0.0f);
  EXPECT_TRUE(std::signbit(out[4]) && out[4] == 0.0f);
  EXPECT_EQ(out[5], std::numeric_limits<float>::infinity());
  EXPECT_EQ(out[6], -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(out[7]));
  EXPECT_EQ(out[8], std::ldexp(1.0f, -133));  // smallest bf16 subnormal
  EXPECT_EQ(out[9], 3.140625f);
}

TEST(Safetensors, F16Conversion) {
  TempDir dir;
  std::string path = dir.file("f16.safetensors");
  std::vector<uint16_t> bits = {0x3c00, 0xc000, 0x7bff, 0x0001, 0x03ff, 0x0400, 0x8001,
                                0x7c00, 0xfc00, 0x7e00, 0x3555, 0x0000, 0x8000, 0x0200};
  const int64_t n = static_cast<int64_t>(bits.size());
  write_safetensors(path, {{"t", DType::F16, {n}, bits.data()}});
  SafetensorsFile f(path);
  std::vector<float> out(bits.size());
  f.read_f32("t", {n}, out.data());
  EXPECT_EQ(out[0], 1.0f);
  EXPECT_EQ(out[1], -2.0f);
  EXPECT_EQ(out[2], 65504.0f);
  EXPECT_EQ(out[3], std::ldexp(1.0f, -24));            // smallest subnormal
  EXPECT_EQ(out[4], 1023.0f * std::ldexp(1.0f, -24));  // largest subnormal
  EXPECT_EQ(out[5], std::ldexp(1.0f, -14));            // smallest normal
  EXPECT_EQ(out[6], -std::ldexp(1.0f, -24));
  EXPECT_EQ(out[7], std::numeric_limits<float>::infinity());
  EXPECT_EQ(out[8], -std::numeric_limits<float>::infinity());
  EXPECT_TRUE(std::isnan(out[9]));
  EXPECT_EQ(out[10], 0.333251953125f);
  EXPECT_EQ(out[11], 0.0f);
  EXPECT_TRUE(std::signbit(out[12]) && out[12] == 0.0f);
  EXPECT_EQ(out[13], std::ldexp(1.0f, -15));  // subnormal with only the top mantissa bit
}

TEST(Safetensors, ShapeMismatchAndMissingTensor) {
  TempDir dir;
  std::string path = dir.file("model.safetensors");
  std::vector<float> w(32 * 16, 0.5f);
  const std::string name = "decoder.layers.0.self_attn.q_proj.weight";
  write_safetensors(path, {{name, DType::F32, {32, 16}, w.data()}});
  SafetensorsFile f(path);
  std::vector<float> out(32 * 32);
  EXPECT_EQ(error_of([&] { f.read_f32(name, {32, 32}, out.data()); }),
            path + ": tensor 'decoder.layers.0.self_attn.q_proj.weight' has shape [32, 16] but the config needs "
                   "[32, 32]: the checkpoint does not match config.json");
  std::string missing = error_of([&] { f.get("decoder.layers.1.self_attn.q_proj.weight"); });
  EXPECT_CONTAINS(missing, path);
  EXPECT_CONTAINS(missing, "'decoder.layers.1.self_attn.q_proj.weight'");
  EXPECT_CONTAINS(error_of([&] { f.read_f32("absent", {1}, out.data()); }), "'absent'");
}

TEST(Safetensors, CorruptFilesNameTheFile) {
  TempDir dir;
  struct Case {
    const char* label;
    std::string bytes;
    const char* expect;
  };
  const std::string ok_entry = R"("t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]})";
  const std::vector<Case> cases = {
      {"empty_file", "", "shorter than the 8-byte"},
      {"five_bytes", "abcde", "shorter than the 8-byte"},
      {"header_beyond_file", le64(1000) + "{}", "header length 1000 is beyond the file size"},
      {"huge_header_len", le64(~0ull) + "{}", "is beyond the file size"},
      {"invalid_json", raw_file("{\"t\": [", 0), "invalid JSON"},
      {"not_object", raw_file("[1,2]", 0), "must be a JSON object"},
      {"unknown_dtype", raw_file(R"({"t":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}})", 8),
       "dtype F64, which is not supported"},
      {"missing_dtype", raw_file(R"({"t":{"shape":[1],"data_offsets":[0,4]}})", 4), "dtype"},
      {"negative_dim", raw_file(R"({"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}})", 4), "shape entry"},
      {"offsets_out_of_range", raw_file("{" + ok_entry + "}", 4), "beyond the 4 data bytes"},
      {"end_before_begin", raw_file(R"({"t":{"dtype":"F32","shape":[0],"data_offsets":[8,4]}})", 8),
       "end before begin"},
      {"bad_offsets", raw_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0]}})", 8), "data_offsets"},
      {"overlap",
       raw_file(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"u":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})",
                12),
       "overlap"},
      {"size_mismatch", raw_file(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", 8),
       "has 8 bytes but dtype F32 and shape [3] need 12"},
      {"metadata_not_string", raw_file(R"({"__metadata__":{"a":1}})", 0), "__metadata__"},
  };
  for (const Case& c : cases) {
    std::string path = dir.file(std::string(c.label) + ".safetensors");
    write_bytes(path, c.bytes);
    std::string msg = open_error(path);
    EXPECT_CONTAINS(msg, path);
    EXPECT_CONTAINS(msg, c.expect);
  }

  // The same helper produces a readable file when nothing is wrong, so the cases above fail
  // for the reason they name.
  std::string good = dir.file("good.safetensors");
  write_bytes(good, raw_file("{" + ok_entry + "}", 8));
  EXPECT_EQ(open_error(good), "");

  std::string absent = dir.file("absent.safetensors");
  std::string msg = open_error(absent);
  EXPECT_CONTAINS(msg, absent);
  EXPECT_CONTAINS(msg, "No such file");
  EXPECT_CONTAINS(open_error(dir.file("")), "not a regular file");
}

TEST(Safetensors, TruncatedFileIsDetected) {
  TempDir dir;
  std::string path = dir.file("model.safetensors");
  std::vector<float> w(100, 2.0f);
  write_safetensors(path, {{"w", DType::F32, {100}, w.data()}});
  std::string bytes = read_bytes(path);
  for (size_t cut : {size_t{1}, size_t{200}, bytes.size() - 20, bytes.size() - 7}) {
    write_bytes(path, bytes.substr(0, bytes.size() - cut));
    std::string msg = open_error(path);
    EXPECT_CONTAINS(msg, path);
    EXPECT_CONTAINS(msg, "truncated");
  }
}

TEST(Safetensors, FailedWriteKeepsOldFileAndLeavesNoTemp) {
  TempDir dir;
  std::string path = dir.file("model.safetensors");
  std::vector<float> v1 = {1.0f, 2.0f};
  write_safetensors(path, {{"w", DType::F32, {2}, v1.data()}});
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  // Overwriting works and replaces the content.
  std::vector<float> v2 = {3.0f, 4.0f, 5.0f};
  write_safetensors(path, {{"w", DType::F32, {3}, v2.data()}});
  EXPECT_EQ(SafetensorsFile(path).get("w").shape, (Shape{3}));
  EXPECT_FALSE(fs::exists(path + ".tmp"));

  // A directory at the temp path makes the write fail; the old file survives untouched.
  std::string before = read_bytes(path);
  fs::create_directory(path + ".tmp");
  std::string msg = error_of([&] { write_safetensors(path, {{"w", DType::F32, {2}, v1.data()}}); });
  EXPECT_CONTAINS(msg, "cannot write '" + path + "'");
  EXPECT_EQ(read_bytes(path), before);
  EXPECT_TRUE(fs::is_directory(path + ".tmp"));
  fs::remove(path + ".tmp");

  // The temp file is written but cannot be renamed over a directory: it must not linger.
  std::string blocked = dir.file("blocked");
  fs::create_directory(blocked);
  EXPECT_CONTAINS(error_of([&] { write_safetensors(blocked, {{"w", DType::F32, {2}, v1.data()}}); }),
                  "cannot write '" + blocked + "'");
  EXPECT_FALSE(fs::exists(blocked + ".tmp"));

  // Writing the data fails (a full device behind the temp path): old file kept, temp removed.
  if (fs::exists("/dev/full")) {
    fs::create_symlink("/dev/full", path + ".tmp");
    std::vector<float> big(1 << 16, 1.0f);
    std::string full = error_of([&] { write_safetensors(path, {{"w", DType::F32, {1 << 16}, big.data()}}); });
    EXPECT_CONTAINS(full, "No space left on device");
    EXPECT_FALSE(fs::exists(fs::symlink_status(path + ".tmp")));
    ASSERT_FALSE(fs::is_symlink(path));  // reading through to /dev/full would never end
    EXPECT_EQ(read_bytes(path), before);
  }

  // A missing output folder.
  std::string nowhere = dir.file("missing/model.safetensors");
  std::string m2 = error_of([&] { write_safetensors(nowhere, {{"w", DType::F32, {2}, v1.data()}}); });
  EXPECT_EQ(m2, "cannot write '" + nowhere + "': No such file or directory (check the output folder)");

  // Invalid input is refused before anything is written.
  std::string dup = dir.file("dup.safetensors");
  EXPECT_CONTAINS(error_of([&] {
                    write_safetensors(dup, {{"w", DType::F32, {2}, v1.data()}, {"w", DType::F32, {2}, v1.data()}});
                  }),
                  "given twice");
  EXPECT_CONTAINS(error_of([&] { write_safetensors(dup, {{"w", DType::F32, {2}, nullptr}}); }), "no data");
  EXPECT_FALSE(fs::exists(dup));
  EXPECT_FALSE(fs::exists(dup + ".tmp"));
}

TEST(Safetensors, UnwritableFolderIsReported) {
  // A folder path that runs through a regular file cannot be written by anyone, root included.
  TempDir dir;
  std::string blocker = dir.file("plain-file");
  { std::ofstream(blocker) << "x"; }
  std::string path = blocker + "/model.safetensors";
  float x = 1.0f;
  std::string msg = error_of([&] { write_safetensors(path, {{"w", DType::F32, {1}, &x}}); });
  EXPECT_NE(msg.find("cannot write '" + path + "'"), std::string::npos) << msg;
  EXPECT_NE(msg.find("check the output folder"), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(path + ".tmp"));
}

}  // namespace safetensors_tests
}  // namespace subllm
