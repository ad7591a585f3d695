#pragma once
// `subllm convert`: Hugging Face LLaMA folders in and out.
//
// A Hugging Face LLaMA folder holds config.json (LlamaConfig's keys), the weights as
// model.safetensors or as shards model-0000i-of-0000n.safetensors listed by
// model.safetensors.index.json (F32, BF16 or F16), and a sentencepiece tokenizer.model.
// A subllm model folder holds config.json (our keys), model.safetensors (F32, our names) and
// tokenizer.model. The mapping (docs/DESIGN.md, "Hugging Face LLaMA checkpoints"):
//   model.embed_tokens.weight                    decoder.embed_tokens.weight
//   model.layers.i.input_layernorm.weight        decoder.layers.i.self_attn_layer_norm.weight
//   model.layers.i.self_attn.{q,k,v}_proj.weight decoder.layers.i.self_attn.{q,k,v}_proj.weight
//   model.layers.i.self_attn.o_proj.weight       decoder.layers.i.self_attn.out_proj.weight
//   model.layers.i.post_attention_layernorm      decoder.layers.i.final_layer_norm.weight
//   model.layers.i.mlp.{gate,up}_proj.weight     decoder.layers.i.feedforward.swiglu.w12.weight
//                                                (gate rows first, then up)
//   model.layers.i.mlp.down_proj.weight          decoder.layers.i.feedforward.swiglu.w3.weight
//   model.norm.weight                            decoder.layer_norm.weight
//   lm_head.weight                               decoder.output_projection.weight (untied)
// Both rotate q and k by halves (pairs (i, i + head_dim / 2)), so q/k rows map unpermuted.
#include <string>

#include "subllm/tensor.h"

namespace subllm {

// Reads the Hugging Face folder `hf_dir` and writes the subllm model folder `out_dir` (a LLaMA:
// structure "T" * layers). Anything the model cannot represent (RoPE scaling, biases, another
// activation, sliding windows, quantized weights, a head size other than hidden / heads, a
// tensor without a place) is refused with an error naming the key or tensor; token ids are
// checked against tokenizer.model. The folder appears whole or not at all; an existing
// non-empty `out_dir` is refused. Returns notes for the user (lines ending in '\n').
std::string convert_from_hf(const std::string& hf_dir, const std::string& out_dir);

// Reads the subllm model folder (or run folder: its newest checkpoint) `model_dir`, which must
// have LLaMA structure (no subsamplers) and no q/k biases, and writes a Hugging Face LLaMA folder:
// config.json, model.safetensors in `dtype` (F32, BF16 or F16, rounded to nearest even), and
// tokenizer.model. Whole or nothing, as above.
std::string convert_to_hf(const std::string& model_dir, const std::string& out_dir, DType dtype);

}  // namespace subllm
