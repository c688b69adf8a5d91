"""Continued training: the Lightning/NeMo run (run.py) and MoE monitoring callbacks (callbacks.py)."""
