"""The docs' lists of strategies, models, baselines, mask patterns and losses, rendered from their registries.

A name and its one-line description are written once, next to the implementation's registry entry
(:mod:`common.registry`, :mod:`common.masks`); the docs hold marked regions that this module rewrites:

- ``<!-- registry:KIND -->`` … ``<!-- /registry:KIND -->``: a table of names and descriptions (the
  markers on their own lines);
- ``<!-- registry:KIND:names -->`` … ``<!-- /registry:KIND:names -->``: the names inline, comma-separated;
- in ``pyproject.toml``'s ``[tool.flwr.app.config]``, the comment of each key in :data:`PYPROJECT_KEYS`
  (``strategy = "fedprox"  # fedavg | fedprox | …``).

``make docs`` (``python -m common.docs_gen``) rewrites them; ``--check`` only reports, and
``tests/test_docs_gen.py`` fails while any region is stale, so adding a name without regenerating the
docs, or editing a region by hand, fails the fast suite. Only the standard library and the registries
are needed (no Flower).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from common.atomic import atomic_write_bytes
from common.masks import PATTERN_DESCRIPTIONS
from common.registry import (
    BASELINE_DESCRIPTIONS,
    LOSS_DESCRIPTIONS,
    MODEL_DESCRIPTIONS,
    STRATEGY_DESCRIPTIONS,
    TRACKER_DESCRIPTIONS,
)

logger = logging.getLogger(__name__)

#: Region kind -> (table header of the name column, table header of the description, name -> description).
KINDS: dict[str, tuple[str, str, Mapping[str, str]]] = {
    "strategies": ("strategy", "what the server does", STRATEGY_DESCRIPTIONS),
    "models": ("model", "what it is", MODEL_DESCRIPTIONS),
    "baselines": ("baseline", "what it trains", BASELINE_DESCRIPTIONS),
    "mask-patterns": ("mask", "what it samples", PATTERN_DESCRIPTIONS),
    "losses": ("loss", "what it compares", LOSS_DESCRIPTIONS),
    "trackers": ("tracker", "what the server writes", TRACKER_DESCRIPTIONS),
}
#: The Markdown files that hold regions (paths from the repository root).
DOCS: tuple[str, ...] = ("README.md", "docs/ARCHITECTURE.md")
PYPROJECT = "pyproject.toml"
#: Run-config keys whose pyproject comment lists a kind's names.
PYPROJECT_KEYS: dict[str, str] = {"strategy": "strategies", "model": "models", "loss": "losses"}

_REGION = re.compile(
    r"<!-- registry:(?P<kind>[a-z-]+)(?P<inline>(?::names)?) -->(?P<body>.*?)<!-- /registry:(?P=kind)(?P=inline) -->",
    re.DOTALL,
)
_OPENING = re.compile(r"<!-- registry:[^ ]+ -->")
_CONFIG_TABLE = "[tool.flwr.app.config]"


class DocsError(Exception):
    """A doc's regions cannot be rendered (unknown kind, unclosed marker, a region or key missing)."""


def _check_kind(kind: str, source: str) -> None:
    if kind not in KINDS:
        raise DocsError(f"{source}: unknown registry region {kind!r}; known: {', '.join(KINDS)}")


def render_table(kind: str) -> str:
    """The Markdown table of ``kind``'s names and descriptions."""
    name_header, text_header, descriptions = KINDS[kind]
    rows = [f"| {name_header} | {text_header} |", "|---|---|"]
    rows += [f"| `{name}` | {text} |" for name, text in descriptions.items()]
    return "\n".join(rows)


def render_names(kind: str) -> str:
    """``kind``'s names inline, as prose or a table cell can hold them (no ``|``)."""
    return ", ".join(f"`{name}`" for name in KINDS[kind][2])


