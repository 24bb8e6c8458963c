"""The wheel carries its configs and data: `rlhf train --cfg job` works from a fresh venv."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

from conftest import REPO


def test_wheel_installs_and_composes_outside_the_checkout(tmp_path):
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(REPO),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheels.glob("rlhf_cli-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # The heavy dependencies come from this environment (no download); the project itself only
    # from the wheel. Paths added by a .pth file come after the venv's own site-packages.
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr

    where = subprocess.run(
        [py, "-c", "import rlhf_cli; print(rlhf_cli.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert str(env_dir) in where  # the wheel's copy, not the checkout's

    cfg = subprocess.run(
        [
            env_dir / "bin" / "rlhf",
            "train",
            "--cfg",
            "job",
            "stage=sft",
            "model=llama2-7b",
            "optim.lr=5e-6",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cfg.returncode == 0, cfg.stderr
    assert "name_or_path: meta-llama/Llama-2-7b-hf" in cfg.stdout
    assert "lr: 5.0e-06" in cfg.stdout
    assert not (tmp_path / "runs").exists()

    data = subprocess.run(
        [
            py,
            "-c",
            "from rlhf_cli.data.rows import builtin_path; print(builtin_path('sft').stat().st_size)",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert data.returncode == 0 and int(data.stdout) > 1000, data.stderr
