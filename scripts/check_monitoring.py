#!/usr/bin/env python3
"""Checks k8s/monitoring (scripts/check-monitoring.sh runs it in its venv):

  catalogue   `cargo run -q --locked -p devstack --bin metric-catalog`: every
              metric the code defines (the sidecar's registry and /metrics,
              the filters' Metrics::define), the source of truth below
  build       the kustomization built here (resources, configMapGenerator
              with generatorOptions; anything else is refused) and, with
              kubectl on PATH, compared with `kubectl kustomize`
  schemas     monitoring.coreos.com kinds against the openAPIV3Schema of
              prometheus-operator-crds.yaml (made strict: unknown fields are
              errors), core kinds with kubernetes-validate (strict)
  wiring      the PodMonitors select what k8s/base/sidecar.yaml and
              deploy.json deploy (the sidecar's pod labels, the workload
              label, the gateway's namespace and labels); both proxies'
              metricRelabelings are the same
  rules       spec.groups as a plain rules file: `promtool check rules`;
              every alert with severity, summary, and a runbook_url whose
              anchor is a heading of k8s/README.md
  dashboards  every query (Grafana's variables substituted) as a recording
              rule: `promtool check rules`
  names       every metric named in a rule or a dashboard is one the
              catalogue has (as the PodMonitors' metricRelabelings store it)
              or one of external-metrics.yaml; label matchers name labels
              the metric has, where the catalogue knows them
  tests       `promtool test rules` on tests/*.test.yaml, with every alert
              firing in some case and every group silent in some case

Environment: PROMETHEUS_OPERATOR_CRDS (the CRD file), PROMTOOL, TARGET_DIR,
METRIC_CATALOG (a catalogue JSON file to use instead of running cargo).
"""

import difflib
import glob
import json
import os
import re
import shutil
import subprocess
import sys

import jsonschema
import yaml

from k8s_schema import strictify

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MON = os.path.join(ROOT, "k8s", "monitoring")
TARGET = os.environ.get("TARGET_DIR") or os.path.join(ROOT, "target")
OUT = os.path.join(TARGET, "check-monitoring")
K8S_VERSION = "1.32.0"
README = os.path.join(ROOT, "k8s", "README.md")
RUNBOOK_BASE = "https://github.com/254carbon/access-layer-mesh/blob/main/k8s/README.md#"
# Labels Prometheus adds to every series of a PodMonitor's targets.
TARGET_LABELS = {"namespace", "pod", "container", "job", "instance", "endpoint", "service"}
# Grafana's built-in interval variables, as durations.
GRAFANA_INTERVALS = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h",
                     "__interval_ms": "60000", "__range_s": "3600"}

errors = []


def fail(msg):
    errors.append(msg)


def step(msg):
    print(f"check-monitoring: {msg}", flush=True)


def rel(p):
    return os.path.relpath(p, ROOT)


# ---------------------------------------------------------------- inputs

def crd_file():
    """$PROMETHEUS_OPERATOR_CRDS, else ../shared/schemas next to the
    checkout, else /work/shared/schemas (as check_deploy.py finds Istio's)."""
    candidates = [os.environ.get("PROMETHEUS_OPERATOR_CRDS", ""),
                  os.path.join(ROOT, "..", "shared", "schemas", "prometheus-operator-crds.yaml"),
                  "/work/shared/schemas/prometheus-operator-crds.yaml"]
    for c in candidates:
        if c and os.path.isfile(c):
            return os.path.normpath(c)
    sys.exit("check-monitoring: the Prometheus Operator's CRD schemas not found; set "
             "PROMETHEUS_OPERATOR_CRDS to prometheus-operator-crds.yaml (looked in: "
             + ", ".join(c for c in candidates if c) + ")")


def catalogue():
    path = os.environ.get("METRIC_CATALOG")
    if path:
        with open(path) as f:
            return json.load(f)
    cmd = ["cargo", "run", "-q", "--locked", "-p", "devstack", "--bin", "metric-catalog"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"check-monitoring: {' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}")
    return json.loads(r.stdout)


