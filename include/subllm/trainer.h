#pragma once
// The training loop: random windows from token shards, gradient accumulation, validation,
// atomic checkpoints, exact resume, progress and metrics.
#include <cstdint>
#include <string>
#include <vector>

#include "subllm/checkpoint.h"
#include "subllm/config.h"
#include "subllm/model.h"
#include "subllm/optim.h"
#include "subllm/schedule.h"

namespace subllm {

struct TrainOptions {
  std::string data_dir;          // holds manifest.json (written by `subllm prepare`)
  std::string out_dir;           // run folder: checkpoints and metrics.jsonl (empty with resume: its run folder)
  std::string resume;            // a run folder or a checkpoint folder; empty: fresh run
  bool overwrite = false;        // out_dir may hold another run: delete its files first
  // A trained model folder (a checkpoint, a run folder's newest, or a converted LLaMA) whose
  // weights seed a fresh run: its blocks, embedding, final norm and head are kept in place
  // (block i stays block i; LLaMA and SUBLLM number blocks alike, in layout order), and tensors
  // it has not (score layers, bypass scales, blocks past its last) start as a fresh model's.
  // Subsampler tensors are kept only when the layouts are equal. The optimizer starts fresh and
  // the schedule (warm-up included) from step 0. Refused when the widths, heads, vocabulary,
  // tie_weights or qk_bias differ, when it has more blocks than the model, or when its weights
  // are quantized. See init_from_model.
  std::string init_from;
  ModelConfig model;
  bool model_given = true;       // false: a resumed run takes the checkpoint's config
  int batch = 8;                 // sequences per micro-batch
  int seq = 256;                 // tokens per sequence
  int grad_accum = 1;            // micro-batches per optimizer step on each rank (ranks × this per step)
  long steps = 1000;             // optimizer steps (a token budget, if given, sets this)
  int64_t token_budget = 0;
  std::string optimizer = "adamw";  // adamw | scaled_adam
  bool shard_optimizer = false;     // ZeRO-1: optimizer state split across the ranks
  std::string device = "cpu";       // backend_names() lists the choices
  LrSchedule lr;
  AdamWOptions adamw;
  ScaledAdamOptions scaled_adam;
  SubllmKnobs subllm;            // SUBLLM's balancer and bypass-limit schedules
  int eval_every = 100;          // steps between validation passes (0: only at the end)
  int eval_batches = 8;          // micro-batches per validation pass (0: no validation)
  int ckpt_every = 200;          // steps between checkpoints (0: only at the end)
  int keep_last = 2;             // checkpoints kept
  uint64_t seed = 1;
  int threads = 0;
  bool quiet = false;
};

struct TrainResult {
  long steps_done = 0;
  float last_loss = 0;
  float val_loss = -1;           // last validation loss (-1 if none ran)
  std::vector<double> retention; // kept fraction per subsampler in the last validation
  std::string last_checkpoint;
  bool interrupted = false;
  int rank = 0;                  // this process's rank in a data-parallel job (0 alone)
};

TrainResult train(const TrainOptions& opt);

// The folder --init-from names: `path` itself when it holds model.safetensors, else the newest
// checkpoint of the run folder `path`. Errors name the path.
std::string init_from_folder(const std::string& path);
// Copies the weights of the model folder `dir` into `model` as TrainOptions::init_from says;
// `model` keeps its own values where the source has no tensor. Returns a summary for the user
// (lines ending in '\n'): what was kept, what starts fresh.
std::string init_from_model(Model& model, const std::string& dir);

}  // namespace subllm
