"""docs/coverage.md: what becomes of every row of the method catalogs, generated, never written by hand.

    python -m postrain.coverage            # (re)writes docs/coverage.md
    python -m postrain.coverage --check    # exit 1 if docs/coverage.md is stale or a catalog row is unaccounted for

Inputs:
  - the catalogs' summary tables (`preference-methods.md`, `rl-methods.md` in the shared methods folder): one row
    per method, `| # | Name | ... | In TRL natively? | ... |`;
  - the registries: an entry names the catalog row(s) it implements with `catalog="preference:5"` (or a tuple) in
    its `register(...)` call; `<catalog>:trl` marks an entry the catalog lists only as a TRL extra and
    `<catalog>:extra` one outside the catalog's rows;
  - the recipes under recipes/, matched to rows by `paper.arxiv` (the arXiv id of a row's entries, or the `arxiv`
    that docs/coverage_exclusions.yaml gives a row without entries);
  - docs/coverage_exclusions.yaml: for each row with neither an entry nor a recipe, why (`not_yet`: could be done,
    and what is missing; `not_reproducible`: what is not established from public information), and what was
    looked up (`searched`: the queries and look-ups, `found`: what they turned up). A `not_reproducible` row must
    name its searches, so that the claim can be checked.

A row's status: `implemented` (a registry entry computes it), else `composed` (a recipe reproduces it from
existing parts), else the exclusion file's status. A row with none of these is unaccounted for, which --check
reports, as it reports an exclusion left on a row that has since been implemented.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "coverage.md"
EXCLUSIONS = REPO / "docs" / "coverage_exclusions.yaml"
# Catalog key (as used in `catalog="preference:5"`) -> file name in the methods folder.
CATALOG_FILES = {"preference": "preference-methods.md", "rl": "rl-methods.md"}
# Tags for entries that implement no numbered row (see the module docstring).
OUTSIDE_TAGS = {"trl": "listed by the catalog only as a TRL option", "extra": "not a row of the catalog"}
STATUSES = ("implemented", "composed", "not_yet", "not_reproducible")
EXCLUSION_KEYS = {"status", "reason", "arxiv", "note", "searched", "found"}


@dataclass(frozen=True)
class CatalogRow:
    catalog: str
    number: int
    name: str
    trl: str


@dataclass
class RowCoverage:
    row: CatalogRow
    status: str | None  # None: unaccounted for
    entries: list[str] = field(default_factory=list)  # "family:name"
    recipes: list[str] = field(default_factory=list)
    reason: str = ""
    searched: list[str] = field(default_factory=list)
    found: str = ""


@dataclass
class Coverage:
    rows: list[RowCoverage]
    outside: list[tuple[str, str]]  # ("family:name", tag or "" when the entry has no catalog= at all)
    notes: list[str]
    problems: list[str]


# --- inputs ---------------------------------------------------------------------------------------------------

def find_catalog_dir(explicit: str | Path | None = None) -> Path | None:
    """The folder holding the catalogs: --catalogs, $POSTRAIN_CATALOGS, or shared/methods beside or in the repo."""
    candidates = [explicit, os.environ.get("POSTRAIN_CATALOGS"), REPO / "shared" / "methods",
                  REPO.parent / "shared" / "methods"]
    for c in candidates:
        if c and all((Path(c) / f).is_file() for f in CATALOG_FILES.values()):
            return Path(c)
    return None


def _cells(line: str) -> list[str]:
    """The cells of a markdown table line; `\\|` inside a cell is a literal bar, not a separator."""
    inner = line.strip().strip("|")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def parse_summary_table(text: str, catalog: str) -> list[CatalogRow]:
    """The rows of the first markdown table after a 'Summary table' heading: its number, name and TRL columns."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines)
                  if line.lstrip().startswith("#") and "summary table" in line.lower()), None)
    if start is None:
        raise ValueError(f"{catalog} catalog: no 'Summary table' heading")
    header = None
    rows = []
    for line in lines[start + 1:]:
        if line.lstrip().startswith("#"):
            break  # the next section
        if not line.lstrip().startswith("|"):
            if header and rows:
                break  # the table ended
            continue
        cells = _cells(line)
        if header is None:
            header = [c.lower() for c in cells]
            number_col = header.index("#")
            name_col = header.index("name")
            trl_col = next(i for i, c in enumerate(header) if "trl" in c)
            continue
        if set("".join(cells)) <= set("-: "):
            continue  # the |---| separator
        if not re.fullmatch(r"\d+", cells[number_col]):
            raise ValueError(f"{catalog} catalog: row {line!r} has no row number")
        rows.append(CatalogRow(catalog, int(cells[number_col]), cells[name_col], cells[trl_col]))
    if not rows:
        raise ValueError(f"{catalog} catalog: the summary table has no rows")
    return rows


def entry_tags(variant) -> list[str]:
    """The `catalog=` tags of a registry entry, as a list ("preference:5", "rl:trl", ...)."""
    tags = variant.extra.get("catalog")
    if tags is None:
        return []
    return [tags] if isinstance(tags, str) else list(tags)


