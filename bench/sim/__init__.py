"""Simulations of babel_sync, pcache and ckpt at scales past one machine (issue 9)."""
