#include "subllm/tokenizer.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <string>
#include <unordered_map>

#include "model_check.h"
#include "subllm/error.h"

namespace subllm {
namespace {

namespace fs = std::filesystem;

const std::string kSpaceMarker = "\xE2\x96\x81";  // U+2581, sentencepiece's word-start mark
const std::string kReplacement = "\xEF\xBF\xBD";  // U+FFFD

// Length of the well-formed character at the start of `s`, 0 when it is malformed, or -1
// when the bytes present are a valid beginning that needs more bytes. The rules are the
// ones sentencepiece applies when it decodes byte pieces, so the stream decoder agrees with it.
int utf8_char_length(std::string_view s) {
  const auto c = (unsigned char)s[0];
  int need;
  uint32_t cp;
  if (c < 0x80) return 1;
  if ((c & 0xE0) == 0xC0) {
    need = 2, cp = c & 0x1F;
  } else if ((c & 0xF0) == 0xE0) {
    need = 3, cp = c & 0x0F;
  } else if ((c & 0xF8) == 0xF0) {
    need = 4, cp = c & 0x07;
  } else {
    return 0;
  }
  const int have = (int)std::min<size_t>(s.size(), need);
  for (int i = 1; i < have; ++i) {
    const auto t = (unsigned char)s[i];
    if ((t & 0xC0) != 0x80) return 0;
    cp = (cp << 6) | (t & 0x3F);
  }
  if (have < need) return -1;
  const uint32_t min_cp = need == 2 ? 0x80 : need == 3 ? 0x800 : 0x10000;
  if (cp < min_cp || cp > 0x10FFFF || (cp >= 0xD800 && cp < 0xE000)) return 0;
  return need;
}

std::string replace_space_markers(std::string_view piece) {
  std::string out;
  out.reserve(piece.size());
  for (size_t i = 0; i < piece.size();) {
    if (piece.compare(i, kSpaceMarker.size(), kSpaceMarker) == 0) {
      out += ' ';
      i += kSpaceMarker.size();
    } else {
      out += piece[i++];
    }
  }
  return out;
}

// Long text is encoded in pieces of about this many bytes: sentencepiece's encoder takes
// some 150 bytes of memory per input byte, and more than linear time.
constexpr size_t kPieceBytes = size_t(1) << 15;
// The trainer's max_sentence_length: it skips longer lines, so they are handed to it in pieces.
constexpr size_t kMaxSentenceBytes = 65536;

// Whether text[i] is a space with a non-space on both sides: a word boundary. Sentencepiece
// pieces never span one (they begin at the word-start mark), so encoding the text before it
// and the text after it (without the space, which the dummy prefix then stands for) gives
// the ids of the whole.
bool is_word_boundary(std::string_view s, size_t i) {
  return s[i] == ' ' && i > 0 && i + 1 < s.size() && s[i - 1] != ' ' && s[i + 1] != ' ';
}

// The end of the training piece of `s` that starts at `from`: the last word boundary in the
// second half of the next kMaxSentenceBytes, else the last character boundary there.
size_t training_piece_end(std::string_view s, size_t from) {
  if (s.size() - from <= kMaxSentenceBytes) return s.size();
  const size_t limit = from + kMaxSentenceBytes;
  for (size_t i = limit; i > from + kMaxSentenceBytes / 2; --i)
    if (is_word_boundary(s, i)) return i;
  size_t end = limit;
  while (end > from + 1 && ((unsigned char)s[end] & 0xC0) == 0x80) --end;  // not inside a UTF-8 character
  return end;
}

// Feeds sentencepiece the non-empty lines of the files, read here rather than by
// sentencepiece so that file names may hold commas (its `input` flag splits on them); lines
// longer than kPieceBytes go in pieces, so that their text counts too.
class LineIterator : public sentencepiece::SentenceIterator {
 public:
  explicit LineIterator(const std::vector<std::string>& files) : files_(files) { Next(); }
  bool done() const override { return done_; }
  const std::string& value() const override { return line_; }
  sentencepiece::util::Status status() const override { return status_; }
  void Next() override {
    for (;;) {
      if (pos_ < whole_.size()) {
        const size_t end = training_piece_end(whole_, pos_);
        line_.assign(whole_, pos_, end - pos_);
        pos_ = end < whole_.size() && whole_[end] == ' ' ? end + 1 : end;  // a word boundary's space
        return;
      }
      if (in_.is_open() && std::getline(in_, whole_)) {
        pos_ = 0;
        continue;
      }
      if (in_.is_open() && in_.bad()) {
        status_ = sentencepiece::util::Status(sentencepiece::util::StatusCode::kInternal,
                                              "cannot read " + files_[next_ - 1]);
        done_ = true;
        return;
      }
      if (next_ >= files_.size()) {
        done_ = true;
        return;
      }
      in_ = std::ifstream(files_[next_++], std::ios::binary);
    }
  }

