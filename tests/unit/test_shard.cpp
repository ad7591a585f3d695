// ZeRO-1 (Optimizer::shard) without MPI: N ranks simulated one after another in one process,
// each with its own Model and optimizer, joined by a fake communicator. Sharded steps, saves
// and loads must match the unsharded optimizer bit for bit. (The real multi-process runs are
// the MPI tests'.)
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <memory>
#include <vector>

#include "backend/backend.h"
#include "dist/communicator.h"
#include "subllm/error.h"
#include "subllm/model.h"
#include "subllm/optim.h"
#include "subllm/rng.h"
#include "subllm/scaled_adam.h"
#include "test_util.h"

namespace subllm {
namespace shard_tests {

using testing::read_all;
using testing::TempDir;

// What the simulated ranks share: the buffer every rank's all_gather deposits its slice into,
// and per rank the slices it sent to rank 0 with gather_host, in call order.
struct World {
  explicit World(int n) : size(n), sent(n) {}
  int size;
  std::vector<float> gathered;  // [n] NaN where no rank has deposited since the last deliver()
  std::vector<int64_t> bounds;  // of the first all_gather since the last deliver()
  std::vector<std::vector<std::vector<float>>> sent;  // [rank][call]: the slice
  size_t root_calls = 0;        // gather_host calls rank 0 has made
};

void check_bounds_of(const std::vector<int64_t>& b, int ranks, int64_t n) {
  check((int)b.size() == ranks + 1 && b.front() == 0 && b.back() == n, "fake communicator: bad bounds");
  for (int r = 0; r < ranks; ++r) check(b[r] <= b[r + 1], "fake communicator: bounds decrease");
}

// Rank `rank` of `world`. The ranks run one after another, so no collective can wait for its
// peers: all_gather only deposits this rank's slice (deliver() hands the assembled buffer to
// every rank once all have stepped), and gather_host on rank 0 reads the slices the other
// ranks sent earlier (they call save_state before rank 0 does).
class FakeComm final : public Communicator {
 public:
  FakeComm(World& w, int rank) : w_(w), rank_(rank) {}
  const char* name() const override { return "fake"; }
  int rank() const override { return rank_; }
  int size() const override { return w_.size; }
  void all_reduce_sum_start(View) override { unexpected("all_reduce_sum_start"); }
  double wait_reductions() override {
    unexpected("wait_reductions");
    return 0;
  }
  void all_gather(View x, const std::vector<int64_t>& bounds) override {
    check(x.dtype == DType::F32, "fake all_gather: F32 only");
    check_bounds_of(bounds, w_.size, x.numel());
    if (w_.bounds.empty()) {
      w_.bounds = bounds;
      w_.gathered.assign(x.numel(), std::numeric_limits<float>::quiet_NaN());
    }
    check(bounds == w_.bounds, "fake all_gather: ranks disagree on the slices");
    std::copy(x.f32() + bounds[rank_], x.f32() + bounds[rank_ + 1], w_.gathered.begin() + bounds[rank_]);
  }
  void all_reduce_sum_host(double*, int) override { unexpected("all_reduce_sum_host"); }
  void gather_host(const float* local, float* full, const std::vector<int64_t>& bounds) override {
    check_bounds_of(bounds, w_.size, bounds.back());
    const int64_t n = bounds[rank_ + 1] - bounds[rank_];
    if (rank_ != 0) {
      w_.sent[rank_].emplace_back(local, local + n);
      return;
    }
    const size_t call = w_.root_calls++;
    std::copy(local, local + n, full + bounds[0]);
    for (int r = 1; r < w_.size; ++r) {
      check(w_.sent[r].size() > call, "fake gather_host: rank " + std::to_string(r) + " has not sent its slice");
      const std::vector<float>& s = w_.sent[r][call];
      check((int64_t)s.size() == bounds[r + 1] - bounds[r], "fake gather_host: slice length differs");
      std::copy(s.begin(), s.end(), full + bounds[r]);
    }
  }
  void broadcast_host(void*, int64_t) override { unexpected("broadcast_host"); }
  void barrier() override { unexpected("barrier"); }

