"""pcache: the node cache (workers, worker selection, client, FUSE mount)."""
