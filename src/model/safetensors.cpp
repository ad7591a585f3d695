// The safetensors format: u64 little-endian header length, JSON header, raw tensor bytes.
#include "subllm/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <utility>

#include "subllm/error.h"

namespace subllm {
namespace {

using nlohmann::json;

bool parse_dtype(const std::string& s, DType& out) {
  if (s == "F32") out = DType::F32;
  else if (s == "BF16") out = DType::BF16;
  else if (s == "F16") out = DType::F16;
  else if (s == "I32") out = DType::I32;
  else if (s == "I8") out = DType::I8;
  else return false;
  return true;
}

uint64_t read_u64_le(const unsigned char* p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
}

void put_u64_le(unsigned char* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<unsigned char>(v >> (8 * i));
}

float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

float bf16_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

float f16_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t mant = h & 0x3ffu;
  uint32_t bits;
  if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {
      // Subnormal half: renormalise so it becomes a normal float (every half subnormal is
      // a normal float).
      int e = -1;
      do {
        mant <<= 1;
        ++e;
      } while ((mant & 0x400u) == 0);
      mant &= 0x3ffu;
      bits = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | (mant << 13);
    }
  } else if (exp == 0x1f) {
    // Inf keeps a zero mantissa; NaN keeps its payload (and so stays NaN).
    bits = sign | 0x7f800000u | (mant << 13);
  } else {
    bits = sign | ((exp - 15 + 127) << 23) | (mant << 13);
  }
  return bits_to_float(bits);
}

// Product of the dims, or false when it overflows or a dim is negative.
bool checked_numel(const Shape& shape, uint64_t& out) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    uint64_t u = static_cast<uint64_t>(d);
    if (u != 0 && n > std::numeric_limits<uint64_t>::max() / u) return false;
    n *= u;
  }
  out = n;
  return true;
}

}  // namespace

