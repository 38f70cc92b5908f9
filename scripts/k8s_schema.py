"""Kubernetes CRD schemas as strict JSON Schema, for scripts/check_deploy.py
(Istio's CRDs) and scripts/check_monitoring.py (the Prometheus Operator's)."""


def strictify(s):
    """An OpenAPI v3 structural schema as JSON Schema (draft 4) with
    Kubernetes' semantics made explicit: fields the schema does not name are
    errors (what `kubectl apply --validate=strict` reports; the API server
    would otherwise prune them silently), except below
    x-kubernetes-preserve-unknown-fields; `nullable` admits null."""
    if not isinstance(s, dict):
        return s
    s = dict(s)
    for key in ("properties", "patternProperties"):
        if key in s:
            s[key] = {k: strictify(v) for k, v in s[key].items()}
    for key in ("items", "additionalProperties", "not"):
        if isinstance(s.get(key), dict):
            s[key] = strictify(s[key])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in s:
            s[key] = [strictify(x) for x in s[key]]
    if s.get("nullable"):
        if "type" in s:
            s["type"] = [s["type"], "null"]
        if "enum" in s:
            s["enum"] = list(s["enum"]) + [None]
    if s.get("type") == "object" and not s.get("x-kubernetes-preserve-unknown-fields") \
            and "additionalProperties" not in s:
        s["additionalProperties"] = False
    return s