def arxiv_id(value) -> str:
    """'arXiv:2305.18290v3' -> '2305.18290', so recipes and entries compare equal however they write it."""
    text = str(value or "").strip()
    text = re.sub(r"^(arxiv:|https?://arxiv\.org/abs/)", "", text, flags=re.I)
    return re.sub(r"v\d+$", "", text)


def recipe_papers(root: Path | None = None) -> dict[str, str]:
    """recipe path -> the arXiv id its `paper:` declares (directly or through its `defaults:`)."""
    # slow: omegaconf (through postrain.recipes, ~90 ms), only the recipe table needs it
    from postrain.recipes.catalog import list_recipes

    return {r["path"]: arxiv_id(r["arxiv"]) for r in list_recipes(root) if r.get("arxiv")}


# --- the table ------------------------------------------------------------------------------------------------

def build(catalog_dir: Path, exclusions_path: Path = EXCLUSIONS, recipes_root: Path | None = None) -> Coverage:
    # slow: torch (through postrain.variants), only the table of entries needs it
    from postrain.variants import all_variants

    rows = {name: parse_summary_table((catalog_dir / fname).read_text(), name)
            for name, fname in CATALOG_FILES.items()}
    exclusions = yaml.safe_load(exclusions_path.read_text()) or {}
    problems: list[str] = []
    known = {(r.catalog, r.number) for rs in rows.values() for r in rs}

    # Registry entries, by the row they implement.
    entries: dict[tuple[str, int], list] = {}
    outside: list[tuple[str, str]] = []
    for v in all_variants():
        label = f"{v.family}:{v.name}"
        tags = entry_tags(v)
        if not tags:
            outside.append((label, ""))
        for tag in tags:
            catalog, _, row = str(tag).partition(":")
            if catalog not in CATALOG_FILES or not (row.isdigit() or row in OUTSIDE_TAGS):
                problems.append(f"{label}: catalog tag {tag!r} is not '<catalog>:<row number>' or "
                                f"'<catalog>:{'|'.join(OUTSIDE_TAGS)}' with catalog in {sorted(CATALOG_FILES)}")
            elif row in OUTSIDE_TAGS:
                outside.append((label, tag))
            elif (catalog, int(row)) not in known:
                problems.append(f"{label}: catalog tag {tag!r} names no row of {CATALOG_FILES[catalog]}")
            else:
                entries.setdefault((catalog, int(row)), []).append(v)

    for catalog in exclusions:
        if catalog != "notes" and catalog not in CATALOG_FILES:
            problems.append(f"{exclusions_path.name}: unknown catalog {catalog!r}; valid: "
                            f"{', '.join(CATALOG_FILES)}, notes")
    papers = recipe_papers(recipes_root)
    out: list[RowCoverage] = []
    for catalog, catalog_rows in rows.items():
        given = exclusions.get(catalog) or {}
        for number in given:
            if (catalog, number) not in known:
                problems.append(f"{exclusions_path.name}: {catalog} row {number!r} is not in {CATALOG_FILES[catalog]}")
        for row in catalog_rows:
            excl = given.get(row.number) or {}
            where = f"{exclusions_path.name}: {catalog} row {row.number} ({row.name})"
            for key in set(excl) - EXCLUSION_KEYS:
                problems.append(f"{where}: unknown key {key!r}; valid: {', '.join(sorted(EXCLUSION_KEYS))}")
            implemented = entries.get((catalog, row.number), [])
            arxivs = {arxiv_id(v.arxiv) for v in implemented} | ({arxiv_id(excl["arxiv"])} if excl.get("arxiv") else set())
            recipes = sorted(path for path, arxiv in papers.items() if arxiv in arxivs)
            searched = excl.get("searched") or []
            malformed = not isinstance(searched, list) or not all(isinstance(q, str) and q.strip() for q in searched)
            if malformed:
                problems.append(f"{where}: `searched` must be a list of the queries / look-ups made (strings)")
                searched = []
            cov = RowCoverage(row, None, sorted(f"{v.family}:{v.name}" for v in implemented), recipes,
                              str(excl.get("reason") or excl.get("note") or ""), list(searched),
                              str(excl.get("found") or ""))
            if implemented or recipes:
                cov.status = "implemented" if implemented else "composed"
                if "status" in excl:
                    problems.append(f"{where} is {cov.status} now ({', '.join(cov.entries or recipes)}): "
                                    f"remove its status (keep a `note:` if something is still missing)")
            elif not excl:
                problems.append(f"{catalog} row {row.number} ({row.name}) is unaccounted for: no registry entry "
                                f"has catalog=\"{catalog}:{row.number}\", no recipe matches, and "
                                f"{exclusions_path.name} gives no reason")
            elif excl.get("status") not in ("not_yet", "not_reproducible") or not excl.get("reason"):
                problems.append(f"{where}: needs `status: not_yet` or `status: not_reproducible` and a `reason`")
            elif excl["status"] == "not_reproducible" and not cov.searched and not malformed:
                problems.append(f"{where} is not_reproducible without the searches that support it: list them "
                                f"under `searched:` (queries, repositories fetched) and what they turned up under "
                                f"`found:`")
            else:
                cov.status = excl["status"]
            out.append(cov)
    return Coverage(out, sorted(outside), list(exclusions.get("notes") or []), problems)


