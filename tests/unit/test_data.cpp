// The data side: tokenizer wrapper, streaming decoder, token shards, datasets and `prepare`.
#include <gtest/gtest.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iterator>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "subllm/dataset.h"
#include "subllm/error.h"
#include "subllm/prepare.h"
#include "subllm/rng.h"
#include "subllm/tokenizer.h"
#include "test_util.h"

namespace subllm {
namespace data_tests {

namespace fs = std::filesystem;

using testing::error_of;
using testing::read_all;
using testing::TempDir;
using testing::write_corpus;
using testing::write_file;

#define EXPECT_ERROR_HAS(stmt, text)             \
  do {                                           \
    const std::string msg_ = error_of([&] { stmt; }); \
    EXPECT_NE(msg_, "") << "no Error raised";    \
    EXPECT_NE(msg_.find(text), std::string::npos) << "message: " << msg_; \
  } while (0)

PrepareOptions small_options(const std::vector<std::string>& inputs, const std::string& out,
                             std::vector<std::string>* log = nullptr) {
  PrepareOptions o;
  o.inputs = inputs;
  o.out_dir = out;
  o.vocab_size = 400;
  o.valid_every = 5;
  o.shard_tokens = 1000;
  o.log = [log](const std::string& s) {
    if (log) log->push_back(s);
  };
  return o;
}

std::vector<int32_t> read_split(const std::string& folder, const std::string& split) {
  TokenDataset ds(folder, split);
  std::vector<int32_t> t((size_t)ds.num_tokens());
  ds.read(0, ds.num_tokens(), t.data());
  return t;
}

// Splits a token stream at eos; checks it ends with one.
std::vector<std::vector<int32_t>> split_documents(const std::vector<int32_t>& stream, int32_t eos) {
  std::vector<std::vector<int32_t>> docs(1);
  for (int32_t t : stream) {
    if (t == eos) {
      docs.emplace_back();
    } else {
      docs.back().push_back(t);
    }
  }
  EXPECT_TRUE(docs.back().empty()) << "the stream does not end with eos";
  docs.pop_back();
  return docs;
}

// One prepared folder shared by the tests that only read it.
class PreparedData : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    dir_ = new TempDir();
    docs_ = new std::vector<std::string>(write_corpus(dir_->path() / "corpus", 40));
    summary_ = new PrepareSummary(
        prepare_data(small_options({dir_->file("corpus")}, dir_->file("out"))));
  }
  static void TearDownTestSuite() {
    delete summary_;
    delete docs_;
    delete dir_;
  }
  static std::string out() { return dir_->file("out"); }
  static Tokenizer tokenizer() { return Tokenizer::load(dir_->file("out/tokenizer.model")); }

  static TempDir* dir_;
  static std::vector<std::string>* docs_;
  static PrepareSummary* summary_;
};
TempDir* PreparedData::dir_ = nullptr;
std::vector<std::string>* PreparedData::docs_ = nullptr;
PrepareSummary* PreparedData::summary_ = nullptr;

