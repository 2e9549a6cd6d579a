"""The benchmark harness: for each model (a classifier, a detector at 640 and 320, the
face_expression pipeline), the in-process limit and served latency and throughput, and one
stream's frames/s and per-frame latency (in order and live), for every runtime, concurrency level
and batching mode; for a pipeline also its faces/s on an image of 8 faces and its classifier
stage's cost per face with 8 faces and with 1; against servers it starts itself, or against a
running deployment (`--url`, `--grpc-target`). The soak
(`python -m bench.soak`, `make soak`) and the one-process-or-two comparison
(`python -m bench.processes`) live here too.

A development tool beside the served package, not part of it: it imports `visionserve` (the
runtimes, preprocessing, settings) and starts the real servers as subprocesses, but no server
ever imports `bench`, and the serving images do not contain it (only the JupyterLab image does,
for the notebooks).

`python -m bench` (or `make bench`) runs it and writes `--output DIR`:
`DIR/bench.json`, `DIR/bench.md`, `DIR/bench.csv`, `DIR/throughput.png`, `DIR/streams.png`
(and `DIR/repository/`, the models it exported: `yolo11n_320`). Notebooks and scripts call it
without the command line, e.g. against `make run`'s stack:

```python
from pathlib import Path

import pandas as pd

from bench import BenchConfig, run_benchmark

report = run_benchmark(
    BenchConfig(
        url="http://127.0.0.1:8000",
        grpc_target="127.0.0.1:50051",
        grpc_metrics_url="http://127.0.0.1:8002/metrics",
        endpoints=("json", "grpc"),
        concurrency=(1, 4, 16),
        requests=200,
    )
)
frame = pd.DataFrame(report.to_records())  # the columns of bench.csv, numbers as numbers
latencies = pd.DataFrame(report.latency_records())  # one line per measured request (ms)
batches = pd.DataFrame(report.batch_size_records())  # the servers' batch sizes, per row
report.write(Path("bench-results"))  # the same files as the command line writes
```

`run_benchmark` blocks until the run is over (in a thread of its own where an event loop is
running, as in a notebook's kernel) and raises `DeploymentError` when a target is not ready.

The modules:

- `stats`: percentiles and the `Measurement` / `LatencySummary` every row reports (milliseconds);
- `closed_loop`: N closed-loop senders over any protocol, bounded by requests and/or duration;
- `http_load`: HTTP requests encoded once and sent with `httpx2.AsyncClient` keep-alive;
- `raw_http`: a minimal keep-alive HTTP/1.1 client, the default (least client overhead);
- `grpc_load`: unary `Predict` (and V2, health) senders over grpc.aio; `stream_load`: one
  `PredictStream` back to back (frames/s), one `PredictStream` / `PredictLive` fed like a camera;
- `images`: the photos sent (every packaged photo as a 600 px JPEG, or `--image FILE`); `clip`:
  the clip a detector is sent (pans over the packaged photos, 640x480 frames); `face_images`: a
  pipeline's (the photos, the astronaut's one face, a group image of 8 faces);
- `steps`: a model's task steps in-process (crop + top-k, letterbox + NMS) and request parameters;
  `subjects`: the models of a run, their images and in-process settings;
- `inprocess`: decode + preprocess + predict_batch + postprocess, timed per stage (batch 1);
- `layouts`: the in-process limit, img/s over thread layouts (preprocessing x intra-op threads);
- `pipeline_rows`: a pipeline's in-process rows: the registry the servers build, driven by N
  concurrent coroutines with no protocol (its limit, its faces/s); `face_stage`: its classifier
  stage (crop + classify) per face, through the registry and timed directly;
- `variants`: the run's model repository, with `yolo11n_320` exported into it when missing;
- `server_metrics`: the server's /metrics scraped around a row and subtracted (batches, queue);
- `servers`: the real services as subprocesses (`python -m fastapi_onnx` / `fastapi_pt`,
  `python -m grpc_server`, both APIs in one process, and `baseline`: seed 004's plain endpoint,
  for `--baseline`); `server_env`: the `VISION_*` each is given;
- `deployment`: a running deployment's targets, checked ready, and its served model;
- `access`: the API key and TLS certificates a deployment's requests use (`--api-key`, `--tls-ca`);
- `machine`: the date, CPU, cores and package versions a result is only meaningful with;
- `choices`, `config`, `cli`: what a run can measure, what it measures (`BenchConfig`), the
  command line; `groups`: the served processes of a backend; `senders`: the clients of a run;
  `plans`: its served rows; `progress`: the progress bar on stderr;
- `rows`, `report`, `tables`, `summaries`, `faces_report`, `csvfile`, `plot`, `targets`,
  `targets_models`, `targets_faces`, `facts`: the rows, the JSON document, the markdown (results;
  limit, streams, faces, overload, stages, targets), the CSV (and the records of
  `BenchReport.to_records`, `latency_records`, `batch_size_records`), the plots, the issues'
  targets and the report's header;
- `measure`: one runtime's rows measured in turns; `runner`: one whole run (`run_benchmark`),
  `external`: one against a deployment; `__main__`: the command line;
- `soak`, `soak_report`: the soak; `processes`, `processes_report`: one process or two.
"""

from bench.config import BenchConfig
from bench.deployment import DeploymentError
from bench.report import BenchReport
from bench.runner import run_benchmark

__all__ = ["BenchConfig", "BenchReport", "DeploymentError", "run_benchmark"]
