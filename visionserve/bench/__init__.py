"""The benchmark harness: the in-process limit and served latency and throughput, for every
runtime, concurrency level and batching mode.

`python -m visionserve.bench` (or `make bench`) runs it; notebooks run that command as a process
of their own and read what it writes (`--output DIR` -> `DIR/bench.json`, `DIR/bench.csv`,
`DIR/throughput.png`). The modules:

- `stats`: percentiles and the `Measurement` / `LatencySummary` every row reports (milliseconds);
- `closed_loop`: N closed-loop senders over any protocol, bounded by requests and/or duration;
- `http_load`: HTTP requests encoded once and sent with `httpx2.AsyncClient` keep-alive;
- `raw_http`: a minimal keep-alive HTTP/1.1 client, the default (least client overhead);
- `grpc_load`: unary `Predict` senders and one `PredictStream`'s frames/s over grpc.aio;
- `images`: the images sent (every packaged photo as a 600 px JPEG, or `--image FILE`);
- `inprocess`: decode + preprocess + predict_batch + postprocess, timed per stage (batch 1);
- `layouts`: the in-process limit, img/s over thread layouts (preprocessing x intra-op threads);
- `server_metrics`: the server's /metrics scraped around a row and subtracted (batches, queue);
- `servers`: the real services as subprocesses (`python -m fastapi_onnx` / `fastapi_pt`,
  `python -m grpc_server`, and `baseline`: seed 004's plain endpoint, for `--baseline`);
- `machine`: the date, CPU, cores and package versions a result is only meaningful with;
- `config`: what a run measures (`BenchConfig`); `plans`: the served processes and rows of a
  backend; `progress`: the progress bar on stderr;
- `rows`, `report`, `tables`, `csvfile`, `plot`, `targets`: the rows, the JSON document, the
  markdown, the CSV, the plot and the issue's targets;
- `runner`: one whole run, wiring the above; `__main__`: its command line.
"""
