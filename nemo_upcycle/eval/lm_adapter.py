"""Our models as an lm-evaluation-harness language model.

`ModelLM` needs only the call `model(tokens) -> obj.logits` (tokens (B, S) -> logits (B, S, V)), so the reference
GPTModel and a Megatron-backed module with the same call both work, and a tokenizer with `encode`, `decode`, `eod`
and `vocab_size` (plus `bos_id` when it has one).

Tokenisation, BOS and logits are those of lm-eval's Hugging Face model (HFLM) for the same tokenizer, so the two
report the same numbers for the same weights (tests/equivalence/test_eval_hflm_agreement.py checks it):
- `tok_encode` adds what the tokenizer adds by default (HFLM's `add_bos_token=None`: a Llama-style tokenizer
  prepends BOS, a GPT-2-style one adds nothing), unless the string already starts with the BOS text;
  `add_bos_token=True/False` overrides that, as lm-eval's `--model_args add_bos_token=...` does.
- `TemplateLM.loglikelihood` encodes context + continuation together and splits at the context boundary, moving
  trailing whitespace of the context into the continuation; an empty context is replaced by the prefix token (BOS,
  else end-of-document).
- Scoring: requests sorted longest first, right-padded into batches, inputs truncated from the left to
  `max_length`, requests sharing context + continuation[:-1] (the four letters of a multiple-choice question) served
  by one forward pass, and the log-softmax taken over every logit the model outputs: like HFLM, no cut to the
  tokenizer's size (Megatron's padded vocabulary rows, or an embedding larger than the tokenizer, count too).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from lm_eval import utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import Collator, maybe_truncate, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from nemo_upcycle.data.tokenizers import Tokenizer
from nemo_upcycle.errors import UpcycleError

# (request strings or None, context tokens, continuation tokens), as TemplateLM hands them over
TokenRequest = tuple[Any, list[int], list[int]]


class ModelLM(TemplateLM):
    """lm-eval's LM interface (loglikelihood, loglikelihood_rolling, generate_until) over `model(tokens).logits`."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, max_length: int, batch_size: int = 8,
                 max_gen_toks: int = 256, add_bos_token: bool | None = None):
        super().__init__()
        if max_length < 2 or batch_size < 1:
            raise UpcycleError(f"max_length {max_length} must be >= 2 and batch_size {batch_size} >= 1")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self.max_gen_toks = max_gen_toks
        self.add_bos_token = add_bos_token  # None: what the tokenizer adds by default (HFLM's default)
        self._device = next(model.parameters()).device

    # ---- tokens ----------------------------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eod

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_id", None)
        return self.tokenizer.eod if bos is None else bos

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """HFLM.tok_encode: an explicit flag wins, then add_bos_token, then the tokenizer's default; no special
        tokens for a string that already starts with the BOS text."""
        add = add_special_tokens if add_special_tokens is not None else self.add_bos_token
        if add_special_tokens is None:
            bos_text = self.tokenizer.decode([self.prefix_token_id])
            if bos_text and string.startswith(bos_text):
                add = False
        ids = self.tokenizer.encode(string, add_special_tokens=True if add is None else add)
        bos = getattr(self.tokenizer, "bos_id", None)
        if add and self.add_bos_token is not None and bos is not None:
            # HFLM builds its tokenizer with add_bos_token set: special tokens then include BOS, or leave it out,
            # whatever the tokenizer's own default
            ids = ids[1:] if ids[:1] == [bos] else ids
            ids = [bos] + ids if self.add_bos_token else ids
        return ids

    def _log_probs(self, inputs: Sequence[list[int]], keep: Sequence[int]) -> list[torch.Tensor]:
        """One forward pass over right-padded inputs; float32 log-probs of the last keep[i] positions of input i.

        Only the kept positions go through the softmax and to the CPU: a full (B, S, V) float32 copy would be tens
        of GB for a 256k vocabulary.
        """
        width = max(len(ids) for ids in inputs)
        tokens = torch.full((len(inputs), width), self.eot_token_id, dtype=torch.long)
        for row, ids in enumerate(inputs):
            tokens[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        with torch.inference_mode():
            logits = self.model(tokens.to(self.device)).logits  # (B, S, V), every row the model has, as HFLM
            kept = [logits[row, len(ids) - k : len(ids)] for row, (ids, k) in enumerate(zip(inputs, keep))]
            return [x.float().log_softmax(dim=-1).cpu() for x in kept]

    # ---- scoring ---------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        """(log P(continuation | context), whether greedy decoding gives the continuation) per request."""
        for _, _, continuation in requests:
            if not 0 < len(continuation) <= self.max_length:
                raise UpcycleError(f"a continuation of {len(continuation)} tokens cannot be scored: it must have "
                                   f"1 to max_length ({self.max_length}) tokens")
        collator = Collator(requests, sort_fn=lambda r: (-len(r[1] + r[2]), tuple(r[1] + r[2])),
                            group_by="contexts", group_fn=lambda r: r[1] + r[2][:-1])
        results = []
        progress = tqdm(total=len(requests), disable=disable_tqdm, desc="Running loglikelihood requests")
        for chunk in collator.get_batched(n=self.batch_size):
            # the model sees (context + continuation)[:-1], at most max_length tokens, cut from the left
            inputs = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
            # a group's representative has its longest continuation, so its positions cover every member's
            log_probs = self._log_probs(inputs, keep=[len(cont) for _, _, cont in chunk])
            for (strings, ctx, cont), lp in zip(chunk, log_probs):
                for member_strings, member_cont, member_lp in collator.get_cache(
                        req_str=strings, cxt_toks=ctx, cont_toks=cont, logits=lp[None]):
                    target = torch.tensor(member_cont)
                    scored = member_lp[0, -len(target):]  # (len(target), V): the positions predicting it
                    answer = (scored.gather(-1, target[:, None]).sum().item(),
                              bool((scored.argmax(dim=-1) == target).all()))
                    results.append(answer)
                    progress.update(1)
                    if member_strings is not None:  # rolling windows carry None; totals are cached per document
                        self.cache_hook.add_partial("loglikelihood", member_strings, answer)
        progress.close()
        return collator.get_original(results)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole documents, in disjoint windows of max_length, each token predicted once."""
        windows, owners = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for index, (log_prob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[index] += log_prob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ------------------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, stopped at the first `until` string, end-of-document or `max_gen_toks`."""
        collator = Collator([req.args for req in requests], sort_fn=lambda a: (-len(self.tok_encode(a[0])), a[0]),
                            group_by="gen_kwargs", group_fn=lambda a: a[1])
        results = []
        for chunk in collator.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(all_kwargs[0], self.max_gen_toks)
            if kwargs["do_sample"]:
                raise UpcycleError(f"a task asks for sampled generation ({kwargs}): only greedy generation is "
                                   f"supported, evaluate a task that generates with do_sample false")
            until = [stop for stop in kwargs["until"] if stop]
            # as HFLM: keep the generation budget, cut the context from the left to make room for it
            budget = min(kwargs["max_gen_toks"], self.max_length - 1)
            prompts = [maybe_truncate(self.tok_encode(c) or [self.prefix_token_id], budget, self.max_length)
                       for c in contexts]
            for context, text in zip(contexts, self._greedy(prompts, until)):
                text = postprocess_generated_text(text, until, think_end_token=None)
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, all_kwargs[0]), text)
        return collator.get_original(results)

    def _greedy(self, prompts: list[tuple[list[int], int]], until: list[str]) -> list[str]:
        """Decode each (prompt, max new tokens) greedily; every step re-runs the unfinished rows (no KV cache)."""
        sequences = [list(prompt) for prompt, _ in prompts]
        generated: list[list[int]] = [[] for _ in prompts]
        active = [row for row, (_, budget) in enumerate(prompts) if budget > 0]
        while active:
            last = self._log_probs([sequences[row] for row in active], keep=[1] * len(active))
            still = []
            for row, log_probs in zip(active, last):
                token = int(log_probs.argmax())
                if token == self.eot_token_id:
                    continue
                sequences[row].append(token)
                generated[row].append(token)
                text = self.tokenizer.decode(generated[row])
                if len(generated[row]) < prompts[row][1] and not any(stop in text for stop in until):
                    still.append(row)
            active = still
        return [self.tokenizer.decode(ids) for ids in generated]

    def get_model_info(self) -> dict[str, Any]:
        """Recorded in lm-eval's results JSON under `config`."""
        return {"model_num_parameters": sum(p.numel() for p in self.model.parameters()),
                "model_dtype": str(next(self.model.parameters()).dtype), "max_length": self.max_length,
                "add_bos_token": self.add_bos_token}