 private:
  const std::vector<std::string>& files_;
  size_t next_ = 0;
  std::ifstream in_;
  std::string whole_, line_;  // the line read, and the piece of it handed out
  size_t pos_ = 0;            // where the next piece of whole_ starts
  bool done_ = false;
  sentencepiece::util::Status status_;
};

// The first number after `marker` in `msg`, or -1.
long number_after(const std::string& msg, const std::string& marker) {
  const size_t at = msg.find(marker);
  if (at == std::string::npos) return -1;
  size_t i = at + marker.size();
  while (i < msg.size() && !std::isdigit((unsigned char)msg[i])) ++i;
  if (i >= msg.size()) return -1;
  return std::strtol(msg.c_str() + i, nullptr, 10);
}

// sentencepiece reports a vocabulary that does not fit the corpus in its own terms; say it
// in terms of this program's flags.
std::string explain_training_failure(const std::string& msg, int vocab_size) {
  if (msg.find("Vocabulary size too high") != std::string::npos) {
    const long most = number_after(msg, "value <=");
    std::string fix = most > 0 ? "use a smaller --vocab, at most " + std::to_string(most)
                               : "use a smaller --vocab or a larger corpus";
    return "vocabulary size " + std::to_string(vocab_size) + " is too large for this corpus: " + fix;
  }
  if (msg.find("smaller than required_chars") != std::string::npos) {
    const long least = number_after(msg, " vs ");
    std::string fix = least > 0 ? "use a larger --vocab, at least " + std::to_string(least)
                                : "use a larger --vocab";
    return "vocabulary size " + std::to_string(vocab_size) +
           " is too small for the distinct characters of this corpus: " + fix;
  }
  return "training the tokenizer failed: " + msg;
}

}  // namespace

size_t utf8_error_offset(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    const int n = utf8_char_length(s.substr(i));
    if (n <= 0) return i;
    i += n;
  }
  return s.size();
}

Tokenizer Tokenizer::load(const std::string& path) {
  std::error_code ec;
  check(fs::is_regular_file(path, ec), "tokenizer " + path + " not found: pass a sentencepiece .model file");
  const std::string fix = "): pass the tokenizer.model of a data folder or checkpoint";
  const std::string invalid = "tokenizer " + path + " is not a valid sentencepiece model (";
  std::string bytes;
  {
    std::ifstream in(path, std::ios::binary);
    check(in.good(), "cannot read tokenizer " + path + ": check its permissions");
    bytes.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    check(!in.bad(), "cannot read tokenizer " + path + ": a read error");
  }
  // sentencepiece trusts the model's normalisation tables, and uses them already in Load
  // (its self-test): they are checked first.
  const std::string problem = sentencepiece_model_problem(bytes);
  check(problem.empty(), invalid + problem + fix);
  auto sp = std::make_shared<sentencepiece::SentencePieceProcessor>();
  sentencepiece::util::Status status;
  try {
    status = sp->LoadFromSerializedProto(bytes);
  } catch (const std::exception& e) {
    // Some malformed models (a piece holding a NUL byte) throw from sentencepiece's trie
    // builder instead of returning a status.
    throw Error(invalid + e.what() + fix);
  }
  check(status.ok(), invalid + status.ToString() + fix);
  Tokenizer t;
  t.sp_ = std::move(sp);
  t.path_ = path;
  return t;
}

