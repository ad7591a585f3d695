// `subllm train`: train a model on prepared token shards.
#include <algorithm>
#include <cstdio>
#include <filesystem>

#include "cli/commands.h"
#include "subllm/config.h"
#include "subllm/dataset.h"
#include "subllm/error.h"
#include "subllm/trainer.h"

namespace subllm::cli {
namespace {

struct TrainCli {
  TrainOptions o;
  std::string config_path;
  int dim = 256, layers = 4, heads = 4, kv_heads = 0, ffn = 0, vocab = 0;
  std::string structure;
  std::string retention;
  bool layers_given = false;
  // Which model flags were given (with --init-from, the rest come from the source model).
  bool dim_given = false, heads_given = false, kv_heads_given = false, ffn_given = false, vocab_given = false;
  std::string recipe;
  std::string balancer_fraction = SubllmKnobs{}.balancer_counted ? "counted" : "gaussian";
  std::string balancer_prob = SubllmKnobs{}.balancer_prob.str(), bypass_min = SubllmKnobs{}.bypass_min.str();
  bool lr_given = false, schedule_given = false, optimizer_given = false, beta2_given = false, warmup_given = false;
  bool balancer_grad_scale_given = false;
  float lr = 2e-3f;
  std::string clipping = "per-group";
};

int run_train(TrainCli& c) {
  TrainOptions& o = c.o;
  check(o.scaled_adam.param_min_rms < o.scaled_adam.param_max_rms,
        "--param-min-rms must be below --param-max-rms (got " + std::to_string(o.scaled_adam.param_min_rms) + " and " +
            std::to_string(o.scaled_adam.param_max_rms) + ")");
  // A wrong --resume path is named before anything reads the data folder (a folder of
  // `subllm quantize`, which holds no checkpoint, by the trainer with the reason).
  if (!o.resume.empty()) {
    const std::filesystem::path weights_file = std::filesystem::path(o.resume) / "model.safetensors";
    if (!std::filesystem::exists(weights_file) || weight_file_type(weights_file.string()) == "f32")
      find_checkpoint(o.resume);
  }
  const bool sized = !c.config_path.empty();
  if (sized) {
    o.model = load_config(c.config_path);
  } else if (!o.init_from.empty()) {
    // The source model's config, with the layout the flags ask for (continued training as SUBLLM).
    const std::string from = init_from_folder(o.init_from);
    ModelConfig m = load_config((std::filesystem::path(from) / "config.json").string());
    m.source = "the config of --init-from " + from + " with the model flags";
    if (!c.structure.empty()) {
      const bool new_layout = c.structure != m.layout();
      m.structure = c.structure;
      m.n_layers = c.layers_given ? c.layers : (int)std::count(c.structure.begin(), c.structure.end(), 'T');
      m.retentions.clear();
      if (!c.retention.empty()) m.retentions = config_from_json_text("{\"downsampling_factor_denominator\": \"" + c.retention + "\"}", "--retention").retentions;
      // A new layout places kept tokens as the authors do.
      if (new_layout) m.rope_parent_positions = true;
    } else if (!c.retention.empty()) {
      m.retentions = config_from_json_text("{\"downsampling_factor_denominator\": \"" + c.retention + "\"}", "--retention").retentions;
    } else if (c.layers_given) {
      m.n_layers = c.layers;
    }
    // Sizes given explicitly are taken as asked; init_from_model refuses any that differ.
    if (c.dim_given) m.dim = c.dim;
    if (c.heads_given) m.n_heads = c.heads;
    if (c.kv_heads_given) m.n_kv_heads = c.kv_heads == m.n_heads ? 0 : c.kv_heads;
    if (c.ffn_given) m.ffn_dim = c.ffn;
    if (c.vocab_given) m.vocab_size = c.vocab;
    m.bypass_numbering = 2;
    m.validate();
    o.model = m;
  } else {
    ModelConfig m;
    m.source = "the model flags (decoder_embed_dim is --dim, decoder_layers --layers, decoder_attention_heads "
               "--heads, decoder_ffn_embed_dim --ffn, num_embeddings --vocab)";
    m.dim = c.dim;
    // A structure string fixes the block count unless --layers says otherwise.
    m.n_layers = c.layers_given || c.structure.empty() ? c.layers
                                                       : (int)std::count(c.structure.begin(), c.structure.end(), 'T');
    m.n_heads = c.heads;
    m.n_kv_heads = c.kv_heads == c.heads ? 0 : c.kv_heads;
    // SwiGLU hidden size ≈ 8/3 d rounded to a multiple of 32, as LLaMA sizes it.
    // In 64 bits, so a huge --dim reaches the size limits rather than wrapping around.
    m.ffn_dim = c.ffn > 0 ? c.ffn : (int)std::min<int64_t>((8 * (int64_t)c.dim / 3 + 31) / 32 * 32, INT32_MAX);
    m.structure = c.structure;
    if (!c.retention.empty()) m.retentions = config_from_json_text("{\"downsampling_factor_denominator\": \"" + c.retention + "\"}", "--retention").retentions;
    if (c.vocab > 0) {
      m.vocab_size = c.vocab;
    } else {
      TokenDataset ds((std::filesystem::path(o.data_dir) / "manifest.json").string(), "train");
      m.vocab_size = ds.vocab_size();
    }
    o.model = m;
  }
  o.model.context = std::max(o.model.context, o.seq);
  // --recipe paper: the paper's optimizer and schedule; explicit flags still win.
  if (c.recipe == "paper") {
    if (!c.optimizer_given) o.optimizer = "scaled_adam";
    if (!c.lr_given) c.lr = 0.045f;
    if (!c.schedule_given) o.lr.kind = "eden";
    if (!c.warmup_given) o.lr.warmup_steps = 500;
  }
  if (o.optimizer == "scaled-adam") o.optimizer = "scaled_adam";
  if (c.beta2_given) o.scaled_adam.beta2 = o.adamw.beta2;
  o.scaled_adam.beta1 = o.adamw.beta1;
  o.scaled_adam.clipping = c.clipping == "global" ? Clipping::global : Clipping::per_group;
  o.lr.base_lr = c.lr;
  o.subllm.balancer_prob = ScheduledFloat::parse(c.balancer_prob, "--balancer-prob");
  o.subllm.balancer_counted = c.balancer_fraction == "counted";
  if (!c.balancer_grad_scale_given && !o.subllm.balancer_counted) o.subllm.balancer_grad_scale = 0.04f;  // the paper's
  o.subllm.bypass_min = ScheduledFloat::parse(c.bypass_min, "--bypass-min");
  TrainResult r = train(o);
  if (r.rank != 0) return r.interrupted ? 130 : 0;  // rank 0 reports for the job
  std::printf("steps %ld  train loss %.4f", r.steps_done, r.last_loss);
  if (r.val_loss >= 0) std::printf("  validation loss %.4f", r.val_loss);
  if (!r.retention.empty()) {
    std::printf("  retention");
    for (double x : r.retention) std::printf(" %.3f", x);
  }
  std::printf("\ncheckpoint %s\n", r.last_checkpoint.c_str());
  return r.interrupted ? 130 : 0;
}

}  // namespace

void add_train_command(CLI::App& app, Runner& run) {
  auto c = std::make_shared<TrainCli>();
  TrainOptions& o = c->o;
  // The defaults train the small model of the README's first command in about five minutes.
  o.data_dir = "data/default";
  o.out_dir = "runs/default";
  o.batch = 16;
  o.seq = 256;
  o.steps = 300;
  o.lr.warmup_steps = 30;
  o.eval_every = 50;
  o.ckpt_every = 100;
  o.lr.eden.lr_epochs = 0;  // a third of the run's data
  auto* t = app.add_subcommand("train", "Train a LLaMA or SUBLLM model on prepared token shards");
  t->add_option("--data", o.data_dir, "folder written by `subllm prepare`")->capture_default_str();
  auto* out = t->add_option("-o,--out", o.out_dir,
                             "run folder for checkpoints and metrics.jsonl (with --resume: a new folder to fork "
                             "the run into)")
                  ->capture_default_str();
  t->add_option("--resume", o.resume,
                "continue a run folder or checkpoint exactly where it stopped, in its own run folder");
  t->add_flag("--overwrite", o.overwrite, "-o may name a folder holding another run: delete that run's files first");
  auto* cfg = t->add_option("--config", c->config_path, "model config.json (official SUBLLM keys)");
  auto* dim = t->add_option("--dim", c->dim, "model width (without --config)")
      ->capture_default_str()
      ->check(interval("[1, inf)"));
  auto* layers = t->add_option("--layers", c->layers, "transformer blocks")
      ->capture_default_str()
      ->check(interval("[1, inf)"));
  auto* heads = t->add_option("--heads", c->heads, "attention heads")
      ->capture_default_str()
      ->check(interval("[1, inf)"));
  auto* kv_heads = t->add_option("--kv-heads", c->kv_heads,
                                 "key/value heads, a divisor of --heads (grouped-query attention; 1: multi-query; "
                                 "default: --heads)")
                      ->check(interval("[0, inf)"));
  t->add_option("--init-from", o.init_from,
                "start from the weights of a trained model (model, checkpoint or run folder; e.g. a LLaMA from "
                "`subllm convert`): its blocks stay in place, new subsamplers start fresh, the optimizer and "
                "schedule start anew; without --config its sizes are used, with --structure/--retention the new layout");
  auto* ffn = t->add_option("--ffn", c->ffn, "SwiGLU hidden size (default ≈ 8/3 · dim)")->check(interval("[0, inf)"));
  auto* vocab = t->add_option("--vocab", c->vocab, "vocabulary size (default: the tokenizer's)")
      ->check(interval("[0, inf)"));
  auto* structure = t->add_option("--structure", c->structure, "layout string, e.g. TT(TT)TT (default all T)");
  auto* retention = t->add_option("--retention", c->retention, "subsampler retention(s), e.g. 0.64 or 0.64,0.5");
  for (auto* opt : {dim, layers, heads, kv_heads, ffn, vocab, structure, retention}) opt->excludes(cfg);
  t->add_option("--batch", o.batch, "sequences per micro-batch")->capture_default_str()->check(interval("[1, inf)"));
  t->add_option("--seq", o.seq, "tokens per sequence")->capture_default_str()->check(interval("[1, inf)"));
  t->add_option("--grad-accum", o.grad_accum,
                "micro-batches per optimizer step on each rank (under mpirun -np N: N x this per step)")
      ->capture_default_str()->check(interval("[1, inf)"));
  t->add_flag("--shard-optimizer", o.shard_optimizer,
              "ZeRO-1: split the optimizer state across the ranks of an mpirun job (memory per rank / N)");
  t->add_option("--steps", o.steps, "optimizer steps")->capture_default_str()->check(interval("[1, inf)"));
  t->add_option("--tokens", o.token_budget, "token budget (sets --steps)")->check(interval("[1, inf)"));
  t->add_option("--recipe", c->recipe,
                "paper: ScaledAdam, base lr 0.045, Eden, 500 warm-up steps (flags given still win)")
      ->check(CLI::IsMember({"paper"}));
  auto* optimizer = t->add_option("--optimizer", o.optimizer, "adamw | scaled-adam")
                        ->capture_default_str()
                        ->check(CLI::IsMember({"adamw", "scaled-adam", "scaled_adam"}));
  auto* lr = t->add_option("--lr", c->lr, "peak (base) learning rate")
      ->capture_default_str()
      ->check(interval("(0, inf)"));
  auto* warmup = t->add_option("--warmup", o.lr.warmup_steps, "warm-up steps (Eden: from --warmup-start to 1)")
                     ->capture_default_str()->check(interval("[0, inf)"));
  auto* schedule = t->add_option("--schedule", o.lr.kind, "cosine | constant | eden | eden2")
                       ->capture_default_str()
                       ->check(CLI::IsMember({"cosine", "constant", "eden", "eden2"}));
  t->add_option("--lr-batches", o.lr.eden.lr_batches, "Eden: steps over which the rate falls (B)")
      ->capture_default_str()
      ->check(interval("(0, inf)"));
  t->add_option("--lr-epochs", o.lr.eden.lr_epochs, "Eden: epochs over which the rate falls (E; default a third of the run)")
      ->check(interval("[0, inf)"));
  t->add_option("--warmup-start", o.lr.eden.warmup_start, "Eden: warm-up factor at step 0")
      ->capture_default_str()
      ->check(interval("[0, 1]"));
  t->add_option_function<std::string>(
       "--eden-epoch", [c](const std::string& v) { c->o.lr.eden.epoch_mode = parse_eden_epoch(v); },
       "Eden: the epoch e is the data seen, fractional (default, the paper's recipe), or the passes completed "
       "(icefall's speech recipes: 0 through the first pass)")
      ->check(CLI::IsMember({"fractional", "completed"}));
  t->add_option("--min-lr-ratio", o.lr.min_lr_ratio, "final lr / peak lr for cosine")
      ->capture_default_str()
      ->check(interval("[0, 1]"));
  t->add_option("--weight-decay", o.adamw.weight_decay, "AdamW weight decay (matrices only)")
      ->capture_default_str()
      ->check(interval("[0, inf)"));
  t->add_option("--beta1", o.adamw.beta1, "first-moment decay (both optimizers)")
      ->capture_default_str()
      ->check(interval("[0, 1)"));
  auto* beta2 = t->add_option("--beta2", o.adamw.beta2, "second-moment decay (default 0.95 AdamW, 0.98 ScaledAdam)")
      ->check(interval("[0, 1)"));
  t->add_option("--grad-clip", o.adamw.grad_clip, "AdamW: global gradient-norm limit (0: off)")
      ->capture_default_str()
      ->check(interval("[0, inf)"));
  auto& sa = o.scaled_adam;
  t->add_option("--clipping-scale", sa.clipping_scale, "ScaledAdam: clip at this × the median norm (0: off)")
      ->capture_default_str()->check(interval("[0, inf)"));
  t->add_option("--clipping-update-period", sa.clipping_update_period, "ScaledAdam: steps in the median window")
      ->capture_default_str()->check(interval("[1, inf)"));
  t->add_option("--clipping", c->clipping,
                "ScaledAdam: per-group (each lr scale's tensors against their own median window, as icefall) "
                "or global (one norm over all tensors)")
      ->capture_default_str()
      ->check(CLI::IsMember({"per-group", "global"}));
  t->add_option("--scalar-lr-scale", sa.scalar_lr_scale, "ScaledAdam: lr factor of one-element tensors")
      ->capture_default_str()->check(interval("[0, inf)"));
  t->add_option("--param-min-rms", sa.param_min_rms, "ScaledAdam: smallest tensor RMS")
      ->capture_default_str()
      ->check(interval("(0, inf)"));
  t->add_option("--param-max-rms", sa.param_max_rms, "ScaledAdam: largest tensor RMS")
      ->capture_default_str()
      ->check(interval("(0, inf)"));
  t->add_option("--scalar-max", sa.scalar_max, "ScaledAdam: clamp of one-element tensors")
      ->capture_default_str()
      ->check(interval("(0, inf)"));
  t->add_option("--size-update-period", sa.size_update_period, "ScaledAdam: steps between tensor-scale updates")
      ->capture_default_str()->check(interval("[1, inf)"));
  t->add_option("--adam-eps", o.adamw.eps, "epsilon of both optimizers")
      ->capture_default_str()
      ->check(interval("(0, inf)"));
  auto* bal_scale = t->add_option("--balancer-grad-scale", o.subllm.balancer_grad_scale,
                                  "SUBLLM: strength of the score balancer's gradient edit (0.04 with "
                                  "--balancer-fraction gaussian, the paper's)")
                        ->capture_default_str()->check(interval("[0, inf)"));
  t->add_option("--balancer-fraction", c->balancer_fraction,
                "SUBLLM: how the score balancer sees the positive fraction: counted (counts it and steers it to "
                "the retention) | gaussian (judges it from mean/std, the paper's function)")
      ->capture_default_str()
      ->check(CLI::IsMember({"gaussian", "counted"}));
  t->add_option("--balancer-window", o.subllm.balancer_window,
                "SUBLLM: the score balancer's window [r - w, r + w]: full strength at its edges and beyond "
                "(counted: proportional to the distance from r inside; gaussian: no push inside)")
      ->capture_default_str()->check(interval("(0, 0.5)"));
  t->add_option("--balancer-prob", c->balancer_prob, "SUBLLM: chance the score balancer acts, STEP:VALUE,...")
      ->capture_default_str();
  t->add_option("--bypass-min", c->bypass_min, "SUBLLM: lower limit of the bypass scales, STEP:VALUE,...")
      ->capture_default_str();
  t->add_option("--eval-every", o.eval_every, "steps between validation passes")
      ->capture_default_str()
      ->check(interval("[0, inf)"));
  t->add_option("--eval-batches", o.eval_batches, "batches per validation pass (0: no validation)")
      ->capture_default_str()
      ->check(interval("[0, inf)"));
  t->add_option("--ckpt-every", o.ckpt_every, "steps between checkpoints")
      ->capture_default_str()
      ->check(interval("[0, inf)"));
  t->add_option("--keep", o.keep_last, "checkpoints kept")->capture_default_str()->check(interval("[1, inf)"));
  t->add_option("--seed", o.seed, "seed for init and data order")->capture_default_str();
  add_device_option(t, o.device);
  add_threads_option(t, o.threads);
  t->add_flag("-q,--quiet", o.quiet, "no progress output");
  t->callback([&run, c, out, cfg, dim, layers, heads, kv_heads, ffn, vocab, structure, retention, lr, schedule,
               optimizer, beta2, warmup, bal_scale] {
    c->o.model_given = cfg->count() + dim->count() + layers->count() + heads->count() + kv_heads->count() +
                           ffn->count() + vocab->count() + structure->count() + retention->count() > 0 ||
                       c->o.resume.empty();
    c->dim_given = dim->count() > 0;
    c->heads_given = heads->count() > 0;
    c->kv_heads_given = kv_heads->count() > 0;
    c->ffn_given = ffn->count() > 0;
    c->vocab_given = vocab->count() > 0;
    // --resume alone continues the run in its own folder, not in the default -o.
    if (!c->o.resume.empty() && out->count() == 0) c->o.out_dir.clear();
    c->layers_given = layers->count() > 0;
    c->lr_given = lr->count() > 0;
    c->schedule_given = schedule->count() > 0;
    c->optimizer_given = optimizer->count() > 0;
    c->beta2_given = beta2->count() > 0;
    c->warmup_given = warmup->count() > 0;
    c->balancer_grad_scale_given = bal_scale->count() > 0;
    c->o.scaled_adam.eps = c->o.adamw.eps;
    run = [c] { return run_train(*c); };
  });
}

}  // namespace subllm::cli
