"""Packaging: pyproject.toml is the one list of dependencies; Dockerfile, README and CI follow it.

The Dockerfile cannot install pyproject.toml's dependencies as they stand (its base image keeps its
own torch), so it names its pins itself, and these tests fail when one disagrees with pyproject.toml
for the image's Python. `pip install .` must put no generic top-level package (`kernels`, `tools`,
`bench`, ...) into site-packages.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tools.check_env import load, mismatches, release, requirements, supported

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"


def dockerfile_args(text: str) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.MULTILINE))


def dockerfile_pip_requirements(text: str) -> dict[str, Requirement]:
    """What the Dockerfile's `pip install` lines name, by canonical name."""
    out: dict[str, Requirement] = {}
    for command in re.findall(r"^RUN (.*)$", text.replace("\\\n", " "), flags=re.MULTILINE):
        words = shlex.split(command)
        for i in [i for i, word in enumerate(words) if words[i - 1:i + 1] == ["pip", "install"]]:
            for word in words[i + 1:]:
                if word in ("&&", ";", "||"):
                    break
                if not word.startswith("-"):
                    req = Requirement(word)
                    out[canonicalize_name(req.name)] = req
    return out


def _pinned(req: Requirement) -> str | None:
    specs = list(req.specifier)
    return specs[0].version if len(specs) == 1 and specs[0].operator == "==" else None


def disagreements(dockerfile: str, project: dict) -> list[str]:
    """How the Dockerfile's pip pins and base-image declarations break pyproject.toml."""
    args = dockerfile_args(dockerfile)
    python = args["BASE_PYTHON"]
    wanted = requirements(project, python)
    ranges = supported(project)
    named = dockerfile_pip_requirements(dockerfile)
    out = []
    for name, req in named.items():
        want = wanted.get(name)
        pin = _pinned(req)
        if want is None:
            out.append(f"Dockerfile installs {req}; pyproject.toml lacks {name} on Python {python}")
        elif pin is not None and not want.specifier.contains(pin, prereleases=True):
            out.append(f"Dockerfile pins {req}; pyproject.toml wants {want} on Python {python}")
        elif pin is None and req.specifier not in (want.specifier, ranges.get(name)):
            out.append(f"Dockerfile gives {req}: pin {want}, or give pyproject.toml's range or the "
                       f"one [tool.fp8moe] supported declares")
    for name, req in wanted.items():
        if name not in named and name not in ranges:
            out.append(f"Dockerfile installs no {name} ({req}), and [tool.fp8moe] supported does "
                       f"not declare it one the base image keeps")
    torch = args["BASE_TORCH"]
    if not ranges["torch"].contains(release(torch), prereleases=True):
        out.append(f"the base image's torch {torch} is outside the supported {ranges['torch']}")
    if not Requirement(f"python{project['project']['requires-python']}").specifier.contains(python):
        out.append(f"the base image's Python {python} is outside requires-python")
    return out


def test_dockerfile_pins_agree_with_pyproject():
    assert disagreements(DOCKERFILE.read_text(), load()) == []


@pytest.mark.parametrize("old, new, culprit", [
    ("hydra-core==1.3.2", "hydra-core==1.3.1", "hydra-core==1.3.1"),
    # The image runs Python 3.12, where megatron-core 0.17+ is the one pyproject.toml names.
    ("megatron-core==0.19.2", "megatron-core==0.16.1", "megatron-core==0.16.1"),
    ('"safetensors>=0.4"', '"safetensors>=0.3"', "safetensors>=0.3"),
    ("        tokenizers==0.23.3 \\\n", "", "no tokenizers"),
    ("        wandb==0.31.0 \\\n", "        wandb==0.31.0 \\\n        einops==0.8.1 \\\n",
     "einops==0.8.1"),
    # NGC 25.12's torch: a 2.10 build, older than the code supports.
    ("BASE_TORCH=2.11.0a0+eb65b36914.nv26.02", "BASE_TORCH=2.10.0a0+b4e4ee81d3.nv25.12",
     "torch 2.10"),
])
def test_a_dockerfile_that_disagrees_is_caught(old, new, culprit):
    text = DOCKERFILE.read_text()
    assert old in text
    found = disagreements(text.replace(old, new), load())
    assert len(found) == 1 and culprit in found[0], found


