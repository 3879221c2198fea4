"""The real-text corpus (core.corpus) and the next-token figures measured on it (core.metrics)."""

from __future__ import annotations

import numpy as np
import pytest

from prism_deploy.cli.main import main
from prism_deploy.core import corpus, tolerances
from prism_deploy.core.errors import PrismInputError
from prism_deploy.core.metrics import next_token_quality, perplexity


def test_default_corpus_is_prose_split_the_same_way_every_time():
    a, b = corpus.default(), corpus.default()
    assert a == b and a.sha256 == b.sha256
    assert len(a.calibration) > 500 and len(a.held_out) > 20
    assert not set(a.calibration) & set(a.held_out)
    every = a.calibration + a.held_out
    assert not any(p.startswith(">>>") or "\n" in p for p in every)
    assert all(p.endswith((".", ":")) and len(p.split()) >= 8 for p in every)
    assert a.text("held_out").count("\n\n") == len(a.held_out) - 1


def test_a_users_text_holds_out_every_fifth_paragraph(tmp_path):
    f = tmp_path / "mine.txt"
    f.write_text("\n\n".join(f"Paragraph number {i} has\nseveral words." for i in range(10)))
    c = corpus.load(f)
    assert c.name == "mine.txt"
    assert c.held_out == ("Paragraph number 4 has several words.", "Paragraph number 9 has several words.")
    assert len(c.calibration) == 8
    lines = tmp_path / "lines.txt"
    lines.write_text("one text\nanother text\n")  # no blank lines: one text per line
    assert corpus.load(lines).calibration == ("one text", "another text")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(PrismInputError, match="latin1.txt: not UTF-8"):
        corpus.load(bad)
    with pytest.raises(PrismInputError, match="absent.txt: no such text file"):
        corpus.load(tmp_path / "absent.txt")


def test_token_windows_are_consecutive_and_full():
    class Chars:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [ord(c) for c in text]}

    w = corpus.token_windows(Chars(), "abcdefghij", 3, 5)
    assert w == [[97, 98, 99], [100, 101, 102], [103, 104, 105]]


def test_next_token_figures():
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, size=(2, 9))
    logits = [rng.normal(size=(9, 50)) for _ in range(2)]
    same = next_token_quality(logits, logits, list(ids))
    assert same["agreement"] == 1.0 and same["perplexity_ratio"] == pytest.approx(1.0)
    assert same["tokens"] == 18
    # a uniform guess has the vocabulary's perplexity
    assert perplexity(np.zeros((9, 50)), ids[0]) == pytest.approx(50.0)
    flat = next_token_quality([np.zeros((9, 50))] * 2, logits, list(ids))
    assert flat["perplexity"] == pytest.approx(50.0) and flat["agreement"] < 0.2
    bad = tolerances.real_text("int8").failures({"rel_l2": 0.0, "agreement": 0.5, "perplexity_ratio": 1.5})
    assert any("agreement" in b for b in bad) and any("perplexity ratio" in b for b in bad)


def test_export_model_text_that_cannot_be_read_is_one_line(zoo, tmp_path, capsys):
    code = main(
        [
            "export-model",
            str(zoo["llama"]),
            "--role",
            "last",
            "-o",
            str(tmp_path / "out"),
            "--text",
            str(tmp_path / "absent.txt"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "absent.txt" in err
    assert not (tmp_path / "out").exists()