def render_markdown(text: str, source: str) -> tuple[str, set[str]]:
    """``text`` with every region rewritten, and the kinds it has a table of; ``DocsError`` on a bad marker."""
    kinds: set[str] = set()

    def replace(match: re.Match[str]) -> str:
        kind, inline = match["kind"], bool(match["inline"])
        _check_kind(kind, source)
        if not inline:
            kinds.add(kind)
        body = render_names(kind) if inline else f"\n{render_table(kind)}\n"
        marker = f"registry:{kind}{':names' if inline else ''}"
        return f"<!-- {marker} -->{body}<!-- /{marker} -->"

    new_text = _REGION.sub(replace, text)
    opened, closed = len(_OPENING.findall(text)), len(_REGION.findall(text))
    if opened != closed:
        raise DocsError(f"{source}: {opened - closed} registry region(s) opened but not closed")
    return new_text, kinds


def render_pyproject(text: str, source: str = PYPROJECT) -> str:
    """``text`` with the comment of each :data:`PYPROJECT_KEYS` key in the run-config table rewritten."""
    start = text.find(f"\n{_CONFIG_TABLE}\n")
    if start < 0:
        raise DocsError(f"{source}: no {_CONFIG_TABLE} table")
    body_start = start + len(_CONFIG_TABLE) + 2
    next_table = re.search(r"^\[", text[body_start:], re.MULTILINE)
    end = body_start + next_table.start() if next_table else len(text)
    table = text[body_start:end]
    for key, kind in PYPROJECT_KEYS.items():
        names = " | ".join(KINDS[kind][2])
        table, count = re.subn(
            rf"^({re.escape(key)}\s*=\s*\"[^\"\n]*\"\s*)#[^\n]*$",
            lambda match: f"{match[1]}# {names}",  # noqa: B023 - called within this iteration
            table,
            flags=re.MULTILINE,
        )
        if count != 1:
            raise DocsError(f'{source}: {_CONFIG_TABLE}: {key}: needs one `{key} = "..."  # ...` line, found {count}')
    return text[:body_start] + table + text[end:]


def rendered(root: Path) -> dict[Path, tuple[str, str]]:
    """Every generated file under ``root``: path -> (current text, text with its regions rendered).

    ``DocsError`` when a kind has no table region in any doc (its descriptions would be shown nowhere).
    """
    result: dict[Path, tuple[str, str]] = {}
    tables: set[str] = set()
    for name in DOCS:
        path = root / name
        text = path.read_text(encoding="utf-8")
        new, kinds = render_markdown(text, name)
        tables |= kinds
        result[path] = (text, new)
    missing = sorted(set(KINDS) - tables)
    if missing:
        raise DocsError(f"{', '.join(DOCS)}: no <!-- registry:KIND --> table for {', '.join(missing)}")
    path = root / PYPROJECT
    text = path.read_text(encoding="utf-8")
    result[path] = (text, render_pyproject(text))
    return result


def stale(root: Path) -> list[Path]:
    """The generated files under ``root`` whose regions differ from the registries (empty: all current)."""
    return [path for path, (text, new) in rendered(root).items() if text != new]


def write(root: Path) -> list[Path]:
    """Rewrite the stale files under ``root`` atomically; returns them."""
    changed = []
    for path, (text, new) in rendered(root).items():
        if text != new:
            atomic_write_bytes(path, new.encode("utf-8"))
            changed.append(path)
    return changed


def main(argv: Sequence[str] | None = None) -> int:
    """``make docs``: regenerate the regions; ``--check``: exit 1 naming the stale files instead."""
    parser = argparse.ArgumentParser(prog="python -m common.docs_gen", description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--check", action="store_true", help="only report stale files (exit 1 if any)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        paths = stale(args.root) if args.check else write(args.root)
    except (DocsError, OSError) as exc:
        logger.error("%s", exc)
        return 2
    for path in paths:
        logger.info("%s: %s", path.relative_to(args.root), "stale (run `make docs`)" if args.check else "regenerated")
    return 1 if args.check and paths else 0


if __name__ == "__main__":
    sys.exit(main())