TEST_F(PreparedData, WritesFolderAndManifest) {
  for (const char* f : {"tokenizer.model", "manifest.json", "train_000.bin", "valid_000.bin"})
    EXPECT_TRUE(fs::exists(fs::path(out()) / f)) << f;
  EXPECT_FALSE(fs::exists(fs::path(out()) / "tokenizer_train.txt"));
  // Nothing left beside the folder but the corpus.
  for (const auto& e : fs::directory_iterator(dir_->path()))
    EXPECT_TRUE(e.path().filename() == "out" || e.path().filename() == "corpus") << e.path();

  const auto m = nlohmann::json::parse(read_all(out() + "/manifest.json"));
  EXPECT_EQ(m["format"], "subllm-tokens-v1");
  EXPECT_EQ(m["tokenizer"], "tokenizer.model");
  EXPECT_EQ(m["vocab_size"], 400);
  EXPECT_EQ(m["pad_id"], 0);
  EXPECT_EQ(m["bos_id"], 1);
  EXPECT_EQ(m["eos_id"], 2);
  EXPECT_EQ(m["documents"]["train"], 32);
  EXPECT_EQ(m["documents"]["valid"], 8);
  EXPECT_EQ(m["sources"].size(), 40u);
  int64_t train_tokens = 0, train_docs = 0;
  for (const auto& e : m["train"]) {
    train_tokens += e["tokens"].get<int64_t>();
    train_docs += e["documents"].get<int64_t>();
    EXPECT_LE(e["tokens"].get<int64_t>(), 1000);
  }
  EXPECT_GT(m["train"].size(), 1u) << "a 1000-token shard limit should give several train shards";
  EXPECT_EQ(train_docs, 32);
  EXPECT_EQ(train_tokens, summary_->tokens_train);

  EXPECT_EQ(summary_->documents_train, 32);
  EXPECT_EQ(summary_->documents_valid, 8);
  EXPECT_EQ(summary_->vocab_size, 400);
  TokenDataset train(out(), "train");
  TokenDataset valid(out() + "/manifest.json", "valid");
  EXPECT_EQ(train.num_tokens(), summary_->tokens_train);
  EXPECT_EQ(valid.num_tokens(), summary_->tokens_valid);
  EXPECT_EQ(train.vocab_size(), 400);
  EXPECT_EQ(train.num_documents(), 32);
  EXPECT_EQ(train.eos_id(), 2);
  EXPECT_EQ(fs::path(train.tokenizer_path()), fs::path(out()) / "tokenizer.model");
}

TEST_F(PreparedData, SplitsHoldExactlyTheirDocuments) {
  const Tokenizer tok = tokenizer();
  const auto train = split_documents(read_split(out(), "train"), tok.eos_id());
  const auto valid = split_documents(read_split(out(), "valid"), tok.eos_id());
  ASSERT_EQ(train.size(), 32u);
  ASSERT_EQ(valid.size(), 8u);
  size_t ti = 0, vi = 0;
  for (size_t d = 0; d < docs_->size(); ++d) {
    // Every 5th document (5th, 10th, ...) is held out.
    const bool is_valid = (d + 1) % 5 == 0;
    const std::string text = tok.decode(is_valid ? valid[vi++] : train[ti++]);
    EXPECT_EQ(text, (*docs_)[d]) << "document " << d;
  }
  // The held-out text never reaches training, not even as part of another document.
  std::string all_train;
  for (const auto& d : train) all_train += tok.decode(d);
  for (size_t d = 4; d < docs_->size(); d += 5)
    EXPECT_EQ(all_train.find("Document " + std::to_string(d) + "."), std::string::npos) << d;
}

TEST_F(PreparedData, EveryDocumentEndsWithEos) {
  const auto stream = read_split(out(), "train");
  ASSERT_FALSE(stream.empty());
  EXPECT_EQ(stream.back(), 2);
  EXPECT_EQ(std::count(stream.begin(), stream.end(), 2), 32);
  for (int32_t t : stream) {
    EXPECT_GE(t, 0);
    EXPECT_LT(t, 400);
    EXPECT_NE(t, 1) << "no bos in the shards";
  }
}

TEST_F(PreparedData, DatasetReadsAcrossShardBoundaries) {
  const auto m = nlohmann::json::parse(read_all(out() + "/manifest.json"));
  std::vector<int32_t> concatenated;
  for (const auto& e : m["train"]) {
    TokenShard shard(out() + "/" + e["file"].get<std::string>());
    ASSERT_EQ(shard.dtype(), kShardUint16);
    std::vector<int32_t> t((size_t)shard.num_tokens());
    shard.read(0, shard.num_tokens(), t.data());
    concatenated.insert(concatenated.end(), t.begin(), t.end());
  }
  TokenDataset ds(out(), "train");
  ASSERT_EQ((int64_t)concatenated.size(), ds.num_tokens());
  const int64_t first = m["train"][0]["tokens"].get<int64_t>();
  ASSERT_EQ(first, 1000);
  // Windows that straddle one boundary, span a whole shard, and touch the ends.
  for (auto [start, count] : std::vector<std::pair<int64_t, int64_t>>{
           {first - 7, 20}, {first - 1, 2}, {0, ds.num_tokens()}, {first - 3, std::min<int64_t>(1100, ds.num_tokens() - first + 3)},
           {ds.num_tokens() - 5, 5}, {17, 0}}) {
    std::vector<int32_t> got((size_t)count);
    ds.read(start, count, got.data());
    EXPECT_TRUE(std::equal(got.begin(), got.end(), concatenated.begin() + start)) << start << "+" << count;
  }
  int32_t x;
  EXPECT_ERROR_HAS(ds.read(ds.num_tokens(), 1, &x), "outside");
  EXPECT_ERROR_HAS(ds.read(-1, 1, &x), "outside");
}

