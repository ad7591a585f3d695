#include "subllm/dataset.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>

#include "subllm/error.h"

namespace subllm {
namespace {

namespace fs = std::filesystem;

// Shards are little-endian and read by plain loads; a big-endian port would byte-swap here.
static_assert(std::endian::native == std::endian::little, "token shards assume a little-endian host");

constexpr char kMagic[8] = {'S', 'U', 'B', 'L', 'L', 'M', 'T', 'K'};

int64_t dtype_bytes(uint32_t dtype) { return dtype == kShardUint16 ? 2 : 4; }

const char* rerun_hint = "re-run `subllm prepare` to rebuild the data folder";

// An integer field of the manifest, within [lo, hi]. nlohmann's get<int> is undefined for
// 1e300 and wraps 2^40, so the type and range are checked first. A missing field throws
// json's out_of_range, which the caller reports.
int64_t int_field(const nlohmann::json& j, const char* key, int64_t lo, int64_t hi, const std::string& where) {
  const nlohmann::json& v = j.at(key);
  bool fits = false;
  if (v.is_number_unsigned()) {  // nlohmann reads every non-negative integer as unsigned
    fits = v.get<uint64_t>() <= (uint64_t)hi && (int64_t)v.get<uint64_t>() >= lo;
  } else if (v.is_number_integer()) {
    fits = v.get<int64_t>() >= lo && v.get<int64_t>() <= hi;
  }
  check(fits, where + " has \"" + key + "\": " + v.dump() + ", which is not an integer in [" + std::to_string(lo) +
                  ", " + std::to_string(hi) + "]: " + rerun_hint);
  return v.get<int64_t>();
}

int int_field_or(const nlohmann::json& j, const char* key, int fallback, const std::string& where) {
  return j.contains(key) ? (int)int_field(j, key, -1, INT32_MAX, where) : fallback;
}

}  // namespace

uint32_t shard_dtype_for_vocab(int vocab_size) { return vocab_size <= 65536 ? kShardUint16 : kShardUint32; }

// ---------------------------------------------------------------------------------------
// ShardWriter

ShardWriter::ShardWriter(const std::string& path, int vocab_size)
    : path_(path), tmp_(path + ".tmp"), vocab_size_(vocab_size), dtype_(shard_dtype_for_vocab(vocab_size)) {
  check(vocab_size > 0, "shard " + path + ": vocabulary size must be positive");
  f_ = std::fopen(tmp_.c_str(), "wb");
  check(f_ != nullptr, "cannot create shard " + tmp_ + ": " + std::strerror(errno));
  unsigned char header[kShardHeaderBytes] = {};
  std::memcpy(header, kMagic, 8);
  std::memcpy(header + 8, &kShardVersion, 4);
  std::memcpy(header + 12, &dtype_, 4);
  if (std::fwrite(header, 1, sizeof header, f_) != sizeof header) {
    std::fclose(f_);
    f_ = nullptr;
    std::remove(tmp_.c_str());
    throw Error("cannot write shard " + tmp_ + " (disk full?)");
  }
}

ShardWriter::~ShardWriter() {
  if (f_) {
    std::fclose(f_);
    std::remove(tmp_.c_str());
  }
}

void ShardWriter::append(const int32_t* tokens, int64_t n) {
  check(f_ != nullptr, "shard " + path_ + " is already closed");
  const int64_t width = dtype_bytes(dtype_);
  buf_.resize((size_t)(n * width));
  for (int64_t i = 0; i < n; ++i) {
    const int32_t t = tokens[i];
    check(t >= 0 && t < vocab_size_, "shard " + path_ + ": token id " + std::to_string(t) +
                                         " is outside the vocabulary of " + std::to_string(vocab_size_));
    if (width == 2) {
      const auto v = (uint16_t)t;
      std::memcpy(&buf_[(size_t)(i * 2)], &v, 2);
    } else {
      const auto v = (uint32_t)t;
      std::memcpy(&buf_[(size_t)(i * 4)], &v, 4);
    }
  }
  check(std::fwrite(buf_.data(), 1, buf_.size(), f_) == buf_.size(), "cannot write shard " + tmp_ + " (disk full?)");
  count_ += n;
}

void ShardWriter::close() {
  check(f_ != nullptr, "shard " + path_ + " is already closed");
  const auto count = (uint64_t)count_;
  bool ok = std::fseek(f_, 16, SEEK_SET) == 0 && std::fwrite(&count, 8, 1, f_) == 1 && std::fflush(f_) == 0 &&
            ::fsync(::fileno(f_)) == 0;
  ok = std::fclose(f_) == 0 && ok;
  f_ = nullptr;
  if (!ok) {
    std::remove(tmp_.c_str());
    throw Error("cannot write shard " + tmp_ + " (disk full?)");
  }
  std::error_code ec;
  fs::rename(tmp_, path_, ec);
  if (ec) {
    std::remove(tmp_.c_str());
    throw Error("cannot move shard into place at " + path_ + ": " + ec.message());
  }
}

// ---------------------------------------------------------------------------------------
// TokenShard

TokenShard::TokenShard(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  check(fd >= 0, "token shard " + path + " cannot be opened (" + std::strerror(errno) + "): " + rerun_hint);
  struct stat st {};
  if (::fstat(fd, &st) != 0) {
    ::close(fd);
    throw Error("token shard " + path + " cannot be read: " + std::strerror(errno));
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    throw Error("token shard " + path + " is " + (S_ISDIR(st.st_mode) ? "a folder" : "not a regular file") +
                ", not a shard file: " + rerun_hint);
  }
  const auto size = (int64_t)st.st_size;
  if (size < kShardHeaderBytes) {
    ::close(fd);
    throw Error("token shard " + path + " is truncated (" + std::to_string(size) + " bytes, shorter than its header): " +
                rerun_hint);
  }
  void* map = ::mmap(nullptr, (size_t)size, PROT_READ, MAP_SHARED, fd, 0);
  ::close(fd);  // the mapping keeps the file alive
  check(map != MAP_FAILED, "token shard " + path + " cannot be mapped: " + std::strerror(errno));
  map_ = map;
  map_bytes_ = (size_t)size;
  const auto* bytes = (const unsigned char*)map;
  try {
    check(std::memcmp(bytes, kMagic, 8) == 0, "file " + path + " is not a subllm token shard (bad magic): " + rerun_hint);
    uint32_t version, dtype;
    uint64_t count;
    std::memcpy(&version, bytes + 8, 4);
    std::memcpy(&dtype, bytes + 12, 4);
    std::memcpy(&count, bytes + 16, 8);
    check(version == kShardVersion, "token shard " + path + " has version " + std::to_string(version) +
                                        ", this build reads version " + std::to_string(kShardVersion) + ": " +
                                        rerun_hint);
    check(dtype == kShardUint16 || dtype == kShardUint32,
          "token shard " + path + " has unknown dtype " + std::to_string(dtype) + ": " + rerun_hint);
    const int64_t width = dtype_bytes(dtype);
    // The count comes from the file: compare it without multiplying, which could overflow.
    check(count <= (uint64_t)(size - kShardHeaderBytes) / (uint64_t)width,
          "token shard " + path + " is truncated: its header promises " + std::to_string(count) + " tokens of " +
              std::to_string(width) + " bytes but the file has " + std::to_string(size - kShardHeaderBytes) +
              " bytes after its header: " + rerun_hint);
    check(kShardHeaderBytes + (int64_t)count * width == size,
          "token shard " + path + " has " + std::to_string(size - kShardHeaderBytes - (int64_t)count * width) +
              " bytes past its " + std::to_string(count) + " tokens: " + rerun_hint);
    dtype_ = dtype;
    count_ = (int64_t)count;
    data_ = bytes + kShardHeaderBytes;
  } catch (...) {
    release();
    throw;
  }
  // Training reads windows at random offsets.
  ::madvise(map_, map_bytes_, MADV_RANDOM);
}

TokenShard::~TokenShard() { release(); }

void TokenShard::release() {
  if (map_) ::munmap(map_, map_bytes_);
  map_ = nullptr;
  data_ = nullptr;
}

TokenShard::TokenShard(TokenShard&& o) noexcept
    : path_(std::move(o.path_)), map_(o.map_), map_bytes_(o.map_bytes_), data_(o.data_), dtype_(o.dtype_),
      count_(o.count_) {
  o.map_ = nullptr;
  o.data_ = nullptr;
}

TokenShard& TokenShard::operator=(TokenShard&& o) noexcept {
  if (this != &o) {
    release();
    path_ = std::move(o.path_);
    map_ = o.map_;
    map_bytes_ = o.map_bytes_;
    data_ = o.data_;
    dtype_ = o.dtype_;
    count_ = o.count_;
    o.map_ = nullptr;
    o.data_ = nullptr;
  }
  return *this;
}

void TokenShard::read(int64_t start, int64_t count, int32_t* out) const {
  check(start >= 0 && count >= 0 && start + count <= count_,
        "read of tokens [" + std::to_string(start) + ", " + std::to_string(start + count) + ") is outside shard " +
            path_ + " of " + std::to_string(count_) + " tokens");
  if (dtype_ == kShardUint16) {
    const auto* p = data_ + start * 2;
    for (int64_t i = 0; i < count; ++i) {
      uint16_t v;
      std::memcpy(&v, p + i * 2, 2);
      out[i] = v;
    }
  } else {
    const auto* p = data_ + start * 4;
    for (int64_t i = 0; i < count; ++i) {
      uint32_t v;
      std::memcpy(&v, p + i * 4, 4);
      out[i] = (int32_t)v;
    }
  }
}

// ---------------------------------------------------------------------------------------
// TokenDataset

TokenDataset::TokenDataset(const std::string& manifest_path, const std::string& split) : split_(split) {
  std::error_code ec;
  fs::path manifest = manifest_path;
  if (fs::is_directory(manifest, ec)) manifest /= "manifest.json";
  manifest_ = manifest.string();
  check(split == "train" || split == "valid", "unknown data split '" + split + "': use train or valid");
  check(fs::is_regular_file(manifest, ec),
        "data manifest " + manifest_ + " not found: run `subllm prepare -o <folder>` first and pass that folder");

  nlohmann::json j;
  {
    std::ifstream in(manifest);
    check(in.good(), "cannot read data manifest " + manifest_);
    try {
      j = nlohmann::json::parse(in);
    } catch (const nlohmann::json::exception& e) {
      throw Error("data manifest " + manifest_ + " is not valid JSON (" + e.what() + "): " + rerun_hint);
    }
  }
  const std::string where = "data manifest " + manifest_;
  try {
    check(j.is_object() && j.value("format", "") == kManifestFormat,
          where + " is not a \"" + kManifestFormat + "\" manifest: " + rerun_hint);
    vocab_size_ = (int)int_field(j, "vocab_size", 1, INT32_MAX, where);
    pad_id_ = int_field_or(j, "pad_id", -1, where);
    bos_id_ = int_field_or(j, "bos_id", -1, where);
    eos_id_ = int_field_or(j, "eos_id", -1, where);
    const fs::path folder = manifest.parent_path();
    tokenizer_path_ = (folder / j.at("tokenizer").get<std::string>()).string();
    check(j.contains(split) && j[split].is_array(), where + " has no \"" + split + "\" list: " + rerun_hint);
    for (const auto& entry : j[split]) {
      const std::string file = (folder / entry.at("file").get<std::string>()).string();
      const int64_t expected = int_field(entry, "tokens", 0, INT64_MAX, where);
      // Every document ends with eos, so a shard holds no more documents than tokens.
      const int64_t documents = entry.contains("documents") ? int_field(entry, "documents", 0, expected, where) : 0;
      check(fs::exists(file, ec), "token shard " + file + " listed in " + manifest_ + " is missing: " + rerun_hint);
      TokenShard shard(file);
      check(shard.num_tokens() == expected, "token shard " + file + " holds " + std::to_string(shard.num_tokens()) +
                                                " tokens but " + manifest_ + " says " + std::to_string(expected) +
                                                ": " + rerun_hint);
      check(shard.dtype() == shard_dtype_for_vocab(vocab_size_) || shard.dtype() == kShardUint32,
            "token shard " + file + " stores 16-bit ids but the vocabulary has " + std::to_string(vocab_size_) +
                " tokens: " + rerun_hint);
      starts_.push_back(total_);
      total_ += shard.num_tokens();
      documents_ += documents;  // bounded by the shard's real size now that the counts agree
      shards_.push_back(std::move(shard));
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error(where + " is missing a field or has one of the wrong type (" + e.what() + "): " + rerun_hint);
  }
  check(total_ > 0, "the \"" + split + "\" split of " + manifest_ + " holds no tokens: " + rerun_hint +
                        " with more documents");
}

void TokenDataset::read(int64_t start, int64_t count, int32_t* out) const {
  check(start >= 0 && count >= 0 && start + count <= total_,
        "read of tokens [" + std::to_string(start) + ", " + std::to_string(start + count) + ") is outside the " +
            split_ + " split of " + manifest_ + " (" + std::to_string(total_) + " tokens)");
  // The shard holding `start`: the last one that begins at or before it.
  size_t s = (size_t)(std::upper_bound(starts_.begin(), starts_.end(), start) - starts_.begin()) - 1;
  while (count > 0) {
    const int64_t offset = start - starts_[s];
    const int64_t n = std::min(count, shards_[s].num_tokens() - offset);
    shards_[s].read(offset, n, out);
    out += n;
    start += n;
    count -= n;
    ++s;
  }
}

}  // namespace subllm
