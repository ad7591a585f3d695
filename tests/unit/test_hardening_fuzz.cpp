// Regression cases for what the fuzz targets (fuzz/, scripts/fuzz.sh) found in the readers of
// untrusted files: each input here once crashed, overflowed or was misreported.
#include <gtest/gtest.h>
#include <sentencepiece_trainer.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>


#include "subllm/config.h"
#include "subllm/dataset.h"
#include "subllm/error.h"
#include "subllm/tokenizer.h"
#include "test_util.h"

namespace subllm {
namespace hardening_fuzz_tests {

using testing::error_of;
using testing::read_all;
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

// A small identity-normalising tokenizer trained on a few lines, in `dir`.
std::string train_small_tokenizer(const TempDir& dir) {
  std::string text;
  for (int i = 0; i < 40; ++i) text += "a bad cab abbey, " + std::to_string(i) + " dab and ebb\n";
  write_file(dir.file("small.txt"), text);
  Tokenizer::train({dir.file("small.txt")}, dir.file("small.model"), Tokenizer::kMinVocab + 20, 1);
  return dir.file("small.model");
}

// A protocol buffer varint.
std::string varint(uint64_t v) {
  std::string out;
  for (; v >= 0x80; v >>= 7) out += (char)(0x80 | (v & 0x7F));
  return out + (char)v;
}

// The model at `from` with `table` as its normalisation (or, with `denormalizer`, its
// denormalisation) table, written to `to`: a second NormalizerSpec field holding only
// precompiled_charsmap is appended, which a reader merges into the first, the table replacing it.
void write_with_table(const std::string& from, const std::string& to, const std::string& table,
                      bool denormalizer = false) {
  const std::string spec = varint(2 << 3 | 2) + varint(table.size()) + table;
  write_file(to, read_all(from) + varint((denormalizer ? 5 : 3) << 3 | 2) + varint(spec.size()) + spec);
}

// A normalisation table of `units` trie units that maps "A" to the first of `strings`: unit 0
// leads to state 256; unit 256 ^ 'A' = 321 has label 'A', a leaf and offset 833, so the
// leaf is unit 321 ^ 833 = 512, whose value `leaf_value` is where the replacement starts.
std::string table_mapping_A(size_t units, uint32_t leaf_value, const std::string& strings) {
  std::vector<uint32_t> trie(std::max<size_t>(units, 768), 0);
  trie[0] = 256u << 10;
  trie[321] = (833u << 10) | (1u << 8) | 'A';
  trie[512] = (1u << 31) | leaf_value;
  trie.resize(units);
  const uint32_t trie_bytes = (uint32_t)(4 * units);
  std::string table(4 + trie_bytes, '\0');
  std::memcpy(table.data(), &trie_bytes, 4);
  std::memcpy(table.data() + 4, trie.data(), trie_bytes);
  return table + strings;
}

// A normalisation table whose trie walks led outside it: sentencepiece read past the model's
// bytes while loading (its self-test normalises) or encoding. Each broken table is refused,
// naming the table and what is wrong; a well-formed one is used as sentencepiece uses it.
TEST(HardeningFuzz, TokenizerWithABrokenNormalizationTableIsAnError) {
  TempDir tmp;
  const std::string small = train_small_tokenizer(tmp);
  const std::string path = tmp.file("tokenizer.model");

  write_with_table(small, path, table_mapping_A(768, 0, std::string("b\0", 2)));
  const Tokenizer mapped = Tokenizer::load(path);
  EXPECT_EQ(mapped.encode("A"), mapped.encode("b"));
  EXPECT_EQ(mapped.encode("cAb"), mapped.encode("cbb"));
  EXPECT_NE(Tokenizer::load(small).encode("A"), Tokenizer::load(small).encode("b"));

  const struct {
    std::string table;
    bool denormalizer;
    const char* expected;
  } broken[] = {
      {"abc", false, "its normalization table is broken: it is shorter than its header"},
      {std::string("\xff\0\0\0abcdefgh", 12), false, "its trie of 255 bytes is longer than the table"},
      {std::string("\0\0\0\0b", 5), false, "its trie is empty"},
      // The walk past "A" reaches state 512, whose units run to 767.
      {table_mapping_A(600, 0, std::string("b\0", 2)), false, "leads outside the trie's 600 units"},
      {table_mapping_A(768, 7, std::string("b\0", 2)), false, "a rule points at byte 7 of its 2 bytes"},
      {table_mapping_A(768, 7, std::string("b\0", 2)), true, "its denormalization table is broken: a rule"},
  };
  for (const auto& b : broken) {
    write_with_table(small, path, b.table, b.denormalizer);
    const std::string msg = error_of([&] { Tokenizer::load(path); });
    EXPECT_NE(msg.find("tokenizer " + path + " is not a valid sentencepiece model"), std::string::npos) << msg;
    EXPECT_NE(msg.find(b.expected), std::string::npos) << msg;
    EXPECT_NE(msg.find("pass the tokenizer.model of a data folder or checkpoint"), std::string::npos) << msg;
  }

  // A leaf beyond the trie: unit 321's offset leads to unit 321 ^ 1345 = 1024.
  std::string table = table_mapping_A(768, 0, std::string("b\0", 2));
  const uint32_t far_leaf = (1345u << 10) | (1u << 8) | 'A';
  std::memcpy(table.data() + 4 + 4 * 321, &far_leaf, 4);
  write_with_table(small, path, table);
  EXPECT_NE(error_of([&] { Tokenizer::load(path); }).find("a leaf of its trie lies outside the trie's 768 units"),
            std::string::npos);
}

// The tables sentencepiece itself compiles pass the check: a model trained with NFKC
// normalisation loads and folds full-width letters.
TEST(HardeningFuzz, TokenizerWithSentencepiecesOwnNfkcTableLoads) {
  TempDir tmp;
  std::string text;
  for (int i = 0; i < 40; ++i) text += "ABC abc, the cab " + std::to_string(i) + "\n";
  write_file(tmp.file("t.txt"), text);
  const auto status = sentencepiece::SentencePieceTrainer::Train(
      "--input=" + tmp.file("t.txt") + " --model_prefix=" + tmp.file("nfkc") +
      " --vocab_size=300 --hard_vocab_limit=false --byte_fallback=true --normalization_rule_name=nmt_nfkc --minloglevel=2");
  ASSERT_TRUE(status.ok()) << status.ToString();
  EXPECT_GT(read_all(tmp.file("nfkc.model")).size(), 100000u);  // the most of it its NFKC table
  const Tokenizer tok = Tokenizer::load(tmp.file("nfkc.model"));
  EXPECT_EQ(tok.encode("\xEF\xBC\xA1\xEF\xBC\xA2\xEF\xBC\xA3"), tok.encode("ABC"));  // U+FF21..U+FF23
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

}  // namespace hardening_fuzz_tests
}  // namespace subllm
