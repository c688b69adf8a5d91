"""The lm-eval adapter against hand computations on a tiny GPT: loglikelihood (batched, padded, truncated),
rolling loglikelihood and greedy generation."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lm_eval.api.instance import Instance

from nemo_upcycle.data.tokenizers import ByteTokenizer
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.eval.lm_adapter import ModelLM
from tests.conftest import random_model, small_config

TOK = ByteTokenizer()
MAX_LEN = 24


@pytest.fixture(scope="module")
def gpt():
    # the output layer is padded past the tokenizer's 257 ids, as Megatron pads it: like lm-eval's HFLM, the
    # softmax covers every row (no cut to the tokenizer's size)
    return random_model(small_config(vocab_size=320, seq_length=MAX_LEN), scale=0.5)


def requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args)]


def log_probs(model, ids: list[int]) -> torch.Tensor:
    """Log-softmax over all the model's logits of one unpadded sequence, no batching."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def reference_loglikelihood(model, context: str, continuation: str) -> tuple[float, bool]:
    if context:  # trailing whitespace of the context is scored as part of the continuation
        split = len(TOK.encode(context.rstrip()))
        whole = TOK.encode(context + continuation)
    else:  # an empty context is the end-of-document token
        split, whole = 1, [TOK.eod] + TOK.encode(continuation)
    target = whole[split:]
    lp = log_probs(model, whole[:-1][-MAX_LEN:])[-len(target):]
    return lp[range(len(target)), target].sum().item(), lp.argmax(-1).tolist() == target


def test_loglikelihood_equals_log_softmax_by_hand(gpt):
    question = "Q: what is 2+2?\nA. 3\nB. 4\nAnswer:"
    args = [(question, " A"), (question, " B"), ("The cat sat on the ", "mat"), ("", "hello"),
            ("x" * 40 + " and then", " cut from the left"), ("Short", "!"),
            ("A context whose continuation is long", " " + "y" * 20)]
    lm = ModelLM(gpt, TOK, max_length=MAX_LEN, batch_size=3)
    got = lm.loglikelihood(requests("loglikelihood", args))
    for (context, continuation), (ll, greedy) in zip(args, got):
        want_ll, want_greedy = reference_loglikelihood(gpt, context, continuation)
        assert ll == pytest.approx(want_ll, abs=1e-4), (context, continuation)
        assert greedy == want_greedy
    assert got[0][0] != pytest.approx(got[1][0])  # same context, different letters, one forward pass
    with pytest.raises(UpcycleError, match="continuation of 25 tokens"):
        lm.loglikelihood(requests("loglikelihood", [("context", "z" * 25)]))


def test_loglikelihood_rolling_scores_every_token_once(gpt):
    texts = ["def f(x):\n    return x * 2  # doubles its argument, for the rolling windows", "tiny"]
    lm = ModelLM(gpt, TOK, max_length=MAX_LEN, batch_size=2)
    got = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(t,) for t in texts]))
    for text, total in zip(texts, got):
        ids = TOK.encode(text)
        prefixed = [TOK.eod] + ids  # prefixed[i] is the token before ids[i]
        want = 0.0
        for start in range(0, len(ids), MAX_LEN):  # each block predicted with up to MAX_LEN tokens of context
            end = min(start + MAX_LEN, len(ids))
            lp = log_probs(gpt, prefixed[max(0, end - MAX_LEN): end])[-(end - start):]
            want += lp[range(end - start), ids[start:end]].sum().item()
        assert total == pytest.approx(want, abs=1e-3)


class NextByte(torch.nn.Module):
    """Predicts byte b + 1 after byte b, and end-of-document after "z": greedy decoding spells the alphabet."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))  # the adapter finds the device through the parameters

    def forward(self, tokens: torch.Tensor) -> SimpleNamespace:
        following = torch.where(tokens == ord("z"), TOK.eod, tokens + 1)
        return SimpleNamespace(logits=torch.nn.functional.one_hot(following, TOK.vocab_size).float() * 10)


def test_generate_until_stops_on_strings_limits_and_eod():
    lm = ModelLM(NextByte(), TOK, max_length=MAX_LEN, batch_size=2)
    args = [("abc", {"until": ["g"], "max_gen_toks": 10}), ("pq", {"until": ["\n"], "max_gen_toks": 3}),
            ("012", {"until": ["6", "5"], "max_gen_toks": 10}), ("vw", {"until": [], "max_gen_toks": 10})]
    assert lm.generate_until(requests("generate_until", args)) == ["def", "rst", "34", "xyz"]


def test_generate_until_equals_greedy_loop_by_hand(gpt):
    contexts = ["Once upon a time", "x", "The quick brown fox jumps"]
    lm = ModelLM(gpt, TOK, max_length=MAX_LEN, batch_size=2)
    got = lm.generate_until(requests("generate_until", [(c, {"until": [], "max_gen_toks": 5}) for c in contexts]))
    for context, text in zip(contexts, got):
        ids, new = TOK.encode(context)[-(MAX_LEN - 5):], []  # context cut to leave room for 5 new tokens
        while len(new) < 5 and (token := int(log_probs(gpt, ids)[-1].argmax())) != TOK.eod:
            ids, new = ids + [token], new + [token]
        assert text == TOK.decode(new)
