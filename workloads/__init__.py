"""What to send: workload specs, request generators and arrival processes (docs/workloads.md).

    spec.py           RequestSpec, the engine-neutral request every generator produces
    arrival.py        load points and send-time schedules
    model.py          the workload file format (pydantic), distributions
    registry.py       load_workload(name | path) -> Workload: validation, fingerprint, generate()
    tokenizer.py      Tokenizer protocol: engine endpoint, local (HF folder / GGUF), test-only simple
    text.py           prompts of exact token counts
    synthetic.py, chat.py, long_context.py, shared_prefix.py, quantized.py, traces.py   the generators
    gguf.py           GGUF header metadata
    catalog.py        what `bench workloads` shows

Nothing is imported here, so `from workloads.spec import RequestSpec` stays light.
"""
