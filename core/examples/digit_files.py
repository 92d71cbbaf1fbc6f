"""The digits written as PNG files, one folder per site: data a training script reads from disk.

``python -m fedkube.examples.digit_files JOB.yaml OUT`` writes, for every
tenant of the job, its own partition (the job's ``spec.data.partition``,
as :mod:`fedkube.examples.digits` splits it) as
``OUT/<tenant>/<label>/<index>.png``, and the held-out split as
``OUT/test/<label>/<index>.png``: the layout of torchvision's
``ImageFolder``. The Client API example (:mod:`fedkube.examples.digits_script`)
trains on these files as a site's own script would.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from matplotlib import image

from fedkube.datasets import ArrayData
from fedkube.examples import digits
from fedkube.spec import Client, FederatedJob, load_job
from fedkube.training.learning import data_context


def write_images(job: FederatedJob, out: Path) -> dict[str, int]:
    """Every tenant's partition and the test split as PNG files; files written per folder."""
    written: dict[str, int] = {}
    for index, tenant in enumerate(job.spec.tenants):
        whole = Client.whole_tenant(job.spec, index)
        written[tenant.name] = write_site(job, whole, out / tenant.name)
    written["test"] = _write(digits.make_data(data_context(job, "test", None)), out / "test")
    return written


def write_site(job: FederatedJob, client: Client, out: Path) -> int:
    """One client's own partition as PNG files (what a site prepares for its script)."""
    return _write(digits.make_data(data_context(job, "train", client)), out)


def _write(data: ArrayData, folder: Path) -> int:
    for row, (pixels, label) in enumerate(zip(data.x, data.y, strict=True)):
        target = folder / str(int(label)) / f"{row:05d}.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.imsave(target, np.asarray(pixels).reshape(8, 8), cmap="gray", vmin=0.0, vmax=1.0)
    return len(data)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", type=Path, help="the FederatedJob manifest (tenants, partition)")
    parser.add_argument("out", type=Path, help="folder to write into")
    args = parser.parse_args(argv)
    for folder, count in write_images(load_job(args.job), args.out).items():
        print(f"{args.out / folder}: {count} images")


if __name__ == "__main__":
    main()
