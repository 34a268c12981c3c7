"""Calibration entry points given no text, or too little, say so (issue #12): naming ``texts=``
and what it accepts, instead of "got list"."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import compresskv
from compresskv import elitekv
from compresskv import projected as matryoshka
from compresskv.calibration import calibration_windows
from conftest import tiny_model
from tiny_tokenizer import prose, tiny_tokenizer

NO_TEXT = [[], (), "", "  \n", [""], None, torch.tensor([]), torch.zeros(0, 16, dtype=torch.long), [[]]]
ACCEPTED = ["tokenizer=", "token ids", "pathlib.Path"]


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", "sdpa")


def _entry_points(model):
    tok = tiny_tokenizer()
    return {
        "compresskv.calibrate": lambda texts: compresskv.calibrate(model, texts, tokenizer=tok, seq_len=16, progress=False),
        "matryoshka.calibrate": lambda texts: matryoshka.calibrate(model, texts, tokenizer=tok, seq_len=16, progress=False),
        "allocate_ranks": lambda texts: compresskv.allocate_ranks(
            model, _projections(model), texts, compression_ratio=0.5, tokenizer=tok, seq_len=16, progress=False),
        "train_projections": lambda texts: compresskv.train_projections(
            model, _projections(model), texts, tokenizer=tok, seq_len=16, steps=1, batch_size=1, progress=False),
        "elitekv.rank_frequencies": lambda texts: elitekv.rank_frequencies(
            model, texts, tokenizer=tok, seq_len=16, num_windows=1, progress=False),
        "calibration_windows": lambda texts: calibration_windows(texts, tokenizer=tok, seq_len=16),
    }


_PROJECTIONS = {}


def _projections(model):
    if id(model) not in _PROJECTIONS:
        ids = torch.randint(3, 90, (2, 32), generator=torch.Generator().manual_seed(0))
        _PROJECTIONS[id(model)] = compresskv.calibrate(model, ids, seq_len=16, progress=False)
    return _PROJECTIONS[id(model)]


@pytest.mark.parametrize("entry", ["compresskv.calibrate", "matryoshka.calibrate", "allocate_ranks",
                                   "train_projections", "elitekv.rank_frequencies", "calibration_windows"])
@pytest.mark.parametrize("texts", NO_TEXT, ids=repr)
def test_no_text_says_so(model, entry, texts):
    with pytest.raises(ValueError) as err:
        _entry_points(model)[entry](texts)
    message = str(err.value)
    assert "no calibration text was given" in message and "texts=" in message
    assert "got list" not in message and "got tuple" not in message
    for word in ACCEPTED:
        assert word in message


def test_too_short_for_one_window_says_how_much_is_needed(model):
    with pytest.raises(ValueError, match=r"too short: \d+ tokens give 0 windows of seq_len=512.*≥ 512 tokens.*lower seq_len"):
        compresskv.calibrate(model, "A short sentence.", tokenizer=tiny_tokenizer(), progress=False)


def test_many_short_texts_say_each_is_windowed_alone():
    # 600 tokens in all, but no text reaches one window: the message says why
    with pytest.raises(ValueError, match="each text is cut on its own and the longest has 30 tokens.*join the texts"):
        calibration_windows([list(range(30))] * 20, seq_len=64)


def test_a_file_path(tmp_path):
    tok = tiny_tokenizer()
    path = tmp_path / "calibration.txt"
    path.write_text(prose(50))
    from_file = calibration_windows(path, tokenizer=tok, seq_len=16)
    assert torch.equal(from_file, calibration_windows(prose(50), tokenizer=tok, seq_len=16))
    with pytest.raises(FileNotFoundError, match="no text file.*missing.txt"):
        calibration_windows(tmp_path / "missing.txt", tokenizer=tok, seq_len=16)
    # a str is the text itself; when it is too short and names a file, the message says how to read the file
    with pytest.raises(ValueError, match=r"names a file.*pathlib\.Path"):
        calibration_windows(str(path), tokenizer=tok, seq_len=512)


def test_one_list_of_token_ids_is_one_text():
    assert calibration_windows(list(range(10)), seq_len=5).tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


def test_mixed_list_names_the_wrong_item():
    with pytest.raises(ValueError, match=r"texts\[1\] is int"):
        calibration_windows(["some text", 3], tokenizer=tiny_tokenizer(), seq_len=4)


def test_pca_cache_given_no_text(model):
    with pytest.raises(ValueError, match="no calibration text was given"):
        compresskv.PCAKVCache(model, compression_ratio=0.5, texts=[], tokenizer=tiny_tokenizer())


def test_the_path_is_documented_where_texts_are():
    assert "pathlib.Path" in (calibration_windows.__doc__ or "")
    assert Path(compresskv.calibration.__file__).read_text().count("pathlib.Path") >= 2
