#pragma once
// Tokenised corpora on disk: shards of token ids and the manifest that lists them.
//
// Shard file (*.bin), little-endian:
//   bytes 0-7    magic "SUBLLMTK"
//   bytes 8-11   uint32 version (1)
//   bytes 12-15  uint32 dtype (1: uint16, used when the vocabulary has <= 65536 tokens; 2: uint32)
//   bytes 16-23  uint64 number of tokens
//   bytes 24-63  zero
//   then the tokens.
// A data folder holds tokenizer.model, train_NNN.bin, valid_NNN.bin and manifest.json
// (format "subllm-tokens-v1"); documents follow one another, each ended by eos.
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace subllm {

constexpr int64_t kShardHeaderBytes = 64;
constexpr uint32_t kShardVersion = 1;
constexpr uint32_t kShardUint16 = 1;
constexpr uint32_t kShardUint32 = 2;
constexpr const char* kManifestFormat = "subllm-tokens-v1";

// The narrowest shard dtype that holds every id of a vocabulary.
uint32_t shard_dtype_for_vocab(int vocab_size);

// Writes one shard. Tokens go to `path`.tmp and the file is renamed to `path` by close(),
// so a reader never sees a shard without its final token count.
class ShardWriter {
 public:
  // Ids are checked against `vocab_size`, which also picks the dtype.
  ShardWriter(const std::string& path, int vocab_size);
  ~ShardWriter();  // without close(), the partial file is deleted
  ShardWriter(const ShardWriter&) = delete;
  ShardWriter& operator=(const ShardWriter&) = delete;

  void append(const int32_t* tokens, int64_t n);
  void append(const std::vector<int32_t>& tokens) { append(tokens.data(), (int64_t)tokens.size()); }
  int64_t count() const { return count_; }
  const std::string& path() const { return path_; }
  void close();

 private:
  std::string path_, tmp_;
  std::FILE* f_ = nullptr;
  int vocab_size_;
  uint32_t dtype_;
  int64_t count_ = 0;
  std::vector<unsigned char> buf_;
};

// A shard mapped into memory (read-only; pages load on demand, so opening is cheap).
class TokenShard {
 public:
  // Throws Error naming `path` when it is missing, not a shard, or truncated.
  explicit TokenShard(const std::string& path);
  ~TokenShard();
  TokenShard(TokenShard&& other) noexcept;
  TokenShard& operator=(TokenShard&& other) noexcept;
  TokenShard(const TokenShard&) = delete;
  TokenShard& operator=(const TokenShard&) = delete;

  int64_t num_tokens() const { return count_; }
  uint32_t dtype() const { return dtype_; }
  const std::string& path() const { return path_; }
  // Tokens [start, start + count) widened to int32.
  void read(int64_t start, int64_t count, int32_t* out) const;

 private:
  void release();

  std::string path_;
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
  const unsigned char* data_ = nullptr;
  uint32_t dtype_ = 0;
  int64_t count_ = 0;
};

// One split of a prepared data folder, read as a single stream of tokens.
class TokenDataset {
 public:
  // `manifest_path`: a manifest.json or the folder holding it; `split`: "train" or "valid".
  // Throws Error naming the file at fault (missing manifest or shard, bad JSON, a shard whose
  // token count disagrees with the manifest, an empty split).
  TokenDataset(const std::string& manifest_path, const std::string& split);

  int64_t num_tokens() const { return total_; }
  // Tokens [start, start + count) of the concatenated shards; throws Error when out of range.
  void read(int64_t start, int64_t count, int32_t* out) const;

  int vocab_size() const { return vocab_size_; }
  int pad_id() const { return pad_id_; }
  int bos_id() const { return bos_id_; }
  int eos_id() const { return eos_id_; }
  int64_t num_documents() const { return documents_; }
  int num_shards() const { return (int)shards_.size(); }
  const std::string& split() const { return split_; }
  // Absolute or relative to the working directory, ready for Tokenizer::load.
  std::string tokenizer_path() const { return tokenizer_path_; }

 private:
  std::string manifest_, split_, tokenizer_path_;
  std::vector<TokenShard> shards_;
  std::vector<int64_t> starts_;  // first token of each shard in the stream
  int64_t total_ = 0, documents_ = 0;
  int vocab_size_ = 0, pad_id_ = -1, bos_id_ = -1, eos_id_ = -1;
};

}  // namespace subllm