TEST_F(PreparedData, TokenizerRoundTrips) {
  const Tokenizer tok = tokenizer();
  EXPECT_EQ(tok.vocab_size(), 400);
  EXPECT_EQ(tok.pad_id(), 0);
  EXPECT_EQ(tok.bos_id(), 1);
  EXPECT_EQ(tok.eos_id(), 2);
  EXPECT_EQ(tok.unk_id(), 3);
  for (const std::string text :
       {"The old sailor watched the distant harbour.", "  two leading spaces,  double  spaces\tand a tab\n",
        "naïve café — 東京 🐋", "line one\nline two\r\n", "1790 and 2018", "", " ", "\n\n"}) {
    const auto ids = tok.encode(text);
    EXPECT_EQ(std::count(ids.begin(), ids.end(), tok.eos_id()), 0);
    EXPECT_EQ(std::count(ids.begin(), ids.end(), tok.bos_id()), 0);
    EXPECT_EQ(tok.decode(ids), text) << text;
  }
  // Digits are split, so a number is one piece per digit.
  const auto digits = tok.encode("2018");
  std::string pieces;
  for (int32_t id : digits) pieces += tok.id_to_piece(id) + "|";
  EXPECT_EQ(pieces, "\xE2\x96\x81|2|0|1|8|") ;
  EXPECT_ERROR_HAS(tok.decode({400}), "invalid token id 400");
  EXPECT_ERROR_HAS(tok.id_to_piece(-1), "invalid token id -1");
}

// Streams `ids` through a StreamDecoder, checking each piece of output is valid UTF-8.
std::string stream_decode(const Tokenizer& tok, const std::vector<int32_t>& ids) {
  StreamDecoder dec(tok);
  std::string all;
  for (int32_t id : ids) {
    const std::string s = dec.push(id);
    EXPECT_TRUE(is_valid_utf8(s)) << "broken UTF-8 after id " << id;
    all += s;
  }
  const std::string s = dec.flush();
  EXPECT_TRUE(is_valid_utf8(s));
  return all + s;
}

TEST_F(PreparedData, StreamDecoderMatchesDecode) {
  const Tokenizer tok = tokenizer();
  for (const std::string text : {"naïve café — 東京", "The captain remembered 🐋 the naïve plan.",
                                 " leading space", "a\n\nb  c", "東"}) {
    const auto ids = tok.encode(text);
    bool has_bytes = false;
    for (int32_t id : ids) has_bytes |= tok.is_byte(id);
    if (text.find("東") != std::string::npos) {
      EXPECT_TRUE(has_bytes) << "expected byte-fallback pieces";
    }
    EXPECT_EQ(stream_decode(tok, ids), text) << text;
  }
  // A split character is held back until its last byte arrives.
  const auto ids = tok.encode("東");
  StreamDecoder dec(tok);
  std::string out;
  for (size_t i = 0; i + 1 < ids.size(); ++i) out += dec.push(ids[i]);
  EXPECT_EQ(out.find("\xE6"), std::string::npos) << "emitted part of a character";
  out += dec.push(ids.back());
  EXPECT_NE(out.find("東"), std::string::npos);

  // Any id sequence, however malformed (lone continuation bytes, a character cut by eos,
  // unknown and control tokens), streams to exactly what decode gives.
  Rng rng(3);
  std::vector<int32_t> bytes, spaces, others;
  for (int id = 0; id < tok.vocab_size(); ++id) {
    const std::string piece = tok.id_to_piece(id);
    if (tok.is_byte(id)) {
      bytes.push_back(id);
    } else if (piece.find_first_not_of("\xE2\x96\x81") == std::string::npos) {
      spaces.push_back(id);  // pieces of word-start marks only, where decode's first-space rule bites
    } else {
      others.push_back(id);
    }
  }
  ASSERT_FALSE(spaces.empty());
  const auto multibyte = tok.encode("é東🐋—");
  for (int trial = 0; trial < 2000; ++trial) {
    std::vector<int32_t> seq;
    const int n = 1 + (int)rng.below(24);
    for (int i = 0; i < n; ++i) {
      const auto r = rng.below(12);
      if (r < 4) {
        seq.push_back(bytes[rng.below(bytes.size())]);
      } else if (r < 6) {
        seq.push_back(multibyte[rng.below(multibyte.size())]);
      } else if (r < 7) {
        seq.push_back((int32_t)rng.below(4));  // pad, bos, eos, unk
      } else if (r < 9) {
        seq.push_back(spaces[rng.below(spaces.size())]);
      } else {
        seq.push_back(others[rng.below(others.size())]);
      }
    }
    ASSERT_EQ(stream_decode(tok, seq), tok.decode(seq)) << "trial " << trial;
  }
}

