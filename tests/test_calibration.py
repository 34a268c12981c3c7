"""Calibration inputs and artifacts."""

from __future__ import annotations

import pytest
import torch

from compresskv.calibration import Artifact, calibration_windows, config_hash
from conftest import tiny_model


class _Tok:
    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) % 90 + 3 for c in text]}


def test_windows_from_strings_ids_and_lists():
    w = calibration_windows(["a" * 25, "b" * 9], tokenizer=_Tok(), seq_len=8)
    assert w.shape == (4, 8)  # 3 windows from the first text, 1 from the second, remainders dropped
    assert torch.equal(calibration_windows(torch.arange(20), seq_len=5), torch.arange(20).view(4, 5))
    assert calibration_windows([[1, 2, 3, 4], [5, 6]], seq_len=2).tolist() == [[1, 2], [3, 4], [5, 6]]
    assert calibration_windows(torch.arange(40).view(2, 20), seq_len=10, max_windows=3).shape == (3, 10)


def test_windows_errors():
    with pytest.raises(ValueError, match="tokenizer="):
        calibration_windows(["text"], seq_len=4)
    with pytest.raises(ValueError, match="too short.*seq_len=64"):
        calibration_windows(torch.arange(100), seq_len=64, min_windows=2)
    with pytest.raises(ValueError, match="seq_len"):
        calibration_windows(torch.arange(100), seq_len=1)


def test_artifact_roundtrip_and_model_check(tmp_path):
    model = tiny_model("llama", "sdpa")
    other = tiny_model("llama", "sdpa", layers=2)
    art = Artifact({"u": torch.randn(3, 4)}, {"seq_len": 8}, "tiny", config_hash(model))
    art.save_pretrained(tmp_path / "a")
    back = Artifact.from_pretrained(tmp_path / "a", model)
    assert torch.equal(back.tensors["u"], art.tensors["u"]) and back.options == {"seq_len": 8}
    with pytest.raises(ValueError, match="config hash"):
        Artifact.from_pretrained(tmp_path / "a", other)
    assert config_hash(model) == config_hash(tiny_model("llama", "sdpa", seed=5))
