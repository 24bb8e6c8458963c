"""Layer 1 adapters: task and environment libraries of the ecosystem as data, rewards and environments."""
