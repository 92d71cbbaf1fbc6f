"""The region's copy of the global model: fetched from the global tier once, served from a file.

Every worker of a region downloads the round's model from its combiner, not
from the global tier: one copy per region crosses the global tier, however
many workers the region has. The copy is written to a file so that aiohttp
can serve it with sendfile(2) (a region's hundred downloads cost no
user-space copies). Fetching also learns the model's template (names,
shapes, dtypes), against which every update of the round is checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from pathlib import Path

import aiohttp
import numpy as np

from fedkube.aggregator.validation import Template, template_of
from fedkube.service.bodies import read_response
from fedkube.spec import WireCompression
from fedkube.wire import codec, compression


def _failed(task: asyncio.Task[bytearray]) -> bool:
    """Whether a finished task failed or was cancelled (reading its exception marks it seen)."""
    return task.done() and (task.cancelled() or task.exception() is not None)


class ModelCache:
    """Model versions by number, each fetched once however many workers ask at the same time."""

    def __init__(self, global_url: str, region: str, down: WireCompression, prefix: str):
        self.global_url = global_url
        self.region = region
        self.down = down
        self.models: dict[int, bytearray] = {}
        self.template: Template | None = None
        # In flight, shielded from their waiters: stop() cancels them itself.
        self.fetches: dict[int, asyncio.Task[bytearray]] = {}
        self.http: aiohttp.ClientSession | None = None
        self._dir = Path(tempfile.mkdtemp(prefix=prefix))

    async def get(self, version: int) -> bytearray:
        """Model ``version`` from the cache, fetched from the global tier once."""
        if version in self.models:
            return self.models[version]
        task = self.fetches.get(version)
        if task is None or _failed(task):
            # A fetch whose waiters were all cancelled (a stopped prefetch) stays
            # here; if it failed, fetch again rather than repeat its old error.
            task = asyncio.create_task(self._fetch(version))
            task.add_done_callback(_failed)  # retrieved: no "never retrieved" noise
            self.fetches[version] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self.fetches.pop(version, None)

    async def prefetch(self, version: int) -> None:
        """Fetch ahead of the first download; a failure is retried by that download."""
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError):
            await self.get(version)

    async def template_for(self, version: int) -> Template:
        """The template updates are checked against (the model fetched if need be)."""
        if self.template is None:
            await self.get(version)
        assert self.template is not None
        return self.template

    def path(self, version: int) -> Path:
        return self._dir / f"model-{version}.safetensors"

    def keep_from(self, version: int) -> None:
        """Drop the versions before ``version`` (the models a round may still be asked for stay)."""
        for old in list(self.models):
            if old < version:
                del self.models[old]
                self.path(old).unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _fetch(self, version: int) -> bytearray:
        assert self.http is not None
        url = f"{self.global_url}/v1/model/{version}"
        async with self.http.get(url, params={"region": self.region}) as response:
            response.raise_for_status()
            data = await read_response(response)
        tensors, meta = codec.decode(data)
        if self.down.scheme == "none":
            self.template = template_of(tensors)
        else:  # served as it came; updates must match the model it decodes to
            _parts, shapes = compression.parse_model(tensors, meta, self.down)
            self.template = {name: (shape, np.dtype(np.float32)) for name, shape in shapes.items()}
        self.models[version] = data
        path = self.path(version)
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        return data
