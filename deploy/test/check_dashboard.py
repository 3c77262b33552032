#!/usr/bin/env python3
"""Checks the Grafana dashboard and provisioning against a running Prometheus.

    check_dashboard.py --prometheus http://127.0.0.1:9090 \
        [--dashboard deploy/grafana/switchyard.json] \
        [--provisioning deploy/compose/grafana/provisioning] \
        [--compose deploy/compose/docker-compose.yml] \
        [--no-series-yet METRIC ...]

What it proves, and exits 1 naming every failure otherwise:
- every PromQL expression of every panel (rows' nested panels too) and every
  `label_values(...)` variable is accepted by this Prometheus (its query API
  parses it, with Grafana's variables replaced by values);
- every metric name those expressions use is one Prometheus has series for
  right now (`/api/v1/label/__name__/values`), except the ones given with
  --no-series-yet (labelled counters with no series until their first event),
  which are listed as such;
- every `label_values(metric, label)` label exists on that metric;
- every panel takes its datasource from the `datasource` variable, whose type
  is the provisioned datasource's type;
- the provisioned datasource URL names a compose service and its port, and
  the dashboard provider's path is where compose mounts deploy/grafana/.

Standard library only, plus PyYAML for the provisioning files (python3-yaml).
"""

import argparse
import json
import re
import sys
import urllib.parse
import urllib.request

import yaml

# PromQL words that look like metric names but are not.
PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
    "and", "or", "unless", "offset", "atan2", "inf", "nan",
}

# Grafana's variables, replaced by values Prometheus accepts.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
    "${__rate_interval}": "1m",
}


def substitute(expr):
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    # Any other variable ($model, ${model}) is a regex matcher value in this
    # dashboard: "match everything" is the `All` choice.
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


def metric_names(expr):
    """The metric names a PromQL expression selects."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery durations
    # Label lists of aggregations and vector matching: by (a, b), on (a) ...
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        word = match.group(0)
        rest = text[match.end():].lstrip()
        if rest.startswith("("):  # a function or aggregation
            continue
        if word.lower() in PROMQL_WORDS:
            continue
        before = text[:match.start()]
        if re.search(r"[0-9.]$", before):  # part of a number like 1e3
            continue
        names.add(word)
    return names


def panels(items):
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def get_json(base, path, params=None):
    url = base.rstrip("/") + path
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.load(response)
    except urllib.error.HTTPError as error:
        return json.load(error)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prometheus", required=True)
    parser.add_argument("--dashboard", default="deploy/grafana/switchyard.json")
    parser.add_argument("--provisioning", default="deploy/compose/grafana/provisioning")
    parser.add_argument("--compose", default="deploy/compose/docker-compose.yml")
    parser.add_argument("--no-series-yet", nargs="*", default=[])
    args = parser.parse_args()

    failures = []
    with open(args.dashboard) as f:
        dashboard = json.load(f)

    served = set(get_json(args.prometheus, "/api/v1/label/__name__/values")["data"])
    if not served:
        failures.append("Prometheus serves no metric names at all")

    # (where, expression) of every query.
    queries = []
    for panel in panels(dashboard.get("panels", [])):
        title = panel.get("title", "?")
        for target in panel.get("targets", []):
            if target.get("expr"):
                queries.append((f"panel {title!r}", target["expr"]))
        if panel.get("type") != "row" and panel.get("targets"):
            uid = (panel.get("datasource") or {}).get("uid")
            if uid != "${datasource}":
                failures.append(f"panel {title!r}: datasource uid {uid!r}, not the ${{datasource}} variable")
    label_checks = []
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable.get("type") != "query":
            continue
        query = variable.get("query")
        query = query.get("query") if isinstance(query, dict) else query
        found = re.fullmatch(r"\s*label_values\(\s*([^,]+?)\s*,\s*([A-Za-z_][A-Za-z0-9_]*)\s*\)\s*", query or "")
        if not found:
            failures.append(f"variable {variable.get('name')!r}: query {query!r} is not label_values(metric, label)")
            continue
        selector, label = found.groups()
        queries.append((f"variable {variable['name']!r}", selector))
        label_checks.append((variable["name"], selector, label))

    used = {}
    for where, expr in queries:
        answer = get_json(args.prometheus, "/api/v1/query", {"query": substitute(expr)})
        if answer.get("status") != "success":
            failures.append(f"{where}: Prometheus refuses {expr!r}: {answer.get('error')}")
        for name in metric_names(expr):
            used.setdefault(name, []).append(where)

    waiting = []
    for name, places in sorted(used.items()):
        if name in served:
            continue
        if name in args.no_series_yet:
            waiting.append(name)
            continue
        failures.append(f"metric {name} (used by {', '.join(sorted(set(places)))}) is not served by Prometheus")

    for variable, selector, label in label_checks:
        series = get_json(args.prometheus, "/api/v1/series", {"match[]": selector}).get("data", [])
        if series and not any(label in s for s in series):
            failures.append(f"variable {variable!r}: no series of {selector} has the label {label!r}")

    # Provisioning: the datasource and dashboard provider fit the compose file.
    with open(args.compose) as f:
        compose = yaml.safe_load(f)
    services = compose.get("services", {})
    datasource_types = set()
    with open(f"{args.provisioning}/datasources/prometheus.yml") as f:
        for source in yaml.safe_load(f).get("datasources", []):
            datasource_types.add(source.get("type"))
            url = urllib.parse.urlparse(source.get("url", ""))
            if url.hostname not in services:
                failures.append(f"datasource {source.get('name')!r}: host {url.hostname!r} is no compose service")
            elif url.hostname == "prometheus" and url.port != 9090:
                failures.append(f"datasource {source.get('name')!r}: port {url.port}, Prometheus listens on 9090")
    variable_types = {v.get("query") for v in dashboard.get("templating", {}).get("list", []) if v.get("type") == "datasource"}
    if not variable_types or not variable_types <= datasource_types:
        failures.append(f"datasource variable wants {variable_types}, provisioned types are {datasource_types}")
    with open(f"{args.provisioning}/dashboards/switchyard.yml") as f:
        paths = [p.get("options", {}).get("path") for p in yaml.safe_load(f).get("providers", [])]
    mounts = [str(v).split(":")[1] for v in services.get("grafana", {}).get("volumes", []) if str(v).startswith("../grafana:")]
    for path in paths:
        if path not in mounts:
            failures.append(f"dashboard provider path {path!r} is not where compose mounts ../grafana ({mounts})")

    print(f"dashboard: {len(queries)} queries, {len(used)} metrics; Prometheus serves {len(served)} names")
    for name in waiting:
        print(f"  no series yet (allowed: appears on its first event): {name}")
    if failures:
        for failure in failures:
            print(f"FAIL: {failure}", file=sys.stderr)
        sys.exit(1)
    print("dashboard: every query parses and every metric it needs is served")


if __name__ == "__main__":
    main()