 private:
  static void unexpected(const char* op) { throw Error(std::string("fake communicator: unexpected ") + op); }
  World& w_;
  int rank_;
};

// Completes an all_gather round: every slice must have been deposited; each rank's buffer
// becomes the whole.
void deliver(World& w, const std::vector<float*>& buffers) {
  ASSERT_FALSE(w.bounds.empty()) << "no rank all-gathered";
  for (size_t i = 0; i < w.gathered.size(); ++i) ASSERT_FALSE(std::isnan(w.gathered[i])) << "element " << i;
  for (float* b : buffers) std::copy(w.gathered.begin(), w.gathered.end(), b);
  w.bounds.clear();
  w.gathered.clear();
}

ModelConfig small_config() {
  ModelConfig c;
  c.vocab_size = 256;  // embedding and head of 8192 elements: several chunks each
  c.dim = 32;
  c.ffn_dim = 48;
  c.n_layers = 3;
  c.n_heads = 2;
  c.context = 16;
  c.structure = "T(T)T";
  c.retentions = {0.5f};
  return c;
}

std::vector<float> host_params(Model& m) {
  std::vector<float> h(m.num_params());
  m.backend().to_host(h.data(), m.param_data(), sizeof(float) * h.size());
  return h;
}

// Gradients that depend on the parameters (so a rank with stale parameters would differ),
// identical for identical parameters.
void fill_grads(Model& m, int step, float scale) {
  const std::vector<float> p = host_params(m);
  std::vector<float> g(p.size());
  for (size_t i = 0; i < g.size(); ++i)
    g[i] = scale * (0.02f * (float)std::sin(0.37 * (double)i + 1.3 * step) + 0.5f * p[i]);
  m.backend().to_device(m.grad_data(), g.data(), sizeof(float) * g.size());
}

bool same_bits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), sizeof(float) * a.size()) == 0;
}

std::unique_ptr<Optimizer> make(const std::string& kind, const Model& m) {
  AdamWOptions a;
  ScaledAdamOptions s;
  s.clipping_update_period = 2;  // a threshold from step 2 on, so step 3's large gradient is clipped
  return make_optimizer(kind, m, a, s);
}

// A gradient scale per step: step 3's is large enough to be clipped by either optimizer.
const std::vector<float> kScales = {1e-3f, 1.0f, 1.0f, 30.0f, 1.0f};

void sharded_matches_unsharded(const std::string& kind, int ranks) {
  SCOPED_TRACE(kind + " over " + std::to_string(ranks) + " ranks");
  TempDir tmp("shard");
  const ModelConfig cfg = small_config();
  const float lr = kind == "adamw" ? 1e-2f : 5e-2f;

  Model ref(cfg);
  ref.weights().init(7);
  std::unique_ptr<Optimizer> ref_opt = make(kind, ref);
  EXPECT_FALSE(ref_opt->sharded());

  World world(ranks);
  std::vector<std::unique_ptr<FakeComm>> comms;
  std::vector<std::unique_ptr<Model>> models;
  std::vector<std::unique_ptr<Optimizer>> opts;
  std::vector<float*> buffers;
  for (int r = 0; r < ranks; ++r) {
    comms.push_back(std::make_unique<FakeComm>(world, r));
    models.push_back(std::make_unique<Model>(cfg));
    models[r]->weights().init(7);
    opts.push_back(make(kind, *models[r]));
    opts[r]->shard(*comms[r]);
    EXPECT_TRUE(opts[r]->sharded());
    buffers.push_back(models[r]->param_data());
  }
  // A second shard() is refused.
  EXPECT_NE(testing::error_of([&] { opts[0]->shard(*comms[0]); }), "");

  bool clipped = false;
  auto step_all = [&](World& w, int s, float scale) {
    fill_grads(ref, s, scale);
    const StepReport want = ref_opt->step(ref, lr);
    clipped = clipped || want.clip_factor < 1.0;
    for (int r = 0; r < ranks; ++r) {
      fill_grads(*models[r], s, scale);
      const StepReport got = opts[r]->step(*models[r], lr);
      EXPECT_EQ(got.grad_norm, want.grad_norm) << "step " << s << " rank " << r;
      EXPECT_EQ(got.clip_factor, want.clip_factor) << "step " << s << " rank " << r;
    }
    deliver(w, buffers);
    for (auto& m : models) m->weights().params_changed();
    const std::vector<float> p = host_params(ref);
    for (int r = 0; r < ranks; ++r)
      EXPECT_TRUE(same_bits(host_params(*models[r]), p)) << "step " << s << " rank " << r;
  };
  for (int s = 0; s < (int)kScales.size(); ++s) step_all(world, s, kScales[s]);
  EXPECT_TRUE(clipped) << "no step was clipped";
  for (auto& o : opts) EXPECT_EQ(o->steps_taken(), ref_opt->steps_taken());

  // Save: the other ranks first (they only send), then rank 0, which writes.
  const std::string ref_file = tmp.file("ref.safetensors"), shard_file = tmp.file("sharded.safetensors");
  ref_opt->save_state(ref_file);
  for (int r = ranks - 1; r >= 1; --r) opts[r]->save_state(shard_file);
  EXPECT_FALSE(std::filesystem::exists(shard_file)) << "a rank other than 0 wrote the state";
  opts[0]->save_state(shard_file);
  ASSERT_TRUE(std::filesystem::exists(shard_file));
  EXPECT_EQ(read_all(shard_file), read_all(ref_file));

  // Load an unsharded file into fresh sharded optimizers (over the same models, whose
  // parameters equal ref's), then continue both for two steps.
  World world2(ranks);
  std::vector<std::unique_ptr<FakeComm>> comms2;
  for (int r = 0; r < ranks; ++r) {
    comms2.push_back(std::make_unique<FakeComm>(world2, r));
    opts[r] = make(kind, *models[r]);
    opts[r]->shard(*comms2[r]);
    opts[r]->load_state(ref_file);
    EXPECT_EQ(opts[r]->steps_taken(), ref_opt->steps_taken());
  }
  for (int s = (int)kScales.size(); s < (int)kScales.size() + 2; ++s) step_all(world2, s, 1.0f);
}

