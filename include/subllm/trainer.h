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

}  // namespace subllm