std::string Tokenizer::min_vocab_reason() {
  return "the tokenizer holds 4 special pieces (pad, bos, eos, unk), 256 byte pieces and one piece per distinct "
         "character of the text";
}

void Tokenizer::train(const std::vector<std::string>& text_files, const std::string& model_path, int vocab_size,
                      uint64_t seed) {
  check(vocab_size >= kMinVocab, "vocabulary size " + std::to_string(vocab_size) + " is too small: " +
                                     min_vocab_reason() + ", so at least " + std::to_string(kMinVocab));
  check(!text_files.empty(), "no text files to train the tokenizer on");
  for (const auto& f : text_files) {
    std::error_code ec;
    check(fs::is_regular_file(f, ec), "tokenizer training text " + f + " not found");
  }
  const std::unordered_map<std::string, std::string> args = {
      {"model_type", "bpe"},
      {"vocab_size", std::to_string(vocab_size)},
      {"byte_fallback", "true"},
      {"pad_id", "0"},
      {"bos_id", "1"},
      {"eos_id", "2"},
      {"unk_id", "3"},
      {"split_digits", "true"},
      {"character_coverage", "0.9995"},
      // Identity normalisation and kept whitespace make decode(encode(x)) == x, as in LLaMA's.
      {"normalization_rule_name", "identity"},
      {"remove_extra_whitespaces", "false"},
      {"add_dummy_prefix", "true"},
      {"allow_whitespace_only_pieces", "true"},
      // A sample of lines bounds memory and time on large corpora.
      {"input_sentence_size", "2000000"},
      {"shuffle_input_sentence", "true"},
      // Paragraph-long lines are common in prose; the default cap (4192 bytes) drops them.
      {"max_sentence_length", std::to_string(kMaxSentenceBytes)},
      {"num_threads", "2"},
      // Our own Error carries the failure; sentencepiece's log lines would only be noise.
      {"minloglevel", "2"},
  };
  sentencepiece::SetRandomGeneratorSeed((unsigned)(seed ^ (seed >> 32)));
  LineIterator lines(text_files);
  std::string model;
  const auto status = sentencepiece::SentencePieceTrainer::Train(args, &lines, &model);
  check(lines.status().ok(), lines.status().ToString());
  check(status.ok(), explain_training_failure(status.ToString(), vocab_size));

  const std::string tmp = model_path + ".tmp-" + std::to_string(::getpid());
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    check(out.good(), "cannot write tokenizer " + tmp + ": check the folder exists and is writable");
    out.write(model.data(), (std::streamsize)model.size());
    out.close();
    if (!out) {
      std::remove(tmp.c_str());
      throw Error("cannot write tokenizer " + tmp + " (disk full?)");
    }
  }
  std::error_code ec;
  fs::rename(tmp, model_path, ec);
  if (ec) {
    std::remove(tmp.c_str());
    throw Error("cannot move tokenizer into place at " + model_path + ": " + ec.message());
  }
}

void Tokenizer::check_id(int32_t id) const {
  check(id >= 0 && id < vocab_size(),
        "invalid token id " + std::to_string(id) + ": the tokenizer has " + std::to_string(vocab_size()) + " tokens");
}

