"""A served model directly (through its registry): the two preprocessing paths, lifecycle,
validation order, batching knobs, admission."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from PIL import Image

from tests.conftest import encode
from tests.fixtures import FakeRuntime, SlowRuntime, registry_of
from visionserve.errors import ErrorCode, VisionError
from visionserve.preprocessing import ImagePreprocessor
from visionserve.repository import ModelEntry
from visionserve.runtimes.base import ModelRuntime
from visionserve.serving.lifecycle import ServiceState
from visionserve.serving.model import ServedModel

IMAGE = encode(Image.new("RGB", (40, 30), (10, 120, 200)))


class RecordingPreprocessor:
    """Wraps the real preprocessor and records the thread each call ran on."""

    def __init__(self, inner: ImagePreprocessor):
        self.inner = inner
        self.threads: list[str] = []

    def __call__(self, data: bytes) -> np.ndarray:
        self.threads.append(threading.current_thread().name)
        return self.inner(data)


def served(runtime: ModelRuntime, **settings: object) -> ServedModel:
    """The runtime's model, in a registry of its own (pixels limit 10**6, 2 decode threads)."""
    settings = {"max_image_pixels": 10**6, "preprocess_workers": 2, **settings}
    return registry_of(runtime, **settings).default


def _service(runtime: FakeRuntime, **settings: object) -> tuple[ServedModel, RecordingPreprocessor]:
    service = served(runtime, **settings)
    recorder = RecordingPreprocessor(service.task.preprocessor)
    service.task.preprocessor = recorder  # type: ignore[assignment]
    return service, recorder


async def stop(service: ServedModel) -> None:
    await service.stop()
    service.pipeline.preprocess_pool.shutdown(wait=True)  # type: ignore[attr-defined]


def indices(result: object) -> list[int]:
    return [p.index for p in result.output.predictions]  # type: ignore[attr-defined]


def test_an_idle_service_decodes_on_the_runtime_thread(fake_entry: ModelEntry) -> None:
    async def scenario() -> RecordingPreprocessor:
        service, recorder = _service(FakeRuntime(fake_entry))
        await service.start()
        recorder.threads.clear()  # warm-up decodes in the pool
        for _ in range(3):
            result = await service.predict(IMAGE, {"topk": 2})
            assert indices(result) == [9, 8]
        await stop(service)
        return recorder

    recorder = asyncio.run(scenario())
    assert len(recorder.threads) == 3
    assert all(name.startswith("runtime") for name in recorder.threads)


def test_a_busy_service_decodes_in_the_pool_while_the_runtime_works(fake_entry: ModelEntry) -> None:
    async def scenario() -> RecordingPreprocessor:
        service, recorder = _service(SlowRuntime(fake_entry, batch_s=0.05))
        await service.start()
        recorder.threads.clear()
        results = await asyncio.gather(*(service.predict(IMAGE) for _ in range(6)))
        assert len(results) == 6 and all(indices(r)[0] == 9 for r in results)
        await stop(service)
        return recorder

    recorder = asyncio.run(scenario())
    assert len(recorder.threads) == 6
    assert sum(name.startswith("runtime") for name in recorder.threads) == 1  # the first one
    assert sum(name.startswith("preprocess") for name in recorder.threads) == 5


def test_bad_images_fail_alone_on_both_paths(fake_entry: ModelEntry) -> None:
    async def scenario() -> list[object]:
        service, _ = _service(SlowRuntime(fake_entry, batch_s=0.02))
        await service.start()
        outcomes = await asyncio.gather(
            service.predict(b"not an image"),  # idle path
            service.predict(IMAGE),
            service.predict("@@not base64@@", field="image_base64"),  # pool path
            service.predict(IMAGE),
            return_exceptions=True,
        )
        await stop(service)
        return outcomes

    bad_bytes, good_1, bad_b64, good_2 = asyncio.run(scenario())
    assert isinstance(bad_bytes, VisionError) and bad_bytes.code is ErrorCode.INVALID_IMAGE
    assert isinstance(bad_b64, VisionError) and bad_b64.code is ErrorCode.INVALID_BASE64
    assert "image_base64" in bad_b64.message
    assert not isinstance(good_1, BaseException) and not isinstance(good_2, BaseException)


