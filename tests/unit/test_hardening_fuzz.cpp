// Regression cases for what the fuzz targets (fuzz/, scripts/fuzz.sh) found in the readers of
// untrusted files: each input here once crashed, overflowed or was misreported.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>
#include <string>

#include "subllm/config.h"
#include "subllm/dataset.h"
#include "subllm/error.h"
#include "subllm/tokenizer.h"
#include "test_util.h"

namespace subllm {
namespace {

using testing::error_of;
using testing::TempDir;
using testing::write_file;

// A shard header (magic, version, dtype, count) and `payload` bytes of tokens.
std::string shard_bytes(uint32_t dtype, uint64_t count, const std::string& payload) {
  std::string bytes(kShardHeaderBytes, '\0');
  std::memcpy(bytes.data(), "SUBLLMTK", 8);
  std::memcpy(bytes.data() + 8, &kShardVersion, 4);
  std::memcpy(bytes.data() + 12, &dtype, 4);
  std::memcpy(bytes.data() + 16, &count, 8);
  return bytes + payload;
}

// A header count so large that count * 2 overflowed int64 while the message was built.
TEST(HardeningFuzz, ShardWithAHugeTokenCountIsTruncatedNotOverflowed) {
  TempDir tmp;
  const std::string path = tmp.file("train_000.bin");
  const uint64_t count = 7074645048167497738ull;
  write_file(path, shard_bytes(kShardUint16, count, std::string(20, '\1')));
  const std::string msg = error_of([&] { TokenShard s(path); });
  EXPECT_NE(msg.find(path), std::string::npos) << msg;
  EXPECT_NE(msg.find("promises 7074645048167497738 tokens of 2 bytes but the file has 20 bytes after its header"),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("subllm prepare"), std::string::npos) << msg;
}

// A number beyond double's range made nlohmann-json throw out_of_range, not parse_error,
// which escaped as a foreign exception.
TEST(HardeningFuzz, ConfigWithANumberBeyondDoubleIsAnError) {
  const std::string msg =
      error_of([] { config_from_json_text("{\"decoder_ffn_embed_dim\": 177e1051}", "model/config.json"); });
  EXPECT_NE(msg.find("model/config.json: invalid JSON"), std::string::npos) << msg;
  EXPECT_NE(msg.find("177e1051"), std::string::npos) << msg;
}

// A sentencepiece model whose second piece starts with a NUL byte: sentencepiece's trie
// builder threw its own exception type (a zero-length key) out of Tokenizer::load.
TEST(HardeningFuzz, TokenizerWithANulInAPieceIsAnError) {
  TempDir tmp;
  const std::string path = tmp.file("tokenizer.model");
  // ModelProto: pieces {piece: "<unk>", type: UNKNOWN}, {piece: "\0x"}.
  const char model[] = "\x0a\x09\x0a\x05<unk>\x18\x02\x0a\x04\x0a\x02\x00x";
  write_file(path, std::string(model, sizeof model - 1));
  const std::string msg = error_of([&] { Tokenizer::load(path); });
  EXPECT_NE(msg.find("tokenizer " + path + " is not a valid sentencepiece model"), std::string::npos) << msg;
  EXPECT_NE(msg.find("zero-length key"), std::string::npos) << msg;
}

// Validation spelled out the layout ("T" per block) before any size check: decoder_layers
// 2e9 allocated gigabytes. 100000 shows the limit without the allocation.
TEST(HardeningFuzz, ConfigWithTooManyLayersIsRefusedBeforeParsing) {
  const std::string msg =
      error_of([] { config_from_json_text("{\"decoder_layers\": 100000}", "model/config.json"); });
  EXPECT_NE(msg.find("model/config.json: decoder_layers (100000) is above the limit of 10000"), std::string::npos) << msg;
  EXPECT_EQ(error_of([] { config_from_json_text("{\"decoder_layers\": 10000}", "config.json"); }), "");
}

// Manifest integers were read with get<int>: 1e300 is undefined behaviour (UBSan), 2^32 + 512
// wrapped to a vocabulary of 512, and documents could overflow the running sum.
TEST(HardeningFuzz, ManifestIntegersAreCheckedForTypeAndRange) {
  TempDir tmp;
  write_file(tmp.file("train_000.bin"), shard_bytes(kShardUint16, 2, std::string("\1\0\2\0", 4)));
  const std::string manifest = tmp.file("manifest.json");
  auto with = [&](const std::string& vocab, const std::string& tokens, const std::string& documents) {
    write_file(manifest, "{\"format\": \"subllm-tokens-v1\", \"vocab_size\": " + vocab +
                             ", \"tokenizer\": \"tokenizer.model\", \"train\": [{\"file\": \"train_000.bin\", "
                             "\"tokens\": " + tokens + ", \"documents\": " + documents + "}]}");
    return error_of([&] { TokenDataset d(manifest, "train"); });
  };
  EXPECT_EQ(with("512", "2", "1"), "");
  std::string msg = with("4294967808", "2", "1");
  EXPECT_NE(msg.find("data manifest " + manifest + " has \"vocab_size\": 4294967808, which is not an integer in [1, "),
            std::string::npos)
      << msg;
  EXPECT_NE(msg.find("subllm prepare"), std::string::npos) << msg;
  msg = with("1e300", "2", "1");
  EXPECT_NE(msg.find("\"vocab_size\": 1e+300, which is not an integer"), std::string::npos) << msg;
  msg = with("512", "2.5", "1");
  EXPECT_NE(msg.find("\"tokens\": 2.5, which is not an integer"), std::string::npos) << msg;
  msg = with("512", "2", "9223372036854775807");
  EXPECT_NE(msg.find("\"documents\": 9223372036854775807, which is not an integer in [0, 2]"), std::string::npos)
      << msg;
  // A second entry whose counts are wild: refused before its documents join the sum.
  write_file(manifest, "{\"format\": \"subllm-tokens-v1\", \"vocab_size\": 512, \"tokenizer\": \"t.model\", \"train\": ["
                       "{\"file\": \"train_000.bin\", \"tokens\": 2, \"documents\": 1}, {\"file\": \"train_000.bin\", "
                       "\"tokens\": 9223372036854775807, \"documents\": 9223372036854775807}]}");
  msg = error_of([&] { TokenDataset d(manifest, "train"); });
  EXPECT_NE(msg.find("holds 2 tokens but " + manifest + " says 9223372036854775807"), std::string::npos) << msg;
}

}  // namespace
}  // namespace subllm
