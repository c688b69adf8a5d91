"""MoE layer speed on CPU: forward + backward tokens/s of our MoE layer against (a) a dense MLP with the same
active parameters (equal FLOPs) and (b) a per-expert Python loop as in Hugging Face's Mixtral block, all three
measured side by side in one run on the same tokens.

Target: the MoE layer within 1.5x of the dense MLP's time, and faster than the loop.

    python benchmarks/moe_layer.py [--tokens 4096 --hidden 512 --ffn 2048 --repeats 5]
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from nemo_upcycle.models import GPTConfig
from nemo_upcycle.models.reference import MLP, MoELayer
from nemo_upcycle.report import markdown_table


class MixtralStyleLoop(torch.nn.Module):
    """Hugging Face MixtralSparseMoeBlock's dispatch: for each expert, gather its tokens with torch.where and
    index_add_ its output back. Shares the router and experts of `moe`."""

    def __init__(self, moe: MoELayer):
        super().__init__()
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.moe.router(x)
        out = torch.zeros_like(x)
        mask = F.one_hot(r.experts, num_classes=len(self.moe.experts.local_experts)).permute(2, 1, 0)
        for e, expert in enumerate(self.moe.experts.local_experts):
            slot, token = torch.where(mask[e])
            if token.numel():
                out.index_add_(0, token, expert(x[token]) * r.weights[token, slot, None])
        return out


def time_fwd_bwd(module: torch.nn.Module, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of one forward + backward."""
    grad = torch.randn_like(x)
    times = []
    for i in range(repeats + 1):
        x.grad = None
        module.zero_grad(set_to_none=True)
        t = time.perf_counter()
        module(x).backward(grad)
        if i:  # first call warms up
            times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per batch")
    p.add_argument("--hidden", type=int, default=512, help="hidden size H")
    p.add_argument("--ffn", type=int, default=2048, help="dense ffn_hidden_size F")
    p.add_argument("--activation", default="squared-relu")
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for e, g, t in [(8, 1, 2), (8, 8, 8)]:
        cfg = GPTConfig(num_layers=1, hidden_size=args.hidden, ffn_hidden_size=args.ffn, num_attention_heads=8,
                        vocab_size=8, activation=args.activation, num_moe_experts=e * g,
                        moe_ffn_hidden_size=args.ffn // g, moe_router_topk=t, moe_router_pre_softmax=True)
        moe = MoELayer(cfg)
        for prm in moe.parameters():
            torch.nn.init.normal_(prm, 0.0, 0.02)
        dense = MLP(cfg, cfg.expert_ffn_hidden_size * t)  # same active parameters as T experts
        x = torch.randn(args.tokens, args.hidden, requires_grad=True)
        t_dense = time_fwd_bwd(dense, x, args.repeats)
        t_moe = time_fwd_bwd(moe, x, args.repeats)
        t_loop = time_fwd_bwd(MixtralStyleLoop(moe), x, args.repeats)
        name = f"E{e}G{g}T{t}"
        rows.append([name, args.tokens / t_dense, args.tokens / t_moe, args.tokens / t_loop,
                     t_moe / t_dense, t_loop / t_moe,
                     "yes" if t_moe <= 1.5 * t_dense and t_moe < t_loop else "NO"])
    print(f"forward+backward, {args.tokens} tokens, H={args.hidden}, F={args.ffn}, {args.activation}, fp32, "
          f"{torch.get_num_threads()} threads\n")
    print(markdown_table(
        ["recipe", "dense MLP tok/s", "our MoE tok/s", "Mixtral-style loop tok/s", "MoE time / dense time",
         "loop time / MoE time", "target met (<=1.5x dense, faster than loop)"], rows))


if __name__ == "__main__":
    main()
