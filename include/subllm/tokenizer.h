#pragma once
// A sentencepiece model (the LLaMA kind: BPE with byte fallback) behind a small interface,
// so nothing above this layer includes sentencepiece's headers.
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace sentencepiece {
class SentencePieceProcessor;
}

namespace subllm {

// Offset of the first byte of `s` that is not part of well-formed UTF-8 (overlong forms,
// surrogates, code points past U+10FFFF and a cut-off last character count as malformed),
// or s.size() when all of it is.
size_t utf8_error_offset(std::string_view s);
inline bool is_valid_utf8(std::string_view s) { return utf8_error_offset(s) == s.size(); }

class Tokenizer {
 public:
  // Throws Error naming `path` when it is missing or not a sentencepiece model.
  static Tokenizer load(const std::string& path);

  // Trains a LLaMA-style BPE model (byte fallback, pad 0, bos 1, eos 2, unk 3, digits split,
  // no text normalisation so decode(encode(x)) == x) on the lines of `text_files`, and writes
  // it to `model_path` through a temporary file, so a failed run leaves no model behind.
  // Throws Error with the fix when the vocabulary does not fit the corpus.
  // The smallest vocabulary train() can build: 4 special pieces, 256 byte pieces and one
  // piece per distinct character of the text, of which there is at least one (the word start).
  static constexpr int kMinVocab = 4 + 256 + 1;
  static std::string min_vocab_reason();
  static void train(const std::vector<std::string>& text_files, const std::string& model_path, int vocab_size,
                    uint64_t seed);

  // Token ids of `text`; no bos or eos is added.
  std::vector<int32_t> encode(const std::string& text) const;
  // Control tokens (bos, eos, pad) decode to nothing. Throws Error on an id outside the vocabulary.
  std::string decode(const std::vector<int32_t>& ids) const;
  std::string id_to_piece(int32_t id) const;

  int vocab_size() const;
  int bos_id() const;
  int eos_id() const;
  int pad_id() const;
  int unk_id() const;
  bool is_byte(int32_t id) const;
  bool is_control(int32_t id) const;
  bool is_unknown(int32_t id) const;
  const std::string& path() const { return path_; }

 private:
  Tokenizer() = default;
  void check_id(int32_t id) const;

  // Shared and immutable after loading: copies of a Tokenizer are cheap, and encoding from
  // several threads at once is safe.
  std::shared_ptr<const sentencepiece::SentencePieceProcessor> sp_;
  std::string path_;
};

// Turns token ids into text as they arrive, for streaming generation. A character split over
// byte-fallback pieces (<0xE2> <0x80> <0x94>) is held back until complete, so every returned
// string is valid UTF-8, and the concatenation of all push() and flush() results equals
// Tokenizer::decode of all the ids.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer);
  // Text completed by `id` (often empty while a character is still incomplete).
  std::string push(int32_t id);
  // Ends the stream: whatever is held back, as decode would render it (an unfinished
  // character becomes U+FFFD). The decoder then starts a fresh stream.
  std::string flush();
  // The text continues one already shown (a prompt), so a leading word-start mark is a real
  // space rather than the start of the text.
  void continue_text() { emitted_ = true; }

 private:
  std::string take_bytes(bool final);

  Tokenizer tok_;
  std::string pending_;      // bytes of an unfinished byte-fallback run
  bool emitted_ = false;             // any text produced yet
  bool first_space_pending_ = true;  // decode drops the first word-start mark of a text...
  bool strips_first_space_;          // ...when the model adds a dummy prefix when encoding
  std::string unk_surface_;
};

}  // namespace subllm