SafetensorsFile::SafetensorsFile(const std::string& path) : path_(path) {
  const std::string& p = path_;
  int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) throw Error("cannot open '" + p + "': " + std::strerror(errno) + " (check the checkpoint path)");
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    throw Error("cannot read '" + p + "': " + std::strerror(err));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error("'" + p + "' is not a regular file: point at the .safetensors file itself");
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    throw Error(p + ": file is " + std::to_string(file_size) +
                " bytes, shorter than the 8-byte safetensors header length: the file is truncated or not a "
                "safetensors file");
  }
  void* m = ::mmap(nullptr, file_size, PROT_READ, MAP_PRIVATE, fd, 0);
  int map_err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (m == MAP_FAILED) throw Error("cannot map '" + p + "' into memory: " + std::strerror(map_err));
  map_ = m;
  map_size_ = file_size;

  // The destructor does not run when the constructor throws, so unmap here on failure.
  try {
    const auto* bytes = static_cast<const unsigned char*>(map_);
    const uint64_t header_len = read_u64_le(bytes);
    if (header_len > file_size - 8) {
      throw Error(p + ": header length " + std::to_string(header_len) + " is beyond the file size " +
                  std::to_string(file_size) + ": the file is truncated or not a safetensors file");
    }
    const char* hdr = reinterpret_cast<const char*>(bytes + 8);
    json j;
    try {
      j = json::parse(hdr, hdr + header_len);
    } catch (const json::exception& e) {
      throw Error(p + ": invalid JSON in the header: " + e.what() + " (the file is corrupt)");
    }
    if (!j.is_object()) throw Error(p + ": the header must be a JSON object, got " + std::string(j.type_name()));

    const unsigned char* data = bytes + 8 + header_len;
    const uint64_t data_size = file_size - 8 - header_len;
    std::vector<std::pair<uint64_t, uint64_t>> ranges;  // (begin, end) of non-empty tensors, for overlaps
    std::vector<std::string> range_names;

    for (auto it = j.begin(); it != j.end(); ++it) {
      const std::string& name = it.key();
      const json& v = it.value();
      if (name == "__metadata__") {
        if (!v.is_object()) throw Error(p + ": __metadata__ must be a JSON object of strings (the file is corrupt)");
        for (auto m_it = v.begin(); m_it != v.end(); ++m_it) {
          if (!m_it.value().is_string()) {
            throw Error(p + ": __metadata__ value '" + m_it.key() + "' is not a string (the file is corrupt)");
          }
          metadata_[m_it.key()] = m_it.value().get<std::string>();
        }
        continue;
      }
      const std::string where = p + ": tensor '" + name + "'";
      if (!v.is_object()) throw Error(where + " is not described by a JSON object (the file is corrupt)");

      auto dt_it = v.find("dtype");
      if (dt_it == v.end() || !dt_it->is_string()) throw Error(where + " has no \"dtype\" string (the file is corrupt)");
      SafetensorsEntry e;
      e.name = name;
      const std::string dt = dt_it->get<std::string>();
      if (!parse_dtype(dt, e.dtype)) {
        throw Error(where + " has dtype " + dt +
                    ", which is not supported (supported: F32, BF16, F16, I32, I8): convert the checkpoint");
      }

      auto sh_it = v.find("shape");
      if (sh_it == v.end() || !sh_it->is_array()) throw Error(where + " has no \"shape\" list (the file is corrupt)");
      for (const json& d : *sh_it) {
        if (!d.is_number_unsigned()) {
          throw Error(where + " has a shape entry " + d.dump() + " that is not a non-negative integer (the file is corrupt)");
        }
        uint64_t u = d.get<uint64_t>();
        if (u > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
          throw Error(where + " has a dimension too large (" + d.dump() + ") (the file is corrupt)");
        }
        e.shape.push_back(static_cast<int64_t>(u));
      }

      auto off_it = v.find("data_offsets");
      if (off_it == v.end() || !off_it->is_array() || off_it->size() != 2 || !(*off_it)[0].is_number_unsigned() ||
          !(*off_it)[1].is_number_unsigned()) {
        throw Error(where + " needs \"data_offsets\": [begin, end] with non-negative integers (the file is corrupt)");
      }
      const uint64_t begin = (*off_it)[0].get<uint64_t>();
      const uint64_t end = (*off_it)[1].get<uint64_t>();
      if (end < begin) {
        throw Error(where + " has data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                    "] with end before begin (the file is corrupt)");
      }
      if (end > data_size) {
        throw Error(where + " has data_offsets [" + std::to_string(begin) + ", " + std::to_string(end) +
                    "] beyond the " + std::to_string(data_size) + " data bytes: the file is truncated or corrupt");
      }
      uint64_t numel = 0;
      const uint64_t elem = dtype_size(e.dtype);
      if (!checked_numel(e.shape, numel) || numel > std::numeric_limits<uint64_t>::max() / elem ||
          numel * elem != end - begin) {
        throw Error(where + " has " + std::to_string(end - begin) + " bytes but dtype " + dt + " and shape " +
                    shape_str(e.shape) + " need " + (checked_numel(e.shape, numel) ? std::to_string(numel * elem) : "more") +
                    " (the file is corrupt)");
      }
      e.data = data + begin;
      e.nbytes = static_cast<size_t>(end - begin);
      if (end > begin) {
        ranges.emplace_back(begin, end);
        range_names.push_back(name);
      }
      entries_.emplace(name, std::move(e));
    }

    std::vector<size_t> order(ranges.size());
    for (size_t i = 0; i < order.size(); ++i) order[i] = i;
    std::sort(order.begin(), order.end(), [&](size_t a, size_t b) { return ranges[a] < ranges[b]; });
    for (size_t k = 1; k < order.size(); ++k) {
      const auto& prev = ranges[order[k - 1]];
      const auto& cur = ranges[order[k]];
      if (cur.first < prev.second) {
        throw Error(p + ": tensors '" + range_names[order[k - 1]] + "' and '" + range_names[order[k]] +
                    "' overlap in the data section (the file is corrupt)");
      }
    }
  } catch (...) {
    ::munmap(map_, map_size_);
    map_ = nullptr;
    throw;
  }
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, map_size_);
}

const SafetensorsEntry& SafetensorsFile::get(const std::string& name) const {
  auto it = entries_.find(name);
  if (it == entries_.end()) {
    throw Error(path_ + ": no tensor '" + name + "' (the file has " + std::to_string(entries_.size()) +
                " tensors): the checkpoint does not match config.json");
  }
  return it->second;
}

std::vector<std::string> SafetensorsFile::names() const {
  std::vector<std::string> out;
  out.reserve(entries_.size());
  for (const auto& kv : entries_) out.push_back(kv.first);
  return out;
}

