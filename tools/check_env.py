"""Whether this Python environment runs the project as pyproject.toml declares it.

    python3 tools/check_env.py                       # exit 1, naming each mismatch
    python3 tools/check_env.py --python 3.12 --torch 2.11.0a0+eb65b36914.nv26.02

Every [project.dependencies] line whose environment marker holds here must be installed at a
version it allows or, for a name that [tool.fp8moe] supported lists, within that range: the
training image keeps its base image's own torch and triton builds instead of the pins. The image
runs this at build time with the Python and torch its Dockerfile declares, so the image is what
the Dockerfile says and runs only what the project supports. Standard library and `packaging`
only: it imports none of the packages it checks.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import platform
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def load(path: Path = PYPROJECT) -> dict:
    with open(path, "rb") as f:
        return tomllib.load(f)


def requirements(project: dict, python: str) -> dict[str, Requirement]:
    """[project.dependencies] whose marker holds on Python `python` ("3.12"), by canonical name."""
    env = {"python_version": python, "python_full_version": f"{python}.0"}
    out: dict[str, Requirement] = {}
    for line in project["project"]["dependencies"]:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name in out:
            raise ValueError(f"pyproject.toml [project.dependencies]: two lines for {name} hold on "
                             f"Python {python} ({out[name]}; {req}); their markers must exclude "
                             f"each other")
        out[name] = req
    return out


def supported(project: dict) -> dict[str, SpecifierSet]:
    """[tool.fp8moe] supported: the ranges the code runs on where an image keeps its own build."""
    reqs = [Requirement(line) for line in project["tool"]["fp8moe"]["supported"]]
    return {canonicalize_name(req.name): req.specifier for req in reqs}


def release(version: str) -> Version:
    """`version` without pre-release or local label. NGC builds torch from the release branch ahead
    of the release (2.11.0a0+eb65b36914.nv26.02), which counts as that release (2.11.0) here."""
    return Version(Version(version).base_version)


def mismatches(project: dict, python: str, installed: dict[str, str | None]) -> list[str]:
    """One line for each requirement that `installed` (canonical name -> version, None: absent)
    breaks on Python `python`."""
    ranges = supported(project)
    out = []
    for name, req in requirements(project, python).items():
        version = installed.get(name)
        if version is None:
            out.append(f"{name} is not installed; pyproject.toml requires {req}")
        elif req.specifier.contains(version, prereleases=True):
            continue
        elif name in ranges and ranges[name].contains(release(version), prereleases=True):
            continue
        else:
            also = f" or, as [tool.fp8moe] supported, {ranges[name]}" if name in ranges else ""
            out.append(f"{name} {version}: pyproject.toml requires {req.specifier}{also}")
    return out


def installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:  # a source build installed without its distribution metadata
        return str(importlib.import_module(name.replace("-", "_")).__version__)
    except (ImportError, AttributeError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", help="the Python (major.minor) this environment must run")
    parser.add_argument("--torch", help="the torch version this environment must have, exactly")
    args = parser.parse_args(argv)
    python = "{}.{}".format(*sys.version_info[:2])
    project = load()
    installed = {name: installed_version(name) for name in requirements(project, python)}
    problems = mismatches(project, python, installed)
    if args.python is not None and args.python != python:
        problems.append(f"--python {args.python}: this environment runs Python {python}")
    if args.torch is not None and args.torch != installed.get("torch"):
        torch = installed.get("torch")
        problems.append(f"--torch {args.torch}: this environment has torch {torch}")
    for problem in problems:
        print(f"check_env: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_env: Python {platform.python_version()},",
              ", ".join(f"{name} {version}" for name, version in installed.items()))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
