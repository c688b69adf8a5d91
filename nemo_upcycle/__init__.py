"""nemo-upcycle: turn a dense GPT checkpoint into a Mixture-of-Experts model with NVIDIA's upcycling recipe.

Packages, one per concept (imports flow downward):
    recipe/      the upcycling maths on tensors: config, expert construction, weight scaling, router init
    models/      the reference PyTorch GPT (dense and MoE) and its Megatron-core twin
    cli/         the command line: all argument parsing, one module per command
"""

__version__ = "0.1.0"
