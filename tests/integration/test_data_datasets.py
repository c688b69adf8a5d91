"""Megatron-core GPT datasets built from preprocessed files, in one process without torch.distributed:
windows of seq_length tokens with labels shifted by one, document-level train/valid/test splits, the same
samples for the same seed, and a two-prefix blend drawing in the requested ratio."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from nemo_upcycle.data.corpus import stdlib_files
from nemo_upcycle.data.datasets import build_gpt_datasets, parse_blend
from nemo_upcycle.data.preprocess import preprocess
from nemo_upcycle.data.tokenizers import ByteTokenizer
from nemo_upcycle.errors import UpcycleError
from tests.unit.test_data_tokenizers import assert_one_line_error

TOK = ByteTokenizer()
SEQ = 64


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[str, list[str]]:
    """50 real stdlib files, preprocessed with byte tokens; returns the prefix and the documents' texts."""
    folder = tmp_path_factory.mktemp("data")
    files = [p for p in stdlib_files() if 1_000 < p.stat().st_size < 8_000][:50]
    preprocess(files, folder / "stdlib", TOK, progress=False)
    return str(folder / "stdlib_text_document"), [p.read_text(encoding="utf-8") for p in files]


@pytest.fixture(scope="module")
def two_corpora(tmp_path_factory) -> list[str]:
    """Two jsonl corpora told apart by their one letter: 40 documents of 'a's, 40 of 'b's."""
    folder = tmp_path_factory.mktemp("blend")
    prefixes = []
    for letter in "ab":
        path = folder / f"{letter}.jsonl"
        path.write_text("".join(json.dumps({"text": letter * (100 + 7 * i)}) + "\n" for i in range(40)))
        preprocess([path], folder / letter, TOK, progress=False)
        prefixes.append(str(folder / f"{letter}_text_document"))
    return prefixes


def test_samples_are_shifted_windows_of_documents(corpus, tmp_path):
    prefix, texts = corpus
    docs = [t.encode() for t in texts]
    splits = build_gpt_datasets(prefix, TOK, SEQ, split="8,1,1", num_samples=(200, 20, 20), seed=3,
                                cache_dir=tmp_path)
    for i in range(0, 200, 13):
        item = splits.train[i]
        assert set(item) == {"tokens", "labels", "loss_mask", "position_ids"}
        assert item["tokens"].shape == (SEQ,) and torch.equal(item["tokens"][1:], item["labels"][:-1])
        assert torch.equal(item["position_ids"], torch.arange(SEQ)) and bool((item["loss_mask"] == 1).all())
        window = torch.cat([item["tokens"], item["labels"][-1:]]).tolist()
        chunks = [bytes(c) for c in _split_at(window, TOK.eod)]
        assert all(any(c in doc for doc in docs) for c in chunks)  # contiguous bytes of real documents
        assert all(c in docs for c in chunks[1:-1])  # whole documents between two EODs
    batch = next(iter(torch.utils.data.DataLoader(splits.train, batch_size=8)))
    assert batch["tokens"].shape == (8, SEQ) and batch["labels"].dtype == torch.int64


def _split_at(ids: list[int], separator: int) -> list[list[int]]:
    chunks: list[list[int]] = [[]]
    for i in ids:
        if i == separator:
            chunks.append([])
        else:
            chunks[-1].append(i)
    return chunks


def test_split_is_by_document_and_sizes_are_met(corpus, tmp_path):
    prefix, texts = corpus
    splits = build_gpt_datasets(prefix, TOK, SEQ, split="8,1,1", num_samples=(3000, 50, None), seed=3,
                                cache_dir=tmp_path)
    assert [d.indices.tolist() for d in splits] == [list(range(40)), list(range(40, 45)), list(range(45, 50))]
    assert len(splits.train) >= 3000 and len(splits.valid) >= 50  # more than one epoch: Megatron repeats
    test_tokens = sum(len(texts[i].encode()) + 1 for i in range(45, 50))
    assert len(splits.test) == (test_tokens - 1) // SEQ  # None: exactly one epoch
    train_only = build_gpt_datasets(prefix, TOK, SEQ, split="1,0,0", num_samples=(10, None, None), cache_dir=tmp_path)
    assert train_only.valid is None and train_only.test is None


def test_same_seed_same_samples(corpus, tmp_path):
    prefix, _ = corpus

    def first_tokens(seed: int, cache: str) -> torch.Tensor:
        train = build_gpt_datasets(prefix, TOK, SEQ, split="8,1,1", num_samples=(100, 10, 10), seed=seed,
                                   cache_dir=tmp_path / cache).train
        return torch.stack([train[i]["tokens"] for i in range(20)])

    assert torch.equal(first_tokens(5, "one"), first_tokens(5, "two"))  # two caches: built twice, not loaded
    assert not torch.equal(first_tokens(5, "one"), first_tokens(6, "one"))


