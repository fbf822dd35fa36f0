"""docs/design.md §4 is the one map of the package: it names every module file
under mmdialog/ (empty ``__init__.py`` files aside) and nothing that is gone."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mmdialog"


def mapped() -> list[str]:
    """The paths the map names: the first word of each line of §4's code block."""
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    section = text.split("## 4. Where each part lives", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    return [m.group(1) for m in re.finditer(r"^(\S+\.py)\s", block, re.MULTILINE)]


def modules() -> set[str]:
    return {f.relative_to(PACKAGE).as_posix() for f in PACKAGE.rglob("*.py")
            if not (f.name == "__init__.py" and not f.read_text(encoding="utf-8").strip())}


def test_the_map_is_read():
    names = mapped()
    assert "core/assembler.py" in names and "plugins/bridges/gumbel.py" in names and "sdk/cli.py" in names


def test_design_md_names_every_module_and_only_modules_that_exist():
    names = mapped()
    assert sorted(modules() - set(names)) == []   # a module the map does not name
    assert sorted(set(names) - modules()) == []   # a path the map names that is gone
    assert len(names) == len(set(names))          # each once


def test_the_readme_points_to_the_map_instead_of_repeating_it():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    assert "docs/design.md" in layout
    assert not [p for p in modules() if p in layout]  # no module list of its own
