"""The benchmark harness: in-process pipeline vs served latency, for every runtime.

`python -m visionserve.bench` (or `make bench`) runs it; notebooks run that command as a process
of their own and plot the JSON it writes (`--output DIR` -> `DIR/bench.json`). The modules:

- `stats`: percentiles and the `Measurement` / `LatencySummary` every row reports (milliseconds);
- `closed_loop`: N closed-loop senders over any protocol, bounded by requests and/or duration;
- `http_load`: HTTP requests encoded once and sent with `httpx2.AsyncClient` keep-alive;
- `raw_http`: a minimal keep-alive HTTP/1.1 client, the default (least client overhead);
- `grpc_load`: unary `Predict` senders and one `PredictStream`'s frames/s over grpc.aio;
- `inprocess`: decode + preprocess + predict_batch + postprocess, timed per stage;
- `servers`: the real services as subprocesses (`python -m fastapi_onnx` / `fastapi_pt`, and
  `python -m grpc_server`);
- `machine`: the date, CPU, cores and package versions a result is only meaningful with;
- `report`: the markdown table and the JSON document;
- `runner`: one whole run, wiring the above; `__main__`: its command line.
"""
