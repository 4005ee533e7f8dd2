"""Ray actors: the collector (one model replica) and the pool supervisor that keeps them busy."""
