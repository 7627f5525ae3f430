"""The README's reading guide points at the lines it names: every anchor is on exactly one line, and the table in
README.md is the one those lines give (regenerate it with `python tools/reading_guide.py`)."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import reading_guide  # noqa: E402


def test_the_reading_guide_is_up_to_date():
    readme = (ROOT / "README.md").read_text()
    assert reading_guide.readme_with_table(readme) == readme, "run python tools/reading_guide.py"


def test_equation_rows_land_on_the_line_that_computes_the_equation():
    rows = [r for r in reading_guide.ROWS if r[0].startswith("Eq. (") and r[0][7] == ":"]  # "Eq. (k): ..."
    assert len(rows) == 4
    for paper, file, anchor, _ in rows:
        line = (ROOT / file).read_text().splitlines()[reading_guide.line_of(file, anchor) - 1]
        code, comment = line.split("#", 1)
        assert code.strip() and comment.strip().startswith(f"eq. {paper[4:7]}"), (paper, line)
