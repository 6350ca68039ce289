"""The documentation site's shape: mkdocs.yml's nav covers every page, and the shell commands in
the README and docs/ name scripts, configs, modules, flags and extras that exist.

Shell blocks are not run (they train for minutes, or need several hosts); this checks what can
go stale cheaply. `mkdocs build --strict` itself runs in .ci/run.
"""

import importlib.util
import re
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_FILES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
# Pages deliberately left out of the nav: the study's generated table and claim verdicts, linked
# from study.md.
NOT_IN_NAV = {
    "study/table.md",
    "study/verdicts.md",
    "adaptation/table.md",
    "adaptation/against_source.md",
}


def _nav_pages(entries) -> list[str]:
    pages = []
    for entry in entries:
        value = next(iter(entry.values())) if isinstance(entry, dict) else entry
        pages.extend(_nav_pages(value) if isinstance(value, list) else [value])
    return pages


def _mkdocs() -> dict:
    # mkdocs.yml has no custom tags; the safe loader reads it.
    return yaml.safe_load((ROOT / "mkdocs.yml").read_text())


def test_the_nav_lists_every_page_once_and_only_pages_that_exist():
    nav = _nav_pages(_mkdocs()["nav"])
    pages = {path.relative_to(DOCS).as_posix() for path in DOCS.rglob("*.md")}
    assert len(nav) == len(set(nav)), "a page twice in the nav"
    assert pages - set(nav) == NOT_IN_NAV, "pages missing from mkdocs.yml's nav"
    assert set(nav) - pages == set(), "the nav names pages that do not exist"


def test_every_package_has_an_api_page():
    api = {path.stem for path in (DOCS / "api").glob("*.md")}
    packages = {"core", "linen", "nnx", "parallel", "lifecycle", "diagnostics", "models"}
    assert packages | {"data", "train", "study", "export"} <= api
    for path in (DOCS / "api").glob("*.md"):
        assert re.search(r"^::: bnjax", path.read_text(), re.M), f"{path.name}: no ::: directive"


# ----------------------------------------------------------------------------- shell blocks

_FENCE = re.compile(r"^```(?:bash|sh|shell|console)\n(.*?)^```", re.M | re.S)
# Placeholders a reader fills in: <name>, NAME, DIR, ...
_PLACEHOLDER = re.compile(r"<|\.\.\.|\b[A-Z]{3,}\b|\$")


def _commands() -> list[tuple[str, str]]:
    """[(file, command)] of every shell block's lines, backslash continuations joined."""
    commands = []
    for path in DOC_FILES:
        for block in _FENCE.findall(path.read_text()):
            text = re.sub(r"\\\n\s*", " ", block)
            for line in text.splitlines():
                line = line.split(" # ", 1)[0].strip()
                if line and not line.startswith("#"):
                    commands.append((path.relative_to(ROOT).as_posix(), line))
    return commands


def _defined_flags(source: str) -> set[str]:
    absl = re.findall(r"DEFINE_\w+,?\s*\(?\s*\"(\w+)\"", source)
    argparse = re.findall(r"add_argument\(\s*\"--(\w+)\"", source)
    return {*absl, *argparse, "help"}


def _entry_points() -> dict[str, set[str]]:
    """{script or module: the flags it defines}."""
    parallel_flags = _defined_flags((ROOT / "bnjax" / "parallel" / "distributed.py").read_text())
    entry = {}
    for script in [*ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.py")]:
        flags = _defined_flags(script.read_text())
        if "define_distributed_flags" in script.read_text():
            flags |= parallel_flags
        entry[script.relative_to(ROOT).as_posix()] = flags
    entry["bnjax.demo"] = _defined_flags((ROOT / "bnjax" / "demo.py").read_text())
    return entry


def _config_keys() -> set[str]:
    from bnjax.study.defaults import study_config
    from bnjax.train.defaults import base_config

    return set(base_config()) | set(study_config())


def test_shell_commands_name_files_modules_flags_and_extras_that_exist():
    entry_points, config_keys = _entry_points(), _config_keys()
    extras = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    )
    problems = []
    for where, command in _commands():
        for path in re.findall(
            r"(?<![\w/])((?:scripts|configs|benchmarks|examples)/[\w./-]+)", command
        ):
            if not _PLACEHOLDER.search(path) and not (ROOT / path).exists():
                problems.append(f"{where}: `{command}` names {path}, which does not exist")
        for module in re.findall(r"python3? -m ([\w.]+)", command):
            if module.startswith("bnjax") and importlib.util.find_spec(module) is None:
                problems.append(f"{where}: `{command}`: no module {module}")
        for extra in re.findall(r"\.\[([\w,]+)\]", command):
            for name in extra.split(","):
                if name not in extras:
                    problems.append(f"{where}: `{command}`: no extra [{name}] in pyproject.toml")
        for key in re.findall(r"--config\.(\w+)", command):
            if not key.isupper() and key not in config_keys:  # KEY: a placeholder
                problems.append(f"{where}: `{command}`: no config key {key}")
        for program, flags in entry_points.items():
            if program in command.split() or f"-m {program}" in command:
                after = command.split(program, 1)[1]
                for flag in re.findall(r"(?<![\w-])--(\w+)", after):
                    if flag not in flags:
                        problems.append(f"{where}: `{command}`: {program} has no flag --{flag}")
    assert not problems, "\n".join(problems)


def test_the_shell_check_sees_the_commands():
    commands = [command for _, command in _commands()]
    assert any("scripts/train.py --config=configs/default.py" in c for c in commands)
    assert any(c.startswith("python benchmarks/norm_bench.py") for c in commands)
    assert len(commands) > 20


@pytest.mark.parametrize(
    "command",
    [
        "python scripts/train.py --config=configs/nope.py --workdir=w",
        "python scripts/train.py --config=configs/default.py --no_such_flag",
        "python scripts/train.py --config=configs/default.py --config.no_such_key=1",
        "python -m bnjax.no_such_module",
        'pip install -e ".[no_such_extra]"',
    ],
)
def test_the_shell_check_catches_a_stale_command(command, monkeypatch):
    monkeypatch.setattr(
        "tests.test_docs_site._commands", lambda: [("README.md", command)], raising=True
    )
    with pytest.raises(AssertionError):
        test_shell_commands_name_files_modules_flags_and_extras_that_exist()
