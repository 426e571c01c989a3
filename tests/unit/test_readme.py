"""The README's metric reference cannot drift from what the sidecar exports."""

from __future__ import annotations

import re
from pathlib import Path

from exporter.metrics import CounterFamily, SidecarMetrics

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_metric_reference_lists_exactly_the_exported_families() -> None:
    text = README.read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| \w+ \| `(tts_\w+)` \|", text, flags=re.MULTILINE))
    exported = {family.name + ("_total" if isinstance(family, CounterFamily) else "")
                for family in SidecarMetrics().metric_set.families()}
    assert documented == exported, {"undocumented": exported - documented,
                                    "not exported": documented - exported}


REPO = README.parent
# What only the venv has: the interpreter's own tools, the dev tools and the package's scripts.
VENV_PROGRAMS = {"python", "pip", "pytest", "ruff", "mypy",
                 *re.findall(r"^([\w-]+) = \"[\w.]+:\w+\"$",
                             (REPO / "pyproject.toml").read_text(), flags=re.MULTILINE)}


def readme_shell_commands() -> list[str]:
    """The command lines of the README's ```sh blocks (comments dropped)."""
    blocks = re.findall(r"^```sh\n(.*?)^```", README.read_text(encoding="utf-8"),
                        flags=re.MULTILINE | re.DOTALL)
    return [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_readme_commands_work_without_an_activated_venv() -> None:
    commands = readme_shell_commands()
    assert any(command.startswith(".venv/bin/") for command in commands)
    for command in commands:
        program = command.split()[0]
        if program.startswith(".venv/bin/"):
            assert program.removeprefix(".venv/bin/") in VENV_PROGRAMS, command
        else:
            assert program not in VENV_PROGRAMS, f"needs the venv activated: {command}"
    # Debian has python3 but no `python`: no command anywhere in the README starts with it.
    assert not re.findall(r"`python ", README.read_text(encoding="utf-8"))


def test_every_make_target_the_readme_names_exists() -> None:
    makefile = (REPO / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, flags=re.MULTILINE))
    named = set(re.findall(r"`make ([a-z][\w-]*)", README.read_text(encoding="utf-8")))
    assert {"run", "test", "check", "lint"} <= named
    assert named <= targets, named - targets


def test_pointers_to_documents_in_the_sources_resolve() -> None:
    """`README: "Section"` names a README section; a top-level document (`X.md`) exists."""
    sections = set(re.findall(r"^#+ (.+)$", README.read_text(encoding="utf-8"),
                              flags=re.MULTILINE))
    sources = [path for folder in ("exporter", "tts_app", "tests", "config", "alerts")
               for path in (REPO / folder).rglob("*")
               if path.suffix in {".py", ".yaml", ".yml"} and path.is_file()
               and path != Path(__file__)]
    pointers = 0
    for path in sources:
        text = path.read_text(encoding="utf-8", errors="replace")
        for section in re.findall(r'README: "([^"]+)"', text):
            pointers += 1
            assert section in sections, f"{path}: no README section {section!r}"
        for document in re.findall(r"(?<![\w/.-])([A-Z][A-Za-z0-9_-]*\.md)\b", text):
            assert (REPO / document).is_file(), f"{path}: {document} does not exist"
    assert pointers > 0
