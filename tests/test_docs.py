"""The documentation stays true: the configuration reference matches the code, and the
commands the docs show parse with the tools' own parsers."""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def load_generator():
    spec = importlib.util.spec_from_file_location(
        "config_reference", REPO / "docs/config_reference.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_reference_is_up_to_date() -> None:
    generator = load_generator()
    assert generator.undocumented() == []  # every field has a description in its docstring
    written = (REPO / "docs/config-reference.md").read_text()
    assert written == generator.render(), "run `make docs` to regenerate docs/config-reference.md"
    for key in ("peers_dns", "secret_access_key", "max_concurrent", "simulate_nodes", "top_k"):
        assert f"| `{key}` |" in written


def command_lines() -> list[tuple[str, str]]:
    """(document, command line) for every babel-sync / pcache / ckpt / torchrun command shown in
    a code block of the README or docs/ (continuations joined, comments and pipes cut)."""
    found = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        fences = re.findall(r"^```(\w*)\n(.*?)^```", doc.read_text(), re.DOTALL | re.MULTILINE)
        for language, block in fences:
            if language not in ("", "bash", "sh", "console"):
                continue
            # continuations joined; a synopsis's optional [--flag [ARG]] is checked as given
            text = block.replace("\\\n", " ").replace("[", " ").replace("]", " ")
            for line in text.splitlines():
                line = line.strip().removeprefix("$ ")
                line = re.split(r"\s+#\s|\s[|>]|\s2>|\s&(?:\s|$)|\s&&\s", line)[0].strip()
                # a synopsis's placeholders: "local|remote" -> the first choice, N -> a number
                line = re.sub(r"(?<=\s)([\w-]+)\|[\w|-]+", r"\1", line)
                line = re.sub(r"(?<=\s)N(?=\s|$)", "10", line)
                if re.match(r"(babel-sync|pcache|ckpt|torchrun) ", line):
                    found.append((doc.name, line))
    return found


def parse(argv: list[str]) -> None:
    """Parse a command line with the tool's own parser (SystemExit on an unknown flag)."""
    from babel_sync.cli import build_parser as babel_sync_parser
    from ckpt.cli import build_parser as ckpt_parser
    from ckpt.trainer.train import build_parser as trainer_parser
    from pcache.cli import build_parser as pcache_parser

    tool, args = argv[0], argv[1:]
    if tool == "torchrun":  # check the trainer's own arguments
        assert "-m" in args and args[args.index("-m") + 1] == "ckpt.trainer", argv
        trainer_parser().parse_args(args[args.index("-m") + 2 :])
    elif tool == "ckpt" and args[:1] == ["train"]:
        trainer_parser().parse_args(args[1:])
    else:
        parser = {"babel-sync": babel_sync_parser, "pcache": pcache_parser, "ckpt": ckpt_parser}
        parser[tool]().parse_args(args)


def test_documented_commands_parse() -> None:
    """Every command the docs show names a real subcommand with real flags. (The README's tour
    also runs, in tests/test_readme.py.)"""
    lines = command_lines()
    assert len(lines) >= 20
    bad = []
    for doc, line in lines:
        try:
            parse(shlex.split(line))
        except SystemExit:
            bad.append(f"{doc}: {line}")
    assert bad == []


def test_a_wrong_flag_is_caught() -> None:
    for line in ("babel-sync sync a b --verfy full", "pcache mount ds /mnt --red-only",
                 "torchrun --nproc-per-node 2 -m ckpt.trainer --stpes 4"):  # fmt: skip
        try:
            parse(shlex.split(line))
        except SystemExit:
            continue
        raise AssertionError(f"{line!r} parsed")


def test_every_benchmark_is_documented_with_its_command() -> None:
    """docs/benchmarks.md names a command for every bench script, and only scripts that exist."""
    text = (REPO / "docs/benchmarks.md").read_text()
    named = set(re.findall(r"bench/([\w/]+\.py)", text))
    on_disk = {p.relative_to(REPO / "bench").as_posix() for p in (REPO / "bench").glob("*.py")}
    # helpers the benchmarks share, and the FUSE floor mount_vs_peers.py starts: not benchmarks
    on_disk -= {"measure.py", "netns.py", "fuse_floor.py"}
    assert on_disk <= named, f"undocumented benchmarks: {sorted(on_disk - named)}"
    assert all((REPO / "bench" / name).exists() for name in named), named
    for name in on_disk:
        assert f"Command: `.venv/bin/python bench/{name}" in text, name


def test_every_simulator_is_documented_and_in_make_sim() -> None:
    text = (REPO / "docs/scale.md").read_text()
    makefile = (REPO / "Makefile").read_text()
    sims = sorted(p.name for p in (REPO / "bench/sim").glob("*_sim.py"))
    assert len(sims) == 3, sims
    for name in sims:
        assert f".venv/bin/python bench/sim/{name}" in text, name
        assert f"$(PY) bench/sim/{name}" in makefile, name
