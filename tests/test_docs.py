"""The README and docs/ cannot drift from the code.

- Every ``python -m mnv3.<entry> ...`` and ``mnv3-<entry> ...`` command they write (in code blocks,
  indented code, inline code, continued over lines with ``\\``) composes with Hydra's compose API
  against the project's configs, after the rewrites the entry point itself applies to its command
  line (``resume=<run>``, ``backbone=<file.yaml>``, ``data.<key>=`` for tools opening a run):
  every group and option exists, every key exists, every multirun value composes.
- Every relative link (and its ``#anchor``) resolves, every ``make <target>`` exists, every page
  of docs/ is in the index.
- The quick demos' run times and results come from one file: the README's demo table is the
  rendering of ``bench/reference/demos.json`` (``bench/bench_demos.py``), and no other place in
  the README, the Makefile or the experiment files states a run time for them.

Placeholders such as ``<run>`` stand for a value the user supplies; composition reads no file, so
``/data/imagenet`` or ``path/to/x.ckpt`` need not exist.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shlex
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser

from mnv3.cli import CONFIG_DIR, open_data_overrides
from mnv3.models.block_table import backbone_file_overrides
from mnv3.resume import resume_argv

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = [README, *sorted((REPO / "docs").glob("*.md"))]
sys.path.insert(0, str(REPO / "bench"))

import bench_demos  # noqa: E402  (bench/ is not a package)

PLACEHOLDER = "_placeholder_"
# A backbone file anywhere a command names one that is not on disk: the shipped table file.
SHIPPED_BACKBONE_FILE = CONFIG_DIR / "backbone" / "small_table.yaml"


def _resume(args: list[str]) -> list[str]:
    """``resume=<run>`` as the entry rewrites it (the run folder's files are not read here)."""
    return resume_argv(args, needed=())


def _train_argv(args: list[str]) -> list[str]:
    """``mnv3.train``'s rewrites: ``resume=<run>``, then ``backbone=<file.yaml>`` to overrides."""
    files = []
    for arg in _resume(args):
        value = arg.partition("=")[2] if arg.startswith("backbone=") else ""
        if value.endswith((".yaml", ".yml")) and not Path(value).is_file():
            arg = f"backbone={SHIPPED_BACKBONE_FILE}"
        files.append(arg)
    return backbone_file_overrides(files)


def _open_data_argv(args: list[str]) -> list[str]:
    """A tool that opens a finished run: plain ``data.<key>=`` overrides apply to its data."""
    return open_data_overrides(["prog", *args])[1:]


# Entry point -> (its config name, the rewrite its main() applies before Hydra parses the line).
ENTRIES: dict[str, tuple[str, Callable[[list[str]], list[str]]]] = {
    "train": ("train", _train_argv),
    "eval": ("eval", _open_data_argv),
    "export": ("export", _open_data_argv),
    "explain": ("explain", list),
    "search": ("search", _resume),
    "predict": ("predict", _open_data_argv),
}
# Hydra plugin options a documented command may select, with the module that provides each and
# the extra that installs it (not part of make install): without it such a command is skipped.
PLUGIN_OPTIONS = {"hydra/sweeper/optuna": ("hydra_plugins.hydra_optuna_sweeper", "sweep")}
# Hydra's own flags that take a value, and those that take none (besides help and multirun).
FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-name", "-cn"}
FLAGS = {"--resolve", "--info", "-i"}
SHELL_OPERATORS = {"|", "||", "&&", ";", ">", ">>", "2>", "&"}

COMMAND = re.compile(r"python -m mnv3\.(?P<module>[\w.]+)|(?<![\w./-])mnv3-(?P<script>[a-z]+)\b")
FENCE = re.compile(r"^```[^\n]*\n.*?^```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"`([^`]+)`")
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|!\[[^\]]*\]\(([^)\s]+)\)")
MAKE = re.compile(r"(?<![\w/.-])make ([a-z][\w-]*)")


@dataclass(frozen=True)
class DocCommand:
    """One command written in a doc: where, which entry point, and its text from the entry on."""

    path: Path
    line: int
    entry: str
    text: str

    def __str__(self) -> str:
        return f"{self.path.relative_to(REPO)}:{self.line}: {self.text}"


# -- reading markdown ------------------------------------------------------------------------------
def _blank(text: str, spans: list[tuple[int, int]]) -> str:
    """``text`` with the characters of ``spans`` replaced by spaces (newlines kept)."""
    chars = list(text)
    for start, end in spans:
        for i in range(start, end):
            if chars[i] != "\n":
                chars[i] = " "
    return "".join(chars)


def _fences(text: str) -> list[tuple[int, int]]:
    return [m.span() for m in FENCE.finditer(text)]


def _inline_spans(prose: str) -> list[tuple[int, int]]:
    """Inline code spans of ``prose`` (fences already blanked), not crossing a blank line."""
    return [m.span() for m in INLINE.finditer(prose) if "\n\n" not in m.group(1)]


def _indented(prose: str, offset: int) -> bool:
    """Whether ``offset`` lies on an indented code line (4 spaces) of ``prose``."""
    start = prose.rfind("\n", 0, offset) + 1
    return prose.startswith("    ", start) and not prose[start:offset].strip().startswith(
        ("-", "*")
    )


def _logical_line(text: str, offset: int) -> str:
    """From ``offset`` to the end of its line, following ``\\`` continuations."""
    out = []
    while True:
        end = text.find("\n", offset)
        end = len(text) if end < 0 else end
        line = text[offset:end]
        if line.rstrip().endswith("\\") and end < len(text):
            out.append(line.rstrip()[:-1])
            offset = end + 1
            continue
        out.append(line)
        return " ".join(out)


def commands_in(path: Path, text: str | None = None) -> tuple[list[DocCommand], list[str]]:
    """The commands a markdown file writes, and the mentions found outside any code."""
    text = path.read_text() if text is None else text
    fences = _fences(text)
    prose = _blank(text, fences)
    spans = _inline_spans(prose)
    found, bare = [], []
    for m in COMMAND.finditer(text):
        at = m.start()
        line = text.count("\n", 0, at) + 1
        entry = m.group("module") or m.group("script")
        span = next(((s, e) for s, e in spans if s < at < e), None)
        if any(s <= at < e for s, e in fences):
            command = _logical_line(text, at)
        elif span is not None:
            command = " ".join(text[at : span[1] - 1].split())
        elif _indented(prose, at):
            command = _logical_line(text, at)
        else:
            bare.append(f"{path.relative_to(REPO)}:{line}: {text[at : at + 60]!r}")
            continue
        found.append(DocCommand(path, line, entry, command))
    return found, bare


def _headings(text: str) -> set[str]:
    """GitHub's anchors of a markdown file's headings (and explicit ``<a id=...>`` anchors)."""
    anchors: set[str] = set(re.findall(r"<a (?:id|name)=\"([^\"]+)\"", text))
    seen: dict[str, int] = {}
    for m in re.finditer(r"^#{1,6} +(.+?) *#*$", _blank(text, _fences(text)), re.M):
        title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1))  # a link's text only
        slug = re.sub(r"[^\w\- ]", "", title.strip().lower()).replace(" ", "-")
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


def link_problems(path: Path, text: str | None = None) -> list[str]:
    """Relative links of ``path`` whose file, or whose ``#anchor`` in a markdown file, is missing."""
    text = path.read_text() if text is None else text
    prose = _blank(text, _fences(text))
    prose = _blank(prose, _inline_spans(prose))
    problems = []
    for m in LINK.finditer(prose):
        target = m.group(1) or m.group(2)
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (path.parent / file_part).resolve() if file_part else path
        line = text.count("\n", 0, m.start()) + 1
        where = f"{path.relative_to(REPO)}:{line}: ({target})"
        if not resolved.exists():
            problems.append(f"{where}: {resolved} does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in _headings(resolved.read_text()):
            problems.append(f"{where}: no heading with anchor #{anchor} in {resolved.name}")
    return problems


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):(?!=)", (REPO / "Makefile").read_text(), re.M))


def make_problems(path: Path, text: str | None = None) -> list[str]:
    """``make <target>`` written in code (blocks, indented lines, inline) with no such target."""
    text = path.read_text() if text is None else text
    fences = _fences(text)
    prose = _blank(text, fences)
    code = [text[s:e] for s, e in fences + _inline_spans(prose)]
    code += [line for line in prose.splitlines() if line.startswith("    ")]
    targets = make_targets()
    return [
        f"{path.relative_to(REPO)}: make {name}: no such target in the Makefile"
        for name in sorted({n for chunk in code for n in MAKE.findall(chunk)})
        if name not in targets
    ]


# -- composing a command ---------------------------------------------------------------------------
def _split(command: DocCommand) -> list[str]:
    """The command's arguments after the entry, as a shell would split them."""
    text = re.sub(r"<[^<>\n]*>", PLACEHOLDER, command.text)
    tokens = shlex.split(text, comments=True)
    start = 3 if tokens[:2] == ["python", "-m"] else 1
    args = []
    for token in tokens[start:]:
        if token in SHELL_OPERATORS:
            break
        if token == "...":  # an elision: "and the rest of your arguments"
            continue
        optional = re.fullmatch(r"\[([\w.+~/-]+=[^\[\]]*)\]", token)  # [quantize=int8]: optional
        args.append(optional.group(1) if optional else token)
    return args


def _variants(overrides: list[str], multirun: bool) -> Iterator[list[str]]:
    """The override lists to compose: the line itself, or under ``-m`` one per swept option."""
    if not multirun:
        yield overrides
        return
    parsed = OverridesParser.create().parse_overrides(overrides)
    values = [
        list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.input_line] for o in parsed
    ]
    keys = [o.get_key_element() for o in parsed]
    firsts = [
        f"{k}={v[0]}" if o.is_sweep_override() else v[0]
        for k, v, o in zip(keys, values, parsed, strict=True)
    ]
    yield firsts
    for i, (o, choices) in enumerate(zip(parsed, values, strict=True)):
        if o.is_sweep_override() and _is_group(keys[i]):  # each option must exist; a plain
            for value in choices[1:]:  # key's other values compose as its first does
                yield [*firsts[:i], f"{keys[i]}={value}", *firsts[i + 1 :]]


def _is_group(key: str) -> bool:
    return (CONFIG_DIR / key.lstrip("+~")).is_dir() or key.startswith("hydra/")


def _drop_placeholders(overrides: list[str]) -> list[str]:
    """Drop what only a run can supply: a group choice that is a placeholder (``backbone=<name>``),
    and a placeholder ``hydra.searchpath`` (a run's folder) with the group options it adds."""
    loose = any(o.startswith("hydra.searchpath=") and PLACEHOLDER in o for o in overrides)
    kept = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "hydra.searchpath" and PLACEHOLDER in value:
            continue
        if _is_group(key) and PLACEHOLDER in value:
            continue
        if loose and _is_group(key) and not key.startswith("hydra/"):
            options = value.split(",")
            if not all((CONFIG_DIR / key / f"{o}.yaml").is_file() for o in options):
                continue  # options the run's own search path holds
        kept.append(override)
    return kept


def compose_problem(command: DocCommand) -> str | None:
    """Why ``command`` would not start (its config does not compose), or None."""
    if command.entry not in ENTRIES:
        return f"{command}: no entry point mnv3.{command.entry} (expected one of {sorted(ENTRIES)})"
    config_name, rewrite = ENTRIES[command.entry]
    if not (CONFIG_DIR / f"{config_name}.yaml").is_file():
        return f"{command}: {CONFIG_DIR / config_name}.yaml does not exist"
    try:
        args = _split(command)
    except ValueError as exc:
        return f"{command}: cannot be split as a shell would ({exc})"
    multirun, overrides, skip = False, [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in ("--help", "-h", "--hydra-help"):
            return None  # prints help; the entry's config was checked above
        elif arg in ("-m", "--multirun"):
            multirun = True
        elif arg in FLAGS_WITH_VALUE:
            skip = True
        elif arg.startswith("-") and arg not in FLAGS:
            return f"{command}: unknown flag {arg}"
        elif not arg.startswith("-"):
            overrides.append(arg)
    try:
        for variant in _variants(_drop_placeholders(rewrite(overrides)), multirun):
            _compose(config_name, tuple(variant))
    except Exception as exc:  # any composition error is the finding
        for option, (module, extra) in PLUGIN_OPTIONS.items():
            if f"Could not find '{option}'" in str(exc) and not importlib.util.find_spec(module):
                raise PluginNotInstalled(
                    f"{command}: needs the '{extra}' extra ({module})"
                ) from exc
        return f"{command}: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
    return None


class PluginNotInstalled(Exception):
    """A documented command selects a Hydra plugin that an uninstalled extra provides."""


@functools.cache
def _compose(config_name: str, overrides: tuple[str, ...]) -> None:
    """Compose once per distinct line (~0.3-1 s each here); raises what Hydra raises."""
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            compose(config_name, overrides=list(overrides), return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def _all_commands() -> list[DocCommand]:
    return [c for path in DOCS for c in commands_in(path)[0]]


# -- the tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("command", _all_commands(), ids=lambda c: f"{c.path.name}:{c.line}")
def test_every_command_in_the_docs_composes(command: DocCommand) -> None:
    try:
        problem = compose_problem(command)
    except PluginNotInstalled as missing:
        pytest.skip(str(missing))
    assert problem is None, problem


def test_every_command_mention_is_in_code_so_it_is_checked() -> None:
    bare = [b for path in DOCS for b in commands_in(path)[1]]
    assert not bare, "commands written outside code (not checked): " + "; ".join(bare)
    assert len(_all_commands()) > 50  # the README and the manual are read, not skipped


def test_every_relative_link_resolves() -> None:
    problems = [p for path in DOCS for p in link_problems(path)]
    assert not problems, "\n".join(problems)


def test_every_make_target_named_exists() -> None:
    problems = [p for path in DOCS for p in make_problems(path)]
    assert not problems, "\n".join(problems)


def test_every_docs_page_is_in_the_index() -> None:
    index = (REPO / "docs" / "README.md").read_text()
    linked = {(REPO / "docs" / t).resolve() for t in re.findall(r"\]\(([\w.-]+\.md)\)", index)}
    missing = [p.name for p in DOCS[1:] if p.name != "README.md" and p.resolve() not in linked]
    assert not missing, f"docs pages missing from docs/README.md: {missing}"


def test_a_typo_in_a_command_a_link_or_a_target_is_found(tmp_path: Path) -> None:
    page = REPO / "docs" / "typos.md"  # never written: the text is checked as if it were there
    text = """# Typos

```bash
python -m mnv3.train experiment=textures_quick \\
    trainer.max_epochs=3