def promtool():
    p = os.environ.get("PROMTOOL") or shutil.which("promtool")
    if not p:
        sys.exit("check-monitoring: promtool not found: scripts/ensure-deps.sh promtool "
                 "(Debian's prometheus package), or set PROMTOOL")
    return p


def run_promtool(args, what):
    r = subprocess.run([promtool()] + args, capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"{what}: promtool {' '.join(args[:2])} failed:\n{r.stdout}{r.stderr}")
    return r


# ---------------------------------------------------------------- build

def build():
    """The kustomization's objects: resources, then configMapGenerator."""
    with open(os.path.join(MON, "kustomization.yaml")) as f:
        k = yaml.safe_load(f)
    known = {"apiVersion", "kind", "resources", "configMapGenerator", "generatorOptions"}
    for key in set(k) - known:
        fail(f"k8s/monitoring/kustomization.yaml: {key}: not supported by this check's build")
    objs = []
    for r in k.get("resources") or []:
        with open(os.path.join(MON, r)) as f:
            for d in yaml.safe_load_all(f):
                if d:
                    objs.append((r, d))
    opts = k.get("generatorOptions") or {}
    if not opts.get("disableNameSuffixHash"):
        fail("kustomization.yaml: generatorOptions.disableNameSuffixHash must be true "
             "(Grafana's sidecar finds dashboards by label; stable names keep old ones from piling up)")
    for g in k.get("configMapGenerator") or []:
        data = {}
        for fpath in g.get("files") or []:
            with open(os.path.join(MON, fpath)) as f:
                data[os.path.basename(fpath)] = f.read()
        meta = {"name": g["name"], "labels": dict(opts.get("labels") or {})}
        if g.get("namespace"):
            meta["namespace"] = g["namespace"]
        objs.append(("configMapGenerator " + g["name"],
                     {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": data}))
    return objs


def compare_kubectl(objs):
    if not shutil.which("kubectl"):
        step("kubectl not on PATH: the build is not compared with kubectl kustomize")
        return
    r = subprocess.run(["kubectl", "kustomize", MON], capture_output=True, text=True)
    if r.returncode != 0:
        fail(f"kubectl kustomize k8s/monitoring failed: {r.stderr.strip()}")
        return
    theirs = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d
              for d in yaml.safe_load_all(r.stdout) if d}
    ours = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]): d for _, d in objs}
    if set(theirs) != set(ours):
        fail(f"kubectl kustomize builds {sorted(map(str, theirs))}, this check {sorted(map(str, ours))}")
        return
    for key, d in ours.items():
        if d != theirs[key]:
            fail(f"{key}: kubectl kustomize builds it differently")
    step(f"build: {len(ours)} objects, the same as kubectl kustomize")


# ---------------------------------------------------------------- schemas

