"""Whole paths end to end: files in, files out, loaded back by the tools that use them; bad inputs; training."""
