"""The metric names that deploy/ uses (the Grafana dashboard's PromQL, the HPA, the Prometheus
Adapter's rules) against tests/fixtures/vllm-metrics.txt, the list of names the server exposes
(`name type` per line, `#` comments). Every query is parsed by a real PromQL parser."""

from __future__ import annotations

import json
import re

import promql_parser
import pytest
from conftest import GRAFANA, K8S, METRICS_FIXTURE, load_one

HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def exposed() -> dict[str, str]:
    """{name: type} of tests/fixtures/vllm-metrics.txt."""
    if not METRICS_FIXTURE.is_file():
        pytest.fail(f"{METRICS_FIXTURE} is missing: it lists the metric names the server exposes")
    out = {}
    for n, line in enumerate(METRICS_FIXTURE.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        assert len(parts) == 2, f"{METRICS_FIXTURE.name}:{n}: want `name type`, got {line!r}"
        name, kind = parts
        assert kind in {"counter", "gauge", "histogram", "summary"}, f"line {n}: type {kind!r}"
        assert name not in out, f"line {n}: {name} twice"
        out[name] = kind
    return out


def resolve(series: str, names: dict[str, str]) -> str | None:
    """The exposed metric a series name belongs to (a histogram's _bucket/_sum/_count belong to
    the histogram), or None."""
    if names.get(series) in ("counter", "gauge"):
        return series
    for suffix in HISTOGRAM_SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and names.get(base) == "histogram":
            return base
    return None


def grafana_vars(expr: str) -> str:
    """A dashboard query with Grafana's variables replaced as Grafana replaces them."""
    return (expr.replace("$__rate_interval", "5m").replace("$__interval", "1m")
            .replace("${model_name}", ".*").replace("$model_name", ".*"))


def selectors(expr: str) -> list[tuple[str | None, dict]]:
    """(metric name, {label: matcher value}) of each vector selector in a PromQL expression;
    the name is None where a regex on __name__ selects the series. Raises ValueError when the
    expression does not parse."""
    out = []

    def visit(node):
        if isinstance(node, promql_parser.VectorSelector):
            ms = node.matchers.matchers
            matchers = {m.name: m.value for m in ms}
            name = node.name or next((m.value for m in ms if m.name == "__name__"
                                      and m.op == promql_parser.MatchOp.Equal), None)
            out.append((name, matchers))

    promql_parser.walk(promql_parser.parse(expr), visit)
    return out


def dashboard() -> dict:
    return json.loads((GRAFANA / "autoglm.json").read_text())


def panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))
    return out


def dashboard_queries(d: dict) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and of the template variables' label_values()."""
    out = [(f"panel {p['title']!r}", t["expr"]) for p in panels(d) for t in p.get("targets", [])]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q)
            assert m, f"variable {v['name']}: {q!r} is not label_values(SELECTOR, LABEL)"
            out.append((f"variable {v['name']}", m.group(1)))
    return out


def adapter_rules() -> list[dict]:
    return load_one(K8S / "prometheus-adapter-rules.yaml")["rules"]


def adapter_series_query(rule: dict) -> str:
    return rule["seriesQuery"]


def adapter_metrics_query(rule: dict, series: str) -> str:
    """The metricsQuery as the adapter fills its Go template for one series and a pod."""
    return (rule["metricsQuery"].replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="autoglm",pod=~"autoglm-.*"')
            .replace("<<.GroupBy>>", "pod"))


def adapter_rename(rule: dict, series: str) -> str | None:
    """The custom-metrics name the rule gives a series (Go's regexp and ${1} expansion)."""
    m = re.search(rule["name"]["matches"], series)
    if not m:
        return None
    return re.sub(r"\$\{(\d+)\}|\$(\d+)", lambda g: m.group(int(g.group(1) or g.group(2))),
                  rule["name"]["as"])


