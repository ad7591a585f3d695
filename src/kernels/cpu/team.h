// One team of threads through a decoding step. A decoded token runs about 80 parallel kernels
// (its matrix-vector products and attention), each a few to a hundred microseconds; opening
// and closing an OpenMP parallel region for each costs 3.5 µs on a virtual machine whose cores
// see each other's writes 0.3 µs late, a barrier 1.6 µs. Inside run_in_team the threads stay
// in one region for the whole step: the calling thread runs the step and hands each parallel
// kernel to the others through one shared word, which they watch between kernels (about
// 1 µs a kernel).
#pragma once

#include <omp.h>

#include <type_traits>

namespace subllm::kernels {

namespace team_detail {
// The team open on this thread, while it runs a step in run_in_team (nullptr otherwise).
struct Team;
Team* open_team();
// Runs fn(ctx) on every thread of the team, the calling thread included; returns once all are
// done.
void run_on_team(Team* team, void (*fn)(void*), void* ctx);
}  // namespace team_detail

// body() on every thread of the current team (the step's team inside run_in_team; a new
// parallel region otherwise). body may use omp_get_thread_num(), omp_get_num_threads() and
// worksharing (omp for) as in a parallel region: the step's threads are one.
template <class Body>
void parallel(Body&& body) {
  if (team_detail::Team* team = team_detail::open_team()) {
    using B = std::remove_reference_t<Body>;
    team_detail::run_on_team(team, [](void* b) { (*static_cast<B*>(b))(); }, (void*)&body);
    return;
  }
#pragma omp parallel
  body();
}

}  // namespace subllm::kernels
