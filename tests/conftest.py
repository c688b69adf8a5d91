"""Shared fixtures: small model configs, randomised weights, and one Megatron-core process group on CPU."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from nemo_upcycle.models import GPTConfig, GPTModel


def small_config(**overrides) -> GPTConfig:
    """A Nemotron-shaped toy: squared-ReLU, layernorm1p, RoPE on half the head, grouped-query attention."""
    values = dict(
        num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
        vocab_size=96, seq_length=32, rotary_percentage=0.5, activation="squared-relu",
        normalization="layernorm1p",
    )
    values.update(overrides)
    return GPTConfig(**values)


def random_model(cfg: GPTConfig, seed: int = 0, scale: float = 0.05) -> GPTModel:
    """A model whose every parameter (norms and biases included) is perturbed, so no weight is trivially 0/1."""
    torch.manual_seed(seed)
    model = GPTModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


def torchrun(args: list[str], nproc: int = 2, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m torch.distributed.run --nproc-per-node N ARGS` on a free port, outside this test's own group."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_PORT")}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
                           "--master-port", str(port), *args], capture_output=True, text=True,
                          env={**env, "PYTHONWARNINGS": "ignore"}, timeout=timeout)


@pytest.fixture(scope="session")
def megatron():
    """Megatron-core initialised once for the session: gloo group of one, TP=PP=EP=1, CPU shims applied."""
    from nemo_upcycle.compat import init_megatron

    init_megatron()
    import megatron.core

    return megatron.core


def assert_megatron_matches(cfg: GPTConfig, state_dict: dict, tokens: torch.Tensor, tol: float = 1e-5) -> torch.Tensor:
    """Build Megatron-core's GPTModel (local spec, CPU) with these weights and check its state-dict keys and logits
    against the reference model's; returns the reference logits."""
    from nemo_upcycle.models.megatron import build_megatron_gpt, load_reference_weights, megatron_forward

    megatron_model = build_megatron_gpt(cfg, use_te=False).eval()
    load_reference_weights(megatron_model, state_dict, cfg)
    ours = GPTModel(cfg).eval()
    ours.load_state_dict(state_dict)
    assert {k for k in megatron_model.state_dict() if not k.endswith("_extra_state")} == set(ours.state_dict())
    with torch.no_grad():
        logits = ours(tokens).logits
        diff = (megatron_forward(megatron_model, tokens) - logits).abs().max().item()
    assert diff < tol, f"reference vs Megatron-core: max abs logit diff {diff:.3e}"
    return logits