def adapter_selects(rule: dict, names: dict[str, str]) -> list[str]:
    """The exposed names the rule's seriesQuery selects (its __name__ matchers, anchored as
    Prometheus anchors regexes)."""
    (sel,) = selectors(adapter_series_query(rule))
    name, matchers = sel
    if name:
        return [name]
    return [n for n in names if re.fullmatch(matchers["__name__"], n)]


def used_names() -> dict[str, list[str]]:
    """Every metric name deploy/ uses: {name: [where]}."""
    used: dict[str, list[str]] = {}
    for where, expr in dashboard_queries(dashboard()):
        for name, _ in selectors(grafana_vars(expr)):
            used.setdefault(name, []).append(f"grafana {where}")
    hpa_names = [m["pods"]["metric"]["name"] for m in load_one(K8S / "hpa.yaml")["spec"]["metrics"]]
    for rule in adapter_rules():
        (sel,) = selectors(adapter_series_query(rule))
        # A regex over names: each alternative must be exposed, so spell them out; the regex's
        # own reach is checked by test_hpa_metric_is_what_the_adapter_serves.
        for name in [sel[0]] if sel[0] else regex_names(sel[1]["__name__"]):
            used.setdefault(name, []).append("adapter seriesQuery")
            if adapter_rename(rule, name) in hpa_names:
                used[name].append(f"hpa.yaml as {adapter_rename(rule, name)}")
    return used


def regex_names(pattern: str) -> list[str]:
    """The names a __name__ regex of the form `prefix(a|b|...)suffix` (or a plain name) spells."""
    m = re.fullmatch(r"([^()|]*)\(([^()]*)\)([^()|]*)", pattern)
    if not m:
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", pattern), f"cannot expand {pattern!r}"
        return [pattern]
    return [m.group(1) + alt + m.group(3) for alt in m.group(2).split("|")]


# ---- the fixture and the checker -------------------------------------------------------------

def test_fixture_lists_the_names_the_deployments_need():
    names = exposed()
    for need in ["vllm:num_requests_waiting", "vllm:num_requests_running",
                 "vllm:kv_cache_usage_perc", "vllm:time_to_first_token_seconds"]:
        assert need in names, need


def test_resolver_rejects_unknown_and_mistyped_names():
    names = exposed()
    assert resolve("vllm:time_to_first_token_seconds_bucket", names) == \
        "vllm:time_to_first_token_seconds"
    assert resolve("vllm:prompt_tokens_total", names) == "vllm:prompt_tokens_total"
    assert resolve("vllm:prompt_tokens", names) is None          # a counter without _total
    assert resolve("vllm:no_such_metric_total", names) is None
    assert resolve("vllm:num_requests_waiting_bucket", names) is None   # a gauge's "bucket"
    assert resolve("vllm:time_to_first_token_seconds", names) is None   # a histogram, bare


def test_parser_rejects_broken_promql():
    with pytest.raises(ValueError):
        selectors("sum(rate(vllm:prompt_tokens_total[5m])")
    with pytest.raises(ValueError):
        selectors("rate(vllm:prompt_tokens_total[$__rate_interval])")  # a variable left in


# ---- every name used is exposed ---------------------------------------------------------------

def missing_report(used: dict[str, list[str]], names: dict[str, str]) -> str:
    """The names used but not exposed (as a type that has such a series), one a line with where
    they are used; empty when every one is exposed."""
    missing = {n: w for n, w in used.items() if resolve(n, names) is None}
    return "\n".join(f"  {n}  (in {', '.join(sorted(set(w)))})"
                     for n, w in sorted(missing.items()))


def test_every_name_used_is_exposed():
    used = used_names()
    report = missing_report(used, exposed())
    assert not report, (
        f"metric names used in deploy/ but not in {METRICS_FIXTURE.name} as that type:\n{report}")
    print("names used:", ", ".join(sorted(used)))