python -m mnv3.train backbone=lrage
python -m mnv3.train experiment=textures_quick \\
    trainer.max_epoch=3
python -m mnv3.trian experiment=textures_quick
python -m mnv3.train -m backbone=large,smal
mnv3-eval ckpt_path=<run>/checkpoints/best.ckpt split=vall data.root=/elsewhere
```

A bare one: python -m mnv3.train seed=1, and [a page](nope.md), [an anchor](cli.md#no-such-heading),
[a good one](cli.md#evaluate); `make trian`, `make train`.
"""
    commands, bare = commands_in(page, text)
    problems = {c.line: compose_problem(c) for c in commands}
    assert [c.line for c in commands] == [4, 6, 7, 9, 10, 11]
    assert problems[4] is None  # the continued line is joined and composes
    assert "Could not find 'backbone/lrage'" in str(problems[6])
    assert "trainer.max_epoch" in str(problems[7])
    assert "no entry point mnv3.trian" in str(problems[9])
    assert "backbone/smal" in str(problems[10])  # the second swept value is composed too
    assert problems[11] is None  # split is checked when eval runs, not by composition
    assert len(bare) == 1 and "seed=1" in bare[0]
    links = link_problems(page, text)
    assert len(links) == 2 and "nope.md" in links[0] and "#no-such-heading" in links[1]
    assert make_problems(page, text) == [
        "docs/typos.md: make trian: no such target in the Makefile"
    ]


def test_the_readme_is_short() -> None:
    assert len(README.read_bytes()) <= 12_000


# -- the quick demos: one place for their times and results ------------------------------------------
def _demos_json() -> dict:
    return json.loads(bench_demos.DEMOS_JSON.read_text())


def test_the_readme_demo_table_is_rendered_from_demos_json() -> None:
    expected = bench_demos.render_readme_table(_demos_json())
    assert bench_demos.readme_block(README.read_text()) == expected, (
        "the README's demo table differs from bench/reference/demos.json: "
        "python bench/bench_demos.py --render-only rewrites it"
    )


def test_every_quick_demo_has_a_measured_record() -> None:
    records = {r["name"]: r for r in _demos_json()["demos"]}
    for demo in bench_demos.DEMOS:
        if not (CONFIG_DIR / "experiment" / f"{demo.name}.yaml").is_file():
            continue
        assert demo.name in records, f"{demo.name}: python bench/bench_demos.py --demos {demo.name}"
        record = records[demo.name]
        assert record["exit status"] == 0 and record["wall s"] > 0
        assert [m["label"] for m in record["metrics"]] == [m.label for m in demo.metrics]
        assert all(m["value"] is not None for m in record["metrics"])
        assert record["command"] == bench_demos.command_of(demo)  # the Makefile still runs it


TIME = re.compile(
    r"\b\d+(?:\.\d+)?\s*(?:s|sec|secs|seconds?|mins?|minutes?|h|hours?)\b|\bminutes?\b|\bhours?\b",
    re.I,
)


def _demo_names() -> list[str]:
    targets = bench_demos.make_targets()
    names = [d.name for d in bench_demos.DEMOS]
    return names + [f"make {targets[n]}" for n in names if n in targets]


def _mentions_demo(chunk: str) -> bool:
    return any(re.search(rf"{re.escape(n)}(?![\w-])", chunk) for n in _demo_names())


def test_no_other_place_states_a_quick_demo_run_time() -> None:
    readme = README.read_text()
    readme = readme.replace(bench_demos.readme_block(readme), "")
    chunks = [(README, c) for c in re.split(r"\n\s*\n|\n(?=\|)", readme)]
    makefile = REPO / "Makefile"
    chunks += [(makefile, line) for line in makefile.read_text().splitlines()]
    for path in sorted((CONFIG_DIR / "experiment").glob("*.yaml")):
        comments = [line for line in path.read_text().splitlines() if line.lstrip().startswith("#")]
        if path.stem in {d.name for d in bench_demos.DEMOS}:
            chunks.append((path, "\n".join([path.stem, *comments])))  # its own comments, whole
        chunks += [(path, line) for line in path.read_text().splitlines()]
    found = [
        f"{path.name}: {' '.join(chunk.split())[:160]!r}"
        for path, chunk in chunks
        if _mentions_demo(chunk) and TIME.search(chunk)
    ]
    assert not found, "run times quoted outside bench/reference/demos.json:\n" + "\n".join(found)


def test_the_time_check_catches_a_quoted_time() -> None:
    assert _mentions_demo("make train-detect  # ~8 minutes") and TIME.search("~8 minutes")
    assert TIME.search("about 5 minutes on 2 cores") and TIME.search("50 s wall")
    assert not TIME.search("30 fine-tune steps, 300 steps first, 64x64, 12-bit")