def test_pyproject_pins_the_releases_ci_installs():
    """The set-up commands install [project.dependencies] as they stand: a range would let pip take
    a newer torch (on PyPI, the multi-GB CUDA build) than the one the tests run on."""
    project = load()
    wanted = requirements(project, "3.11")
    assert str(wanted["torch"].specifier) == "==2.13.0"
    assert str(wanted["triton"].specifier) == "==3.9.0"
    assert str(wanted["megatron-core"].specifier) == "==0.16.1"  # 0.17+ needs Python 3.12
    assert str(requirements(project, "3.12")["megatron-core"].specifier) == "<0.20,>=0.17"
    for name, specifier in supported(project).items():  # a pin lies within what is supported
        pin = _pinned(wanted[name])
        assert pin is not None and specifier.contains(pin), (name, str(specifier))


def test_check_env_holds_an_image_to_the_supported_range():
    """An environment like the image's: the Dockerfile's pins and declared torch; for what the base
    keeps, stand-ins of the kind NGC's constraint file pins (a triton and safetensors within the
    supported ranges, numpy, tqdm and matplotlib within pyproject.toml's)."""
    project = load()
    text = DOCKERFILE.read_text()
    image = {name: _pinned(req) for name, req in dockerfile_pip_requirements(text).items()}
    image.update(torch=dockerfile_args(text)["BASE_TORCH"], triton="3.6.0", safetensors="0.5.3",
                 numpy="2.1.0", tqdm="4.67.1", matplotlib="3.9.2")
    assert mismatches(project, "3.12", image) == []
    older = mismatches(project, "3.12", {**image, "torch": "2.10.0a0+b4e4ee81d3.nv25.12"})
    assert older == ["torch 2.10.0a0+b4e4ee81d3.nv25.12: pyproject.toml requires ==2.13.0 or, as "
                     "[tool.fp8moe] supported, >=2.11"]
    # Outside the supported list a dependency must be the pinned one; a missing one is named.
    assert mismatches(project, "3.12", {**image, "hydra-core": "1.3.1", "wandb": None}) == [
        "hydra-core 1.3.1: pyproject.toml requires ==1.3.2",
        "wandb is not installed; pyproject.toml requires wandb==0.31.0"]


def test_check_env_passes_here_and_refuses_a_wrong_declaration():
    """The command the image build runs, here: the test environment is what pyproject.toml says."""
    script = [sys.executable, str(REPO / "tools" / "check_env.py")]
    here = subprocess.run(script, capture_output=True, text=True, timeout=60)
    assert here.returncode == 0, here.stderr
    wrong = subprocess.run([*script, "--python", "3.12", "--torch", "2.11.0a0"],
                           capture_output=True, text=True, timeout=60)
    assert wrong.returncode == 1
    assert "--python 3.12" in wrong.stderr and "--torch 2.11.0a0" in wrong.stderr


def test_wheel_holds_no_top_level_package(tmp_path):
    """`pip wheel .` of pyproject.toml beside a stand-in for every top-level package and module of
    the checkout: the wheel holds its metadata only, so `pip install .` adds no importable name."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text())
    folders = [path.name for path in REPO.iterdir() if (path / "__init__.py").exists()]
    assert {"kernels", "tools", "bench", "moe", "trainer"} <= set(folders)
    for name in folders:
        (src / name).mkdir()
        (src / name / "__init__.py").write_text("")
    for path in REPO.glob("*.py"):  # train.py
        (src / path.name).write_text("")
    out = tmp_path / "out"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(src)]
    subprocess.run(pip_wheel, check=True, timeout=120, capture_output=True)
    (wheel,) = out.glob("fp8moe-*.whl")
    top = {name.split("/")[0] for name in zipfile.ZipFile(wheel).namelist()}
    assert top == {"fp8moe-{}.dist-info".format(load()["project"]["version"])}


def test_setup_commands_install_from_pyproject():
    """README.md's two set-up commands and CI's install take pyproject.toml, and no second list of
    dependencies exists beside it."""
    readme = (REPO / "README.md").read_text()
    assert "pip install . && python train.py" in readme
    assert 'pip install ".[dev]" && python3 -m pytest' in readme
    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r"^python3 -m pip install -q \"\.\[dev\]\"$", ci, flags=re.MULTILINE), ci
    assert not list(REPO.glob("requirements*.txt"))
