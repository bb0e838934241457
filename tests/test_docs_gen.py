"""The docs' lists of strategies, models, baselines, mask patterns and losses are the registries' own."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common import docs_gen, registry
from common.docs_gen import DOCS, PYPROJECT, DocsError, render_markdown, stale, write

ROOT = Path(__file__).resolve().parent.parent


def _copy_tree(tmp_path: Path) -> Path:
    """The generated files copied under ``tmp_path`` and regenerated there (current whatever ROOT's state)."""
    for name in (*DOCS, PYPROJECT):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(ROOT / name, tmp_path / name)
    write(tmp_path)
    return tmp_path


def test_generated_doc_regions_are_current() -> None:
    assert stale(ROOT) == [], "the docs' registry regions are stale: run `make docs`"


def test_every_registered_name_and_description_is_in_the_readme_once() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for descriptions in (
        registry.STRATEGY_DESCRIPTIONS,
        registry.MODEL_DESCRIPTIONS,
        registry.BASELINE_DESCRIPTIONS,
        registry.LOSS_DESCRIPTIONS,
        docs_gen.PATTERN_DESCRIPTIONS,
    ):
        for name, text in descriptions.items():
            assert readme.count(f"| `{name}` | {text} |") == 1, name


def test_a_new_strategy_makes_the_readme_and_pyproject_stale(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    assert stale(root) == []
    monkeypatch.setitem(registry.STRATEGY_DESCRIPTIONS, "fedfake", "a strategy the docs do not know yet")
    assert set(stale(root)) == {root / "README.md", root / PYPROJECT}
    write(root)
    assert stale(root) == []
    assert "| `fedfake` | a strategy the docs do not know yet |" in (root / "README.md").read_text(encoding="utf-8")
    names = " | ".join(registry.STRATEGY_DESCRIPTIONS)  # the registered ones, then fedfake
    assert names.endswith(" | fedfake") and f"# {names}\n" in (root / PYPROJECT).read_text(encoding="utf-8")


def test_a_hand_edit_inside_a_region_is_stale_and_regenerating_restores_it(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    path = root / "docs/ARCHITECTURE.md"
    original = path.read_text(encoding="utf-8")
    edited = original.replace(
        "`unet`, `unrolled`, `varnet`<!-- /registry:models:names -->",
        "`unet`, `unrolled`<!-- /registry:models:names -->",
    )
    assert edited != original
    path.write_text(edited, encoding="utf-8")
    assert stale(root) == [path]
    write(root)
    assert path.read_text(encoding="utf-8") == original


def test_a_hand_edit_of_a_pyproject_comment_is_stale(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    path = root / PYPROJECT
    path.write_text(
        path.read_text(encoding="utf-8").replace("# unet | unrolled | varnet", "# unet | unrolled"), encoding="utf-8"
    )
    assert stale(root) == [path]


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("<!-- registry:colours -->\n<!-- /registry:colours -->", "unknown registry region 'colours'"),
        ("<!-- registry:models -->\n| model |\n", "opened but not closed"),
        ("<!-- registry:models -->\n<!-- /registry:models:names -->", "opened but not closed"),
    ],
)
def test_a_bad_marker_is_an_error_naming_the_file(text: str, fragment: str) -> None:
    with pytest.raises(DocsError, match=fragment) as info:
        render_markdown(text, "doc.md")
    assert str(info.value).startswith("doc.md: ")


def test_a_kind_with_no_table_anywhere_is_an_error(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    path = root / "README.md"
    text = path.read_text(encoding="utf-8")
    start, end = text.index("<!-- registry:losses -->"), text.index("<!-- /registry:losses -->")
    path.write_text(text[:start] + text[end + len("<!-- /registry:losses -->") :], encoding="utf-8")
    with pytest.raises(DocsError, match="no <!-- registry:KIND --> table for losses"):
        stale(root)


def test_a_missing_pyproject_key_line_is_an_error(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    path = root / PYPROJECT
    path.write_text(
        path.read_text(encoding="utf-8").replace('\nloss = "l1"', '\nloss="l1"\nloss-x = "l1"'), encoding="utf-8"
    )
    with pytest.raises(DocsError, match="loss: needs one"):
        stale(root)
