"""The ACE concept-erasure benchmark: a procedural image world, a toy text-to-image model, a classifier."""