void SafetensorsFile::read_f32(const std::string& name, const Shape& expected, float* dst) const {
  const SafetensorsEntry& e = get(name);
  if (e.shape != expected) {
    throw Error(path_ + ": tensor '" + name + "' has shape " + shape_str(e.shape) + " but the config needs " +
                shape_str(expected) + ": the checkpoint does not match config.json");
  }
  const size_t n = e.nbytes / dtype_size(e.dtype);
  // Offsets in a file are not necessarily aligned, so elements are copied bytewise.
  const auto* src = static_cast<const unsigned char*>(e.data);
  switch (e.dtype) {
    case DType::F32:
      if (n) std::memcpy(dst, src, n * sizeof(float));
      return;
    case DType::BF16:
    case DType::F16:
      for (size_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, sizeof h);
        dst[i] = e.dtype == DType::BF16 ? bf16_to_float(h) : f16_to_float(h);
      }
      return;
    case DType::I32:
    case DType::F64:  // never parsed from a file; the engine's own reductions only
    case DType::I64:
    case DType::U8:
    case DType::I8:
    case DType::Q8:
      break;
  }
  throw Error(path_ + ": tensor '" + name + "' has dtype " + dtype_name(e.dtype) +
              ", but a floating-point tensor (F32, BF16, F16) is needed here");
}

void write_safetensors(const std::string& path, const std::vector<SafetensorsOut>& tensors,
                       const std::map<std::string, std::string>& metadata, bool in_given_order) {
  const std::string bad = "cannot write '" + path + "': ";
  std::vector<const SafetensorsOut*> sorted;
  sorted.reserve(tensors.size());
  std::set<std::string> seen;
  for (const SafetensorsOut& t : tensors) {
    if (t.name.empty() || t.name == "__metadata__") throw Error(bad + "invalid tensor name '" + t.name + "'");
    if (!seen.insert(t.name).second) throw Error(bad + "tensor '" + t.name + "' is given twice");
    uint64_t numel = 0;
    if (!checked_numel(t.shape, numel)) throw Error(bad + "tensor '" + t.name + "' has an invalid shape " + shape_str(t.shape));
    if (numel > 0 && t.data == nullptr) throw Error(bad + "tensor '" + t.name + "' has no data");
    sorted.push_back(&t);
  }
  if (!in_given_order)
    std::sort(sorted.begin(), sorted.end(), [](const SafetensorsOut* a, const SafetensorsOut* b) { return a->name < b->name; });

  // Offsets are contiguous without gaps: common safetensors readers reject holes in the data
  // section. The data section itself starts 8-byte aligned.
  nlohmann::ordered_json hdr = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json m = nlohmann::ordered_json::object();
    for (const auto& kv : metadata) m[kv.first] = kv.second;
    hdr["__metadata__"] = std::move(m);
  }
  uint64_t offset = 0;
  for (const SafetensorsOut* t : sorted) {
    uint64_t nbytes = static_cast<uint64_t>(shape_numel(t->shape)) * dtype_size(t->dtype);
    nlohmann::ordered_json e;
    e["dtype"] = dtype_name(t->dtype);
    e["shape"] = t->shape;
    e["data_offsets"] = {offset, offset + nbytes};
    hdr[t->name] = std::move(e);
    offset += nbytes;
  }
  std::string header = hdr.dump();
  header.append((8 - (header.size() % 8)) % 8, ' ');
  unsigned char len_bytes[8];
  put_u64_le(len_bytes, header.size());

  const std::string tmp = path + ".tmp";
  std::FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) throw Error(bad + std::strerror(errno) + " (check the output folder)");
  bool ok = std::fwrite(len_bytes, 1, 8, f) == 8 && std::fwrite(header.data(), 1, header.size(), f) == header.size();
  for (const SafetensorsOut* t : sorted) {
    if (!ok) break;
    size_t nbytes = static_cast<size_t>(shape_numel(t->shape)) * dtype_size(t->dtype);
    if (nbytes) ok = std::fwrite(t->data, 1, nbytes, f) == nbytes;
  }
  ok = ok && std::fflush(f) == 0 && ::fsync(fileno(f)) == 0;
  int err = errno;
  if (std::fclose(f) != 0 && ok) {
    ok = false;
    err = errno;
  }
  if (ok && std::rename(tmp.c_str(), path.c_str()) != 0) {
    ok = false;
    err = errno;
  }
  if (!ok) {
    // unlink rather than remove: only the regular file this call created is ours to delete.
    ::unlink(tmp.c_str());
    throw Error(bad + std::strerror(err) + " (check the output folder)");
  }
}

}  // namespace subllm
