"""Our model, recipe and outputs against independent implementations (transformers, Megatron-core, lm-eval) and
the dense model at step 0."""
