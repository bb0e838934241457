"""bench.quality's scarce-data scenario (--train-subjects) and named docs sections (--section), without training."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bench import quality
from common.data.splits import split_subjects


@pytest.mark.parametrize("train", [1, 2, 3, 8])
def test_train_subjects_keeps_the_validation_and_test_subjects_and_trains_on_n(train: int) -> None:
    args = quality.parse_args(["--train-subjects", str(train)])
    ids = [f"subject-{i}" for i in range(args.subjects)]
    split = split_subjects(ids, 0, args.val_fraction, args.test_fraction)
    # --subjects 20 at val 0.2 / test 0.4 gives 4 validation and 8 test subjects: kept; training gets `train`.
    assert {k: len(v) for k, v in split.items()} == {"test": 8, "val": 4, "train": train}


def test_train_subjects_below_one_is_refused_naming_the_option(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        quality.parse_args(["--train-subjects", "0"])
    assert "--train-subjects must be >= 1, got 0" in capsys.readouterr().err


def test_a_named_section_is_rewritten_and_the_main_one_left_alone(tmp_path: Path) -> None:
    doc = tmp_path / "BENCHMARKS.md"
    begin, end = quality.doc_markers("scarce")
    doc.write_text(
        f"top\n{quality.DOC_BEGIN}\nmain numbers\n{quality.DOC_END}\nmiddle\n{begin}\nold\n{end}\nbottom\n",
        encoding="utf-8",
    )
    quality.write_docs(doc, "new scarce numbers", "scarce")
    assert doc.read_text(encoding="utf-8") == (
        f"top\n{quality.DOC_BEGIN}\nmain numbers\n{quality.DOC_END}\nmiddle\n{begin}\nnew scarce numbers\n{end}\nbottom\n"
    )
    with pytest.raises(SystemExit, match=re.escape("no '<!-- bench.quality other: begin -->'")):
        quality.write_docs(doc, "x", "other")