TEST_F(PreparedData, TruncatedShardIsReported) {
  TempDir tmp;
  const fs::path copy = tmp.path() / "data";
  fs::copy(out(), copy);
  const fs::path shard = copy / "train_000.bin";
  fs::resize_file(shard, fs::file_size(shard) - 3);
  const std::string msg = error_of([&] { TokenShard s(shard.string()); });
  EXPECT_NE(msg.find(shard.string()), std::string::npos) << msg;
  EXPECT_NE(msg.find("truncated"), std::string::npos) << msg;
  EXPECT_NE(msg.find("subllm prepare"), std::string::npos) << msg;
  EXPECT_ERROR_HAS(TokenDataset(copy.string(), "train"), "truncated");
  fs::resize_file(shard, 10);
  EXPECT_ERROR_HAS(TokenShard(shard.string()), "truncated");
  // The validation split does not touch the broken shard.
  EXPECT_NO_THROW(TokenDataset(copy.string(), "valid"));
}

TEST_F(PreparedData, ManifestProblemsNameTheFile) {
  TempDir tmp;
  const fs::path copy = tmp.path() / "data";
  auto fresh = [&] {
    fs::remove_all(copy);
    fs::copy(out(), copy);
  };
  const std::string manifest = (copy / "manifest.json").string();

  EXPECT_ERROR_HAS(TokenDataset((tmp.path() / "nowhere").string(), "train"), "nowhere not found");

  fresh();
  write_file(manifest, "{\"format\": \"subllm-tokens-v1\", ");
  EXPECT_ERROR_HAS(TokenDataset(copy.string(), "train"), manifest + " is not valid JSON");

  fresh();
  fs::remove(copy / "valid_000.bin");
  EXPECT_ERROR_HAS(TokenDataset(copy.string(), "valid"), (copy / "valid_000.bin").string() + " listed in");

  fresh();
  auto m = nlohmann::json::parse(read_all(manifest));
  m["valid"][0]["tokens"] = m["valid"][0]["tokens"].get<int64_t>() + 1;
  write_file(manifest, m.dump());
  EXPECT_ERROR_HAS(TokenDataset(copy.string(), "valid"), "but " + manifest + " says");

  m["valid"] = nlohmann::json::array();
  write_file(manifest, m.dump());
  EXPECT_ERROR_HAS(TokenDataset(copy.string(), "valid"), "holds no tokens");

  EXPECT_ERROR_HAS(TokenDataset(copy.string(), "test"), "unknown data split 'test'");

  fresh();
  write_file((copy / "train_000.bin").string(), std::string(100, 'x'));
  EXPECT_ERROR_HAS(TokenDataset(copy.string(), "train"), "not a subllm token shard");
}

