"""The format registry: every path is claimed by at most one reader (in any order), and each writer names what
it cannot represent before anything is read."""

from __future__ import annotations

import pytest

from nemo_upcycle.checkpoint import READERS, WRITERS, WriteOptions, detect_format, make_writer
from nemo_upcycle.errors import UpcycleError
from tests.conftest import small_config


def _layouts(root):
    """One folder or file per format as the readers recognise them; a Megatron folder written by this
    project also holds a model_config.yaml, a .nemo tar is any file but a .gguf one."""
    (root / "megatron").mkdir()
    (root / "megatron" / "latest_checkpointed_iteration.txt").write_text("0")
    (root / "megatron" / "model_config.yaml").write_text("{}")
    (root / "nemo").mkdir()
    (root / "nemo" / "model_config.yaml").write_text("{}")
    (root / "hf").mkdir()
    (root / "hf" / "config.json").write_text("{}")
    (root / "model.nemo").write_bytes(b"")
    (root / "model.GGUF").write_bytes(b"")
    return {"megatron": "megatron", "nemo": "nemo", "hf": "hf", "model.nemo": "nemo", "model.GGUF": "gguf"}


def test_each_layout_is_detected_by_exactly_one_reader(tmp_path):
    for entry, fmt in _layouts(tmp_path).items():
        claims = [name for name, reader in READERS.items() if reader.detect(tmp_path / entry)]
        assert claims == [fmt], entry
        assert detect_format(tmp_path / entry) == fmt
    (tmp_path / "empty").mkdir()
    with pytest.raises(UpcycleError, match="pass --input-format"):
        detect_format(tmp_path / "empty")


def test_writers_name_what_they_cannot_represent(tmp_path):
    assert list(WRITERS) == ["nemo", "megatron", "hf"]
    llama3 = small_config(activation="swiglu", normalization="rmsnorm", rope_scaling_type="llama3",
                          rope_scaling_factor=32.0, rope_original_max_position_embeddings=8192,
                          rope_low_freq_factor=1.0, rope_high_freq_factor=4.0)
    assert "factor 8 only" in make_writer(tmp_path / "a", WriteOptions("nemo")).problem(llama3)
    assert make_writer(tmp_path / "a", WriteOptions("megatron")).problem(llama3) is None
    assert "no flag for activation 'geglu'" in make_writer(tmp_path / "a", WriteOptions("megatron")).problem(
        small_config(activation="geglu"))
    assert make_writer(tmp_path / "a", WriteOptions("nemo")).problem(small_config()) is None
    for fmt in ("nemo", "megatron"):
        with pytest.raises(UpcycleError, match="target_engine is for output_format=hf exports"):
            make_writer(tmp_path / "a", WriteOptions(fmt, target_engine="vllm"))
    with pytest.raises(UpcycleError, match="output_format=hf needs hf_arch"):
        make_writer(tmp_path / "a", WriteOptions("hf"))
    assert not (tmp_path / "a").exists()  # making a writer writes nothing
