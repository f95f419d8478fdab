"""The documentation stays true to the code: conf/README.md is the one scripts/gen_conf_readme.py
writes from the schema and the option files, and every relative link of the Markdown pages
points to a file that exists (and, with a #fragment into a Markdown page, to a heading in it)."""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gen_conf_readme.py"


def _gen():
    spec = importlib.util.spec_from_file_location("gen_conf_readme", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)   # dataclasses look their module up there
    spec.loader.exec_module(sys.modules[spec.name])
    return sys.modules[spec.name]


def test_conf_readme_is_generated_from_the_current_schema_and_options():
    committed = (ROOT / "conf" / "README.md").read_text()
    assert _gen().generate(ROOT) == committed, (
        "conf/README.md is stale: run `python scripts/gen_conf_readme.py` and commit it")


def test_a_key_added_to_the_schema_changes_the_reference():
    gen = _gen()
    source = (ROOT / "xbarflow" / "config.py").read_text()
    anchor = "class EvalConfig:\n"
    assert anchor in source
    added = source.replace(anchor, anchor + "    bias_volts: float = rf(0.35, gt=0.0, le=2.0)"
                                             "   # volt, a key added without regenerating\n", 1)
    before, after = gen.generate(ROOT), gen.generate(ROOT, schema_source=added)
    assert before != after                      # so the check above can fail
    row = next(line for line in after.splitlines() if line.startswith("| `eval.bias_volts` |"))
    assert row == "| `eval.bias_volts` | float | `0.35` | volt | (0.0, 2.0] | a key added without regenerating |"
    assert "bias_volts" not in before


SCHEMA = '''
from dataclasses import dataclass, field
LIMIT = 2**4
@dataclass
class NoiseConfig:
    """Noise of a step."""
    pdrop: float = rf(0.0, ge=0.0, lt=1.0)       # drop connect: probability that a weight is 0
@dataclass
class EvalConfig:
    r_source: float = rf(1000.0, ge=0.0)         # ohm, row driver output resistance
    name: str = MISSING
    times: List[float] = rf([3600.0, 86400.0], gt=0.0)
    # seconds, how long a read lasts;
    # two comment lines above the field
    t_read: float = rf(1.0e-7, gt=0.0, le=LIMIT - 1)
    mode: str = rf("none", choices=("none", "chip"))   # none | chip
    # a note on the fields that follow
    percentile: float = rf(99.9, gt=0.0, le=100.0)   # of |I+ - I-| over a batch
    patterns: List[str] = field(default_factory=lambda: ["*"])
    memory_gb: Optional[float] = rf(None, gt=0.0)   # memory, GB; null: this machine's
    noise: NoiseConfig = field(default_factory=NoiseConfig)
@dataclass
class Config:
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
'''


def test_schema_fields_give_type_default_unit_range_and_comment():
    text = _gen().generate(ROOT, schema_source=SCHEMA)
    rows = [line for line in text.splitlines()      # the schema tables' rows (6 columns)
            if line.startswith(("| `eval.", "| `seed`")) and len(line.split(" | ")) == 6]
    assert rows == [
        "| `eval.r_source` | float | `1000.0` | ohm | >= 0.0 | row driver output resistance |",
        "| `eval.name` | str | `required` |  |  |  |",
        "| `eval.times` | list of float | `[3600.0, 86400.0]` |  | > 0.0 |  |",
        "| `eval.t_read` | float | `1e-07` | seconds | (0.0, 15] | how long a read lasts; two comment lines above the field |",
        "| `eval.mode` | str | `none` |  | `none`, `chip` | none \\| chip |",
        "| `eval.percentile` | float | `99.9` |  | (0.0, 100.0] | "
        "a note on the fields that follow — of \\|I+ - I-\\| over a batch |",
        '| `eval.patterns` | list of str | `["*"]` |  |  |  |',
        "| `eval.memory_gb` | float or null | `null` | GB | > 0.0 | memory, GB; null: this machine's |",
        "| `eval.noise.pdrop` | float | `0.0` |  | [0.0, 1.0) | drop connect: probability that a weight is 0 |",
        "| `seed` | int | `0` |  |  |  |",
    ]
    assert "`eval.noise`: Noise of a step." in text


def test_every_option_file_has_its_section():
    text = _gen().generate(ROOT)
    for path in sorted((ROOT / "conf").glob("**/*.yaml")):
        if path.parent != ROOT / "conf":
            group = path.parent.relative_to(ROOT / "conf").as_posix()
            assert f"### `{group}={path.stem}`" in text, path


def test_check_exits_1_with_one_line_when_a_yaml_key_is_added(tmp_path):
    shutil.copytree(ROOT / "conf", tmp_path / "conf")
    (tmp_path / "xbarflow").mkdir()
    shutil.copy(ROOT / "xbarflow" / "config.py", tmp_path / "xbarflow" / "config.py")
    check = [sys.executable, str(SCRIPT), "--root", str(tmp_path), "--check"]
    (tmp_path / "conf" / "README.md").write_text(_gen().generate(tmp_path))
    assert subprocess.run(check, capture_output=True, text=True).returncode == 0
    with open(tmp_path / "conf" / "hardware" / "pcm.yaml", "a") as f:
        f.write("t_read: 1.0e-8     # seconds, read pulse\n")
    result = subprocess.run(check, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stdout.strip().count("\n") == 0 and "conf/README.md is stale" in result.stdout
    text = _gen().generate(tmp_path)
    assert "| `t_read` | `1.0e-8` | seconds | seconds, read pulse |" in text


# --- relative links ------------------------------------------------------------------------

def _pages():
    pages = [ROOT / "README.md", ROOT / "conf" / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "results").glob("**/README.md"))]
    return [p for p in pages if p.is_file()]


_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_HTML = re.compile(r"""(?:src|href)\s*=\s*["']([^"']+)["']""")


def _links(text: str):
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)   # fenced code
    text = re.sub(r"`[^`\n]*`", "", text)                               # inline code
    return _LINK.findall(text) + _HTML.findall(text)


def _anchors(page: Path):
    """GitHub's anchors of a Markdown page's headings."""
    seen: dict = {}
    out = set()
    text = re.sub(r"^```.*?^```", "", page.read_text(), flags=re.S | re.M)
    for line in text.splitlines():
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not m:
            continue
        slug = re.sub(r"[^\w\- ]", "", m.group(1).lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_the_link_check_sees_links_and_images():
    assert _links("see [a](docs/a.md) and ![fig](x.png \"t\") but not `[b](c.md)`") == ["docs/a.md", "x.png"]


@pytest.mark.parametrize("page", _pages(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_point_to_existing_files(page):
    broken = []
    for target in _links(page.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):      # http:, https:, mailto:
            continue
        path, _, fragment = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target} (no such file)")
        elif fragment and file.suffix == ".md" and fragment not in _anchors(file):
            broken.append(f"{target} (no heading #{fragment})")
    assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)