TEST_F(PreparedData, GivenTokenizerIsCopiedAndUsed) {
  TempDir tmp;
  const std::string text = "The captain remembered the naïve plan.\n";
  write_file(tmp.file("a.jsonl"), "");
  std::string jsonl;
  for (int i = 0; i < 6; ++i) jsonl += nlohmann::json{{"text", text + std::to_string(i)}}.dump() + "\n";
  write_file(tmp.file("a.jsonl"), jsonl);
  auto o = small_options({tmp.file("a.jsonl")}, tmp.file("out"));
  o.tokenizer = out() + "/tokenizer.model";
  o.vocab_size = 0;  // unused with a given tokenizer
  o.valid_every = 3;
  const auto s = prepare_data(o);
  EXPECT_EQ(s.documents_train, 4);
  EXPECT_EQ(s.documents_valid, 2);
  EXPECT_EQ(read_all(tmp.file("out/tokenizer.model")), read_all(out() + "/tokenizer.model"));
  const Tokenizer tok = Tokenizer::load(tmp.file("out/tokenizer.model"));
  const auto docs = split_documents(read_split(tmp.file("out"), "valid"), tok.eos_id());
  ASSERT_EQ(docs.size(), 2u);
  EXPECT_EQ(tok.decode(docs[0]), text + "2");
  EXPECT_EQ(tok.decode(docs[1]), text + "5");
}

// ---------------------------------------------------------------------------------------
// Without the shared folder

TEST(Shards, WriteReadBothDtypes) {
  TempDir tmp;
  for (int vocab : {1000, 65536, 70000}) {
    const std::string path = tmp.file("s" + std::to_string(vocab) + ".bin");
    std::vector<int32_t> tokens;
    for (int i = 0; i < 5000; ++i) tokens.push_back((i * 7919) % vocab);
    tokens.push_back(vocab - 1);
    {
      ShardWriter w(path, vocab);
      w.append(tokens.data(), 10);
      w.append(std::vector<int32_t>(tokens.begin() + 10, tokens.end()));
      EXPECT_FALSE(fs::exists(path)) << "visible before close";
      w.close();
    }
    EXPECT_FALSE(fs::exists(path + ".tmp"));
    const std::string bytes = read_all(path);
    const int width = vocab <= 65536 ? 2 : 4;
    ASSERT_EQ(bytes.size(), 64 + tokens.size() * width);
    EXPECT_EQ(bytes.substr(0, 8), "SUBLLMTK");
    uint32_t version, dtype;
    uint64_t count;
    std::memcpy(&version, bytes.data() + 8, 4);
    std::memcpy(&dtype, bytes.data() + 12, 4);
    std::memcpy(&count, bytes.data() + 16, 8);
    EXPECT_EQ(version, 1u);
    EXPECT_EQ(dtype, width == 2 ? 1u : 2u);
    EXPECT_EQ(count, tokens.size());
    EXPECT_EQ(bytes.substr(24, 40), std::string(40, '\0'));
    TokenShard shard(path);
    std::vector<int32_t> back(tokens.size());
    shard.read(0, (int64_t)tokens.size(), back.data());
    EXPECT_EQ(back, tokens);
  }
  {
    ShardWriter w(tmp.file("bad.bin"), 100);
    EXPECT_ERROR_HAS(w.append({5, 100}), "token id 100 is outside the vocabulary of 100");
  }
  EXPECT_FALSE(fs::exists(tmp.file("bad.bin")));
  EXPECT_FALSE(fs::exists(tmp.file("bad.bin.tmp"))) << "an abandoned writer leaves nothing";
  // A shard that is longer than its header says is corrupt too.
  write_file(tmp.file("long.bin"), read_all(tmp.file("s1000.bin")) + "xy");
  EXPECT_ERROR_HAS(TokenShard(tmp.file("long.bin")), "bytes past its");
  EXPECT_ERROR_HAS(TokenShard(tmp.file("none.bin")), "none.bin cannot be opened");
}

TEST(Prepare, SkipsNonUtf8FilesWithWarning) {
  TempDir tmp;
  write_corpus(tmp.path() / "c", 12);
  static const char binary[] = "abc\xff\xfe\x00 latin-1 caf\xe9";
  write_file(tmp.file("c/binary.dat"), std::string(binary, sizeof binary - 1));
  std::vector<std::string> log;
  auto o = small_options({tmp.file("c")}, tmp.file("out"), &log);
  o.valid_every = 4;
  const auto s = prepare_data(o);
  ASSERT_EQ(s.skipped.size(), 1u);
  EXPECT_EQ(s.skipped[0], tmp.file("c/binary.dat"));
  EXPECT_EQ(s.documents_train + s.documents_valid, 12);
  EXPECT_EQ(s.sources.size(), 12u);
  bool warned = false;
  for (const auto& l : log)
    warned |= l.rfind("warning: skipping " + tmp.file("c/binary.dat"), 0) == 0 && l.find("not UTF-8") != std::string::npos;
  EXPECT_TRUE(warned);
  const auto m = nlohmann::json::parse(read_all(tmp.file("out/manifest.json")));
  EXPECT_EQ(m["skipped"].size(), 1u);
}

