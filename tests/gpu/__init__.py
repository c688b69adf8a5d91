"""What needs a GPU or a serving engine (-m gpu, -m engines); on CPU they run up to the first GPU-only step."""
