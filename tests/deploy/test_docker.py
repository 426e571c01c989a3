"""config/docker/: the Dockerfiles, checked statically (no Docker daemon on CI machines).

What a wrong Dockerfile would break in production: a root sidecar, torch dragged into the
sidecar image, ports that disagree with the configs baked in, COPY of files that do not exist,
a build stage without the C compiler the package's scanner needs.
"""

from __future__ import annotations

import io
import re

import dockerfile_parse
import pytest
import yaml

from .conftest import REPO

DOCKER = REPO / "config" / "docker"
IMAGES = {"Dockerfile.app-cuda": "app.yaml", "Dockerfile.app-cpu": "app.yaml",
          "Dockerfile.exporter": "exporter.yaml"}


def parse(name: str) -> list[dict[str, str]]:
    content = io.BytesIO((DOCKER / name).read_bytes())
    return list(dockerfile_parse.DockerfileParser(fileobj=content).structure)


def final_stage(instructions: list[dict[str, str]]) -> list[dict[str, str]]:
    starts = [i for i, ins in enumerate(instructions) if ins["instruction"] == "FROM"]
    return instructions[starts[-1]:]


def default_port(config: str) -> int:
    listen = yaml.safe_load((REPO / "config" / config).read_text())["server"]["listen"]
    return int(listen.rsplit(":", 1)[1])


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_multistage_pinned_non_root(name: str) -> None:
    instructions = parse(name)
    bases = [ins["value"].split()[0] for ins in instructions if ins["instruction"] == "FROM"]
    assert len(bases) >= 2, "multi-stage build expected"
    for base in bases:
        assert re.search(r":\d", base), f"unpinned {base}"
        assert not base.endswith(":latest"), f"unpinned {base}"
    users = [ins["value"] for ins in final_stage(instructions) if ins["instruction"] == "USER"]
    assert users, "final stage must run as non-root"
    assert users[-1] not in ("root", "0"), "final stage must run as non-root"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_exposed_port_matches_config_default(name: str) -> None:
    exposed = [int(p) for ins in parse(name) if ins["instruction"] == "EXPOSE"
               for p in ins["value"].split()]
    assert exposed == [default_port(IMAGES[name])]


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_every_copy_source_exists(name: str) -> None:
    for ins in parse(name):
        if ins["instruction"] not in ("COPY", "ADD") or "--from=" in ins["value"]:
            continue
        *sources, _ = ins["value"].split()
        for source in sources:
            assert (REPO / source).exists(), f"{name}: COPY {source} not in the repository"


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_the_stage_that_builds_the_package_has_a_c_compiler(name: str) -> None:
    """pyproject.toml builds exporter/analyze/_scan.c, optionally: the build stage needs gcc,
    libc and Python headers before its `pip install` of the project, must check that the
    scanner imports after it, and the final stage copies the built venv only."""
    instructions = parse(name)
    starts = [i for i, ins in enumerate(instructions) if ins["instruction"] == "FROM"]
    build = instructions[starts[0]:starts[-1]]
    runs = [ins["value"] for ins in build if ins["instruction"] == "RUN"]
    compiler = next(i for i, run in enumerate(runs) if re.search(r"\bgcc\b", run))
    project = re.compile(r'pip install [^&]*\s"?\.(\[[\w,]+\])?"?(\s|$)')
    install = next(i for i, run in enumerate(runs) if project.search(run))
    imports = next(i for i, run in enumerate(runs) if "import exporter.analyze._scan" in run)
    assert compiler < install < imports
    assert "libc6-dev" in runs[compiler]
    base = build[0]["value"]
    assert base.startswith("python:") or re.search(r"python3\.\d+-dev", runs[compiler]), \
        "a distro Python needs its -dev package for the headers"
    assert not any("gcc" in ins["value"] for ins in final_stage(instructions)
                   if ins["instruction"] == "RUN")


def test_sidecar_image_has_no_torch_and_a_healthcheck() -> None:
    instructions = parse("Dockerfile.exporter")
    installs = [ins["value"] for ins in instructions
                if ins["instruction"] == "RUN" and "pip install" in ins["value"]]
    assert installs
    for line in installs:
        assert "torch" not in line, f"sidecar installs extras: {line}"
        assert "[" not in line, f"sidecar installs extras: {line}"
    health = [ins["value"] for ins in instructions if ins["instruction"] == "HEALTHCHECK"]
    assert health
    assert f"127.0.0.1:{default_port('exporter.yaml')}/healthz" in health[0]


def test_cuda_image_runs_on_nvidia_base_with_chattts() -> None:
    instructions = parse("Dockerfile.app-cuda")
    assert all(ins["value"].startswith("nvidia/cuda:")
               for ins in instructions if ins["instruction"] == "FROM")
    run = " ".join(ins["value"] for ins in instructions if ins["instruction"] == "RUN")
    assert "torch==" in run
    assert ".[chattts]" in run
    cpu = " ".join(ins["value"] for ins in parse("Dockerfile.app-cpu")
                   if ins["instruction"] == "RUN")
    assert ".[app]" in cpu
    assert "torch" not in cpu