def crd_validators(path):
    out = {}
    with open(path) as f:
        for d in yaml.safe_load_all(f):
            if not d or d.get("kind") != "CustomResourceDefinition":
                continue
            spec = d["spec"]
            for v in spec["versions"]:
                if not v.get("served"):
                    continue
                schema = strictify(v["schema"]["openAPIV3Schema"])
                schema.setdefault("properties", {}).update(
                    {"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                     "metadata": {"type": "object"}})
                cls = jsonschema.validators.validator_for(schema)
                out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = (cls(schema), spec["scope"])
    return out


def validate(objs, crds):
    import kubernetes_validate
    validators = crd_validators(crds)
    for where, o in objs:
        key = (o.get("apiVersion"), o.get("kind"))
        name = f"{where}: {key[1]} {o.get('metadata', {}).get('name')}"
        if key[0].startswith("monitoring.coreos.com/"):
            entry = validators.get(key)
            if entry is None:
                fail(f"{name}: {key[0]} {key[1]} is not served by any CRD in {rel(crds) if crds.startswith(ROOT) else crds}")
                continue
            v, scope = entry
            for e in sorted(v.iter_errors(o), key=lambda e: list(map(str, e.absolute_path))):
                path = "/".join(str(p) for p in e.absolute_path)
                fail(f"{name}: {path or '(top)'}: {e.message[:300]}")
            if scope == "Namespaced" and not o["metadata"].get("namespace"):
                fail(f"{name}: metadata.namespace: not set")
            meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": o.get("metadata", {})}
        else:
            meta = o
        try:
            kubernetes_validate.validate(meta, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.absolute_path)
            fail(f"{name}: {path or '(top)'}: {e.message[:300]}")
        except kubernetes_validate.SchemaNotFoundError:
            fail(f"{name}: no Kubernetes {K8S_VERSION} schema for {key}")
    step(f"schemas: {len(objs)} objects against {crds} and Kubernetes {K8S_VERSION}")


# ---------------------------------------------------------------- wiring

def by_kind(objs, kind):
    return [o for _, o in objs if o["kind"] == kind]


def wiring(objs):
    with open(os.path.join(ROOT, "k8s", "deploy.json")) as f:
        deploy = json.load(f)
    with open(os.path.join(ROOT, "k8s", "base", "sidecar.yaml")) as f:
        base = [d for d in yaml.safe_load_all(f) if d]
    dep = next(d for d in base if d["kind"] == "Deployment")
    pod_labels = dep["spec"]["template"]["metadata"]["labels"]
    pms = {o["metadata"]["name"]: o for o in by_kind(objs, "PodMonitor")}
    ns = deploy.get("namespace", "carbon-access")
    expect = {
        "access-sidecar": (ns, None),
        "access-layer-proxies": (ns, None),
        "access-layer-gateway": (deploy["ingress"]["namespace"], deploy["ingress"]["gateway_labels"]),
    }
    for name, (want_ns, want_labels) in expect.items():
        pm = pms.get(name)
        if pm is None:
            fail(f"PodMonitor {name}: missing")
            continue
        if pm["metadata"].get("namespace") != want_ns:
            fail(f"PodMonitor {name}: namespace {pm['metadata'].get('namespace')!r}, deploy.json says {want_ns!r}")
        sel = (pm["spec"].get("selector") or {}).get("matchLabels") or {}
        if name == "access-sidecar":
            if not sel or any(pod_labels.get(k) != v for k, v in sel.items()):
                fail(f"PodMonitor {name}: selector {sel} does not select the sidecar's pods "
                     f"(k8s/base/sidecar.yaml labels {pod_labels})")
        elif name == "access-layer-proxies":
            if sel != {"access.254carbon.io/filters": "enabled"}:
                fail(f"PodMonitor {name}: selector {sel}: the workload label is access.254carbon.io/filters: enabled")
        elif sel != want_labels:
            fail(f"PodMonitor {name}: selector {sel}, deploy.json ingress.gateway_labels {want_labels}")
        for ep in pm["spec"].get("podMetricsEndpoints") or []:
            if ep.get("path") != "/stats/prometheus":
                fail(f"PodMonitor {name}: path {ep.get('path')!r}: Istio's agent and Envoy serve /stats/prometheus")
    relabels = [json.dumps(ep.get("metricRelabelings"), sort_keys=True)
                for n in ("access-layer-proxies", "access-layer-gateway") if n in pms
                for ep in pms[n]["spec"]["podMetricsEndpoints"]]
    if len(set(relabels)) != 1 or relabels[0] == "null":
        fail("PodMonitors access-layer-proxies and access-layer-gateway: their metricRelabelings must be "
             "the same (and present)")
    step("wiring: PodMonitors against k8s/base/sidecar.yaml and deploy.json")
    return json.loads(relabels[0]) if relabels and relabels[0] != "null" else []


# ---------------------------------------------------------------- names

def relabel(name, labels, rules):
    """Prometheus' relabelling (action replace, the default) of one series."""
    labels = dict(labels, __name__=name)
    for r in rules:
        action = r.get("action", "replace")
        if action != "replace":
            fail(f"metricRelabelings: action {action!r}: this check only follows replace")
            continue
        value = (r.get("separator", ";")).join(labels.get(s, "") for s in r.get("sourceLabels", []))
        m = re.fullmatch(r.get("regex", "(.*)"), value)
        if m:
            out = re.sub(r"\$\{?(\d+)\}?", lambda g: m.group(int(g.group(1))) or "", r.get("replacement", "$1"))
            if out:
                labels[r["targetLabel"]] = out
            else:
                labels.pop(r["targetLabel"], None)
    return labels.pop("__name__"), labels


def known_metrics(cat, relabels):
    """name -> set of label names (None: not known), and regex patterns
    [(compiled, labels)] for per-id names not relabelled."""
    names, patterns = {}, []
    for f in cat["sidecar"]:
        labels = None if f["labels"] is None else set(f["labels"]) | TARGET_LABELS
        for s in f["series"]:
            names[s] = labels if not s.endswith("_bucket") or labels is None else labels | {"le"}
    sample = "catalogue_sample_id"
    for filt in cat["filters"].values():
        for m in filt["metrics"]:
            prom = m["prometheus"].replace("<id>", sample)
            name, added = relabel(prom, {}, relabels)
            labels = TARGET_LABELS | set(added)
            if sample in name:
                pre, post = name.split(sample)
                patterns.append((re.compile(re.escape(pre) + ".+" + re.escape(post)), labels, m["prometheus"]))
            else:
                names[name] = (names.get(name) or set()) | labels
    with open(os.path.join(MON, "external-metrics.yaml")) as f:
        for e in yaml.safe_load(f):
            names[e["name"]] = set(e["labels"]) | TARGET_LABELS
    return names, patterns


KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
            "bool", "offset", "inf", "nan", "atan2", "start", "end"}
AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
                "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
TOKEN = re.compile(r'''\s*(?:(?P<str>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)|(?P<dur>\d+(?:\.\d+)?(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)|(?P<num>0x[0-9a-fA-F]+|\d+(?:\.\d+)?(?:e[+-]?\d+)?)|(?P<id>[a-zA-Z_:][a-zA-Z0-9_:]*)|(?P<op>=~|!~|!=|==|>=|<=|[-+*/%^<>=(){}\[\],@]))''')


def tokens(expr):
    out, pos = [], 0
    while pos < len(expr):
        if expr[pos:].strip() == "":
            break
        m = TOKEN.match(expr, pos)
        if not m or m.end() == pos:
            raise ValueError(f"cannot read {expr[pos:pos + 20]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


def selectors(expr):
    """[(metric name or None, [(label, op, value)])] of every vector
    selector in a PromQL expression."""
    t = tokens(expr)
    out, i = [], 0

    def matchers(i):
        ms = []
        i += 1  # past {
        while i < len(t) and t[i][1] != "}":
            if t[i][0] == "id" or t[i][0] == "str":
                label = t[i][1]
                op = t[i + 1][1]
                value = t[i + 2][1]
                ms.append((label, op, json.loads(value) if value.startswith('"') else value[1:-1]))
                i += 3
            else:
                i += 1  # commas
        return ms, i + 1

    while i < len(t):
        kind, v = t[i]
        nxt = t[i + 1][1] if i + 1 < len(t) else None
        if kind == "id" and v in KEYWORDS:
            i += 1
            if nxt == "(" and v in ("by", "without", "on", "ignoring", "group_left", "group_right"):
                while t[i][1] != ")":
                    i += 1
                i += 1
            elif v == "offset":
                i += 1
            continue
        if kind == "id" and (nxt == "(" or (v in AGGREGATIONS and nxt in ("by", "without"))):
            i += 1  # a function or an aggregation
            continue
        if kind == "id":
            if nxt == "{":
                ms, i = matchers(i + 1)
            else:
                ms, i = [], i + 1
            out.append((v, ms))
            continue
        if v == "{":
            ms, i = matchers(i)
            out.append((None, ms))
            continue
        if v == "[":
            while t[i][1] != "]":
                i += 1
        i += 1
    return out


def check_names(exprs, names, patterns):
    """exprs: [(where, expr)]. Fails for metrics and labels the code does
    not define."""
    used = set()
    for where, expr in exprs:
        try:
            sels = selectors(expr)
        except (ValueError, IndexError) as e:
            fail(f"{where}: cannot read the expression ({e}): {expr}")
            continue
        if not sels:
            fail(f"{where}: names no metric: {expr}")
        for name, ms in sels:
            if name is None:
                nm = [m for m in ms if m[0] == "__name__"]
                if not nm:
                    fail(f"{where}: a selector without a metric name: {expr}")
                    continue
                rx = re.compile(nm[0][2]) if nm[0][1] == "=~" else re.compile(re.escape(nm[0][2]))
                hits = [n for n in names if rx.fullmatch(n)]
                if not hits:
                    fail(f"{where}: __name__{nm[0][1]}{nm[0][2]!r} matches no metric of the catalogue")
                used.update(hits)
                continue
            if name in names:
                labels = names[name]
            else:
                hit = next((p for p in patterns if p[0].fullmatch(name)), None)
                if hit is None:
                    close = difflib.get_close_matches(name, list(names), n=3)
                    fail(f"{where}: metric {name!r} is not in the metric catalogue (nor external-metrics.yaml)"
                         + (f"; did you mean {' or '.join(close)}?" if close else ""))
                    continue
                labels = hit[1]
            used.add(name)
            if labels is not None:
                for label, _, _ in ms:
                    if label != "__name__" and label not in labels:
                        fail(f"{where}: {name} has no label {label!r} (it has {', '.join(sorted(labels))})")
    return used


# ---------------------------------------------------------------- rules

def slug(heading):
    """GitHub's anchor of a Markdown heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def check_rules(objs):
    rules = by_kind(objs, "PrometheusRule")
    if len(rules) != 1:
        fail(f"expected one PrometheusRule, found {len(rules)}")
        return None, []
    groups = rules[0]["spec"]["groups"]
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "alerts.rules.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"groups": groups}, f, sort_keys=False)
    r = run_promtool(["check", "rules", path], "alerts.yaml")
    with open(README) as f:
        anchors = {slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", f.read(), re.M)}
    exprs = []
    for g in groups:
        for rule in g["rules"]:
            name = rule.get("alert") or rule.get("record")
            exprs.append((f"alerts.yaml {g['name']}/{name}", rule["expr"]))
            if "alert" not in rule:
                continue
            ann = rule.get("annotations") or {}
            if (rule.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
                fail(f"alert {name}: labels.severity must be critical, warning or info")
            if not ann.get("summary"):
                fail(f"alert {name}: no summary annotation")
            url = ann.get("runbook_url", "")
            if not url.startswith(RUNBOOK_BASE):
                fail(f"alert {name}: runbook_url {url!r} must start with {RUNBOOK_BASE}")
            elif url[len(RUNBOOK_BASE):] not in anchors:
                fail(f"alert {name}: runbook_url's anchor #{url[len(RUNBOOK_BASE):]} is no heading of k8s/README.md "
                     f"(add '#### {name}' under \"Alerts\")")
    step(f"rules: promtool check rules: {r.stdout.strip().splitlines()[-1].strip() if r.stdout.strip() else '?'}")
    return groups, exprs


def unit_tests(groups):
    tests = sorted(glob.glob(os.path.join(MON, "tests", "*.test.yaml")))
    if not tests:
        fail("k8s/monitoring/tests: no *.test.yaml")
        return
    alert_group = {r["alert"]: g["name"] for g in groups for r in g["rules"] if "alert" in r}
    fired, silent = set(), set()
    for t in tests:
        with open(t) as f:
            doc = yaml.safe_load(f)
        if doc.get("rule_files") != ["alerts.rules.yaml"]:
            fail(f"{rel(t)}: rule_files must be [alerts.rules.yaml] (the rules this check extracts)")
        for case in doc.get("tests") or []:
            for a in case.get("alert_rule_test") or []:
                if a["alertname"] not in alert_group:
                    fail(f"{rel(t)}: alertname {a['alertname']} is no alert of alerts.yaml")
                    continue
                if a.get("exp_alerts"):
                    fired.add(a["alertname"])
                else:
                    silent.add(alert_group[a["alertname"]])
        shutil.copy(t, os.path.join(OUT, os.path.basename(t)))
    for a, g in sorted(alert_group.items()):
        if a not in fired:
            fail(f"alert {a} ({g}): no unit test where it fires")
    for g in sorted(set(alert_group.values()) - silent):
        fail(f"alert group {g}: no unit test where its alerts stay silent")
    r = run_promtool(["test", "rules"] + [os.path.join(OUT, os.path.basename(t)) for t in tests], "unit tests")
    if r.returncode == 0:
        step(f"tests: promtool test rules: {len(tests)} file(s), every alert fires in a case, every group is silent in one")


# ---------------------------------------------------------------- dashboards

def substitute(expr, variables):
    def var(m):
        name = m.group(1) or m.group(2) or m.group(3)
        if name in GRAFANA_INTERVALS:
            return GRAFANA_INTERVALS[name]
        if name not in variables:
            fail(f"dashboard variable ${name} is not defined")
        return variables.get(name, "x")
    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)", var, expr)


def record_name(*parts):
    """A valid recording rule name for one dashboard query."""
    return "dashboard:" + ":".join(re.sub(r"[^a-zA-Z0-9_]", "_", str(p)) for p in parts)


def dashboards(objs):
    exprs, rules = [], []
    for cm in by_kind(objs, "ConfigMap"):
        if (cm["metadata"].get("labels") or {}).get("grafana_dashboard") != "1":
            fail(f"ConfigMap {cm['metadata']['name']}: no label grafana_dashboard: \"1\"")
        for fname, text in cm["data"].items():
            where0 = f"dashboards/{fname}"
            try:
                d = json.loads(text)
            except json.JSONDecodeError as e:
                fail(f"{where0}: not JSON: {e}")
                continue
            for key in ("uid", "title", "panels", "schemaVersion"):
                if key not in d:
                    fail(f"{where0}: no {key}")
            # A variable's value in an expression: a regex matcher's value.
            variables = {v["name"]: ".*" for v in d.get("templating", {}).get("list", [])}
            for v in d.get("templating", {}).get("list", []):
                if v.get("type") == "query":
                    q = v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query", "")
                    m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q.strip())
                    if not m:
                        fail(f"{where0}: variable {v['name']}: query {q!r} is not label_values(<selector>, <label>)")
                        continue
                    sel = substitute(m.group(1), variables)
                    exprs.append((f"{where0} variable {v['name']}", f"{sel}"))
                    rules.append({"record": record_name(d["uid"], "var", v["name"]), "expr": sel})
                    exprs.append((f"{where0} variable {v['name']} label", f"{sel}{{{m.group(2)}!=\"\"}}"
                                  if "{" not in sel else sel.replace("}", f',{m.group(2)}!=""}}', 1)))
            panels = list(d.get("panels", []))
            while panels:
                p = panels.pop(0)
                panels.extend(p.get("panels", []))
                for t in p.get("targets", []):
                    if "expr" not in t:
                        continue
                    where = f"{where0} panel {p.get('title')!r} {t.get('refId')}"
                    e = substitute(t["expr"], variables)
                    exprs.append((where, e))
                    rules.append({"record": record_name(d["uid"], f"panel{p.get('id')}", t.get("refId")), "expr": e})
    path = os.path.join(OUT, "dashboards.rules.yaml")
    with open(path, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, f, sort_keys=False)
    r = run_promtool(["check", "rules", path], "dashboard queries")
    if r.returncode == 0:
        step(f"dashboards: {len(rules)} queries through promtool check rules ({rel(path) if path.startswith(ROOT) else path})")
    return exprs


# ---------------------------------------------------------------- main

def main():
    crds = crd_file()
    step("catalogue: " + (os.environ.get("METRIC_CATALOG") or "cargo run -q --locked -p devstack --bin metric-catalog"))
    cat = catalogue()
    objs = build()
    compare_kubectl(objs)
    validate(objs, crds)
    relabels = wiring(objs)
    names, patterns = known_metrics(cat, relabels)
    groups, rule_exprs = check_rules(objs)
    dash_exprs = dashboards(objs)
    used = check_names(rule_exprs + dash_exprs, names, patterns)
    step(f"names: {len(used)} metrics used by the rules and dashboards, all defined "
         f"({len(names)} in the catalogue and external-metrics.yaml)" if not errors else
         f"names: {len(used)} metrics used")
    if groups:
        unit_tests(groups)
    if errors:
        print(f"\ncheck-monitoring: {len(errors)} error(s):", file=sys.stderr)
        for e in errors:
            print(f"  - {e}", file=sys.stderr)
        sys.exit(1)
    print("check-monitoring: ok")


if __name__ == "__main__":
    main()
