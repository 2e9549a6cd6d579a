"""An unmodified tritonclient.grpc asks a detector (or the face pipeline) for one photo's outputs;
run as a child process by tests/integration/test_detection.py and test_faces.py (its stubs and
visionserve's cannot share a process: see tritonclient_grpc_calls.py), printing what it saw as JSON.

    python -m tests.integration.tritonclient_grpc_detect HOST:PORT MODEL PHOTO
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient


def main(target: str, model: str, photo: str) -> dict[str, Any]:
    """Metadata, the repository index and one inference of the photo (BYTES in)."""
    client = grpcclient.InferenceServerClient(target)
    try:
        tensor = grpcclient.InferInput("image", [1], "BYTES")
        tensor.set_data_from_numpy(np.array([Path(photo).read_bytes()], dtype=np.object_))
        metadata = client.get_model_metadata(model, as_json=True)
        result = client.infer(model, [tensor])
        outputs = {
            name: {
                "shape": list(result.as_numpy(name).shape),
                "data": result.as_numpy(name).reshape(-1).tolist(),
            }
            for name in (output["name"] for output in metadata["outputs"])
        }
        index = client.get_model_repository_index(as_json=True)["models"]
        return {"outputs": outputs, "index": index, "metadata": metadata}
    finally:
        client.close()


if __name__ == "__main__":
    print(json.dumps(main(*sys.argv[1:4])))
