#include "model_check.h"

#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace subllm {
namespace {

// Field numbers of sentencepiece's model file (sentencepiece_model.proto): ModelProto's
// normalizer_spec and denormalizer_spec, both NormalizerSpec messages, and NormalizerSpec's
// precompiled_charsmap (bytes).
constexpr uint32_t kNormalizerSpec = 3;
constexpr uint32_t kDenormalizerSpec = 5;
constexpr uint32_t kPrecompiledCharsmap = 2;

// Protocol buffer wire types.
enum WireType : uint32_t { kVarint = 0, kFixed64 = 1, kBytes = 2, kGroupStart = 3, kGroupEnd = 4, kFixed32 = 5 };

// Reads the fields of one message in order. sentencepiece links protobuf's runtime into its
// own library and exports it, so a second protobuf runtime in this process would clash with
// it; the two fields the check needs are found by this reader of the wire format instead.
class FieldReader {
 public:
  explicit FieldReader(std::string_view bytes) : rest_(bytes) {}

  struct Field {
    uint32_t number;
    uint32_t wire_type;
    std::string_view bytes;  // the payload of a kBytes field
  };

  // The next field, nullopt at the end; sets `broken` on bytes that are not a message.
  std::optional<Field> next() {
    if (rest_.empty() || broken) return std::nullopt;
    Field f{};
    if (!tag(&f.number, &f.wire_type) || !skip_value(f.number, f.wire_type, &f.bytes, 0)) return fail();
    return f;
  }

  bool broken = false;

 private:
  std::optional<Field> fail() {
    broken = true;
    return std::nullopt;
  }

  bool varint(uint64_t* out) {
    uint64_t v = 0;
    for (int shift = 0; shift < 64 && !rest_.empty(); shift += 7) {
      const auto b = (unsigned char)rest_[0];
      rest_.remove_prefix(1);
      v |= uint64_t(b & 0x7F) << shift;
      if (!(b & 0x80)) {
        *out = v;
        return true;
      }
    }
    return false;
  }

  // A field's tag: its number (from 1) and wire type.
  bool tag(uint32_t* number, uint32_t* wire_type) {
    uint64_t t;
    if (!varint(&t) || t > UINT32_MAX || (t >> 3) == 0) return false;
    *number = (uint32_t)(t >> 3);
    *wire_type = (uint32_t)(t & 7);
    return true;
  }

  bool take(uint64_t n, std::string_view* out) {
    if (n > rest_.size()) return false;
    if (out) *out = rest_.substr(0, n);
    rest_.remove_prefix(n);
    return true;
  }

  // Moves past the value of a field whose tag was just read; a group is skipped up to its
  // matching end, as protobuf's parser does with a group it does not know.
  bool skip_value(uint32_t number, uint32_t wire_type, std::string_view* payload, int depth) {
    uint64_t n;
    switch (wire_type) {
      case kVarint: return varint(&n);
      case kFixed64: return take(8, nullptr);
      case kFixed32: return take(4, nullptr);
      case kBytes: return varint(&n) && take(n, payload);
      case kGroupStart:
        if (depth >= 100) return false;
        for (;;) {
          uint32_t inner, type;
          if (!tag(&inner, &type)) return false;
          if (type == kGroupEnd) return inner == number;
          if (!skip_value(inner, type, nullptr, depth + 1)) return false;
        }
      default: return false;  // an end of group with no start, or wire types 6 and 7
    }
  }

  std::string_view rest_;
};

// Why sentencepiece would read outside a normalisation table while normalising some text,
// or "" when no text can make it. sentencepiece trusts the table: it splits it into a 4-byte
// little-endian trie size, a double-array trie of 32-bit units and the replacement strings
// (each ended by a NUL byte); then it walks the trie from unit 0 and, at a state p, reads
// unit p ^ b for each next byte b of the text. A unit whose label is b moves the walk to
// (p ^ b) ^ offset; one that has a leaf also reads the unit there, whose value is where the
// replacement string starts. So every state a walk can reach must have all 256 of its units
// inside the trie, and every leaf must point inside the strings. The units' bit layout is
// darts-clone's: label = bits 0-7 and 31, has_leaf = bit 8, value = bits 0-30, offset = bits
// 10-31, shifted left by 8 when bit 9 is set.
std::string charsmap_problem(std::string_view table) {
  if (table.empty()) return "";
  uint32_t trie_bytes = 0;
  if (table.size() <= sizeof trie_bytes) return "it is shorter than its header";
  std::memcpy(&trie_bytes, table.data(), sizeof trie_bytes);
  if (trie_bytes > table.size() - sizeof trie_bytes)
    return "its trie of " + std::to_string(trie_bytes) + " bytes is longer than the table";
  const char* trie = table.data() + sizeof trie_bytes;
  const size_t units = trie_bytes / 4;
  const size_t strings_bytes = table.size() - sizeof trie_bytes - trie_bytes;
  if (units == 0) return "its trie is empty";
  const auto unit = [&](size_t i) {
    uint32_t u;
    std::memcpy(&u, trie + 4 * i, 4);
    return u;
  };
  const auto label = [](uint32_t u) { return u & ((1u << 31) | 0xFFu); };
  const auto has_leaf = [](uint32_t u) { return ((u >> 8) & 1u) != 0; };
  const auto value = [](uint32_t u) { return u & ((1u << 31) - 1); };
  const auto offset = [](uint32_t u) { return (size_t)((u >> 10) << ((u & (1u << 9)) >> 6)); };

  std::vector<bool> reached(units, false);
  std::vector<size_t> states{offset(unit(0))};
  while (!states.empty()) {
    const size_t p = states.back();
    states.pop_back();
    if ((p | 0xFF) >= units) return "a path of its trie leads outside the trie's " + std::to_string(units) + " units";
    if (reached[p]) continue;
    reached[p] = true;
    for (uint32_t b = 0; b < 256; ++b) {
      const uint32_t u = unit(p ^ b);
      if (label(u) != b) continue;
      const size_t next = (p ^ b) ^ offset(u);
      if (has_leaf(u)) {
        if (next >= units) return "a leaf of its trie lies outside the trie's " + std::to_string(units) + " units";
        if (value(unit(next)) >= strings_bytes)
          return "a rule points at byte " + std::to_string(value(unit(next))) + " of its " +
                 std::to_string(strings_bytes) + " bytes of replacement strings";
      }
      states.push_back(next);
    }
  }
  return "";
}

}  // namespace

std::string sentencepiece_model_problem(std::string_view model) {
  // A message field given more than once is merged, and of a bytes field the last one counts.
  std::string_view charsmap[2];
  FieldReader top(model);
  while (const auto field = top.next()) {
    if (field->wire_type != kBytes || (field->number != kNormalizerSpec && field->number != kDenormalizerSpec))
      continue;
    std::string_view& table = charsmap[field->number == kDenormalizerSpec];
    FieldReader spec(field->bytes);
    while (const auto f = spec.next())
      if (f->number == kPrecompiledCharsmap && f->wire_type == kBytes) table = f->bytes;
    if (spec.broken) return "not a protocol buffer";
  }
  if (top.broken) return "not a protocol buffer";
  for (int i = 0; i < 2; ++i) {
    const std::string problem = charsmap_problem(charsmap[i]);
    if (!problem.empty())
      return std::string(i ? "its denormalization" : "its normalization") + " table is broken: " + problem;
  }
  return "";
}

}  // namespace subllm
