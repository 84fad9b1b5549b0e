"""The documentation works: README.md and docs/*.md snippets run, commands exist, links resolve.

- Every ```python block runs: a file's blocks in order, in one namespace, in a scratch folder
  whose `runs/smoke` is a finished run of the smoke config (tests/testdata/run_v0.1.0). A block
  right after `<!-- skip-snippet: WHY -->` is left out; keep those few.
- Every `python -m experiments.*` / `python -m mnres` command in a ```bash block names a module
  that exists, flags it defines and config fields that exist. Commands on the smoke config or
  on malaria-mini run for real (marked slow).
- Every relative link and image resolves to a file in the repository that git does not ignore,
  and every `#anchor` to a heading of that file.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mnres import models

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SMOKE_RUN = REPO / "tests" / "testdata" / "run_v0.1.0"
SKIP = re.compile(r"<!--\s*skip-snippet:\s*(\S.*?)\s*-->")
FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
# Commands that run for real: the smoke config (synthetic cells) or the 1,000-crop sample.
RUNNABLE = ("experiments/configs/smoke.py", "malaria-mini")
MNRES_COMMANDS = ("summary", "export", "predict")


@dataclasses.dataclass(frozen=True)
class Block:
    """A fenced code block: where it starts, its language, its text, why it is skipped."""

    path: Path
    line: int  # 1-based line of the first code line
    language: str
    code: str
    skip_reason: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}"


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a markdown file, indentation (list items) removed."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        indent, fence, language = match.groups()
        previous = next((s.strip() for s in reversed(lines[:i]) if s.strip()), "")
        skip = SKIP.fullmatch(previous)
        end = i + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        code = "\n".join(
            s[len(indent) :] if s.startswith(indent) else s for s in lines[i + 1 : end]
        )
        blocks.append(Block(path, i + 2, language, code, skip.group(1) if skip else None))
        i = end + 1
    return blocks


def prose(path: Path) -> str:
    """The file's text without fenced blocks and inline code (links there are not links)."""
    lines, in_fence, fence = [], False, ""
    for line in path.read_text().splitlines():
        match = FENCE.match(line)
        if match and (not in_fence or line.strip().startswith(fence)):
            in_fence, fence = (not in_fence), match.group(2)
            lines.append("")
            continue
        lines.append("" if in_fence else re.sub(r"`[^`]*`", "", line))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Python snippets.


