"""ckpt: torch.distributed.checkpoint storage plugin with node-aware write placement."""