TEST(Prepare, OnlyNonUtf8FilesIsAnError) {
  TempDir tmp;
  write_file(tmp.file("a.txt"), "caf\xe9 latin-1\n");
  write_file(tmp.file("b.txt"), "\xc0\xaf overlong\n");
  std::vector<std::string> log;
  EXPECT_ERROR_HAS(prepare_data(small_options({tmp.file("a.txt"), tmp.file("b.txt")}, tmp.file("out"), &log)),
                   "no usable text");
  EXPECT_EQ(log.size() >= 2 ? 2 : 0, 2);
  EXPECT_FALSE(fs::exists(tmp.file("out")));
}

TEST(Prepare, MissingInputIsNamed) {
  TempDir tmp;
  write_corpus(tmp.path() / "c", 10);
  EXPECT_ERROR_HAS(prepare_data(small_options({tmp.file("c"), tmp.file("nope.txt")}, tmp.file("out"))),
                   "input " + tmp.file("nope.txt") + " not found");
  EXPECT_FALSE(fs::exists(tmp.file("out")));
}

TEST(Prepare, EmptyCorpusIsAnError) {
  TempDir tmp;
  write_file(tmp.file("c/empty.txt"), "");
  write_file(tmp.file("c/blank.txt"), "  \n\n\t\n");
  write_file(tmp.file("c/empty.jsonl"), "{\"text\": \"\"}\n\n");
  EXPECT_ERROR_HAS(prepare_data(small_options({tmp.file("c")}, tmp.file("out"))), "no usable text");
  fs::create_directories(tmp.file("d"));
  EXPECT_ERROR_HAS(prepare_data(small_options({tmp.file("d")}, tmp.file("out"))), "no usable text");
  // Too few documents for a validation split is reported with the fix.
  write_corpus(tmp.path() / "few", 3);
  EXPECT_ERROR_HAS(prepare_data(small_options({tmp.file("few")}, tmp.file("out"))), "lower --valid-every");
  for (const auto& e : fs::directory_iterator(tmp.path()))
    EXPECT_TRUE(e.path().filename() == "c" || e.path().filename() == "d" || e.path().filename() == "few")
        << e.path();
}

TEST(Prepare, VocabularyTooLargeSaysTheLimit) {
  TempDir tmp;
  write_corpus(tmp.path() / "c", 10);
  auto o = small_options({tmp.file("c")}, tmp.file("out"));
  o.vocab_size = 5000;
  const std::string msg = error_of([&] { prepare_data(o); });
  EXPECT_NE(msg.find("too large"), std::string::npos) << msg;
  EXPECT_NE(msg.find("use a smaller --vocab, at most "), std::string::npos) << msg;
  EXPECT_FALSE(fs::exists(tmp.file("out")));
  o.vocab_size = 100;
  EXPECT_ERROR_HAS(prepare_data(o), "use a larger --vocab, at least ");
}

TEST(Prepare, UnwritableOutputLeavesNothing) {
  TempDir tmp;
  write_corpus(tmp.path() / "c", 10);
  write_file(tmp.file("file"), "a regular file");
  const std::string out = tmp.file("file/out");
  std::vector<std::string> log;
  const std::string msg = error_of([&] { prepare_data(small_options({tmp.file("c")}, out, &log)); });
  EXPECT_NE(msg.find(out), std::string::npos) << msg;
  EXPECT_TRUE(log.empty()) << "failed before reading anything";
  EXPECT_EQ(read_all(tmp.file("file")), "a regular file");
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(tmp.path())) left.push_back(e.path().filename().string());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"c", "file"}));
  // The output itself being a file is refused too.
  EXPECT_ERROR_HAS(prepare_data(small_options({tmp.file("c")}, tmp.file("file"))), "is not a folder");
}

