"""VISION_GC_FREEZE: once the models are ready, the start-up heap is frozen out of the cyclic
garbage collector's view, and unfrozen when they stop."""

from __future__ import annotations

import asyncio
import gc

import pytest

from tests.fixtures import FakeRuntime, registry_of
from visionserve.repository import ModelEntry


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.mark.parametrize("freeze", [True, False])
def test_the_heap_is_frozen_while_the_models_serve(fake_entry: ModelEntry, freeze: bool) -> None:
    gc.unfreeze()  # a clean slate: nothing frozen by an earlier test
    registry = registry_of(FakeRuntime(fake_entry), gc_freeze=freeze)
    made_at_start = _Cycle()

    async def serve() -> tuple[int, int, int]:
        await registry.start()
        frozen = gc.get_freeze_count()
        said = registry._frozen
        # garbage made after start-up is still collected
        garbage = _Cycle()
        del garbage
        collected = gc.collect()
        await registry.stop()
        return frozen, said, collected

    frozen, said, collected = asyncio.run(serve())
    assert collected >= 1
    if freeze:
        assert frozen > 1000, "start-up's objects (modules, the registry) should be frozen"
        assert abs(said - frozen) < 100  # a few frozen objects may since have been freed
    else:
        assert frozen == said == 0
    assert gc.get_freeze_count() == 0, "stop unfreezes what start froze"
    # what start-up made and was frozen can be collected again once unfrozen
    del made_at_start
    assert gc.collect() >= 1