def test_blend_draws_in_the_given_ratio(two_corpora, tmp_path):
    a, b = two_corpora
    splits = build_gpt_datasets(["0.7", a, "0.3", b], TOK, 32, split="1", num_samples=(400, 0, 0), seed=1,
                                cache_dir=tmp_path)
    assert len(splits.train) == 400
    letters = [chr(int(splits.train[i]["tokens"][0])) for i in range(400)]
    assert set(letters) <= {"a", "b", chr(TOK.eod)}
    share_a = letters.count("a") / (letters.count("a") + letters.count("b"))
    assert 0.65 < share_a < 0.75
    unweighted = build_gpt_datasets([a, b], TOK, 32, split="1", num_samples=(100, 0, 0), cache_dir=tmp_path)
    assert len(unweighted.train) == 100


def test_cache_lives_in_cache_dir_and_follows_the_data(corpus, tmp_path):
    prefix, _ = corpus
    build_gpt_datasets(prefix, TOK, SEQ, split="8,1,1", num_samples=(10, 10, 10), cache_dir=tmp_path / "c")
    first = {p.parent.name for p in (tmp_path / "c").rglob("*.npy")}
    assert len(first) == 1
    default = Path(prefix).parent / "index_cache"
    build_gpt_datasets(prefix, TOK, SEQ, split="8,1,1", num_samples=(10, 10, 10))
    assert list(default.rglob("*-GPTDataset-train-shuffle_index.npy"))
    copy = tmp_path / "copy_text_document"  # same prefix name written again: new fingerprint, fresh indices
    for suffix in (".bin", ".idx"):
        Path(str(copy) + suffix).write_bytes(Path(prefix + suffix).read_bytes())
    build_gpt_datasets(str(copy), TOK, SEQ, split="8,1,1", num_samples=(10, 10, 10), cache_dir=tmp_path / "c")
    assert len({p.parent.name for p in (tmp_path / "c").rglob("*.npy")}) == 2


def test_parse_blend_forms(two_corpora):
    a, b = two_corpora
    assert parse_blend(["0.7", a, "0.3", b]) == ([a, b], [0.7, 0.3])
    assert parse_blend([a, b]) == ([a, b], None)
    assert parse_blend(f"3 {a} 1 {b}") == ([a, b], [3.0, 1.0])
    assert parse_blend(a) == ([a], None)


def test_bad_arguments_are_one_line_errors(corpus, tmp_path):
    prefix, _ = corpus
    cases = [
        (dict(blend=str(tmp_path / "nope")), ["nope.bin and", "nemo-upcycle preprocess"]),
        (dict(blend=[]), ["the data blend is empty"]),
        (dict(blend=["1", prefix, "0", prefix]), ["must all be positive"]),
        (dict(blend=prefix, split="80/20"), ["split '80/20'"]),
        (dict(blend=["1", prefix, "1", prefix]), ["a weighted blend needs a sample count for every split"]),
        (dict(blend=prefix, num_samples=(10, 10)), ["must be three counts"]),
        (dict(blend=prefix, split="949,50,1", num_samples=(10, 10, 10)),  # Megatron would loop forever
         ["gives the test split none of the 50 documents", "ask for 0 test samples"]),
    ]
    for kwargs, fragments in cases:
        kwargs = dict(dict(tokenizer=TOK, seq_length=SEQ, cache_dir=tmp_path), **kwargs)
        with pytest.raises(UpcycleError) as excinfo:
            build_gpt_datasets(**kwargs)
        assert_one_line_error(excinfo, *fragments)


def test_megatron_order_sampler_splits_global_batches_and_resumes():
    """Each global batch holds the same consecutive samples for any data-parallel size, ranks never overlap,
    and a resumed sampler starts after the consumed samples."""
    from nemo_upcycle.data.datasets import MegatronOrderSampler

    assert list(MegatronOrderSampler(10)) == list(range(10))
    ranks = [list(MegatronOrderSampler(11, 2, r)) for r in (0, 1)]
    assert ranks == [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]  # equal shares; the odd sample out is dropped
    consumed = {"n": 0}
    resumed = MegatronOrderSampler(10, 2, 1, lambda: consumed["n"])
    consumed["n"] = 6  # read when iteration starts, i.e. after Lightning restored the step count
    assert list(resumed) == [7, 9] and len(resumed) == 2
