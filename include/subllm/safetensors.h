#pragma once
// Reading and writing the safetensors format: 8-byte little-endian header length, a JSON
// header {name: {dtype, shape, data_offsets}, "__metadata__": {...}}, then raw data.
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "subllm/tensor.h"

namespace subllm {

struct SafetensorsEntry {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  const void* data = nullptr;  // points into the mapped file
  size_t nbytes = 0;
};

// A memory-mapped safetensors file. Entries stay valid while the object lives.
class SafetensorsFile {
 public:
  // Throws subllm::Error naming the file for: missing/unreadable file, truncated file,
  // header length beyond the file, invalid JSON, unsupported dtype, offsets out of range
  // or overlapping, a size that does not match dtype * shape.
  explicit SafetensorsFile(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  bool has(const std::string& name) const { return entries_.count(name) != 0; }
  const SafetensorsEntry& get(const std::string& name) const;  // error names the missing tensor
  std::vector<std::string> names() const;                      // sorted
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // Copies tensor `name` into dst as fp32 (converting BF16/F16), after checking its shape
  // equals `expected` (error names the tensor, both shapes and the file).
  void read_f32(const std::string& name, const Shape& expected, float* dst) const;

 private:
  std::string path_;
  void* map_ = nullptr;
  size_t map_size_ = 0;
  std::map<std::string, SafetensorsEntry> entries_;
  std::map<std::string, std::string> metadata_;
};

struct SafetensorsOut {
  std::string name;
  DType dtype = DType::F32;
  Shape shape;
  const void* data = nullptr;
};
// Writes atomically: to `path + ".tmp"`, fsync, then rename over `path`. The data section holds
// the tensors sorted by name, or in the order given when `in_given_order` (so tensors that are
// adjacent in memory stay adjacent in the file, as mapped weights need).
void write_safetensors(const std::string& path, const std::vector<SafetensorsOut>& tensors,
                       const std::map<std::string, std::string>& metadata = {}, bool in_given_order = false);

}  // namespace subllm
