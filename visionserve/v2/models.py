"""The served models as the Open Inference Protocol sees them: a `Signature` per model, looked up
by name and version, the server's metadata and the repository index. Shared by the HTTP routes
and the gRPC servicer."""

from __future__ import annotations

from typing import TYPE_CHECKING

from visionserve.errors import ErrorCode, VisionError
from visionserve.serving.lifecycle import ServiceState
from visionserve.v2.signature import Signature

if TYPE_CHECKING:
    from visionserve.serving.registry import AnyModel, ModelRegistry

_INDEX_STATES = {
    ServiceState.CREATED: "LOADING",
    ServiceState.LOADING: "LOADING",
    ServiceState.READY: "READY",
    ServiceState.FAILED: "UNAVAILABLE",
    ServiceState.STOPPING: "UNLOADING",
    ServiceState.STOPPED: "UNAVAILABLE",
}
"""A model's state -> Triton's repository index state."""


class V2Models:
    """Every model of a registry with its protocol signature (built once, at start)."""

    def __init__(self, registry: ModelRegistry):
        self.registry = registry
        self.signatures = {model.name: Signature.of_model(model) for model in registry}

    def get(self, name: str, version: str | None = None) -> tuple[AnyModel, Signature]:
        """The model a request names, and its signature: INVALID_ARGUMENT when it names none (a
        gRPC request without `model_name`), MODEL_NOT_FOUND (listing the models served) for a
        model or version not served here."""
        if not name:
            served = ", ".join(repr(n) for n in self.registry.names)
            raise VisionError(
                ErrorCode.INVALID_ARGUMENT,
                f"the request names no model; set the model name to one of {served}",
            )
        model = self.registry.get(name)
        signature = self.signatures[model.name]
        signature.check_model(name, version)
        return model, signature

    def repository_index(self, *, ready_only: bool = False) -> list[dict[str, str]]:
        """Triton's repository index: every model with its version, state and reason."""
        index = []
        for model in self.registry:
            if ready_only and not model.ready:
                continue
            state = _INDEX_STATES[model.state]
            reason = "" if state == "READY" else f"model is {model.state.value}"
            entry = {"name": model.name, "version": str(model.entry.config.version), "state": state}
            index.append(entry | {"reason": reason})
        return index
