#!/usr/bin/env python3
"""Writes the seed corpora of the fuzz targets into fuzz/corpus/<target>/: a few valid and
near-valid inputs each. Run from anywhere; rewrites the files it owns.

The tokenizer seeds are checked in as they are (5 KB): sentencepiece models trained by
spm_train (Debian package sentencepiece) on 400 lines of words from Moby-Dick,
  bpe_bytes.model  Tokenizer::train's settings: --model_type=bpe --vocab_size=300
                   --byte_fallback=true --pad_id=0 --bos_id=1 --eos_id=2 --unk_id=3
                   --split_digits=true --normalization_rule_name=identity
                   --remove_extra_whitespaces=false --allow_whitespace_only_pieces=true
  unigram.model    --model_type=unigram --vocab_size=60 --normalization_rule_name=identity
  truncated.model  the first 2000 bytes of bpe_bytes.model
tokenizer_seeds() writes one more from unigram.model: charsmap.model, with a small
normalisation table (precompiled_charsmap) that maps "A" to "b", for the fuzzer to break.
"""
import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def write(target, name, data):
    folder = os.path.join(HERE, "corpus", target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


def safetensors(tensors, metadata=None):
    """tensors: (name, dtype, shape, raw bytes), laid out back to back as the writer does."""
    header, blobs, offset = {}, b"", 0
    if metadata:
        header["__metadata__"] = metadata
    for name, dtype, shape, raw in tensors:
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        blobs += raw
        offset += len(raw)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + blobs


def safetensors_seeds():
    f32 = struct.pack("<6f", 0.5, -1.0, 2.0, 0.0, 1e-3, 3.5)
    write("safetensors", "f32.safetensors",
          safetensors([("tok_embeddings.weight", "F32", [3, 2], f32)], {"format": "pt"}))
    write("safetensors", "mixed.safetensors", safetensors([
        ("a", "BF16", [2, 2], struct.pack("<4H", 0x3F80, 0xBF80, 0x7F80, 0x0001)),
        ("b", "F16", [3], struct.pack("<3H", 0x3C00, 0x0001, 0x7C01)),
        ("c", "I32", [2], struct.pack("<2i", 7, -7)),
        ("empty", "F32", [0, 4], b""),
        ("scalar", "F32", [], struct.pack("<f", 1.0)),
    ]))
    # Near-valid: header length past the end; tensors overlapping.
    write("safetensors", "truncated.safetensors", safetensors([("x", "F32", [6], f32)])[:-5])
    overlap = {"x": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
               "y": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}
    text = json.dumps(overlap).encode()
    write("safetensors", "overlap.safetensors", struct.pack("<Q", len(text)) + text + f32)


def config_seeds():
    base = {
        "num_embeddings": 512, "decoder_embed_dim": 64, "decoder_ffn_embed_dim": 176,
        "decoder_layers": 6, "decoder_attention_heads": 4, "norm_name": "rmsnorm", "mlp_name": "swiglu",
        "tokens_per_sample": 128, "padding_idx": 0, "bos_token_id": 1, "eos_token_id": 2,
        "tie_weights": False, "norm_eps": 1e-06, "rope_base": 10000.0,
    }
    write("config", "llama.json", json.dumps(base, indent=2))
    subllm = dict(base, structure="TT(T(TT)T)", downsampling_factor_denominator="0.64,0.5")
    write("config", "subllm.json", json.dumps(subllm, indent=2))
    listed = dict(base, decoder_layers=3, structure="T(T)T", downsampling_factor_denominator=[0.5])
    write("config", "subllm_list.json", json.dumps(listed))
    write("config", "bad_structure.json", json.dumps(dict(base, structure="TT(()TT", decoder_embed_dim=2048.0)))
    write("config", "structure.txt", "TTT(TTT(TTT)TTT)TTT")


def shard(tokens, dtype=1, count=None):
    fmt = "<%dH" % len(tokens) if dtype == 1 else "<%dI" % len(tokens)
    header = b"SUBLLMTK" + struct.pack("<IIQ", 1, dtype, len(tokens) if count is None else count)
    return header + b"\0" * (64 - len(header)) + struct.pack(fmt, *tokens)


def dataset_seeds():
    tokens = [1, 17, 300, 42, 2, 1, 5, 6, 7, 2]
    manifest = {
        "format": "subllm-tokens-v1", "vocab_size": 512, "pad_id": 0, "bos_id": 1, "eos_id": 2,
        "tokenizer": "tokenizer.model",
        "train": [{"file": "train_000.bin", "tokens": len(tokens), "documents": 2}],
        "valid": [{"file": "train_000.bin", "tokens": len(tokens), "documents": 2}],
    }
    sep = b"\n--shard--\n"
    write("dataset", "uint16", json.dumps(manifest, indent=1).encode() + sep + shard(tokens))
    wide = dict(manifest, vocab_size=70000, train=[{"file": "train_000.bin", "tokens": 11, "documents": 2}])
    write("dataset", "uint32", json.dumps(wide).encode() + sep + shard(tokens + [69999], 2))
    write("dataset", "count_mismatch", json.dumps(manifest).encode() + sep + shard(tokens, 1, count=1 << 40))
    two = dict(manifest, train=manifest["train"] * 2)
    write("dataset", "two_shards", json.dumps(two).encode() + sep + shard(tokens))
    # Numbers of the wrong kind where integers belong.
    odd = dict(manifest, vocab_size=512.0, pad_id=-1, train=[{"file": "train_000.bin", "tokens": 1e3, "documents": -2}])
    write("dataset", "odd_numbers", json.dumps(odd).encode() + sep + shard(tokens))


def varint(v):
    out = b""
    while v >= 0x80:
        out += bytes([0x80 | (v & 0x7F)])
        v >>= 7
    return out + bytes([v])


def tokenizer_seeds():
    # A double-array trie of 768 32-bit units: unit 0 leads to state 256; unit 256 ^ 'A' = 321
    # has label 'A', a leaf and offset 833; the leaf, unit 321 ^ 833 = 512, has value 0, where
    # the replacement "b" starts.
    trie = [0] * 768
    trie[0] = 256 << 10
    trie[321] = (833 << 10) | (1 << 8) | ord("A")
    trie[512] = 1 << 31
    table = struct.pack("<I", 4 * len(trie)) + struct.pack("<%dI" % len(trie), *trie) + b"b\0"
    # A NormalizerSpec (field 3) holding only precompiled_charsmap (field 2), appended: readers
    # merge it into the model's own.
    spec = varint(2 << 3 | 2) + varint(len(table)) + table
    with open(os.path.join(HERE, "corpus", "tokenizer", "unigram.model"), "rb") as f:
        model = f.read()
    write("tokenizer", "charsmap.model", model + varint(3 << 3 | 2) + varint(len(spec)) + spec)


if __name__ == "__main__":
    tokenizer_seeds()
    safetensors_seeds()
    config_seeds()
    dataset_seeds()
