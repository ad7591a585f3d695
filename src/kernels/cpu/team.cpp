#include "kernels/cpu/team.h"

#include <atomic>
#include <cstdint>
#include <exception>
#include <thread>

#include "kernels/kernels.h"
#include "kernels/quant_kernels.h"

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace subllm::kernels {

namespace team_detail {

// The calling thread posts a kernel by storing it and bumping `posted`; the others, between
// kernels, watch `posted`, run the kernel and count themselves in `done`. posted == kClosed
// ends the step.
struct Team {
  static constexpr uint64_t kClosed = ~uint64_t(0);
  alignas(64) std::atomic<uint64_t> posted{0};
  void (*fn)(void*) = nullptr;
  void* ctx = nullptr;
  alignas(64) std::atomic<int> done{0};
  int others = 0;
};

namespace {

thread_local Team* g_open = nullptr;

// Spins (a pause per check) while the wait is short, then yields the core: a machine with
// more threads than cores still lets the thread being waited for run.
template <class Ready>
void wait_until(Ready ready) {
  for (int spins = 0; !ready(); ++spins) {
    if (spins < (1 << 16)) {
#if defined(__x86_64__) || defined(__i386__)
      _mm_pause();
#endif
    } else {
      std::this_thread::yield();
    }
  }
}

}  // namespace

Team* open_team() { return g_open; }

void run_on_team(Team* team, void (*fn)(void*), void* ctx) {
  // The team runs one kernel at a time: a kernel's body does not post another.
  g_open = nullptr;
  team->fn = fn;
  team->ctx = ctx;
  team->done.store(0, std::memory_order_relaxed);
  team->posted.fetch_add(1, std::memory_order_release);
  fn(ctx);
  wait_until([&] { return team->done.load(std::memory_order_acquire) == team->others; });
  g_open = team;
}

}  // namespace team_detail

void run_in_team(const std::function<void()>& step) {
  using team_detail::Team;
  if (team_detail::g_open || omp_in_parallel() || omp_get_max_threads() == 1) {
    step();
    return;
  }
  Team team;
  std::exception_ptr error;
#pragma omp parallel
  {
    if (omp_get_thread_num() == 0) {
      team.others = omp_get_num_threads() - 1;
      team_detail::g_open = &team;
      try {
        step();
      } catch (...) {
        error = std::current_exception();
      }
      team_detail::g_open = nullptr;
      team.posted.store(Team::kClosed, std::memory_order_release);
    } else {
      for (uint64_t seen = 0;;) {
        uint64_t now = 0;
        team_detail::wait_until([&] { return (now = team.posted.load(std::memory_order_acquire)) != seen; });
        if (now == Team::kClosed) break;
        seen = now;
        team.fn(team.ctx);
        team.done.fetch_add(1, std::memory_order_release);
      }
    }
  }
  if (error) std::rethrow_exception(error);
}

bool team_takes_step(int64_t rows) {
#if defined(__AVX512F__)
  // More threads than cores would have waiting threads spin on the cores of working ones.
  return rows <= 4 && fast_kernels_active() && omp_get_max_threads() <= omp_get_num_procs();
#else
  (void)rows;
  return false;
#endif
}

}  // namespace subllm::kernels
