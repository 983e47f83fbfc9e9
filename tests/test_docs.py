"""The documentation still matches the repository: every relative link of ``README.md`` and
``docs/*.md`` resolves (file, and heading anchor by GitHub's slug rule), every command of their
fenced ``bash`` blocks that runs ``train_net.py``, ``tools/<x>.py`` or ``make <target>`` parses
with that script's own argument parser (or names a Makefile target) and names existing configs
whose ``KEY VALUE`` overrides merge, the README stays at most 200 lines, and its library
snippet runs."""

import re
import shlex
from pathlib import Path
from typing import Dict, Iterator, List, NamedTuple, Set, Tuple

import pytest
from detectron2.config import get_cfg

from san_det.config import get_san_det_cfg
from tests.helpers.paths import REPO_ROOT
from tests.helpers.scripts import load_script

README = REPO_ROOT / "README.md"
DOC_FILES = [README, *sorted((REPO_ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 200

FENCE = re.compile(r"^\s*(```|~~~)\s*([\w+-]*)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
INLINE_CODE = re.compile(r"(`+)(.+?)\1")
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)")
URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
SCRIPT = re.compile(r"^(?:\./)?(train_net\.py|tools/\w+\.py)$")
SHELL_LANGUAGES = ("bash", "sh", "shell")


class Block(NamedTuple):
    language: str
    lines: List[str]


def split_markdown(text: str) -> Tuple[List[str], List[Block]]:
    """The lines outside fenced blocks (fenced lines blanked, so line numbers hold) and the
    fenced blocks with their language."""
    prose, blocks, block = [], [], None
    for line in text.splitlines():
        fence = FENCE.match(line)
        if block is None and fence:
            block = Block(fence.group(2).lower(), [])
            prose.append("")
        elif block is not None and fence and not fence.group(2):
            blocks.append(block)
            block = None
            prose.append("")
        elif block is not None:
            block.lines.append(line)
            prose.append("")
        else:
            prose.append(line)
    assert block is None, "a fenced block is not closed"
    return prose, blocks


def github_slug(heading: str) -> str:
    """GitHub's anchor of a heading: its text (link and image syntax reduced to their text,
    inline-code backticks dropped) lower-cased, every character but letters, digits, ``_``,
    ``-`` and spaces removed, each space a ``-``."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors_of(path: Path) -> Set[str]:
    """The heading anchors of a Markdown file; a repeated slug gets ``-1``, ``-2``... as on
    GitHub."""
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    seen: Dict[str, int] = {}
    anchors = set()
    for line in prose:
        match = HEADING.match(line)
        if not match:
            continue
        slug = github_slug(match.group(2))
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def relative_links(path: Path) -> Iterator[Tuple[int, str]]:
    """(line number, target) of every link of ``path`` that is not a URL with a scheme."""
    prose, _ = split_markdown(path.read_text(encoding="utf-8"))
    for number, line in enumerate(prose, 1):
        line = INLINE_CODE.sub(lambda m: "x" * len(m.group(0)), line)
        targets = LINK.findall(line) + REFERENCE_LINK.findall(line)
        for target in targets:
            if not URL_SCHEME.match(target):
                yield number, target


def broken_links(path: Path) -> List[str]:
    problems = []
    for number, target in relative_links(path):
        file_part, _, anchor = target.partition("#")
        linked = (path.parent / file_part).resolve() if file_part else path
        where = f"{path.relative_to(REPO_ROOT)}:{number}: {target}"
        if not linked.exists():
            problems.append(f"{where}: {file_part} does not exist")
        elif anchor and (linked.suffix != ".md" or anchor not in anchors_of(linked)):
            problems.append(f"{where}: no heading with the anchor #{anchor} in {file_part or 'it'}")
    return problems


def shell_commands(path: Path) -> Iterator[List[str]]:
    """The commands of the fenced shell blocks of ``path``: continuation lines joined, comments
    dropped, split as the shell splits them (variables are left as written)."""
    _, blocks = split_markdown(path.read_text(encoding="utf-8"))
    for block in blocks:
        if block.language not in SHELL_LANGUAGES:
            continue
        joined = re.sub(r"\\\s*\n", " ", "\n".join(block.lines))
        for line in joined.splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                yield argv


def makefile_targets() -> Set[str]:
    targets = set()
    for line in (REPO_ROOT / "Makefile").read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9_.%/-]+(?:\s+[A-Za-z0-9_.%/-]+)*)\s*:(?!=)", line)
        if match:
            targets.update(match.group(1).split())
    return targets


def command_problems(argv: List[str]) -> List[str]:
    """Why ``argv`` would no longer run as documented (empty: it parses)."""
    if argv[0] == "make":
        missing = [t for t in argv[1:] if not t.startswith("-") and t not in makefile_targets()]
        return [f"no Makefile target {t!r}" for t in missing]
    scripts = [i for i, token in enumerate(argv) if SCRIPT.match(token)]
    if not scripts:
        return []
    script = SCRIPT.match(argv[scripts[0]]).group(1)
    args = argv[scripts[0] + 1 :]
    parser = load_script(script).argument_parser()
    parser.exit_on_error = False
    parser.allow_abbrev = False  # a documented flag is written out in full
    try:
        parsed = parser.parse_args(args)
    except (SystemExit, Exception) as e:  # argparse exits on an unknown or missing flag
        return [f"{script} does not parse {args}: {e!r}"]
    problems = []
    opts = list(getattr(parsed, "opts", None) or [])
    problems += [f"flag {o} after the KEY VALUE overrides" for o in opts if o.startswith("--")]
    configs = [
        value
        for name in ("config_file", "detection_config")
        for value in [getattr(parsed, name, None)]
        if value and value.startswith("configs/")
    ]
    for config in configs:
        if not (REPO_ROOT / config).is_file():
            problems.append(f"config {config} does not exist")
            continue
        try:
            get_san_det_cfg(str(REPO_ROOT / config), opts)
        except Exception as e:
            problems.append(f"{config} with {opts}: {e!r}")
    return problems


MD_MENTION = re.compile(r"(?<![\w/.-])((?:[\w.-]+/)*[\w-]+\.md)\b")


def files_naming_pages() -> List[Path]:
    """The files whose text names Markdown pages: the Makefile, CI, scripts, package, pages."""
    names = [REPO_ROOT / "Makefile", REPO_ROOT / "train_net.py", *DOC_FILES]
    for folder, pattern in (("tools", "*.py"), ("san_det", "**/*.py"), ("benchmarks", "**/*.py")):
        names += sorted((REPO_ROOT / folder).glob(pattern))
    names += sorted((REPO_ROOT / ".ci").glob("*"))
    return [path for path in names if path.is_file()]


def missing_pages(path: Path) -> List[str]:
    """The ``*.md`` names in ``path``'s text that no file of the repository has: a name with a
    folder, relative to the repository or to ``path``'s folder; a bare name, any page's name."""
    page_names = {p.name for p in [README, *REPO_ROOT.glob("docs/**/*.md")]}
    problems = []
    for name in MD_MENTION.findall(path.read_text(encoding="utf-8")):
        if "/" in name:
            found = (REPO_ROOT / name).is_file() or (path.parent / name).is_file()
        else:
            found = name in page_names
        if not found:
            problems.append(f"{path.relative_to(REPO_ROOT)} names {name}")
    return problems


def test_pages_named_in_code_and_docs_exist():
    """A comment, docstring or message naming a page (the Makefile once cited a KERNELS.md that
    was never there) names one that exists."""
    assert [p for path in files_naming_pages() for p in missing_pages(path)] == []


def doc_id(path: Path) -> str:
    return str(path.relative_to(REPO_ROOT))


@pytest.mark.parametrize("path", DOC_FILES, ids=doc_id)
def test_relative_links_resolve(path):
    assert broken_links(path) == []


@pytest.mark.parametrize("path", DOC_FILES, ids=doc_id)
def test_documented_commands_parse(path):
    problems = {" ".join(argv): command_problems(argv) for argv in shell_commands(path)}
    assert {command: p for command, p in problems.items() if p} == {}


def test_readme_runs_the_commands_it_promises():
    commands = [" ".join(argv) for argv in shell_commands(README)]
    assert "make test" in commands and "make demo" in commands
    assert any(c.startswith("python train_net.py") for c in commands)
    assert any("tools/predict.py" in c for c in commands)


def test_readme_lists_every_docs_page():
    linked = {(README.parent / t.partition("#")[0]).resolve() for _, t in relative_links(README)}
    pages = {p.resolve() for p in DOC_FILES[1:]}
    assert sorted(p.name for p in pages - linked) == []


def test_readme_is_at_most_200_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= README_MAX_LINES


def test_github_slug_and_link_checks_on_known_cases(tmp_path):
    assert github_slug("`tools/predict.py --output`") == "toolspredictpy---output"
    assert github_slug("detectron2 0.6 on today's stack") == "detectron2-06-on-todays-stack"
    assert github_slug("Into [detection](x.md)") == "into-detection"
    page = tmp_path / "page.md"
    page.write_text(
        "# A b\n\n## A b\n\nsee [x](#a-b-1), [y](#a-c), [z](nowhere.md), `[q](nowhere.md)`\n"
        "```bash\n# [w](nowhere.md)\n```\n[r](https://example.com/missing)\n"
    )
    assert anchors_of(page) == {"a-b", "a-b-1"}
    assert [t for _, t in relative_links(page)] == ["#a-b-1", "#a-c", "nowhere.md"]


def test_command_checks_on_known_cases():
    demo = "configs/Demo/shapes_retinanet.yaml"
    assert command_problems(["make", "demo"]) == []
    assert command_problems(["make", "no-such-target"]) == ["no Makefile target 'no-such-target'"]
    assert command_problems(["python", "train_net.py", "--config-file", demo, "--eval-only"]) == []
    assert command_problems(["python", "train_net.py", "--config-file", demo, "--no-flag"])
    assert command_problems(["python", "train_net.py", "--config-file", demo, "--eval"])
    assert command_problems(["python", "train_net.py", "--config-file", demo, "A.B", "--resume"])
    assert command_problems(["python", "train_net.py", "--config-file", "configs/none.yaml"]) == [
        "config configs/none.yaml does not exist"
    ]
    assert command_problems(["python", "tools/predict.py", "--config-file", demo, "--input", "x"])
    assert command_problems(["python", "train_net.py", "--config-file", demo, "MODEL.NOPE", "1"])


def python_blocks(path: Path) -> List[str]:
    _, blocks = split_markdown(path.read_text(encoding="utf-8"))
    return ["\n".join(b.lines) for b in blocks if b.language == "python"]


def test_readme_library_snippet_builds_the_model(monkeypatch):
    """The README's snippet (``add_san_det_config`` before ``merge_from_file``) builds the
    SASA-50 RetinaNet it names; the plain detectron2 merge it warns about fails as it says."""
    monkeypatch.chdir(REPO_ROOT)
    (snippet,) = python_blocks(README)
    namespace: dict = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert type(model).__name__ == "SanDetRetinaNet"
    assert type(model.backbone.bottom_up).__name__ == "SASAResNet"
    assert sum(p.numel() for p in model.parameters()) == 30_450_292

    with pytest.raises(KeyError) as failure:
        get_cfg().merge_from_file("configs/COCO-Detection/retinanet_sasa50.yaml")
    assert f"`KeyError: {failure.value}`" in README.read_text(encoding="utf-8")
