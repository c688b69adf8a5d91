"""Continued training: the NeMo model class (nemo_model.py), the Lightning/NeMo run (run.py) and MoE monitoring
callbacks (callbacks.py)."""
