"""Pictures of what the scan did: the per-sample scan picture and the eval gallery."""