def test_a_name_missing_from_the_fixture_is_reported():
    used = used_names()
    names = exposed()
    del names["vllm:num_requests_waiting"]
    names["vllm:e2e_request_latency_seconds"] = "gauge"
    report = missing_report(used, names)
    assert "vllm:num_requests_waiting  (in " in report and "hpa.yaml" in report, report
    assert "vllm:e2e_request_latency_seconds_bucket" in report, report


def test_dashboard_covers_the_metrics():
    names = exposed()
    used = {resolve(n, names) for n in used_names()}
    want = {
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:prompt_tokens_total", "vllm:generation_tokens_total", "vllm:num_preemptions_total",
        "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
        "vllm:request_success_total", "vllm:time_to_first_token_seconds",
        "vllm:time_per_output_token_seconds", "vllm:e2e_request_latency_seconds",
    }
    assert want <= used, f"not on the dashboard: {sorted(want - used)}"


def test_dashboard_quantiles_and_counters():
    d = dashboard()
    exprs = [e for w, e in dashboard_queries(d) if w.startswith("panel")]
    for hist in ["vllm:time_to_first_token_seconds", "vllm:time_per_output_token_seconds",
                 "vllm:e2e_request_latency_seconds"]:
        for q in ("0.5", "0.9", "0.99"):
            assert any(f"histogram_quantile({q}," in e and f"{hist}_bucket" in e for e in exprs), \
                f"no p{q} of {hist}"
    names = exposed()
    for expr in exprs:
        for name, matchers in selectors(grafana_vars(expr)):
            base = resolve(name, names)
            if names.get(base) == "counter" or name.endswith(HISTOGRAM_SUFFIXES):
                assert f"rate({name}" in expr.replace(" ", ""), f"{name} not under rate(): {expr}"


def test_dashboard_variables():
    d = dashboard()
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["model_name"]["type"] == "query"
    ds = {"type": "prometheus", "uid": "${datasource}"}
    assert variables["model_name"]["datasource"] == ds
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    for p in panels(d):
        if p["type"] == "row":
            continue
        assert p["datasource"] == ds, p["title"]
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"] == ds, p["title"]
            # Every series the panel draws is filtered by the model_name variable.
            for name, matchers in selectors(grafana_vars(t["expr"])):
                assert matchers.get("model_name") == ".*", f"{p['title']}: {name} unfiltered"


# ---- the HPA and the adapter ------------------------------------------------------------------

def test_hpa_metric_is_what_the_adapter_serves():
    names = exposed()
    hpa = load_one(K8S / "hpa.yaml")
    served = {}
    for rule in adapter_rules():
        for name in adapter_selects(rule, names):
            assert names[name] == "gauge", f"the adapter serves {name}, a {names[name]}, raw"
            new = adapter_rename(rule, name)
            assert new and ":" not in new, f"{name} renamed to {new!r}"
            served[new] = name
            # The metricsQuery, filled as the adapter fills it, is PromQL.
            (sel,) = [s for s in selectors(adapter_metrics_query(rule, name)) if s[0] == name]
            assert {"namespace", "pod"} <= set(sel[1]), sel
        overrides = rule["resources"]["overrides"]
        assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    for m in hpa["spec"]["metrics"]:
        assert m["type"] == "Pods"
        name = m["pods"]["metric"]["name"]
        assert name in served, f"the HPA asks for {name}; the adapter serves {sorted(served)}"
        assert served[name] == "vllm:num_requests_waiting"


def test_adapter_rename_is_checked():
    rule = adapter_rules()[0]
    assert adapter_rename(rule, "vllm:num_requests_waiting") == "vllm_num_requests_waiting"
    assert adapter_rename(rule, "autoglm_num_requests_waiting") is None
    bad = dict(rule, name={"matches": "^vllm:(.*)$", "as": "${1}"})
    assert adapter_rename(bad, "vllm:num_requests_waiting") != "vllm_num_requests_waiting"
