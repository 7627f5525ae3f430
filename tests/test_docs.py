"""The README's reading guide points at the lines it names: every anchor is on exactly one line, and the table in
README.md is the one those lines give (regenerate it with `python tools/reading_guide.py`)."""
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import reading_guide  # noqa: E402


def test_the_reading_guide_is_up_to_date():
    assert reading_guide.main(["--check"]) == 0, "README.md is out of date: run python tools/reading_guide.py"


def test_equation_rows_land_on_the_line_that_computes_the_equation():
    rows = [(p, *r) for p, r in reading_guide.GUIDE.items() if p.startswith("Eq. (") and p[7] == ":"]  # "Eq. (k): ..."
    assert len(rows) == 4
    for paper, file, anchor, _ in rows:
        line = (ROOT / file).read_text().splitlines()[reading_guide.line_of(file, anchor) - 1]
        code, comment = line.split("#", 1)
        assert code.strip() and comment.strip().startswith(f"eq. {paper[4:7]}"), (paper, line)


def module_layers() -> dict[str, int]:
    """The README's Files table: module name -> layer."""
    section = (ROOT / "README.md").read_text().split("## Files\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| `(\w+)\.py` \|", section, re.M)
    return {name: int(layer) for layer, name in rows}


def project_imports(file: Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """(project modules imported at the top level, those imported inside a function or class) by `file`."""
    tree = ast.parse(file.read_text())
    top, nested = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = {node.module.split(".")[0]}
        else:
            continue
        (top if node in tree.body else nested).update(names & modules)
    return top, nested


def test_imports_flow_one_way_as_the_readme_draws_them():
    layers = module_layers()
    on_disk = {p.stem for p in ROOT.glob("*.py")}
    assert set(layers) == on_disk, "every module has one row in the README's Files table"
    for name, layer in layers.items():
        top, nested = project_imports(ROOT / f"{name}.py", set(layers))
        assert nested <= ({"triton_scan"} if name == "scan" else set()), (name, nested)
        for other in top:
            assert layers[other] < layer, f"{name}.py (layer {layer}) imports {other}.py (layer {layers[other]})"
