"""Data: real text available offline (CPython's standard library), tokenizers, Megatron datasets."""