std::vector<int32_t> Tokenizer::encode(const std::string& text) const {
  // Long text goes in pieces cut at word boundaries, which bounds the encoder's memory and
  // keeps its time linear without changing the ids.
  std::vector<int32_t> out;
  std::vector<int> ids;
  const std::string_view all = text;
  for (size_t from = 0;;) {
    size_t cut = std::string_view::npos;
    if (all.size() - from > kPieceBytes)
      for (size_t i = from + kPieceBytes; i < all.size() && cut == std::string_view::npos; ++i)
        if (is_word_boundary(all, i)) cut = i;
    const size_t end = cut == std::string_view::npos ? all.size() : cut;
    const auto status = sp_->Encode(all.substr(from, end - from), &ids);
    check(status.ok(), "encoding failed: " + status.ToString());
    out.insert(out.end(), ids.begin(), ids.end());
    if (cut == std::string_view::npos) return out;
    from = cut + 1;
  }
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids) const {
  for (int32_t id : ids) check_id(id);
  std::string text;
  const auto status = sp_->Decode(std::vector<int>(ids.begin(), ids.end()), &text);
  check(status.ok(), "decoding failed: " + status.ToString());
  return text;
}

std::string Tokenizer::id_to_piece(int32_t id) const {
  check_id(id);
  return sp_->IdToPiece(id);
}

int Tokenizer::vocab_size() const { return sp_->GetPieceSize(); }
int Tokenizer::bos_id() const { return sp_->bos_id(); }
int Tokenizer::eos_id() const { return sp_->eos_id(); }
int Tokenizer::pad_id() const { return sp_->pad_id(); }
int Tokenizer::unk_id() const { return sp_->unk_id(); }
bool Tokenizer::is_byte(int32_t id) const { return sp_->IsByte(id); }
bool Tokenizer::is_control(int32_t id) const { return sp_->IsControl(id); }
bool Tokenizer::is_unknown(int32_t id) const { return sp_->IsUnknown(id); }

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer) : tok_(tokenizer), strips_first_space_(true) {
  // Whether decode drops the word-start mark of the first piece depends on the model's
  // normaliser settings, which the public API does not expose: ask decode itself.
  for (int id = 0; id < tok_.vocab_size(); ++id) {
    if (tok_.is_byte(id) || tok_.is_control(id) || tok_.is_unknown(id)) continue;
    const std::string piece = tok_.id_to_piece(id);
    if (piece.rfind(kSpaceMarker, 0) != 0) continue;
    strips_first_space_ = tok_.decode({id}) != replace_space_markers(piece);
    break;
  }
  if (tok_.unk_id() >= 0 && tok_.unk_id() < tok_.vocab_size()) unk_surface_ = tok_.decode({tok_.unk_id()});
}

std::string StreamDecoder::take_bytes(bool final) {
  std::string out;
  size_t i = 0;
  while (i < pending_.size()) {
    const int n = utf8_char_length(std::string_view(pending_).substr(i));
    if (n > 0) {
      out.append(pending_, i, n);
      i += n;
    } else if (n == 0 || final) {
      out += kReplacement;  // as decode renders a byte that cannot start a character
      i += 1;
    } else {
      break;  // an unfinished character: wait for its next byte
    }
  }
  pending_.erase(0, i);
  if (!out.empty()) emitted_ = true;
  return out;
}

std::string StreamDecoder::push(int32_t id) {
  const std::string piece = tok_.id_to_piece(id);
  if (tok_.is_byte(id)) {
    // Byte pieces are spelled <0xAB>.
    pending_ += (char)std::stoi(piece.substr(3, 2), nullptr, 16);
    return take_bytes(false);
  }
  // Any other piece ends a byte run, and decode renders an unfinished run as it stands.
  std::string out = take_bytes(true);
  if (tok_.is_control(id)) return out;
  std::string text;
  if (tok_.is_unknown(id)) {
    text = unk_surface_;
  } else {
    std::string_view p = piece;
    // decode drops one word-start mark, and only while nothing has been written yet.
    if (emitted_) first_space_pending_ = false;
    if (first_space_pending_ && strips_first_space_ && p.rfind(kSpaceMarker, 0) == 0) {
      p.remove_prefix(kSpaceMarker.size());
      first_space_pending_ = false;
    }
    text = replace_space_markers(p);
  }
  if (!text.empty()) emitted_ = true;
  return out + text;
}

std::string StreamDecoder::flush() {
  std::string out = take_bytes(true);
  emitted_ = false;
  first_space_pending_ = true;
  return out;
}

}  // namespace subllm
