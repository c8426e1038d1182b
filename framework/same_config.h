// Every rank of a job must run the same build with the same configuration: a
// rank started with another --set (or another binary) would otherwise train a
// different model and meet the others in collectives of the wrong size.
#pragma once

#include <string>

#include "distributed/communicator.h"
#include "framework/config.h"

namespace reformer {

// This build as text: "reformer <version> built <date> <time>".
std::string build_identity();

// Collective over world.host(): every rank compares its build identity and
// config_digest(cfg) with rank 0's. Returns when all agree. Otherwise every
// rank throws the same ConfigError naming the first rank that differs and
// the first differing key (or the two builds), e.g.
//   ranks run different configurations: rank 1 has model.d_model = 64, rank 0 has 128
void require_same_config(const Config& cfg, Communicator& world);

}  // namespace reformer