TEST(Shard, AdamWOverTwoAndThreeRanksMatchesUnsharded) {
  sharded_matches_unsharded("adamw", 2);
  sharded_matches_unsharded("adamw", 3);
}

TEST(Shard, ScaledAdamOverTwoAndThreeRanksMatchesUnsharded) {
  sharded_matches_unsharded("scaled_adam", 2);
  sharded_matches_unsharded("scaled_adam", 3);
}

TEST(Shard, OneRankChangesNothing) {
  World world(1);
  FakeComm comm(world, 0);
  Model m(small_config());
  for (const char* kind : {"adamw", "scaled_adam"}) {
    std::unique_ptr<Optimizer> o = make(kind, m);
    o->shard(comm);
    EXPECT_FALSE(o->sharded()) << kind;
  }
}

// Tensors laid out one after another in flat buffers, as a Model does.
struct Layout {
  std::vector<ParamInfo> infos;
  int64_t total = 0;
  void add(const std::string& name, Shape shape) {
    ParamInfo p;
    p.name = name;
    p.shape = shape;
    p.numel = shape_numel(shape);
    p.offset = total;
    total += p.numel;
    infos.push_back(p);
  }
};

// ScaledAdam's slices are runs of whole chunks (4096 elements of one tensor at most),
// balanced by element count; a rank may own none. Four ranks over chunks of 3, 1, 4096 and
// 904 elements: the chunk starts nearest to 1251, 2502 and 3753 elements are 4, 4100 and
// 4100 (a slice never starts before the previous one), so rank 2 owns nothing.
TEST(Shard, ScaledAdamSlicesAreWholeChunksAndMayBeEmpty) {
  Layout l;
  l.add("a", {3});
  l.add("s", {1});
  l.add("b", {5000});
  ScaledAdamOptions o;
  o.clipping_update_period = 2;
  const int ranks = 4;
  World world(ranks);
  std::vector<std::unique_ptr<FakeComm>> comms;
  std::vector<std::unique_ptr<ScaledAdam>> opts;
  std::vector<std::vector<float>> params(ranks), grads(ranks);
  ScaledAdam ref(l.infos, l.total, o);
  std::vector<float> ref_p(l.total), ref_g(l.total);
  Rng rng(3);
  for (auto& x : ref_p) x = (float)rng.normal();
  for (int r = 0; r < ranks; ++r) {
    comms.push_back(std::make_unique<FakeComm>(world, r));
    opts.push_back(std::make_unique<ScaledAdam>(l.infos, l.total, o));
    opts[r]->shard(*comms[r]);
    params[r] = ref_p;
    grads[r].resize(l.total);
  }
  const std::vector<int64_t> want = {0, 4, 4100, 4100, 5004};
  for (int r = 0; r < ranks; ++r) EXPECT_EQ(opts[r]->slice_bounds(), want) << "rank " << r;
  auto grad = [&](int s, int64_t i, float p) { return kScales[s] * (float)std::cos(0.1 * i + s) + 0.3f * p; };
  for (int s = 0; s < 5; ++s) {
    for (int64_t i = 0; i < l.total; ++i) ref_g[i] = grad(s, i, ref_p[i]);
    ref.step(ref_p.data(), ref_g.data(), 0.05f);
    std::vector<float*> buffers;
    for (int r = 0; r < ranks; ++r) {
      for (int64_t i = 0; i < l.total; ++i) grads[r][i] = grad(s, i, params[r][i]);
      opts[r]->step(params[r].data(), grads[r].data(), 0.05f);
      buffers.push_back(params[r].data());
    }
    deliver(world, buffers);
    for (int r = 0; r < ranks; ++r) EXPECT_TRUE(same_bits(params[r], ref_p)) << "step " << s << " rank " << r;
  }
}

}  // namespace shard_tests
}  // namespace subllm
