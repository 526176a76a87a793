"""vLLM's metric names on /metrics, read with Prometheus' own Python parser (prometheus_client),
against the list in tests/fixtures/vllm-metrics.txt (taken from vLLM's source): what Grafana
dashboards, the Gateway API Inference Extension and autoscalers built for vLLM read."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from conftest import MODEL, ROOT

WANT = [
    tuple(line.split())
    for line in (ROOT / "tests" / "fixtures" / "vllm-metrics.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]


def _family_name(name: str, kind: str) -> str:
    # The parser names a counter family without its `_total`.
    return name[: -len("_total")] if kind == "counter" and name.endswith("_total") else name


def scrape(base_url: str) -> dict:
    with urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
        text = r.read().decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def value(families: dict, name: str, kind: str, model: str, sample: str | None = None, **labels) -> float:
    fam = families[_family_name(name, kind)]
    sample = sample or name
    hits = [
        s.value
        for s in fam.samples
        if s.name == sample
        and s.labels.get("model_name") == model
        and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(hits) == 1, f"{sample}{labels} for {model}: {hits}"
    return hits[0]


def test_every_vllm_name_is_served_with_its_type_and_labels(base_url):
    families = scrape(base_url)
    assert len(WANT) >= 14
    for name, kind in WANT:
        fam = families.get(_family_name(name, kind))
        assert fam is not None, f"{name} is not on /metrics"
        assert fam.type == kind, f"{name}: type {fam.type}, vLLM's is {kind}"
        assert fam.samples, f"{name} has no series"
        for s in fam.samples:
            assert s.labels.get("engine") == "0", f"{s.name}{s.labels}: no engine label"
            assert s.labels.get("model_name"), f"{s.name}{s.labels}: no model_name label"
    models = {s.labels["model_name"] for s in families["vllm:num_requests_running"].samples}
    assert MODEL in models, models
    usage = value(families, "vllm:kv_cache_usage_perc", "gauge", MODEL)
    assert 0.0 <= usage <= 1.0


def test_counters_and_histograms_move_with_a_request(base_url, client):
    before = scrape(base_url)
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Count the metrics"}],
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    after = scrape(base_url)
    assert r.choices[0].finish_reason == "length"

    def delta(name, kind, sample=None, **labels):
        return value(after, name, kind, MODEL, sample, **labels) - value(before, name, kind, MODEL, sample, **labels)

    assert delta("vllm:prompt_tokens_total", "counter") == r.usage.prompt_tokens
    assert delta("vllm:generation_tokens_total", "counter") == r.usage.completion_tokens == 6
    assert delta("vllm:request_success_total", "counter", finished_reason="length") == 1
    assert delta("vllm:request_success_total", "counter", finished_reason="abort") == 0
    assert delta("vllm:prefix_cache_queries_total", "counter") >= r.usage.prompt_tokens
    for name in ["vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds"]:
        assert delta(name, "histogram", name + "_count") == 1, name
        assert delta(name, "histogram", name + "_bucket", le="+Inf") == 1, name
    # Five gaps between six tokens, however the stream grouped them (one event per token here).
    gaps = delta("vllm:time_per_output_token_seconds", "histogram", "vllm:time_per_output_token_seconds_count")
    assert 1 <= gaps <= 5, gaps


def test_a_dropped_stream_counts_as_abort(base_url, client):
    import time

    before = scrape(base_url)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "A long answer, please"}],
        max_tokens=2000,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    for i, _ in enumerate(stream):
        if i == 2:
            break
    stream.close()
    deadline = time.monotonic() + 20
    while True:
        after = scrape(base_url)
        aborted = value(after, "vllm:request_success_total", "counter", MODEL, finished_reason="abort") - value(
            before, "vllm:request_success_total", "counter", MODEL, finished_reason="abort"
        )
        if aborted == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert aborted == 1
    for reason in ["stop", "length"]:
        assert value(after, "vllm:request_success_total", "counter", MODEL, finished_reason=reason) == value(
            before, "vllm:request_success_total", "counter", MODEL, finished_reason=reason
        )
    # Its first token was timed.
    ttft = "vllm:time_to_first_token_seconds_count"
    assert value(after, ttft.removesuffix("_count"), "histogram", MODEL, ttft) == value(
        before, ttft.removesuffix("_count"), "histogram", MODEL, ttft
    ) + 1