TEST(Prepare, MalformedJsonlLineGivesItsNumber) {
  TempDir tmp;
  const std::string path = tmp.file("docs.jsonl");
  write_file(path, "{\"text\": \"one\"}\n\n{\"text\": \"two\"\n{\"text\": \"three\"}\n");
  EXPECT_ERROR_HAS(prepare_data(small_options({path}, tmp.file("out"))), path + ":3");
  write_file(path, "{\"text\": \"one\"}\n{\"body\": \"two\"}\n");
  EXPECT_ERROR_HAS(prepare_data(small_options({path}, tmp.file("out"))), path + ":2: no string field \"text\"");
  EXPECT_FALSE(fs::exists(tmp.file("out")));
}

TEST(Prepare, ReplacesOnlyDataFoldersAndIsDeterministic) {
  TempDir tmp;
  write_corpus(tmp.path() / "c", 15);
  auto o = small_options({tmp.file("c")}, tmp.file("out"));
  prepare_data(o);
  const std::string first = read_all(tmp.file("out/train_000.bin"));
  const std::string first_model = read_all(tmp.file("out/tokenizer.model"));
  write_file(tmp.file("out/stale.txt"), "from an earlier run");
  write_file(tmp.file("out/train_007.bin"), "a shard of an earlier run");
  prepare_data(o);
  EXPECT_EQ(read_all(tmp.file("out/stale.txt")), "from an earlier run") << "a file prepare did not write is kept";
  EXPECT_FALSE(fs::exists(tmp.file("out/train_007.bin"))) << "the old folder's own files are replaced, not merged";
  EXPECT_EQ(read_all(tmp.file("out/tokenizer.model")), first_model) << "same seed, same tokenizer";
  EXPECT_EQ(read_all(tmp.file("out/train_000.bin")), first) << "same seed, same tokens";
  std::vector<std::string> left;
  for (const auto& e : fs::directory_iterator(tmp.path())) left.push_back(e.path().filename().string());
  std::sort(left.begin(), left.end());
  EXPECT_EQ(left, (std::vector<std::string>{"c", "out"}));

  // Leftovers of a killed run (its process gone) are cleared by the next run; a live run's are not.
  fs::create_directories(tmp.file("out.tmp-999999999-abcdef/x"));
  fs::create_directories(tmp.file("out.tmp-1-abcdef"));  // pid 1 is alive
  prepare_data(o);
  EXPECT_FALSE(fs::exists(tmp.file("out.tmp-999999999-abcdef")));
  EXPECT_TRUE(fs::exists(tmp.file("out.tmp-1-abcdef")));
  fs::remove_all(tmp.file("out.tmp-1-abcdef"));

  // A folder that is not a data folder is never replaced.
  write_file(tmp.file("precious/notes.txt"), "keep me");
  EXPECT_ERROR_HAS(prepare_data(small_options({tmp.file("c")}, tmp.file("precious"))), "not a subllm data folder");
  EXPECT_EQ(read_all(tmp.file("precious/notes.txt")), "keep me");
}

TEST(Tokenizer, LoadErrorsNameTheFile) {
  TempDir tmp;
  EXPECT_ERROR_HAS(Tokenizer::load(tmp.file("missing.model")), tmp.file("missing.model") + " not found");
  write_file(tmp.file("junk.model"), "not a model at all");
  EXPECT_ERROR_HAS(Tokenizer::load(tmp.file("junk.model")), tmp.file("junk.model") + " is not a valid sentencepiece");
}

TEST(Tokenizer, Utf8Validation) {
  EXPECT_TRUE(is_valid_utf8("plain ascii"));
  EXPECT_TRUE(is_valid_utf8("naïve café — 東京 🐋"));
  EXPECT_FALSE(is_valid_utf8("caf\xe9"));
  EXPECT_FALSE(is_valid_utf8("\xc0\xaf"));          // overlong '/'
  EXPECT_FALSE(is_valid_utf8("\xed\xa0\x80"));      // surrogate
  EXPECT_FALSE(is_valid_utf8("\xf4\x90\x80\x80"));  // past U+10FFFF
  EXPECT_FALSE(is_valid_utf8("\xe6\x9d"));          // cut-off character
  EXPECT_EQ(utf8_error_offset("ab\xe6\x9d\xb1\xff"), 5u);
}

}  // namespace data_tests
}  // namespace subllm