def test_validation_order_and_lifecycle(fake_entry: ModelEntry) -> None:
    async def scenario() -> None:
        runtime = FakeRuntime(fake_entry)
        service, _ = _service(runtime)
        assert service.state is ServiceState.CREATED
        with pytest.raises(VisionError) as not_ready:
            await service.predict(IMAGE)
        assert not_ready.value.code is ErrorCode.NOT_READY and not_ready.value.retry_after_s
        with pytest.raises(VisionError) as topk_first:  # the parameters are checked first
            await service.predict(IMAGE, {"topk": 0})
        assert topk_first.value.code is ErrorCode.INVALID_ARGUMENT
        await service.start()
        assert service.ready and runtime.loaded
        with pytest.raises(VisionError) as topk:
            await service.predict(IMAGE, {"topk": 0})
        assert topk.value.code is ErrorCode.INVALID_ARGUMENT and "between 1 and 10" in topk.value.message
        with pytest.raises(VisionError) as other_task:
            await service.predict(IMAGE, {"score_threshold": 0.5})
        assert other_task.value.code is ErrorCode.INVALID_ARGUMENT
        assert "does not apply to model 'fake', a classification model" in other_task.value.message
        await stop(service)
        assert service.state is ServiceState.STOPPED and runtime.closed
        with pytest.raises(VisionError) as stopped:
            await service.predict(IMAGE)
        assert stopped.value.code is ErrorCode.NOT_READY

    asyncio.run(scenario())


def test_batching_knobs_come_from_the_model_config_and_env_overrides(fake_entry: ModelEntry) -> None:
    from visionserve.errors import ConfigurationError

    default = served(FakeRuntime(fake_entry))
    assert default.batcher.max_batch_size == 8  # the fake entry's config.json
    assert default.batcher.max_queue_delay_s == 0.0 and default.batcher.max_queue_size == 128
    tuned = served(FakeRuntime(fake_entry), max_batch_size=4, max_queue_delay_us=2000, max_queue_size=16)
    assert tuned.batcher.max_batch_size == 4
    assert tuned.batcher.max_queue_delay_s == pytest.approx(0.002)
    assert tuned.batcher.max_queue_size == 16
    with pytest.raises(ConfigurationError, match="VISION_MAX_BATCH_SIZE=64 is above the max_batch_size 8"):
        served(FakeRuntime(fake_entry), max_batch_size=64)


def test_a_full_queue_refuses_at_once_without_decoding(fake_entry: ModelEntry) -> None:
    """Requests being preprocessed count against max_queue_size: the ones over it are refused
    before their image is decoded, while the runtime is still busy with the first."""

    async def scenario() -> tuple[list[object], list[float], int]:
        service, recorder = _service(SlowRuntime(fake_entry, batch_s=0.3), max_queue_size=2)
        await service.start()
        recorder.threads.clear()
        started = asyncio.get_running_loop().time()
        finished: list[float] = []

        async def one() -> object:
            try:
                return await service.predict(IMAGE)
            except VisionError as exc:
                return exc
            finally:
                finished.append(asyncio.get_running_loop().time() - started)

        outcomes = await asyncio.gather(*(one() for _ in range(6)))
        await stop(service)
        return outcomes, finished, len(recorder.threads)

    outcomes, finished, decoded = asyncio.run(scenario())
    refused = [o for o in outcomes if isinstance(o, VisionError)]
    assert [o.code for o in refused] == [ErrorCode.OVERLOADED] * 3
    assert "VISION_MAX_QUEUE_SIZE" in str(refused[0]) and refused[0].retry_after_s == 1
    assert sum(not isinstance(o, VisionError) for o in outcomes) == 3  # 1 computing + 2 waiting
    assert decoded == 3  # the refused ones were never decoded
    assert sorted(finished)[2] < 0.2  # the refusals came back while the first was still computing


class _GatedLoad(FakeRuntime):
    """Loading waits until `release` is set."""

    def __init__(self, model: ModelEntry):
        super().__init__(model)
        self.loading = threading.Event()
        self.release = threading.Event()

    def load(self) -> None:
        self.loading.set()
        assert self.release.wait(10)
        super().load()


def test_shutdown_begun_while_loading_is_never_ready(fake_entry: ModelEntry) -> None:
    """SIGTERM during loading: when the models are loaded, the registry does not turn ready (nor
    take requests) behind the shutdown's back."""
    runtime = _GatedLoad(fake_entry)

    async def scenario() -> None:
        registry = registry_of(runtime, preprocess_workers=1)
        service = registry.default
        starting = asyncio.ensure_future(registry.start())
        while not runtime.loading.is_set():
            await asyncio.sleep(0.005)
        assert service.state is ServiceState.LOADING
        registry.begin_shutdown()
        runtime.release.set()
        await starting
        assert service.state is ServiceState.STOPPING and not service.ready and not registry.ready
        with pytest.raises(VisionError, match="shutting down") as caught:
            await service.predict(IMAGE)
        assert caught.value.code is ErrorCode.NOT_READY
        await registry.stop()
        assert service.state is ServiceState.STOPPED and registry.state is ServiceState.STOPPED

    asyncio.run(scenario())
