"""Data: real text available offline (corpus: CPython's stdlib), tokenizers (byte, SentencePiece, Hugging Face,
a .nemo file's own), preprocessing (text -> Megatron .bin/.idx) and Megatron-core GPT datasets."""
