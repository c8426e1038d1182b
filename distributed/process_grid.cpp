#include "distributed/process_grid.h"

#include <string>

#include "kernels/errors.h"

namespace reformer {

namespace {

// "1, 2, 4": the sequence-parallel sizes that divide `world`.
std::string divisors(int world) {
  std::string s;
  for (int d = 1; d <= world; ++d)
    if (world % d == 0) s += (s.empty() ? "" : ", ") + std::to_string(d);
  return s;
}

}  // namespace

ProcessGrid::ProcessGrid(Communicator& world, int dp, int sp) : world_(world), sp_(sp) {
  const int n = world.size();
  const std::string procs = std::to_string(n) + (n == 1 ? " process" : " processes");
  if (sp < 1 || n % sp != 0)
    throw ConfigError("parallel.sp " + std::to_string(sp) + " does not divide " + procs +
                      "; use one of " + divisors(n));
  if (dp < 0)
    throw ConfigError("parallel.dp " + std::to_string(dp) + " is negative; use " +
                      std::to_string(n / sp) + " (or dp: auto)");
  dp_ = dp == 0 ? n / sp : dp;
  if (int64_t(dp_) * sp != n)
    throw ConfigError("parallel.dp " + std::to_string(dp_) + " x parallel.sp " + std::to_string(sp) +
                      " = " + std::to_string(int64_t(dp_) * sp) + " != " + procs + "; with sp " +
                      std::to_string(sp) + " use dp " + std::to_string(n / sp) + " (or dp: auto)");
  dp_rank_ = world.rank() / sp;
  sp_rank_ = world.rank() % sp;
  sp_group_ = world.split(/*color*/ dp_rank_, /*key*/ sp_rank_);
  dp_group_ = world.split(/*color*/ sp_rank_, /*key*/ dp_rank_);
}

}  // namespace reformer