# --- output ---------------------------------------------------------------------------------------------------

def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _note(c: "RowCoverage") -> str:
    """The row's note: its reason, then the searches behind it and what they found."""
    parts = [c.reason.strip()] if c.reason.strip() else []
    if c.searched:
        parts.append("Searched: " + "; ".join(q.strip() for q in c.searched) + ".")
    if c.found.strip():
        parts.append("Found: " + c.found.strip().rstrip(".") + ".")
    return " ".join(parts)


def render(cov: Coverage) -> str:
    lines = [
        "# Catalog coverage",
        "",
        "<!-- Generated by `python -m postrain.coverage`; do not edit. Reasons live in "
        "docs/coverage_exclusions.yaml. -->",
        "",
        "Every row of the method catalogs' summary tables (`preference-methods.md`, `rl-methods.md`) and what "
        "postrain does with it:",
        "",
        "- **implemented**: a registry entry computes it (`postrain variants`); the entry's `register(...)` names "
        "the row with `catalog=\"<catalog>:<row>\"`.",
        "- **composed**: no entry of its own; a recipe under `recipes/` reproduces it from existing parts.",
        "- **not yet**: could be done; the note says what is missing.",
        "- **not reproducible**: the formula or setting is not established from public information; the note "
        "says what is missing, what was searched (queries, repositories fetched) and what was found.",
        "",
        "Recipes are matched to rows by `paper.arxiv`: the arXiv id of a row's entries or, for a row without "
        "entries, the `arxiv` that docs/coverage_exclusions.yaml gives it. Rows whose entries share one paper "
        "(cDPO and rDPO, 2403.00409) match the same recipes; a `paper.catalog: [preference:5]` field in "
        "`PaperSpec` would make the match exact.",
        "",
    ]
    labels = {"implemented": "implemented", "composed": "composed", "not_yet": "not yet",
              "not_reproducible": "not reproducible", None: "**unaccounted for**"}
    for catalog, fname in CATALOG_FILES.items():
        rows = [c for c in cov.rows if c.row.catalog == catalog]
        counts = {s: sum(c.status == s for c in rows) for s in [*STATUSES, None]}
        summary = ", ".join(f"{labels[s]} {n}" for s, n in counts.items() if n or s is not None)
        lines += [f"## {catalog} (`{fname}`): {len(rows)} rows", "", summary + ".", "",
                  "| # | Method | In TRL (catalog) | Status | Entries | Recipes | Note |",
                  "|---|---|---|---|---|---|---|"]
        for c in rows:
            lines.append("| " + " | ".join([
                str(c.row.number), _md(c.row.name), _md(c.row.trl), labels[c.status],
                ", ".join(f"`{e}`" for e in c.entries), ", ".join(f"`{r}`" for r in c.recipes), _md(_note(c)),
            ]) + " |")
        lines.append("")
    lines += ["## Registered entries outside the catalog rows", "",
              "`trl`: " + OUTSIDE_TAGS["trl"] + "; `extra`: " + OUTSIDE_TAGS["extra"] +
              "; no tag: the entry's `register(...)` has no `catalog=`.", "",
              "| Entry | Tag |", "|---|---|"]
    lines += [f"| `{label}` | {tag.partition(':')[2] if tag else 'no tag'} |" for label, tag in cov.outside]
    lines.append("")
    if cov.notes:
        lines += ["## Notes", ""] + [f"- {_md(n)}" for n in cov.notes] + [""]
    if cov.problems:
        lines += ["## Problems (`python -m postrain.coverage --check` fails on these)", ""]
        lines += [f"- {_md(p)}" for p in cov.problems] + [""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m postrain.coverage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if docs/coverage.md is stale or a row is unaccounted for")
    parser.add_argument("--catalogs", help="folder holding the catalog files (default: $POSTRAIN_CATALOGS, "
                                           "shared/methods in or beside the repository)")
    parser.add_argument("--output", type=Path, default=DOC)
    args = parser.parse_args(argv)
    catalog_dir = find_catalog_dir(args.catalogs)
    if catalog_dir is None:
        print(f"error: catalogs not found ({', '.join(CATALOG_FILES.values())}); pass --catalogs DIR or set "
              f"POSTRAIN_CATALOGS", file=sys.stderr)
        return 2
    cov = build(catalog_dir)
    text = render(cov)
    for p in cov.problems:
        print(f"problem: {p}", file=sys.stderr)
    if args.check:
        stale = not args.output.is_file() or args.output.read_text() != text
        if stale:
            print(f"{args.output} is stale: run `python -m postrain.coverage`", file=sys.stderr)
        return 1 if stale or cov.problems else 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}: {len(cov.rows)} rows, {len(cov.problems)} problems")
    return 1 if cov.problems else 0


if __name__ == "__main__":
    sys.exit(main())
