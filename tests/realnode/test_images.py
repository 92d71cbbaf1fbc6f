"""fedkube's images, built by scripts/build-images.sh and run with podman as a pod runs them.

Built, not read: the Dockerfile is built here from the Debian base the project makes, and
each image is started with a read-only root filesystem and a tmpfs on /tmp (what every pod
of the operator and the chart mounts), as its own user, through its own entrypoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.node import CONTAINERS_CONF, VERSION, build_images
from tests.support import ROOT

FULL = f"localhost/fedkube:{VERSION}"
SLIM = f"localhost/fedkube-slim:{VERSION}"
TRAINING_ONLY = ("torch", "sklearn", "matplotlib", "ray", "transformers", "peft", "dp_accounting")


def podman(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)},
    )


def run_in(image: str, *command: str, entrypoint: str | None = None) -> str:
    """Run ``image`` as a pod would: read-only root, /tmp a tmpfs, no network."""
    args = ["run", "--rm", "--read-only", "--tmpfs", "/tmp", "--network=none"]
    if entrypoint:
        args += ["--entrypoint", entrypoint]
    done = podman(*args, image, *command)
    assert done.returncode == 0, f"{image} {command}: {done.stdout}{done.stderr}"
    return done.stdout


def layers(image: str) -> list[str]:
    done = podman("image", "inspect", image)
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout)[0]["RootFS"]["Layers"])


@pytest.fixture(scope="module", autouse=True)
def images() -> None:
    build_images()


@pytest.mark.parametrize("image", [FULL, SLIM])
def test_an_image_runs_fedkube_as_its_own_user_on_a_read_only_root(image: str):
    assert "{run,compare,validate,aggregator,combiner,worker,export,operator}" in run_in(
        image, "--help"
    )
    facts = json.loads(
        run_in(
            image,
            "-c",
            "import json, os, shutil, sys; print(json.dumps({"
            "'uid': os.getuid(), 'home': os.environ['HOME'], 'prefix': sys.prefix,"
            "'pip': shutil.which('pip'), 'cc': shutil.which('cc') or shutil.which('gcc')}))",
            entrypoint="python3",
        )
    )
    assert facts == {
        "uid": 10001,
        "home": "/tmp",
        "prefix": "/opt/fedkube",
        "pip": None,
        "cc": None,
    }


def test_the_slim_image_starts_the_operator_and_a_combiner_without_the_training_stack():
    found = run_in(
        SLIM,
        "-c",
        "import importlib.util, sys\n"
        "import fedkube.aggregator.combiner, fedkube.operator.main, fedkube.cli\n"
        f"print([m for m in {TRAINING_ONLY!r} if importlib.util.find_spec(m)])",
        entrypoint="python3",
    )
    assert found.strip() == "[]"
    assert "--region" in run_in(SLIM, "combiner", "--help")
    assert "--slim-image" in run_in(SLIM, "operator", "--help")


def test_the_full_image_trains_a_round_of_digits_with_precompiled_modules():
    # Precompiled: a read-only image cannot cache bytecode, so every module must be there
    # already, or each pod start would compile torch again.
    script = (
        "import importlib.util, torch, sklearn\n"
        "from fedkube.examples import digits\n"
        "from fedkube.training import learning\n"
        "missing = [m for m in ('torch', 'torch.nn', 'fedkube.cli', 'fedkube.workers.runtime')"
        " if not importlib.util.find_spec(m).cached"
        " or not __import__('os').path.exists(importlib.util.find_spec(m).cached)]\n"
        "print('missing', missing)\n"
        "print('torch', torch.__version__)\n"
    )
    out = run_in(FULL, "-c", script, entrypoint="python3")
    assert "missing []" in out, out


def test_a_code_change_rebuilds_only_fedkubes_own_layer(tmp_path: Path):
    # prepare: the build context with one source file added
    context = tmp_path / "context"
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, context / name if context.exists() else _mk(context) / name)
    for folder in ("core", "aggregator", "workers", "operator"):
        shutil.copytree(
            ROOT / folder, context / folder, ignore=shutil.ignore_patterns("__pycache__")
        )
    (context / "scripts").mkdir()
    shutil.copy(ROOT / "scripts" / "image-requirements.py", context / "scripts")
    with (context / "core" / "about_build.py").open("w") as extra:
        extra.write('"""A module that only this test adds."""\n')
    # and pyproject.toml changed where the dependencies are not (a pytest option)
    with (context / "pyproject.toml").open("a") as pyproject:
        pyproject.write("\n# a comment that only this test adds\n")
    tag = "localhost/fedkube-slim:layer-test"
    # execute
    done = podman(
        "build", "--quiet", "--pull=never", "--layers", "--network=none",
        "--build-arg", "BASE_IMAGE=fedkube-base:bookworm", "--target", "slim",
        "-t", tag, str(context),
    )  # fmt: skip
    try:
        assert done.returncode == 0, done.stderr[-3000:]
        changed, original = layers(tag), layers(SLIM)
    finally:
        podman("rmi", tag)
    # assert: the same layers up to fedkube's own, which alone differs
    assert changed[:-1] == original[:-1]
    assert changed[-1] != original[-1]


def _mk(path: Path) -> Path:
    path.mkdir(parents=True)
    return path
