"""The owner's folder layout must not break the standard library."""

import subprocess
import sys
from pathlib import Path

from tests.support import ROOT


def test_stdlib_operator_and_fedkube_operator_import_from_the_repo_root():
    # Running from the root puts the root first on sys.path: the folder
    # operator/ must not shadow the standard library's operator module.
    code = (
        "import operator, collections, fedkube.operator.about as about;"
        "assert operator.itemgetter(1)([0, 7]) == 7;"
        "assert operator.__file__.endswith('operator.py'), operator.__file__;"
        "print(about.NAME)"
    )
    for args in (["-c", code], ["-S", "-c", "import operator; operator.eq"]):
        done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr


def test_services_import_under_one_package_name():
    import fedkube.aggregator.combiner
    import fedkube.aggregator.global_aggregator
    import fedkube.workers.runtime

    assert fedkube.workers.runtime.Worker and fedkube.aggregator.combiner.Combiner


def test_the_slim_images_commands_import_without_the_training_stack():
    # The operator and the combiners run from the slim image, which has none of
    # [tool.fedkube.image] training-only: importing any of those packages must fail
    # here as it would there (the real-node tier runs the image itself).
    import tomllib

    left_out = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["fedkube"]["image"]
    modules = {"scikit-learn": "sklearn", "dp-accounting": "dp_accounting"}
    blocked = [modules.get(name, name) for name in left_out["training-only"]]
    code = (
        "import sys\n"
        f"for name in {blocked!r}: sys.modules[name] = None\n"
        "import fedkube.aggregator.combiner, fedkube.operator.main, fedkube.cli\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_every_package_folder_is_listed_in_pyproject_so_an_install_carries_it():
    # A non-editable install (the image) copies only the packages pyproject names:
    # a sub-package added on disk and not listed there would be missing from it.
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {Path(folder): name for name, folder in tool["package-dir"].items()}
    on_disk = set()
    for folder, name in folders.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            on_disk.add(".".join([name, *relative.parts]))
    # operator/ is a namespace folder on purpose (no __init__.py, see operator/README.md).
    on_disk |= {name for name in folders.values()}
    assert on_disk == set(tool["packages"])
