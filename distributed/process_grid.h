// The process grid dp x sp over the world communicator, and every group
// communicator of the run (after Megatron's parallel_state): nothing else
// splits communicators.
//
// Layout: sequence-parallel groups are consecutive ranks (on one host, on
// NVLink): world rank = dp_rank * sp + sp_rank. The sp group of a rank holds
// the sp ranks with its dp_rank (ordered by sp_rank); its dp group holds the
// dp ranks with its sp_rank (ordered by dp_rank), across which gradients of
// the same parameters and positions are summed.
#pragma once

#include <memory>

#include "distributed/communicator.h"

namespace reformer {

class ProcessGrid {
 public:
  // `world` must outlive the grid. dp == 0 means "auto": world.size() / sp.
  // Collective over `world` (it splits it twice). Throws ConfigError when
  // sp < 1, dp < 0, or dp * sp != world.size(), saying which layout would work.
  ProcessGrid(Communicator& world, int dp, int sp);

  Communicator& world() { return world_; }
  Communicator& sp_group() { return *sp_group_; }
  Communicator& dp_group() { return *dp_group_; }
  int dp() const { return dp_; }
  int sp() const { return sp_; }
  int dp_rank() const { return dp_rank_; }
  int sp_rank() const { return sp_rank_; }
  int world_rank() const { return world_.rank(); }

 private:
  Communicator& world_;
  int dp_ = 1, sp_ = 1, dp_rank_ = 0, sp_rank_ = 0;
  std::unique_ptr<Communicator> sp_group_;
  std::unique_ptr<Communicator> dp_group_;
};

}  // namespace reformer