def _files_with_snippets():
    return [p for p in DOCS if any(b.language == "python" for b in fenced_blocks(p))]


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """A working folder with `runs/smoke`, a finished smoke-config run."""
    shutil.copytree(SMOKE_RUN, tmp_path / "runs" / "smoke")
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.mark.parametrize("path", _files_with_snippets(), ids=lambda p: p.name)
def test_python_snippets_run(path, scratch):
    namespace = {"__name__": "__doc_snippet__"}
    for block in fenced_blocks(path):
        if block.language != "python" or block.skip_reason:
            continue
        # Leading newlines: a traceback names the markdown file and its line.
        source = "\n" * (block.line - 1) + block.code
        try:
            exec(compile(source, str(block.path), "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"the snippet at {block.where} fails: {error!r}") from error


def test_skipped_snippets_are_few_and_say_why():
    skipped = [b for p in DOCS for b in fenced_blocks(p) if b.skip_reason]
    assert len(skipped) <= 3, [b.where for b in skipped]
    for block in skipped:
        assert block.language == "python" and len(block.skip_reason) > 10, block.where


# ---------------------------------------------------------------------------------------------
# Commands.


@dataclasses.dataclass(frozen=True)
class Command:
    """One `python -m MODULE ARGS...` found in a shell block."""

    block: Block
    module: str
    args: tuple[str, ...]

    @property
    def runnable(self) -> bool:
        return any(marker in arg for arg in self.args for marker in RUNNABLE)

    def __str__(self) -> str:
        return f"{self.block.where}: python -m {self.module} {' '.join(self.args)}"


def _commands_of(block: Block) -> list[Command]:
    commands = []
    for line in block.code.replace("\\\n", " ").splitlines():
        lexer = shlex.shlex(line.lstrip("!$ "), posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, "#"
        segment = []
        for token in [*lexer, ";"]:
            if token not in ("&&", "||", ";", "|", "&", ";;"):
                segment.append(token)
                continue
            while segment and segment[0] in ("do", "then", "else"):
                segment.pop(0)
            if segment[:2] == ["python", "-m"] and len(segment) > 2:
                module = segment[2]
                if module == "mnres" or module.startswith("experiments."):
                    commands.append(Command(block, module, tuple(segment[3:])))
            segment = []
    return commands


def _shell_blocks():
    return [b for p in DOCS for b in fenced_blocks(p) if b.language in ("bash", "sh", "shell")]


COMMANDS = [c for b in _shell_blocks() for c in _commands_of(b)]


def test_documented_commands_are_found():
    modules = {c.module for c in COMMANDS}
    assert {"experiments.malaria", "mnres"} <= modules, modules
    assert any(c.runnable for c in COMMANDS)


def _help_text(module: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    # The experiments' --help/--helpfull (experiments._cli) and argparse's exit with 0.
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, (
        f"python -m {module} {' '.join(args)} fails:\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


def _is_absl_program(module: str) -> bool:
    spec = importlib.util.find_spec(module)
    return "app.run(" in Path(spec.origin).read_text()


@functools.cache
def _absl_flags(module: str) -> frozenset:
    text = _help_text(module, "--helpfull")
    names = set()
    for prefix, name in re.findall(r"^\s+--(\[no\])?([\w.-]+):", text, flags=re.M):
        names.add(name)
        if prefix:
            names.add(f"no{name}")
    assert names, f"python -m {module} --helpfull lists no flags"
    return frozenset(names)


@functools.cache
def _mnres_options(command: str) -> frozenset:
    text = _help_text("mnres", command, "--help")
    return frozenset(re.findall(r"(--[\w-]+)", text))


def _config(spec: str):
    path, _, arg = spec.partition(":")
    module_spec = importlib.util.spec_from_file_location("doc_config", REPO / path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def _check_absl_command(command: Command) -> None:
    flags = _absl_flags(command.module)
    options = [a for a in command.args if a.startswith("--")]
    config_files = [a.split("=", 1)[1] for a in options if a.startswith("--config=")]
    for spec in config_files:
        assert (REPO / spec.partition(":")[0]).is_file(), f"{command}: no config {spec}"
    config = None
    for option in options:
        name = option[2:].split("=", 1)[0]
        if not name.startswith("config."):
            assert name in flags, f"{command}: python -m {command.module} has no flag --{name}"
            continue
        if config is None:
            config = _config(config_files[0] if config_files else "experiments/configs/default.py")
        node = config
        for field in name.split(".")[1:]:
            assert field in node, f"{command}: the config has no field {name}"
            node = node[field]


@pytest.mark.parametrize("command", COMMANDS, ids=str)
def test_command_names_existing_module_flags_and_fields(command):
    assert importlib.util.find_spec(command.module) is not None, f"{command}: no such module"
    if command.module == "mnres":
        assert command.args and command.args[0] in MNRES_COMMANDS, str(command)
        known = _mnres_options(command.args[0])
        for option in (a.split("=", 1)[0] for a in command.args if a.startswith("--")):
            assert option in known, f"{command}: python -m mnres {command.args[0]} has no {option}"
    elif _is_absl_program(command.module):
        _check_absl_command(command)


def _runnable_blocks():
    """Shell blocks with a runnable command; the same command twice (other workdir) runs once."""
    blocks = {}
    for block in _shell_blocks():
        if any(c.runnable for c in _commands_of(block)):
            blocks.setdefault(re.sub(r"--workdir=\S+", "", block.code), block)
    return list(blocks.values())


@pytest.mark.slow
@pytest.mark.parametrize("block", _runnable_blocks(), ids=lambda b: b.where)
def test_runnable_commands_run(block, tmp_path):
    commands = _commands_of(block)
    assert all(c.runnable for c in commands), f"{block.where}: split the block; some need data"
    if "malaria-mini" in block.code and not (REPO.parent / "shared/data/malaria-mini").is_dir():
        pytest.skip("needs the 1,000 NIH crops of ../shared/data/malaria-mini beside the repo")
    workdirs = sorted(set(re.findall(r"--workdir=(\S+)", block.code)))
    script = block.code
    for i, workdir in enumerate(workdirs):
        script = script.replace(f"--workdir={workdir}", f"--workdir={tmp_path / f'run{i}'}")
    proc = subprocess.run(
        ["bash", "-c", "set -e\n" + script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, f"{block.where}:\n{proc.stderr[-4000:]}"
    for i in range(len(workdirs)):
        # `wait` hides the exit status of background processes; a finished run has a report.
        assert (tmp_path / f"run{i}" / "report.json").is_file(), f"{block.where}: no report"


def test_model_table_is_the_commands_output(capsys):
    from experiments import model_table

    model_table.main()
    table = capsys.readouterr().out.strip()
    assert table in (REPO / "docs" / "models.md").read_text(), "python -m experiments.model_table"


# ---------------------------------------------------------------------------------------------
# Links.

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", re.M)


@functools.cache
def heading_anchors(path: Path) -> frozenset:
    """GitHub's anchors for the headings of a markdown file (inline code text included)."""
    anchors, seen, in_fence = set(), {}, False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            in_fence = not in_fence
            continue
        match = None if in_fence else re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", match.group(1))
        slug = re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")
        anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return frozenset(anchors)


def _links():
    for path in DOCS:
        text = prose(path)
        for target in [*LINK.findall(text), *REFERENCE.findall(text)]:
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
                yield path, target


@functools.cache
def _ignored_by_git(path: Path) -> bool:
    proc = subprocess.run(
        ["git", "check-ignore", "-q", str(path)], cwd=REPO, capture_output=True, timeout=30
    )
    return proc.returncode == 0


@pytest.mark.parametrize(
    "path, target", list(_links()), ids=lambda x: x.name if isinstance(x, Path) else x
)
def test_relative_links_resolve(path, target):
    file, _, anchor = target.partition("#")
    resolved = (path.parent / file).resolve() if file else path
    where = f"{path.relative_to(REPO)} links to {target}"
    assert resolved.is_relative_to(REPO) and resolved.exists(), f"{where}: no such file"
    if shutil.which("git") and (REPO / ".git").exists():
        assert not _ignored_by_git(resolved), f"{where}: git ignores it, so it is not committed"
    if anchor:
        assert resolved.suffix == ".md", f"{where}: an anchor into a non-markdown file"
        assert anchor in heading_anchors(resolved), f"{where}: no such heading"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(models.MODELS))
def test_readme_library_snippet_works_for_every_registered_model(name):
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Use the blocks as a library\n\n```python\n(.*?)```", text, re.S)
    assert block, "the README's library section lost its snippet"
    call = '"mobilenet_v2", alpha=0.35, num_classes=2'
    assert call in block.group(1)
    exec(block.group(1).replace(call, f'"{name}", num_classes=2'), {})


def test_generated_tables_equal_their_records(capsys):
    """Every `<!-- generated: NAME -->` block of the docs is what its command writes now."""
    from experiments import docs_tables

    assert docs_tables.main(["--check"]) == 0, capsys.readouterr().out
    blocks = [m.group("name") for p in docs_tables._files()
              for m in docs_tables._BLOCK.finditer(p.read_text())]  # fmt: skip
    assert "verdict_cv" in blocks


def test_a_stale_generated_block_is_found():
    from experiments import docs_tables

    text = ("x\n<!-- generated: verdict_cv (python -m experiments.docs_tables) -->\n"
            "| typed by hand |\n<!-- end generated: verdict_cv -->\n")  # fmt: skip
    new, changed = docs_tables.regenerate(text)
    assert changed == ["verdict_cv"] and "typed by hand" not in new


def test_round2_fold_outputs_table_sets_a_retrained_fold_beside_its_record(tmp_path, monkeypatch):
    from experiments import docs_tables

    monkeypatch.setattr(docs_tables, "REPO", tmp_path)
    assert docs_tables._round2_fold_outputs_table() == "No fold recorded yet."
    machine = {"cpu": "AMD EPYC", "versions": {"jax": "0.10.2"}}
    runs = [
        {"recipe": "r", "fold": 0, "evaluated": {"step": 10}, "machine": machine},
        {"recipe": "r", "fold": 1, "evaluated": {"step": 12}, "machine": machine,
         "validation": {"accuracy": 0.95, "auc": 0.99, "sensitivity": 0.9, "specificity": 0.9},
         "recorded": {"evaluated": {"step": 11},
                      "validation": {"accuracy": 0.96, "auc": 0.995}}},
    ]  # fmt: skip
    folder = tmp_path / "experiments" / "results" / "fold_outputs" / "search_round2"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"runs": runs}))
    rows = docs_tables._round2_fold_outputs_table().splitlines()[2:]
    assert rows == [
        "| r | 0 | recorded | 10 | as recorded | AMD EPYC, jax 0.10.2 |",
        "| r | 1 | trained again | 12 (11) | 0.9500 / 0.9900 (0.9600 / 0.9950) | AMD EPYC, jax "
        "0.10.2 |",
    ]


def test_library_layout_names_every_module():
    """docs/library.md's layout has one line for every module of mnres/ and experiments/."""
    text = (REPO / "docs" / "library.md").read_text()
    block = re.search(r"```\nmnres/\n(.*?)```", text, re.S)
    assert block, "docs/library.md lost its layout block"
    words = set(re.findall(r"[\w*]+", block.group(1)))
    patterns = [w for w in words if "*" in w]
    missing = []
    for root in ("mnres", "experiments"):
        for path in sorted((REPO / root).rglob("*.py")):
            rel = path.relative_to(REPO)
            if path.name == "__init__.py" or rel.parts[:2] == ("experiments", "peers"):
                continue  # a package is its folder's line; the peers are one folder's line
            stem = path.stem
            if stem not in words and not any(fnmatch.fnmatch(stem, p) for p in patterns):
                missing.append(str(rel))
    assert not missing, f"docs/library.md's layout does not name: {missing}"
