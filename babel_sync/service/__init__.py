"""``babel-sync serve``: the monitored sync service (job queue, JSON API, metrics)."""
