"""ScanFormer in JAX/Flax: referring expression comprehension by iterative scanning."""
