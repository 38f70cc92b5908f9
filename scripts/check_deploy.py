#!/usr/bin/env python3
"""Checks the deployment files; run through scripts/check-deploy.sh (venv).

  envoy/envoy.yaml   parsed as envoy.config.bootstrap.v3.Bootstrap by the
                     betterproto2 classes of `envoy-data-plane`, strictly:
                     unknown fields, wrong types, bad enums, two members of
                     a oneof, unregistered `@type`s are errors; every
                     typed_config Any is resolved to its message (all of the
                     package's modules are imported so the message pool knows
                     every type). Each wasm filter's configuration must be a
                     google.protobuf.StringValue holding a JSON object.
                     The compressor filters: after every wasm filter,
                     before the router, responses only, with a minimum
                     size and content types.
                     `envoy --mode validate` too when envoy is on PATH.
  k8s/               every kustomization (base, overlays) built (kubectl
                     kustomize when present, compared with a built-in
                     resolver that is used otherwise); core kinds validated
                     against Kubernetes' own JSON schemas, strict
                     (kubernetes-validate, offline); Istio kinds against the
                     openAPIV3Schema of ../shared/schemas/istio-crds.gen.yaml,
                     made strict (unknown fields rejected except under
                     x-kubernetes-preserve-unknown-fields) with its CEL rules;
                     EnvoyFilter patch values parsed as Envoy messages like
                     envoy.yaml. Then drift: plugin configurations, filter
                     order, the policy ConfigMap, the sidecar's flags, ports,
                     probes and selectors against envoy/envoy.yaml,
                     k8s/deploy.json and sidecar/src/config.rs; for the
                     ingress overlays the gateway's WasmPlugins (namespace,
                     labels, mode CLIENT, order, configurations with
                     deploy.json's overrides), the Gateway, the
                     VirtualService against envoy.yaml's routes (/ws without
                     a timeout, nothing reaching /internal/) and the
                     NetworkPolicy for the gateway's pods; envoy.yaml's
                     compressors in every build (in its EnvoyFilter after
                     the wasm patches, or an EnvoyFilter of their own:
                     SIDECAR_INBOUND, GATEWAY for the gateway); the mesh policy
                     of each build (check_mesh: STRICT mTLS, every endpoint
                     of the sidecar admitted by the ALLOW AuthorizationPolicy
                     exactly from deploy.json's principals and never without
                     one, NetworkPolicies by namespace name); the usage
                     secret from one Secret for the sidecar and the usage
                     filter's VM; generated files byte for byte against a
                     fresh generation; the sidecar's image pinned by digest
                     (deploy.json) and run as its user.
  target/oci/        the filters' layouts (scripts/package-oci.sh) and the
                     sidecar's (scripts/package-sidecar.sh: a static binary,
                     a non-root user, the entrypoint, sidecar/migrations/)
                     verified; whether they are the pinned digests is reported.
  self-test          broken copies (in memory) of each kind must be refused.

  --sync             rewrite the generated files (and the policy checksum
                     annotation) from envoy/envoy.yaml and k8s/deploy.json.
  --pin              with --sync: first take the image digests in
                     k8s/deploy.json from target/oci (scripts/package-oci.sh,
                     scripts/package-sidecar.sh): each image with a layout
                     there; the others keep theirs, and are named.
  --envoy FILE       check FILE instead of envoy/envoy.yaml.
"""

import argparse
import copy
import difflib
import hashlib
import importlib
import json
import keyword
import os
import pkgutil
import re
import shutil
import struct
import subprocess
import sys
import time
from collections.abc import Mapping

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Cargo's target directory: check-deploy.sh passes it (scripts/target-dir.sh).
TARGET = os.environ.get("TARGET_DIR") or os.path.join(ROOT, "target")
sys.path.insert(0, os.path.join(ROOT, "scripts"))
sys.dont_write_bytecode = True  # no __pycache__ in scripts/
import oci_layout  # noqa: E402
from k8s_schema import strictify  # noqa: E402

def _crds():
    """Istio's CRD schemas: $ISTIO_CRDS, else ../shared/schemas next to the
    checkout, else the workplace's /work/shared/schemas (a clean clone for
    CI may live anywhere on the machine)."""
    candidates = [os.environ.get("ISTIO_CRDS", ""),
                  os.path.join(ROOT, "..", "shared", "schemas", "istio-crds.gen.yaml"),
                  "/work/shared/schemas/istio-crds.gen.yaml"]
    for c in candidates:
        if c and os.path.isfile(c):
            return os.path.normpath(c)
    sys.exit("check-deploy: Istio's CRD schemas not found; set ISTIO_CRDS to istio-crds.gen.yaml "
             "(looked in: " + ", ".join(c for c in candidates if c) + ")")


CRDS = _crds()
DEPLOY_JSON = os.path.join(ROOT, "k8s", "deploy.json")
SIDECAR_CONFIG_RS = os.path.join(ROOT, "sidecar", "src", "config.rs")
SIDECAR_MIGRATIONS = os.path.join(ROOT, "sidecar", "migrations")
SIDECAR_IMAGE = "sidecar"  # its name under images.repository and in images.digests, and target/oci/sidecar
# Each kustomization and what it attaches the filters to: the application
# workloads (the kind that does it, or None) and the ingress gateway (None,
# "alone", or "both": beside the workloads' attachment, deploy.json's
# ingress.with_sidecar_attachment deciding which filters run where).
ADAPTER_VALUES = os.path.join(ROOT, "k8s", "autoscaling", "prometheus-adapter-values.yaml")
KUSTOMIZATIONS = {
    "k8s/base": ("EnvoyFilter", None),
    "k8s/overlays/wasmplugin": ("WasmPlugin", None),
    "k8s/overlays/trafficextension": ("TrafficExtension", None),
    "k8s/overlays/ingress": (None, "alone"),
    "k8s/overlays/ingress-and-sidecar": ("EnvoyFilter", "both"),
}
K8S_VERSION = "1.32.0"  # Kubernetes schema version for core kinds

WASM_URL = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm"
STRING_VALUE_URL = "type.googleapis.com/google.protobuf.StringValue"
HCM_URL = ("type.googleapis.com/envoy.extensions.filters.network."
           "http_connection_manager.v3.HttpConnectionManager")
ROUTER = "envoy.filters.http.router"
COMPRESSOR_URL = "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor"
HCM = "envoy.filters.network.http_connection_manager"

# Where each filter goes in Istio's chain (WasmPlugin / TrafficExtension
# phase). Within a phase a higher priority runs first, so the priorities are
# assigned from envoy.yaml's order and the order stays envoy.yaml's:
# AUTHN (usage, auth) < Istio authn < AUTHZ (entitlements, ratelimit) < RBAC.
PHASES = {"usage": "AUTHN", "auth": "AUTHN", "entitlements": "AUTHZ", "ratelimit": "AUTHZ"}
PHASE_RANK = {"AUTHN": 0, "AUTHZ": 1, "STATS": 2, "UNSPECIFIED_PHASE": 3, "UNSPECIFIED": 3}

ENVOYFILTER_NAME = "access-layer-filters"
# The ingress: WasmPlugins named INGRESS_PREFIX + filter in the gateway's
# namespace, the Gateway there, the VirtualService and the NetworkPolicy
# that lets the gateway's pods reach the sidecar in the sidecar's namespace.
INGRESS_PREFIX = "access-layer-ingress-"
GATEWAY_NAME = "access-layer"
VIRTUALSERVICE_NAME = "access-layer"
INGRESS_NETPOL = "access-sidecar-ingress"
BOTH_ENVOYFILTER_NAME = "access-layer-filters-with-ingress"
# envoy.yaml's compressor filters where no EnvoyFilter carries them (the
# WasmPlugin / TrafficExtension overlays; the ingress gateway): an
# EnvoyFilter with those patches alone.
COMPRESSOR_ENVOYFILTER = "access-layer-compressor"
INGRESS_COMPRESSOR = INGRESS_PREFIX + "compressor"
ENVOY_ROUTE_TIMEOUT = "15s"  # Envoy's default route timeout, when a route sets none
POLICY_CONFIGMAP = "access-sidecar-policy"
POLICY_KEY = "policy.json"
AUTH_KEY = "auth.json"
SIDECAR_NAME = "access-sidecar"
PART_OF = {"app.kubernetes.io/part-of": "access-layer"}
SIDECAR_POD_LABEL = {"app.kubernetes.io/name": SIDECAR_NAME}

# The mesh policy (issue 26): generated per kustomization from deploy.json
# `mesh`. Each build gets one ALLOW AuthorizationPolicy on the sidecar
# (MESH_AP); the ingress overlays delete the base's and bring their own.
# NetworkPolicies: MESH_NETPOL (listed callers' namespaces, monitoring) in
# every build, MESH_NETPOL_WORKLOADS (the filtered workloads) where the
# filters run on them, INGRESS_NETPOL (routing/) for the gateway's pods.
MESH_AP = {
    "k8s/base": SIDECAR_NAME,
    "k8s/overlays/wasmplugin": SIDECAR_NAME,
    "k8s/overlays/trafficextension": SIDECAR_NAME,
    "k8s/overlays/ingress": SIDECAR_NAME + "-ingress",
    "k8s/overlays/ingress-and-sidecar": SIDECAR_NAME + "-ingress-and-sidecar",
}
MESH_NETPOL = SIDECAR_NAME
MESH_NETPOL_WORKLOADS = SIDECAR_NAME + "-workloads"
MESH_KEYS = {"trust_domain", "root_namespace", "filter_workloads", "ws_callers", "publishers", "prometheus"}
USAGE_SECRET_KEYS = {"secret", "key", "proxy_env"}
# The usage filter's configuration field that names the VM environment
# variable holding the secret (Istio fills it from the istio-proxy
# container's environment: vmConfig.env valueFrom HOST). The filter does not
# read it yet (noted by the check until filters/usage/core knows the field).
USAGE_SECRET_FIELD = "secret_env"
USAGE_CONFIG_RS = os.path.join(ROOT, "filters", "usage", "core", "src", "config.rs")
# Istio's agent serves the probes it rewrote and the merged metrics here
# (plain HTTP, not through Envoy's inbound listener: no AuthorizationPolicy
# sees it; only the NetworkPolicy does).
ISTIO_AGENT_PORT = 15020
RLS_PATH = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit"
# The sidecar's endpoints as the mesh policy names them (Expected.endpoints
# has their ports, paths and the requests the check tries), and the one
# each filter calls (its callouts).
SIDECAR_ENDPOINTS = ("ws", "publish", "usage", "rollups", "internal", "admin", "metrics", "health", "rls", "other")
FILTER_CALLS = {"usage": "usage", "entitlements": "internal", "ratelimit": "rls"}

# EnvoyFilter applyTo -> the Envoy message its patch value is.
APPLY_TO_TYPE = {
    "LISTENER": "envoy.config.listener.v3.Listener",
    "FILTER_CHAIN": "envoy.config.listener.v3.FilterChain",
    "NETWORK_FILTER": "envoy.config.listener.v3.Filter",
    "HTTP_FILTER": "envoy.extensions.filters.network.http_connection_manager.v3.HttpFilter",
    "ROUTE_CONFIGURATION": "envoy.config.route.v3.RouteConfiguration",
    "VIRTUAL_HOST": "envoy.config.route.v3.VirtualHost",
    "HTTP_ROUTE": "envoy.config.route.v3.Route",
    "CLUSTER": "envoy.config.cluster.v3.Cluster",
    "EXTENSION_CONFIG": "envoy.config.core.v3.TypedExtensionConfig",
    "BOOTSTRAP": "envoy.config.bootstrap.v3.Bootstrap",
    "LISTENER_FILTER": "envoy.config.listener.v3.ListenerFilter",
}
CLUSTER_SCOPED = {"Namespace", "CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding",
                  "PersistentVolume", "StorageClass", "PriorityClass"}

NOTES = []


def note(msg):
    NOTES.append(msg)
    print(f"   note: {msg}")


def rel(path):
    return os.path.relpath(path, ROOT)


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def sha256_text(s):
    return hashlib.sha256(s.encode()).hexdigest()


# --------------------------------------------------------------------------
# Envoy protos: envoy-data-plane (betterproto2), strict


class StrictError(Exception):
    def __init__(self, path, msg):
        super().__init__(msg)
        self.path = path
        self.msg = msg

    def __str__(self):
        return f"{''.join(self.path) or '(top)'}: {self.msg}"


_POOL = None


def envoy_pool():
    """Imports every module of envoy_data_plane (so that the message pool
    resolves every `@type`) and tightens the parser: see _strict_parser."""
    global _POOL
    if _POOL is None:
        import betterproto2
        import envoy_data_plane
        for m in pkgutil.walk_packages(envoy_data_plane.__path__, "envoy_data_plane."):
            importlib.import_module(m.name)
        from envoy_data_plane.google import protobuf as wkt
        from envoy_data_plane.message_pool import default_message_pool
        _strict_parser(betterproto2, wkt.Any, default_message_pool)
        _POOL = default_message_pool
    return _POOL


def _strict_parser(bp, any_cls, pool):
    """betterproto2's Message.from_dict already refuses unknown fields
    (ignore_unknown_fields=False raises KeyError), and the pydantic
    dataclasses of envoy-data-plane check types, ranges and oneofs. Wrapped
    here: field by field, so an error names its path; two spellings of one
    field (`stat_prefix` and `statPrefix`); a bool or fractional number for
    an integer (int() would take it); and, for an Any holding a well-known
    type (StringValue, Struct, Duration...), anything beside `@type` and
    `value` (Any.from_dict would silently drop it)."""
    message = bp.Message
    orig_init = message._from_dict_init.__func__
    orig_any = any_cls.from_dict.__func__
    int_types = set(bp.ALL_INT_TYPES)

    def name_of(cls):
        return pool.type_to_url.get(cls, cls.__name__).rsplit("/", 1)[-1]

    def json_names(field):
        proto = field[:-1] if field.endswith("_") and keyword.iskeyword(field[:-1]) else field
        camel = re.sub(r"_([a-z0-9])", lambda m: m.group(1).upper(), proto)
        return {proto, camel}

    def strict_init(cls, mapping, *, ignore_unknown_fields=False):
        if not isinstance(mapping, Mapping):
            raise StrictError([], f"{name_of(cls)} must be an object, not {type(mapping).__name__}")
        seen = {}
        out = {}
        for key, value in mapping.items():
            field = bp.casing.safe_snake_case(key)
            meta = cls._betterproto.meta_by_field_name.get(field)
            # betterproto2 maps any spelling that snake-cases to a field
            # (`Stat-Prefix`, `disabled_`); protobuf JSON takes only the
            # field's name and its lowerCamelCase JSON name.
            if meta is None or key not in json_names(field):
                raise StrictError([f".{key}"], f"unknown field of {name_of(cls)}")
            if field in seen:
                raise StrictError([f".{key}"], f"sets the same field as {seen[field]!r}")
            seen[field] = key
            if meta.repeated and isinstance(value, list):
                items = [(f".{key}[{i}]", [v]) for i, v in enumerate(value)] or [(f".{key}", [])]
            else:
                items = [(f".{key}", value)]
            for path, v in items:
                try:
                    if meta.proto_type in int_types:
                        for x in v if isinstance(v, list) else [v]:
                            if isinstance(x, bool) or (isinstance(x, float) and not x.is_integer()):
                                raise StrictError([], f"{x!r} is not an integer")
                    got = orig_init(cls, {key: v}, ignore_unknown_fields=False)
                except StrictError as e:
                    e.path.insert(0, path)
                    raise
                except Exception as e:  # pydantic, enum, duration, base64 errors
                    msg = " ".join(str(e).split())
                    raise StrictError([path], f"{type(e).__name__}: {msg[:300]}") from None
                for k, x in got.items():
                    if isinstance(x, list) and isinstance(out.get(k), list):
                        out[k] = out[k] + x
                    else:
                        out[k] = x
        return out

    def strict_any(cls, value, *, ignore_unknown_fields=False):
        if not isinstance(value, Mapping):
            raise StrictError([], "an Any must be an object with @type")
        url = value.get("@type")
        target = pool.url_to_type.get(url)
        if target is None:
            raise StrictError([".@type"], f"unknown message type {url!r}")
        if target.to_dict != message.to_dict:  # a type with a special JSON form
            extra = sorted(set(value) - {"@type", "value"})
            if extra:
                raise StrictError([f".{extra[0]}"], f"unknown field beside @type and value of {url}")
            if "value" not in value:
                raise StrictError([], f"{url} needs `value`")
        try:
            return orig_any(cls, value, ignore_unknown_fields=False)
        except StrictError as e:
            e.path.insert(0, f"[{url.rsplit('/', 1)[-1]}]")
            raise

    message._from_dict_init = classmethod(strict_init)
    any_cls.from_dict = classmethod(strict_any)


def parse_envoy(type_name, data):
    """Parses data as the Envoy message type_name; raises StrictError."""
    cls = envoy_pool().url_to_type.get("type.googleapis.com/" + type_name)
    if cls is None:
        raise StrictError([], f"envoy-data-plane has no {type_name}")
    try:
        return cls.from_dict(data)
    except StrictError:
        raise
    except Exception as e:
        raise StrictError([], f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None


def get(d, snake):
    """A proto JSON field by its snake_case or lowerCamelCase name."""
    if not isinstance(d, Mapping):
        return None
    if snake in d:
        return d[snake]
    parts = snake.split("_")
    return d.get(parts[0] + "".join(p.title() for p in parts[1:]))


def hcms(doc, where):
    """The HTTP connection managers of the bootstrap's listeners, in order:
    (where it is, for errors; its typed_config)."""
    for li, listener in enumerate(get(get(doc, "static_resources") or {}, "listeners") or []):
        for ci, chain in enumerate(get(listener, "filter_chains") or []):
            for fi, nf in enumerate(get(chain, "filters") or []):
                tc = get(nf, "typed_config") or {}
                if tc.get("@type") == HCM_URL:
                    yield f"{where}: listeners[{li}].filter_chains[{ci}].filters[{fi}]", tc


def wasm_filters(doc, where):
    """The wasm http filters of the bootstrap's listeners, in chain order:
    [{name, config (PluginConfig dict), json}], and errors."""
    errors, found = [], []
    for at_hcm, tc in hcms(doc, where):
        hf = get(tc, "http_filters") or []
        base = f"{at_hcm}.http_filters"
        if not hf or hf[-1].get("name") != ROUTER:
            errors.append(f"{base}: the last filter must be {ROUTER}")
        for i, f in enumerate(hf):
            ftc = get(f, "typed_config") or {}
            if ftc.get("@type") != WASM_URL:
                continue
            at = f"{base}[{i}] ({f.get('name')})"
            cfg = get(ftc, "config") or {}
            conf = get(cfg, "configuration")
            if not isinstance(conf, Mapping) or conf.get("@type") != STRING_VALUE_URL:
                errors.append(f"{at}: config.configuration must be a {STRING_VALUE_URL}")
                continue
            try:
                parsed = json.loads(conf.get("value", ""))
            except (TypeError, ValueError) as e:
                errors.append(f"{at}: config.configuration.value is not JSON: {e}")
                continue
            if not isinstance(parsed, dict):
                errors.append(f"{at}: config.configuration.value must be a JSON object")
                continue
            found.append({"name": f.get("name"), "config": cfg, "json": parsed})
    names = [f["name"] for f in found]
    if len(set(names)) != len(names):
        errors.append(f"{where}: wasm filter names repeat: {names}")
    return found, errors


def compressor_filters(doc, where):
    """The compressor http filters (whole HttpFilter dicts) of the
    bootstrap's listeners in chain order, and errors: each after every wasm
    filter (those answer locally: their replies stay uncompressed) and
    before the router, responses only, with a minimum size and content
    types."""
    errors, found = [], []
    for at_hcm, tc in hcms(doc, where):
        hf = get(tc, "http_filters") or []
        base = f"{at_hcm}.http_filters"
        types = [(get(f, "typed_config") or {}).get("@type") for f in hf]
        last_wasm = max((i for i, t in enumerate(types) if t == WASM_URL), default=-1)
        for i, f in enumerate(hf):
            if types[i] != COMPRESSOR_URL:
                continue
            at = f"{base}[{i}] ({f.get('name')})"
            if i < last_wasm:
                errors.append(f"{at}: a compressor must come after every wasm filter (their local "
                              "replies, 401/403/429, are not to be compressed; and it must see "
                              "the upstream's response last)")
            if i == len(hf) - 1:
                errors.append(f"{at}: a compressor must come before the router")
            c = get(f, "typed_config")
            if get(c, "request_direction_config") is not None:
                errors.append(f"{at}: request_direction_config: requests are not compressed here")
            for old in ("content_length", "content_type", "disable_on_etag_header",
                        "remove_accept_encoding_header", "runtime_enabled"):
                if get(c, old) is not None:
                    errors.append(f"{at}: {old} is deprecated (and ignored beside "
                                  "response_direction_config): use response_direction_config")
            common = get(get(c, "response_direction_config") or {}, "common_config") or {}
            if not get(common, "min_content_length"):
                errors.append(f"{at}: response_direction_config.common_config.min_content_length "
                              "must be set (small answers are not worth compressing)")
            if not get(common, "content_type"):
                errors.append(f"{at}: response_direction_config.common_config.content_type must "
                              "name the JSON content types")
            found.append(copy.deepcopy(f))
    names = [f.get("name") for f in found]
    if len(set(names)) != len(names):
        errors.append(f"{where}: compressor filter names repeat: {names}")
    return found, errors


def check_envoy_doc(doc, where):
    errors = []
    try:
        parse_envoy("envoy.config.bootstrap.v3.Bootstrap", doc)
    except StrictError as e:
        errors.append(f"{where}: envoy.config.bootstrap.v3.Bootstrap{e}")
    filters, errs = wasm_filters(doc, where)
    errors += errs
    if not filters and not errs:
        errors.append(f"{where}: no wasm filters found")
    errors += compressor_filters(doc, where)[1]
    return filters, errors


def duration_s(text):
    """Seconds of a protobuf JSON Duration ("15s", "0.5s"); None if it is not one."""
    m = re.fullmatch(r"(-?\d+(?:\.\d{1,9})?)s", text) if isinstance(text, str) else None
    return float(m.group(1)) if m else None


def envoy_routes(doc, where):
    """The routes of the listener whose HTTP chain runs the wasm filters, as
    the ingress VirtualService mirrors them: [{match: (path|prefix, value),
    cluster, timeout: Duration string or None (no timeout)}], and errors for
    what it could not mirror (the VirtualService is generated from this, so
    nothing may be dropped silently)."""
    errors, routes, seen = [], [], 0
    for at_hcm, tc in hcms(doc, where):
        if not any((get(f, "typed_config") or {}).get("@type") == WASM_URL
                   for f in get(tc, "http_filters") or []):
            continue
        seen += 1
        base = f"{at_hcm}.route_config"
        rc = get(tc, "route_config")
        if rc is None:
            errors.append(f"{base}: the ingress mirrors an inline route_config (RDS is not mirrored)")
            continue
        vhosts = get(rc, "virtual_hosts") or []
        if len(vhosts) != 1:
            errors.append(f"{base}: one virtual host expected (the ingress mirrors it), found {len(vhosts)}")
            continue
        for ri, r in enumerate(get(vhosts[0], "routes") or []):
            at = f"{base}.virtual_hosts[0].routes[{ri}]"
            match, action = get(r, "match") or {}, get(r, "route")
            kinds = [k for k in ("path", "prefix") if k in match]
            if set(match) - {"path", "prefix"} or len(kinds) != 1 or not isinstance(action, Mapping):
                errors.append(f"{at}: only a `path` or `prefix` match with a `route` action is mirrored "
                              "into the ingress VirtualService (extend gen_routing)")
                continue
            extra = set(action) - {"cluster", "timeout"}
            if extra or not isinstance(action.get("cluster"), str):
                errors.append(f"{at}.route: only `cluster` and `timeout` are mirrored into the ingress "
                              f"VirtualService, not {sorted(extra) or 'a route without cluster'}")
                continue
            timeout = action.get("timeout", ENVOY_ROUTE_TIMEOUT)
            secs = duration_s(timeout)
            if secs is None or secs < 0:
                errors.append(f"{at}.route.timeout: {timeout!r} is not a duration")
                continue
            routes.append({"match": (kinds[0], match[kinds[0]]), "cluster": action["cluster"],
                           "timeout": None if secs == 0 else timeout})
    if seen != 1:
        errors.append(f"{where}: one HTTP connection manager with the wasm filters expected "
                      f"(the ingress mirrors its routes), found {seen}")
    return routes, errors


def envoy_binary(path):
    exe = shutil.which("envoy")
    if not exe:
        note("envoy --mode validate skipped: no envoy binary on PATH")
        return []
    r = subprocess.run([exe, "--mode", "validate", "-c", path, "-l", "warning"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        out = (r.stdout + r.stderr).strip().splitlines()[-15:]
        return [f"envoy --mode validate -c {rel(path)} failed:\n      " + "\n      ".join(out)]
    print(f"   envoy --mode validate -c {rel(path)}: OK")
    return []


# --------------------------------------------------------------------------
# What the k8s files must say, from envoy.yaml and k8s/deploy.json


def merge_patch(target, patch):
    """RFC 7396 JSON merge patch: objects merged key by key, null removes."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


INGRESS_KEYS = {"namespace", "gateway_labels", "service_account", "hosts", "tls_credential_name",
                "with_sidecar_attachment"}
BOTH_KEYS = {"gateway_filters", "workload_filters", "gateway_overrides"}


class Expected:
    def __init__(self, filters, deploy, routes=(), compressors=()):
        self.filters = filters  # envoy.yaml order
        self.compressors = list(compressors)  # envoy.yaml's compressor HttpFilters, in order
        self.deploy = deploy
        self.routes = list(routes)  # envoy.yaml's, envoy_routes()
        self.errors = []
        self.names = [f["name"] for f in filters]
        self.k8s_json = {}
        for f in filters:
            self.k8s_json[f["name"]] = self.in_cluster(f["json"], f"envoy.yaml filter {f['name']}")
        self.usage_secret = self._usage_secret(deploy.get("usage_secret"))
        if self.usage_secret and isinstance(self.k8s_json.get("usage"), dict):
            # In the cluster the usage filter sends the sidecar's
            # --usage-secret, read from its VM's environment (the istio-proxy
            # container's variable, from the Secret); never a literal in a
            # resource anyone who can read WasmPlugins can read.
            u = dict(self.k8s_json["usage"])
            u.pop("secret", None)
            u[USAGE_SECRET_FIELD] = self.usage_secret["proxy_env"]
            self.k8s_json["usage"] = u
        ent = self.k8s_json.get("entitlements", {})
        self.policy = ent.get("policy") if isinstance(ent, dict) else None
        if self.policy is None:
            self.errors.append("envoy.yaml: the entitlements filter has no inline `policy` "
                               "(the sidecar's ConfigMap is made from it)")
        self.policy_text = json.dumps(self.policy, indent=2) + "\n"
        # The sidecar verifies in-band tokens with the auth filter's own
        # configuration; its clusters are named as in envoy.yaml and reached
        # through --cluster NAME=HOST:PORT (deploy.json's Services).
        by_name = {f["name"]: f["json"] for f in filters}
        self.auth = by_name.get("auth")
        self.auth_text = json.dumps(self.auth, indent=2) + "\n" if self.auth is not None else None
        self.auth_clusters = {}
        for path, name in clusters_named(self.auth):
            c = deploy["clusters"].get(name)
            if c is None:
                self.errors.append(f"envoy.yaml filter auth{path}.cluster: {name!r} has no in-cluster "
                                   "Service in k8s/deploy.json clusters (the sidecar's --cluster)")
            else:
                self.auth_clusters[name] = f"{c['host']}:{c['port']}"
        for n in self.names:
            if n not in PHASES:
                self.errors.append(f"envoy.yaml filter {n!r}: no Istio phase for it in scripts/check_deploy.py PHASES")
        self.priority = {}
        for phase in set(PHASES.values()):
            in_phase = [n for n in self.names if PHASES.get(n) == phase]
            for i, n in enumerate(in_phase):
                self.priority[n] = 10 * (len(in_phase) - i)
        imgs = deploy["images"]
        for n in self.names + [SIDECAR_IMAGE]:
            d = imgs["digests"].get(n, "")
            if not re.fullmatch(r"[0-9a-f]{64}", d):
                how = "scripts/package-sidecar.sh" if n == SIDECAR_IMAGE else "scripts/package-oci.sh"
                self.errors.append(
                    f"k8s/deploy.json: images.digests.{n} is {d!r}, not a sha256 hex digest "
                    f"({how}, then scripts/check-deploy.sh --sync --pin)")

        self.ingress = self._ingress(deploy.get("ingress"))
        self.mesh = self._mesh(deploy.get("mesh"))

    def _usage_secret(self, us):
        """k8s/deploy.json `usage_secret`: the Secret (name, key) the
        sidecar's --usage-secret and the proxies' variable proxy_env come
        from; None (and errors) when unusable."""
        where = "k8s/deploy.json usage_secret"
        if not isinstance(us, dict):
            self.errors.append(f"{where}: missing ({{secret, key, proxy_env}}: the sidecar's --usage-secret "
                               "and the usage filter's secret come from that Secret)")
            return None
        errs = [f"{where}.{k}: " + ("unknown field" if k in us else "missing")
                for k in sorted(set(us) ^ USAGE_SECRET_KEYS)]
        if not (isinstance(us.get("secret"), str) and DNS1123_SUBDOMAIN.fullmatch(us["secret"])):
            errs.append(f"{where}.secret: {us.get('secret')!r} is not a Secret name")
        if not (isinstance(us.get("key"), str) and re.fullmatch(r"[-._a-zA-Z0-9]+", us["key"])):
            errs.append(f"{where}.key: {us.get('key')!r} is not a Secret key")
        if not (isinstance(us.get("proxy_env"), str) and re.fullmatch(r"[A-Z_][A-Z0-9_]*", us["proxy_env"])):
            errs.append(f"{where}.proxy_env: {us.get('proxy_env')!r} is not an environment variable name")
        self.errors += errs
        return None if errs else dict(us)

    def _mesh(self, m):
        """k8s/deploy.json `mesh`: who may call the sidecar, by service
        account (SPIFFE principals), and the mesh's trust domain and root
        namespace; None (and errors) when unusable."""
        where = "k8s/deploy.json mesh"
        if not isinstance(m, dict):
            self.errors.append(f"{where}: missing (the AuthorizationPolicy and NetworkPolicy are made from it)")
            return None
        errs = [f"{where}.{k}: " + ("unknown field" if k in m else "missing") for k in sorted(set(m) ^ MESH_KEYS)]
        td = m.get("trust_domain")
        if not (isinstance(td, str) and DNS1123_SUBDOMAIN.fullmatch(td)):
            errs.append(f"{where}.trust_domain: {td!r} is not a trust domain (Istio's default: cluster.local)")
        root = m.get("root_namespace")
        if not (isinstance(root, str) and DNS1123_LABEL.fullmatch(root)):
            errs.append(f"{where}.root_namespace: {root!r} is not a namespace (Istio's root: istio-system)")

        def sa_name(v):
            return isinstance(v, str) and DNS1123_SUBDOMAIN.fullmatch(v) and len(v) <= 253

        def ns_sa(v):
            ns, _, sa = v.partition("/") if isinstance(v, str) else ("", "", "")
            return DNS1123_LABEL.fullmatch(ns) and sa_name(sa)
        fw = m.get("filter_workloads")
        if not (isinstance(fw, list) and fw and all(sa_name(v) for v in fw) and len(set(fw)) == len(fw)):
            errs.append(f"{where}.filter_workloads: {fw!r} must be the service accounts (in "
                        f"{self.deploy.get('namespace')}) of the pods the filters run on, at least one")
        for key in ("ws_callers", "publishers"):
            v = m.get(key)
            if not (isinstance(v, list) and all(ns_sa(x) for x in v) and len(set(v)) == len(v)):
                errs.append(f"{where}.{key}: {v!r} must be a list of \"namespace/serviceaccount\"")
        if not ns_sa(m.get("prometheus")):
            errs.append(f"{where}.prometheus: {m.get('prometheus')!r} must be \"namespace/serviceaccount\" "
                        "of the Prometheus that scrapes the sidecar")
        if errs:
            self.errors += errs
            return None
        ns = self.deploy["namespace"]

        def principal(ns_, sa):
            return f"{td}/ns/{ns_}/sa/{sa}"
        out = dict(m)
        out["workloads"] = [principal(ns, sa) for sa in fw]
        out["ws"] = [principal(*v.split("/", 1)) for v in m["ws_callers"]]
        out["publish"] = [principal(*v.split("/", 1)) for v in m["publishers"]]
        out["prometheus_ns"], prom_sa = m["prometheus"].split("/", 1)
        out["metrics"] = [principal(out["prometheus_ns"], prom_sa)]
        ing = self.ingress
        out["gateway"] = [principal(ing["namespace"], ing["service_account"])] if ing else []
        return out

    def profile_filters(self, profile):
        """(filters on the workloads, filters on the gateway) of a
        kustomization's KUSTOMIZATIONS entry; [] where none run."""
        att = self.attachments(*profile)
        return ((att["workloads"] or ([], {}))[0], (att["gateway"] or ([], {}))[0])

    def callers(self, profile):
        """{endpoint: [principals]} who may call each endpoint of the
        sidecar in a build: endpoints of SIDECAR_ENDPOINTS; [] means nobody
        (deny). The filters' callouts come from where the filters run
        (FILTER_CALLS); /ws and /admin/ from the gateway that routes them,
        and from the callers deploy.json lists."""
        m = self.mesh
        wl, gw = self.profile_filters(profile)
        out = {e: [] for e in SIDECAR_ENDPOINTS}
        for names, who in ((wl, m["workloads"]), (gw, m["gateway"])):
            for n in names:
                if n in FILTER_CALLS:
                    out[FILTER_CALLS[n]] = out[FILTER_CALLS[n]] + who
        if gw:
            out["ws"] = out["ws"] + m["gateway"]
            out["admin"] = out["admin"] + m["gateway"]
        out["ws"] = out["ws"] + m["ws"]
        out["publish"] = out["publish"] + m["publish"]
        out["metrics"] = out["metrics"] + m["metrics"]
        return {e: sorted(set(v)) for e, v in out.items()}

    def vm_env(self, name):
        """The host environment variables filter `name`'s VM reads (the
        usage filter's secret), [] for the others."""
        if name == "usage" and self.usage_secret:
            return [self.usage_secret["proxy_env"]]
        return []

    def usage_path(self):
        u = self.k8s_json.get("usage")
        return (u.get("path") if isinstance(u, dict) else None) or "/v1/usage"

    def ports(self):
        """(HTTP port, RLS port) of the sidecar's container: deploy.json's
        clusters (check_sidecar keeps them the Service's and the container's)."""
        c = self.deploy["clusters"]
        return c.get("sidecar", {}).get("port", 8081), c.get("ratelimit", {}).get("port", 8082)

    def endpoints(self):
        """{endpoint: (operation of its ALLOW rule or None, [(port, path,
        method)] the check asks about)}. Paths as Istio matches them (the
        path without its query; `x*` a prefix); the sidecar's own router
        (sidecar/src/server.rs) matches the same spellings, case and all."""
        http, rls = self.ports()
        usage = self.usage_path()

        def op(port, paths, methods=None):
            o = {"ports": [str(port)]}
            if methods:
                o["methods"] = methods
            o["paths"] = paths
            return o
        return {
            "ws": (op(http, ["/ws"], ["GET"]), [(http, "/ws", "GET")]),
            "publish": (op(http, ["/publish/*"], ["POST"]), [(http, "/publish/pricing.curves.EU-ETS.DEC26", "POST")]),
            "usage": (op(http, [usage], ["POST"]), [(http, usage, "POST")]),
            # the sidecar's access rule is ingest's; nobody in the mesh
            # (an operator: kubectl port-forward, with x-usage-secret)
            "rollups": (None, [(http, usage + "/rollups", "GET")]),
            "internal": (op(http, ["/internal/*"], ["GET"]),
                         [(http, "/internal/v1/grants", "GET"), (http, "/internal/v1/policy", "GET")]),
            "admin": (op(http, ["/admin/*"]), [(http, "/admin/v1/grants", "PUT"), (http, "/admin/v1/grants", "GET"),
                                               (http, "/admin/v1/audit", "GET")]),
            "metrics": (op(http, ["/metrics"], ["GET"]), [(http, "/metrics", "GET")]),
            # the kubelet's probes go to Istio's agent (ISTIO_AGENT_PORT: the
            # injector rewrites them); nothing in the mesh needs them here
            "health": (None, [(http, "/healthz", "GET"), (http, "/readyz", "GET")]),
            "rls": (op(rls, [RLS_PATH], ["POST"]), [(rls, RLS_PATH, "POST")]),
            "other": (None, [(http, "/", "GET"), (http, "/nothing", "POST"), (http, RLS_PATH, "POST"),
                             (rls, "/ws", "GET"), (rls, "/envoy.Other/Method", "POST")]),
        }

    def _ingress(self, ing):
        """k8s/deploy.json `ingress`, checked; None (and errors) when unusable."""
        errs = []
        where = "k8s/deploy.json ingress"
        if not isinstance(ing, dict):
            self.errors.append(f"{where}: missing (the ingress overlays are made from it)")
            return None
        for k in sorted(set(ing) ^ INGRESS_KEYS):
            errs.append(f"{where}.{k}: " + ("unknown field" if k in ing else "missing"))
        ns = ing.get("namespace")
        if not (isinstance(ns, str) and DNS1123_LABEL.fullmatch(ns) and len(ns) <= 63):
            errs.append(f"{where}.namespace: {ns!r} is not a namespace name (where the gateway's pods run)")
        gl = ing.get("gateway_labels")
        if not (isinstance(gl, dict) and gl and all(isinstance(v, str) for v in gl.values())):
            errs.append(f"{where}.gateway_labels: must be the non-empty labels of the gateway's pods")
        sa = ing.get("service_account")
        if not (isinstance(sa, str) and DNS1123_SUBDOMAIN.fullmatch(sa)):
            errs.append(f"{where}.service_account: {sa!r} is not the service account of the gateway's pods "
                        "(its SPIFFE principal is what the sidecar admits)")
        hosts = ing.get("hosts")
        if not (isinstance(hosts, list) and hosts and all(isinstance(h, str) and h for h in hosts)):
            errs.append(f"{where}.hosts: must be a non-empty list of host names")
        if not isinstance(ing.get("tls_credential_name"), str):
            errs.append(f"{where}.tls_credential_name: a Secret name in the gateway's namespace, "
                        "or \"\" for plain HTTP")
        both = ing.get("with_sidecar_attachment")
        if not isinstance(both, dict):
            errs.append(f"{where}.with_sidecar_attachment: must be an object")
            both = {}
        for k in sorted(set(both) ^ BOTH_KEYS) if both else []:
            errs.append(f"{where}.with_sidecar_attachment.{k}: " + ("unknown field" if k in both else "missing"))
        for key in ("gateway_filters", "workload_filters"):
            got = both.get(key)
            if not isinstance(got, list) or got != [n for n in self.names if n in got] or len(set(got)) != len(got):
                errs.append(f"{where}.with_sidecar_attachment.{key}: {got!r} must be envoy.yaml's filters "
                            f"{self.names} or some of them, in that order")
            elif "auth" in self.names and "auth" not in got:
                errs.append(f"{where}.with_sidecar_attachment.{key}: must run auth (it removes clients' "
                            "x-auth-* headers; without it they reach the sidecar or the applications)")
        ov = both.get("gateway_overrides")
        if not isinstance(ov, dict) or not all(k in (both.get("gateway_filters") or []) and isinstance(v, dict)
                                               for k, v in ov.items()):
            errs.append(f"{where}.with_sidecar_attachment.gateway_overrides: {{filter: JSON merge patch}} "
                        "for filters of gateway_filters")
        if errs:
            self.errors += errs
            return None
        gw, wl = both["gateway_filters"], both["workload_filters"]
        gw_json = {n: merge_patch(self.k8s_json[n], ov[n]) if n in ov else self.k8s_json[n] for n in gw}
        for n, cfg in gw_json.items():
            if not isinstance(cfg, dict):
                self.errors.append(f"{where}.with_sidecar_attachment.gateway_overrides.{n}: leaves no configuration")
                return None
        w = f"{where}.with_sidecar_attachment"
        if "usage" in gw and "usage" in wl:
            errs.append(f"{w}: usage in gateway_filters and workload_filters meters every request that "
                        "passes both twice (two records, different batch ids: not deduplicated)")
        if "ratelimit" in gw and "ratelimit" in wl and "global" in gw_json["ratelimit"] \
                and "global" in self.k8s_json["ratelimit"]:
            errs.append(f"{w}: ratelimit in global mode at the gateway and the workloads counts every "
                        "request twice in the same Rate Limit Service buckets")
        if "auth" in wl and "auth" in gw and \
                not ((gw_json["auth"].get("output") or {}).get("forward_token") is True):
            errs.append(f"{w}.gateway_overrides.auth: output.forward_token must be true: the gateway's auth "
                        "removes the token, so the workloads' auth would answer 401 to every request")
        for r in self.routes:
            if r["cluster"] not in self.deploy["clusters"]:
                errs.append(f"envoy.yaml route to cluster {r['cluster']!r}: no in-cluster Service in "
                            "k8s/deploy.json clusters (the ingress VirtualService routes to it)")
        if errs:
            self.errors += errs
            return None
        out = dict(ing)
        out["alone"] = {"gateway": (list(self.names), self.k8s_json), "workloads": None}
        out["both"] = {"gateway": (gw, gw_json), "workloads": (wl, self.k8s_json)}
        return out

    def attachments(self, workloads, gateway):
        """{"workloads": (names, configs) or None, "gateway": ...} for a
        kustomization of KUSTOMIZATIONS."""
        if gateway is None:
            return {"workloads": (list(self.names), self.k8s_json), "gateway": None}
        return self.ingress[gateway]

    def gateway_ref(self):
        return f"{self.ingress['namespace']}/{GATEWAY_NAME}"

    def vs_http(self):
        """The VirtualService's HTTP routes: envoy.yaml's, each cluster its
        Service (deploy.json), timeouts as envoy.yaml's (Envoy's default 15 s
        where it sets none); no timeout where envoy.yaml has 0s (the CRD
        refuses 0s; Istio's default is none)."""
        out = []
        for r in self.routes:
            c = self.deploy["clusters"][r["cluster"]]
            kind, value = r["match"]
            entry = {"name": value.strip("/").replace("/", "-") or "root",
                     "match": [{"uri": {"exact" if kind == "path" else "prefix": value}}],
                     "route": [{"destination": {"host": c["host"], "port": {"number": c["port"]}}}]}
            if r["timeout"] is not None:
                entry["timeout"] = r["timeout"]
            out.append(entry)
        return out

    def in_cluster(self, cfg, where):
        """cfg with each envoy.yaml cluster replaced by Istio's outbound
        cluster of its Service (k8s/deploy.json clusters) and the
        `authority` beside it by the Service's host:port; nothing else."""
        cfg = copy.deepcopy(cfg)
        clusters = self.deploy["clusters"]

        def walk(n, path):
            if isinstance(n, dict):
                if isinstance(n.get("cluster"), str):
                    c = clusters.get(n["cluster"])
                    if c is None:
                        self.errors.append(f"{where}{path}.cluster: envoy cluster {n['cluster']!r} "
                                           "has no in-cluster Service in k8s/deploy.json clusters")
                    else:
                        n["cluster"] = f"outbound|{c['port']}||{c['host']}"
                        if "authority" in n:
                            n["authority"] = f"{c['host']}:{c['port']}"
                for k, v in n.items():
                    walk(v, f"{path}.{k}")
            elif isinstance(n, list):
                for i, v in enumerate(n):
                    walk(v, f"{path}[{i}]")
        walk(cfg, "")
        return cfg

    def url(self, name):
        i = self.deploy["images"]
        return f"oci://{i['repository']}/{name}:{i['tag']}"

    def digest(self, name):
        return self.deploy["images"]["digests"].get(name, "")

    def sidecar_image(self):
        """The sidecar Deployment's image: by digest (the tag for people)."""
        i = self.deploy["images"]
        return f"{i['repository']}/{SIDECAR_IMAGE}:{i['tag']}@sha256:{self.digest(SIDECAR_IMAGE)}"


# --------------------------------------------------------------------------
# Generation


class _Dumper(yaml.SafeDumper):
    pass


def _repr_str(dumper, s):
    return dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)


_Dumper.add_representer(str, _repr_str)

HEADER = ("# Generated by `scripts/check-deploy.sh --sync` from envoy/envoy.yaml and\n"
          "# k8s/deploy.json. Do not edit: scripts/check-deploy.sh fails on drift.\n")


def dump(objs, intro):
    body = yaml.dump_all(objs, Dumper=_Dumper, sort_keys=False, default_flow_style=False,
                         width=1000, explicit_start=True)
    return HEADER + "".join(f"# {line}\n" if line else "#\n" for line in intro) + body


def labels(extra=None):
    out = dict(PART_OF)
    out.update(extra or {})
    return out


def ecds_name(name):
    return f"access-layer.{name}"


def clusters_named(cfg, path=""):
    """[(path, cluster name)] of every `cluster` field in cfg."""
    out = []
    if isinstance(cfg, dict):
        if isinstance(cfg.get("cluster"), str):
            out.append((path, cfg["cluster"]))
        for k, v in cfg.items():
            out.extend(clusters_named(v, f"{path}.{k}"))
    elif isinstance(cfg, list):
        for i, v in enumerate(cfg):
            out.extend(clusters_named(v, f"{path}[{i}]"))
    return out


def gen_policy_configmap(exp):
    data = {POLICY_KEY: exp.policy_text}
    if exp.auth_text is not None:
        data[AUTH_KEY] = exp.auth_text
    obj = {"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": POLICY_CONFIGMAP, "labels": labels({"app.kubernetes.io/name": SIDECAR_NAME})},
           "data": data}
    return dump([obj], ["The entitlements policy of envoy.yaml's entitlements filter; the sidecar",
                        "reads it with --policy (channel subscriptions and publishes). And the",
                        "auth filter's configuration as envoy.yaml has it (cluster names, not",
                        "Istio's): the sidecar verifies in-band tokens with it (--auth-config),",
                        "reaching those clusters through --cluster / SIDECAR_CLUSTERS."])


def compressor_patches(exp, context):
    """envoy.yaml's compressor filters as HTTP_FILTER patches, each
    INSERT_BEFORE the router in envoy.yaml's order (so after whatever the
    wasm filters' patches or Istio's WasmPlugins put there)."""
    return [{"applyTo": "HTTP_FILTER",
             "match": {"context": context,
                       "listener": {"filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}}}},
             "patch": {"operation": "INSERT_BEFORE", "value": copy.deepcopy(c)}}
            for c in exp.compressors]


def gen_compressor_envoyfilter(exp, gateway=False):
    """The compressors alone, for the attachments without an EnvoyFilter of
    their own: the workloads of the WasmPlugin / TrafficExtension overlays
    (SIDECAR_INBOUND), the ingress gateway's pods (GATEWAY, its namespace)."""
    if gateway:
        ing = exp.ingress
        meta = {"name": INGRESS_COMPRESSOR, "namespace": ing["namespace"], "labels": labels()}
        sel, context = dict(ing["gateway_labels"]), "GATEWAY"
        where = (f"the ingress gateway's pods (namespace {ing['namespace']}, labels "
                 + ", ".join(f"{k}: {v}" for k, v in ing["gateway_labels"].items()) + ")")
    else:
        meta = {"name": COMPRESSOR_ENVOYFILTER, "labels": labels()}
        sel, context = dict(exp.deploy["workload_labels"]), "SIDECAR_INBOUND"
        where = "the selected workloads' inbound HTTP chain"
    obj = {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter", "metadata": meta,
           "spec": {"workloadSelector": {"labels": sel}, "configPatches": compressor_patches(exp, context)}}
    return dump([obj], [
        f"envoy.yaml's response compressors ({', '.join(c.get('name') for c in exp.compressors)}) on",
        f"{where},",
        f"context {context}, each INSERT_BEFORE the router: after the wasm filters",
        "(Istio puts those at their phases; an EnvoyFilter's patches are applied",
        "to the chain built with them), so their local replies stay uncompressed."])


def gen_envoyfilter(exp, names=None, name=ENVOYFILTER_NAME, namespace=None, intro=()):
    names = exp.names if names is None else names
    ext, http = [], []
    for f in exp.filters:
        n = f["name"]
        if n not in names:
            continue
        cfg = copy.deepcopy(f["config"])
        vm = cfg.setdefault("vm_config", {})
        vm["code"] = {"remote": {
            # Istio's agent fetches oci:// (and http) modules of ECDS
            # resources itself and hands Envoy a local file; Envoy's schema
            # still wants a cluster, which is then unused.
            "http_uri": {"uri": exp.url(n), "cluster": "istio-agent-fetch", "timeout": "60s"},
            "sha256": exp.digest(n)}}
        if exp.vm_env(n):
            # the istio-proxy container's variables, copied into the VM
            vm["environment_variables"] = {"host_env_keys": exp.vm_env(n)}
        cfg["configuration"] = {"@type": STRING_VALUE_URL,
                                "value": json.dumps(exp.k8s_json[n], indent=2) + "\n"}
        ext.append({"applyTo": "EXTENSION_CONFIG",
                    "match": {"context": "SIDECAR_INBOUND"},
                    "patch": {"operation": "ADD",
                              "value": {"name": ecds_name(n),
                                        "typed_config": {"@type": WASM_URL, "config": cfg}}}})
        http.append({"applyTo": "HTTP_FILTER",
                     "match": {"context": "SIDECAR_INBOUND",
                               "listener": {"filterChain": {"filter": {"name": HCM, "subFilter": {"name": ROUTER}}}}},
                     "patch": {"operation": "INSERT_BEFORE",
                               "value": {"name": ecds_name(n),
                                         "config_discovery": {
                                             "config_source": {"ads": {}, "initial_fetch_timeout": "0s",
                                                               "resource_api_version": "V3"},
                                             "type_urls": [WASM_URL]}}}})
    meta = {"name": name, "labels": labels()}
    if namespace:
        meta = {"name": name, "namespace": namespace, "labels": labels()}
    obj = {"apiVersion": "networking.istio.io/v1alpha3", "kind": "EnvoyFilter",
           "metadata": meta,
           "spec": {"workloadSelector": {"labels": dict(exp.deploy["workload_labels"])},
                    "configPatches": ext + http + compressor_patches(exp, "SIDECAR_INBOUND")}}
    return dump([obj], list(intro) + [
        "The wasm filters of envoy.yaml in the inbound HTTP chain of the selected",
        "workloads' Istio proxies, each INSERT_BEFORE the router in envoy.yaml's",
        f"order ({', '.join(names)}), delivered by ECDS: Istio's agent pulls the",
        "oci:// image, checks its digest (remote.sha256 = the image manifest digest)",
        "and gives Envoy a local file; initial_fetch_timeout 0s keeps the listener",
        "from serving before the module is there. Plugin configurations are",
        "envoy.yaml's with the clusters mapped to Istio's outbound clusters.",
        "Then envoy.yaml's response compressors, INSERT_BEFORE the router after",
        f"the wasm filters: {', '.join(c.get('name') for c in exp.compressors)}."])


def vm_config(exp, name):
    """A WasmPlugin's / TrafficExtension's vmConfig for filter `name`: the
    istio-proxy container's variables it reads (valueFrom HOST), or None."""
    env = exp.vm_env(name)
    return {"env": [{"name": e, "valueFrom": "HOST"} for e in env]} if env else None


def _wasm_spec(exp, f, configs=None):
    n = f["name"]
    fail_open = bool(get(f["config"], "fail_open"))
    out = {"url": exp.url(n), "sha256": exp.digest(n), "imagePullPolicy": "IfNotPresent",
           "pluginName": get(f["config"], "root_id") or n, "type": "HTTP",
           "failStrategy": "FAIL_OPEN" if fail_open else "FAIL_CLOSE"}
    if vm_config(exp, n):
        out["vmConfig"] = vm_config(exp, n)
    out["pluginConfig"] = (configs or exp.k8s_json)[n]
    return out


def gen_wasmplugins(exp):
    objs = []
    for f in exp.filters:
        n = f["name"]
        spec = {"selector": {"matchLabels": dict(exp.deploy["workload_labels"])},
                "match": [{"mode": "SERVER"}],
                "phase": PHASES.get(n, "UNSPECIFIED_PHASE"), "priority": exp.priority.get(n, 0)}
        spec.update(_wasm_spec(exp, f))
        objs.append({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
                     "metadata": {"name": f"access-layer-{n}", "labels": labels()}, "spec": spec})
    return dump(objs, [
        "The wasm filters as WasmPlugins: inbound (mode SERVER) on the selected",
        "workloads, ordered as in envoy.yaml by phase then descending priority.",
        "sha256 is the OCI image manifest digest, which Istio checks for oci:// urls."])


def gen_trafficextensions(exp):
    objs = []
    for f in exp.filters:
        n = f["name"]
        wasm = _wasm_spec(exp, f)
        objs.append({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "TrafficExtension",
                     "metadata": {"name": f"access-layer-{n}", "labels": labels()},
                     "spec": {"selector": {"matchLabels": dict(exp.deploy["workload_labels"])},
                              "match": [{"mode": "SERVER"}],
                              "phase": PHASES.get(n, "UNSPECIFIED"), "priority": exp.priority.get(n, 0),
                              "wasm": wasm}})
    return dump(objs, [
        "The wasm filters as TrafficExtensions (extensions.istio.io/v1alpha1, the",
        "kind that also takes Lua): same phases, priorities and configurations as",
        "the WasmPlugins."])


def gen_gateway_wasmplugins(exp, mode):
    """The filters on the ingress gateway's pods: WasmPlugins in the
    gateway's namespace (a selector reaches only pods of its own namespace;
    the root namespace's reach every namespace), match mode CLIENT (Istio
    classes a gateway's listeners as CLIENT: SERVER would never attach)."""
    ing = exp.ingress
    names, configs = ing[mode]["gateway"]
    objs = []
    for f in exp.filters:
        n = f["name"]
        if n not in names:
            continue
        spec = {"selector": {"matchLabels": dict(ing["gateway_labels"])},
                "match": [{"mode": "CLIENT"}],
                "phase": PHASES.get(n, "UNSPECIFIED_PHASE"), "priority": exp.priority.get(n, 0)}
        spec.update(_wasm_spec(exp, f, configs))
        objs.append({"apiVersion": "extensions.istio.io/v1alpha1", "kind": "WasmPlugin",
                     "metadata": {"name": INGRESS_PREFIX + n, "namespace": ing["namespace"], "labels": labels()},
                     "spec": spec})
    intro = [
        "The wasm filters on the ingress gateway's pods (k8s/deploy.json ingress:",
        f"namespace {ing['namespace']}, labels "
        + ", ".join(f"{k}: {v}" for k, v in ing["gateway_labels"].items()) + ") as WasmPlugins in",
        "the gateway's namespace, match mode CLIENT (how Istio classes a gateway's",
        "listeners; SERVER would never attach), in envoy.yaml's order by phase",
        f"then descending priority: {', '.join(names)}."]
    if mode == "both":
        intro += ["Beside the workloads' attachment: the filters and configuration overrides",
                  "of k8s/deploy.json ingress.with_sidecar_attachment (k8s/README.md)."]
    else:
        intro += ["Plugin configurations are envoy.yaml's with the clusters mapped."]
    return dump(objs, intro)


def routing_objects(exp):
    """Gateway (the gateway's namespace), VirtualService (envoy.yaml's
    routes) and the NetworkPolicy that lets the gateway's pods reach the
    sidecar (the sidecar's namespace)."""
    ing, ns = exp.ingress, exp.deploy["namespace"]
    hosts = list(ing["hosts"])
    if ing["tls_credential_name"]:
        servers = [{"name": "https", "port": {"number": 443, "name": "https", "protocol": "HTTPS"},
                    "hosts": list(hosts), "tls": {"mode": "SIMPLE", "credentialName": ing["tls_credential_name"]}},
                   {"name": "http", "port": {"number": 80, "name": "http", "protocol": "HTTP"},
                    "hosts": list(hosts), "tls": {"httpsRedirect": True}}]
    else:
        servers = [{"name": "http", "port": {"number": 80, "name": "http", "protocol": "HTTP"}, "hosts": list(hosts)}]
    gw = {"apiVersion": "networking.istio.io/v1", "kind": "Gateway",
          "metadata": {"name": GATEWAY_NAME, "namespace": ing["namespace"], "labels": labels()},
          "spec": {"selector": dict(ing["gateway_labels"]), "servers": servers}}
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": VIRTUALSERVICE_NAME, "namespace": ns, "labels": labels()},
          "spec": {"hosts": hosts, "gateways": [exp.gateway_ref()], "http": exp.vs_http()}}
    ports = sorted({exp.deploy["clusters"][c]["port"] for c in ("sidecar", "ratelimit")
                    if c in exp.deploy["clusters"]})
    np = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
          "metadata": {"name": INGRESS_NETPOL, "namespace": ns,
                       "labels": labels({"app.kubernetes.io/name": SIDECAR_NAME})},
          "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": SIDECAR_NAME}},
                   "policyTypes": ["Ingress"],
                   "ingress": [{"from": [{"namespaceSelector": {"matchLabels": {
                                              "kubernetes.io/metadata.name": ing["namespace"]}},
                                          "podSelector": {"matchLabels": dict(ing["gateway_labels"])}}],
                                "ports": [{"port": p, "protocol": "TCP"} for p in ports]}]}}
    return [gw, vs, np]


def gen_routing(exp):
    return dump(routing_objects(exp), [
        "The ingress: a Gateway on the gateway's pods (k8s/deploy.json ingress), a",
        "VirtualService with envoy.yaml's routes (each cluster its Service; /ws",
        "without a timeout: Istio upgrades WebSockets on every HTTP route and sets",
        "no route timeout unless told; nothing else is routed, /internal/ never),",
        "and a NetworkPolicy beside the base's that lets the gateway's pods reach",
        "the sidecar (its filters post usage, poll grants, call the RLS; /ws and",
        "/admin/ are proxied there)."])


def mesh_rules(exp, profile):
    """The ALLOW rules of a build's AuthorizationPolicy: one per endpoint
    of the sidecar that someone may call (Expected.callers), from those
    principals only, to that endpoint's port, methods and paths."""
    callers = exp.callers(profile)
    rules = []
    for e, (op, _) in exp.endpoints().items():
        if op is not None and callers[e]:
            rules.append({"from": [{"source": {"principals": callers[e]}}], "to": [{"operation": copy.deepcopy(op)}]})
    return rules


def authorization_policy(exp, build, namespace=None):
    meta = {"name": MESH_AP[build]}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = labels(SIDECAR_POD_LABEL)
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": meta,
            "spec": {"selector": {"matchLabels": dict(SIDECAR_POD_LABEL)}, "action": "ALLOW",
                     "rules": mesh_rules(exp, KUSTOMIZATIONS[build])}}


def ns_peer(name, pods=None):
    peer = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}
    if pods:
        peer["podSelector"] = {"matchLabels": dict(pods)}
    return peer


def tcp(*ports):
    return [{"port": p, "protocol": "TCP"} for p in ports]


def gen_mesh_base(exp):
    """The base's mesh policy: STRICT mTLS for the namespace and the
    sidecar, the sidecar's AuthorizationPolicy for the filters on the
    application pods, and the NetworkPolicies (by namespace name)."""
    ns, m = exp.deploy["namespace"], exp.mesh
    http, rls = exp.ports()
    sel = {"matchLabels": dict(SIDECAR_POD_LABEL)}
    pa_ns = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
             "metadata": {"name": "default", "labels": labels()},
             "spec": {"mtls": {"mode": "STRICT"}}}
    pa_sidecar = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
                  "metadata": {"name": SIDECAR_NAME, "labels": labels(SIDECAR_POD_LABEL)},
                  "spec": {"selector": copy.deepcopy(sel), "mtls": {"mode": "STRICT"}}}
    common = []
    callers_ns = sorted({v.split("/", 1)[0] for v in m["ws_callers"] + m["publishers"]})
    if callers_ns:
        common.append({"from": [ns_peer(n) for n in callers_ns], "ports": tcp(http)})
    common.append({"from": [ns_peer(m["prometheus_ns"])], "ports": tcp(ISTIO_AGENT_PORT, http)})
    np_common = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                 "metadata": {"name": MESH_NETPOL, "labels": labels(SIDECAR_POD_LABEL)},
                 "spec": {"podSelector": copy.deepcopy(sel), "policyTypes": ["Ingress"], "ingress": common}}
    np_workloads = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
                    "metadata": {"name": MESH_NETPOL_WORKLOADS, "labels": labels(SIDECAR_POD_LABEL)},
                    "spec": {"podSelector": copy.deepcopy(sel), "policyTypes": ["Ingress"],
                             "ingress": [{"from": [ns_peer(ns, exp.deploy["workload_labels"])],
                                          "ports": tcp(http, rls)}]}}
    objs = [pa_ns, pa_sidecar, authorization_policy(exp, "k8s/base"), np_common, np_workloads]
    return dump(objs, [
        "The mesh policy of the sidecar (k8s/README.md, \"Mesh policy\"): mutual TLS",
        "STRICT for the namespace and the sidecar; one ALLOW AuthorizationPolicy on",
        "the sidecar, so whatever no rule names is denied, each rule one endpoint",
        "from the SPIFFE principals (service accounts, k8s/deploy.json mesh) that",
        "call it: here the filters on the application pods (usage, grants feed,",
        "RLS), the listed WebSocket callers and publishers, Prometheus. The",
        "ingress overlays replace the AuthorizationPolicy. NetworkPolicies as a",
        "second layer, by namespace name: the listed callers' namespaces and",
        "monitoring (the agent's merged metrics on 15020, /metrics on 8081); the",
        "filtered workloads (their label, in this namespace)."])


def gen_mesh_overlay(exp, build):
    mode = KUSTOMIZATIONS[build][1]
    intro = ["The sidecar's ALLOW AuthorizationPolicy with the ingress gateway; it",
             "replaces the base's (k8s/README.md, \"Mesh policy\"). The gateway's",
             "principal (k8s/deploy.json ingress.service_account) for /ws and /admin/,",
             "which it routes, and for the callouts of the filters it runs"]
    if mode == "both":
        intro += ["(ingress.with_sidecar_attachment.gateway_filters); the application pods'",
                  "principals for those of workload_filters; the listed WebSocket callers",
                  "and publishers; Prometheus. Nothing else reaches the sidecar."]
    else:
        intro += ["(all of them; the application pods run none, so they call nothing); the",
                  "listed WebSocket callers and publishers; Prometheus. Nothing else",
                  "reaches the sidecar."]
    return dump([authorization_policy(exp, build, exp.deploy["namespace"])], intro)


_CATALOGUE = []


def metric_catalogue():
    """The metric catalogue of the code (tools/devstack's metric-catalog:
    every metric the sidecar and the filter cores define), built and run
    once per check."""
    if not _CATALOGUE:
        cmd = ["cargo", "run", "-q", "--locked", "-p", "devstack", "--bin", "metric-catalog"]
        try:
            out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
        except (OSError, subprocess.CalledProcessError) as e:
            sys.exit(f"check-deploy: {' '.join(cmd)} failed: {getattr(e, 'stderr', '') or e}")
        _CATALOGUE.append(json.loads(out))
    return _CATALOGUE[0]


def filter_stat_prefixes(exp):
    """Envoy stat prefixes of the filters' metrics (`wasmcustom.auth.`, ...),
    from the catalogue: what proxyStatsMatcher must include."""
    cat = metric_catalogue()["filters"]
    prefixes = set()
    for f in exp.names:
        metrics = (cat.get(f) or {}).get("metrics") or []
        msg = f"metric catalogue: the {f} filter defines no metrics"
        if not metrics and msg not in exp.errors:
            exp.errors.append(msg)
        for m in metrics:
            first = m["envoy_stat"].split(".")[:2]
            prefixes.add(".".join(first) + ".")
    return sorted(prefixes)


def proxy_config(exp):
    """The `proxy.istio.io/config` of the pods that run the filters."""
    return yaml.dump({"proxyStatsMatcher": {"inclusionPrefixes": filter_stat_prefixes(exp)}},
                     Dumper=_Dumper, sort_keys=False, default_flow_style=False)


PROXY_CONFIG_INTRO = [
    "Istio's proxies export no custom wasm stats unless proxyStatsMatcher",
    "includes them: these prefixes are every stat the filters define (the",
    "metric catalogue, tools/devstack metric-catalog). k8s/README.md,",
    "\"The filters' stats in Istio\".",
]


def gen_proxy_config_workloads(exp):
    pod_md = {"labels": dict(exp.deploy["workload_labels"]),
              "annotations": {"proxy.istio.io/config": proxy_config(exp)}}
    return dump([{"spec": {"template": {"metadata": pod_md}}}], PROXY_CONFIG_INTRO + [
        "",
        "A strategic merge patch for an application's Deployment: the workload",
        "label that attaches the filters, and the stats. The annotation is",
        "read when the proxy is injected, so the patch rolls the pods:",
        "  kubectl -n <namespace> patch deployment <app> --patch-file k8s/proxy-config/workloads.yaml",
        "(a pod that already has a proxy.istio.io/config needs the two merged).",
    ])


def gen_proxy_config_gateway(exp):
    pod_md = {"annotations": {"proxy.istio.io/config": proxy_config(exp)}}
    return dump([{"spec": {"template": {"metadata": pod_md}}}], PROXY_CONFIG_INTRO + [
        "",
        "For the ingress gateway's Deployment (the ingress overlays):",
        "  kubectl -n istio-system patch deployment istio-ingressgateway --patch-file k8s/proxy-config/gateway.yaml",
        "or, with the gateway's Helm chart, podAnnotations of the same key.",
    ])


def gen_proxy_config_mesh(exp):
    doc = {"meshConfig": {"defaultConfig": {"proxyStatsMatcher": {
        "inclusionPrefixes": filter_stat_prefixes(exp)}}}}
    return dump([doc], PROXY_CONFIG_INTRO + [
        "",
        "Mesh-wide instead of per pod: values for istiod's Helm chart",
        "(helm upgrade istiod istio/istiod -n istio-system -f k8s/proxy-config/mesh-config.yaml,",
        "merged with your own meshConfig), or the same keys under",
        "spec.meshConfig of an IstioOperator. Every proxy then keeps these stats.",
    ])


def generated(exp):
    out = {
        "k8s/proxy-config/workloads.yaml": gen_proxy_config_workloads(exp),
        "k8s/proxy-config/gateway.yaml": gen_proxy_config_gateway(exp),
        "k8s/proxy-config/mesh-config.yaml": gen_proxy_config_mesh(exp),
        "k8s/base/policy-configmap.yaml": gen_policy_configmap(exp),
        "k8s/base/envoyfilter.yaml": gen_envoyfilter(exp),
        "k8s/overlays/wasmplugin/wasmplugins.yaml": gen_wasmplugins(exp),
        "k8s/overlays/trafficextension/trafficextensions.yaml": gen_trafficextensions(exp),
        "k8s/overlays/wasmplugin/compressor.yaml": gen_compressor_envoyfilter(exp),
        "k8s/overlays/trafficextension/compressor.yaml": gen_compressor_envoyfilter(exp),
    }
    if exp.mesh is not None:  # else k8s/deploy.json's errors say why
        out["k8s/base/mesh-policy.yaml"] = gen_mesh_base(exp)
    if exp.ingress is not None:  # else k8s/deploy.json's errors say why
        out["k8s/overlays/ingress/routing/routing.yaml"] = gen_routing(exp)
        out["k8s/overlays/ingress/wasmplugins.yaml"] = gen_gateway_wasmplugins(exp, "alone")
        out["k8s/overlays/ingress/compressor.yaml"] = gen_compressor_envoyfilter(exp, gateway=True)
        out["k8s/overlays/ingress-and-sidecar/compressor.yaml"] = gen_compressor_envoyfilter(exp, gateway=True)
        out["k8s/overlays/ingress-and-sidecar/wasmplugins.yaml"] = gen_gateway_wasmplugins(exp, "both")
        out["k8s/overlays/ingress-and-sidecar/envoyfilter.yaml"] = gen_envoyfilter(
            exp, exp.ingress["both"]["workloads"][0], BOTH_ENVOYFILTER_NAME, exp.deploy["namespace"],
            ["With the ingress gateway (k8s/overlays/ingress-and-sidecar): the filters of",
             "k8s/deploy.json ingress.with_sidecar_attachment.workload_filters only."])
        if exp.mesh is not None:
            for build in ("k8s/overlays/ingress", "k8s/overlays/ingress-and-sidecar"):
                out[f"{build}/mesh-policy.yaml"] = gen_mesh_overlay(exp, build)
    return out


CHECKSUM_RE = re.compile(r'(checksum/policy:\s*)"?([0-9a-f]*)"?')
AUTH_CHECKSUM_RE = re.compile(r'(checksum/auth:\s*)"?([0-9a-f]*)"?')
# The sidecar container's image line in base/sidecar.yaml (any registry, tag, digest).
SIDECAR_IMAGE_RE = re.compile(r'^(\s*image:\s*)"?[^\s"]*/' + SIDECAR_IMAGE + r'(?:[:@][^\s"]*)?"?[ \t]*$', re.M)


def sync(exp, pin):
    if pin:
        # Each image whose layout is in target/oci is pinned (a broken one
        # stops everything); one without a layout keeps its digest and is
        # named, so the sidecar (minutes of musl build) or the filters can
        # be rebuilt and pinned alone.
        deploy = load_yaml(DEPLOY_JSON)
        kept = []
        for n in exp.names + [SIDECAR_IMAGE]:
            layout = os.path.join(TARGET, "oci", n)
            how = "scripts/package-sidecar.sh" if n == SIDECAR_IMAGE else "scripts/package-oci.sh"
            if not os.path.isdir(layout):
                kept.append(n)
                continue
            try:
                if n == SIDECAR_IMAGE:
                    errs, got = sidecar_layout_errors(oci_layout.Layout(layout))
                    if errs:
                        raise ValueError(errs[0])
                else:
                    got = oci_layout.verify(layout)
            except (OSError, ValueError, KeyError) as e:
                sys.exit(f"--pin: target/oci/{n}: {e} ({how})")
            deploy["images"]["digests"][n] = got["digest"]
            print(f"   pinned {n}: sha256:{got['digest']}")
        if len(kept) == len(exp.names) + 1:
            sys.exit(f"--pin: no layouts in {os.path.join(TARGET, 'oci')} "
                     "(scripts/package-oci.sh, scripts/package-sidecar.sh)")
        for n in kept:
            note(f"--pin: no target/oci/{n}: its digest in k8s/deploy.json is kept")
        with open(DEPLOY_JSON, "w") as f:
            json.dump(deploy, f, indent=2)
            f.write("\n")
        exp = Expected(exp.filters, deploy, exp.routes, exp.compressors)
    for path, text in generated(exp).items():
        full = os.path.join(ROOT, path)
        old = open(full).read() if os.path.exists(full) else None
        if old != text:
            os.makedirs(os.path.dirname(full), exist_ok=True)
            with open(full, "w") as f:
                f.write(text)
            print(f"   wrote {path}")
    side = os.path.join(ROOT, "k8s/base/sidecar.yaml")
    text = open(side).read()
    new = CHECKSUM_RE.sub(lambda m: f'{m.group(1)}"{sha256_text(exp.policy_text)}"', text)
    if exp.auth_text is not None:
        new = AUTH_CHECKSUM_RE.sub(lambda m: f'{m.group(1)}"{sha256_text(exp.auth_text)}"', new)
    new = SIDECAR_IMAGE_RE.sub(lambda m: m.group(1) + exp.sidecar_image(), new)
    if new != text:
        with open(side, "w") as f:
            f.write(new)
        print("   wrote k8s/base/sidecar.yaml (checksum/policy, checksum/auth, image)")
    return exp


# --------------------------------------------------------------------------
# Kustomize


def kustomize(dirpath, errors, _stack=()):
    """The built-in resolver: resources (files, directories), namespace, and
    `$patch: delete` patches; anything else is refused, so it never differs
    silently from kustomize. Returns [(source, object)]."""
    dirpath = os.path.normpath(dirpath)
    if dirpath in _stack:
        errors.append(f"{rel(dirpath)}: kustomization cycle")
        return []
    kfile = next((os.path.join(dirpath, n) for n in ("kustomization.yaml", "kustomization.yml", "Kustomization")
                  if os.path.exists(os.path.join(dirpath, n))), None)
    if kfile is None:
        errors.append(f"{rel(dirpath)}: no kustomization.yaml")
        return []
    k = load_yaml(kfile) or {}
    where = rel(kfile)
    unknown = set(k) - {"apiVersion", "kind", "namespace", "resources", "patches"}
    if unknown:
        errors.append(f"{where}: {sorted(unknown)} not supported by the built-in resolver")
    if k.get("apiVersion") != "kustomize.config.k8s.io/v1beta1" or k.get("kind") != "Kustomization":
        errors.append(f"{where}: apiVersion/kind must be kustomize.config.k8s.io/v1beta1 Kustomization")
    out = []
    for r in k.get("resources") or []:
        p = os.path.normpath(os.path.join(dirpath, r))
        if os.path.isdir(p):
            out += kustomize(p, errors, _stack + (dirpath,))
        elif os.path.isfile(p):
            if not p.startswith(dirpath + os.sep):
                errors.append(f"{where}: resource {r} is outside the kustomization's directory")
            with open(p) as f:
                out += [(rel(p), d) for d in yaml.safe_load_all(f) if d is not None]
        else:
            errors.append(f"{where}: resource {r} does not exist")
    for i, patch in enumerate(k.get("patches") or []):
        if set(patch) - {"patch", "path"}:
            errors.append(f"{where}: patches[{i}]: only `patch`/`path` with `$patch: delete` are supported")
            continue
        body = yaml.safe_load(patch["patch"]) if "patch" in patch else load_yaml(os.path.join(dirpath, patch["path"]))
        if not isinstance(body, dict) or body.get("$patch") != "delete":
            errors.append(f"{where}: patches[{i}]: only `$patch: delete` is supported")
            continue
        md = body.get("metadata", {})
        keep = []
        for src, o in out:
            om = o.get("metadata", {})
            hit = (o.get("apiVersion") == body.get("apiVersion") and o.get("kind") == body.get("kind")
                   and om.get("name") == md.get("name")
                   and ("namespace" not in md or om.get("namespace") == md.get("namespace")))
            if not hit:
                keep.append((src, o))
        if len(keep) == len(out):
            errors.append(f"{where}: patches[{i}]: no {body.get('kind')} {md.get('name')} to delete")
        out = keep
    ns = k.get("namespace")
    if ns:
        for _, o in out:
            if o.get("kind") not in CLUSTER_SCOPED:
                o.setdefault("metadata", {})["namespace"] = ns
    return out


def kubectl_kustomize(path):
    exe = shutil.which("kubectl") or shutil.which("kustomize")
    if not exe:
        return None, "no kubectl or kustomize on PATH"
    cmd = [exe, "kustomize", path] if exe.endswith("kubectl") else [exe, "build", path]
    try:
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{' '.join(cmd)}: {e}"
    if r.returncode != 0:
        return [], f"{' '.join(cmd)} failed: {r.stderr.strip()[:500]}"
    return [d for d in yaml.safe_load_all(r.stdout) if d is not None], " ".join(cmd)


def obj_id(o):
    m = o.get("metadata", {})
    return f"{o.get('kind')} {m.get('namespace', '')}/{m.get('name')}"


# --------------------------------------------------------------------------
# Kubernetes validation: core kinds


_KV = None


def k8s_schema_validate(obj):
    """Kubernetes' own OpenAPI-derived JSON schema for the kind, strict."""
    global _KV
    if _KV is None:
        import kubernetes_validate
        _KV = kubernetes_validate
    try:
        _KV.validate(obj, K8S_VERSION, strict=True)
        return []
    except _KV.SchemaNotFoundError:
        return [f"no Kubernetes {K8S_VERSION} schema for {obj.get('apiVersion')} {obj.get('kind')}"]
    except _KV.ValidationError as e:
        path = "/".join(str(p) for p in e.absolute_path)
        return [f"{path or '(top)'}: {e.message[:400]}"]


DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
IANA_SVC_NAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")
ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")


def check_meta(o):
    """What the API server checks beyond the schema: names, labels."""
    errs = []
    m = o.get("metadata") or {}
    name = m.get("name", "")
    label_kinds = {"Namespace", "Service", "ConfigMap"}  # DNS-1123 label names (ConfigMap: subdomain, fine)
    rx, lim = (DNS1123_LABEL, 63) if o.get("kind") in label_kinds - {"ConfigMap"} else (DNS1123_SUBDOMAIN, 253)
    if not (rx.fullmatch(name or "") and len(name) <= lim):
        errs.append(f"metadata.name {name!r} is not a valid {o.get('kind')} name")
    ns = m.get("namespace")
    if ns is not None and not (DNS1123_LABEL.fullmatch(ns) and len(ns) <= 63):
        errs.append(f"metadata.namespace {ns!r} is not a DNS-1123 label")
    for where, lab in (("metadata.labels", m.get("labels")),) + tuple(
            (f"selector {p}", s) for p, s in selectors(o)):
        for k, v in (lab or {}).items():
            prefix, _, nm = k.rpartition("/")
            if (prefix and not (DNS1123_SUBDOMAIN.fullmatch(prefix) and len(prefix) <= 253)) or \
                    not (LABEL_NAME.fullmatch(nm) and len(nm) <= 63):
                errs.append(f"{where}: {k!r} is not a valid label key")
            if not isinstance(v, str) or not (v == "" or (LABEL_NAME.fullmatch(v) and len(v) <= 63)):
                errs.append(f"{where}: {k}={v!r} is not a valid label value")
    return errs


def selectors(o):
    spec = o.get("spec") or {}
    k = o.get("kind")
    if k in ("Deployment", "StatefulSet", "DaemonSet", "PodDisruptionBudget"):
        yield "spec.selector.matchLabels", (spec.get("selector") or {}).get("matchLabels")
    if k == "Service":
        yield "spec.selector", spec.get("selector")
    if k == "NetworkPolicy":
        yield "spec.podSelector.matchLabels", (spec.get("podSelector") or {}).get("matchLabels")
    if k == "EnvoyFilter":
        yield "spec.workloadSelector.labels", (spec.get("workloadSelector") or {}).get("labels")
    if k in ("WasmPlugin", "TrafficExtension"):
        yield "spec.selector.matchLabels", (spec.get("selector") or {}).get("matchLabels")
    if k == "Gateway":
        yield "spec.selector", spec.get("selector")


def check_pod_template(o):
    errs = []
    spec = o["spec"]
    tmpl = spec.get("template", {})
    plabels = tmpl.get("metadata", {}).get("labels", {})
    sel = (spec.get("selector") or {}).get("matchLabels") or {}
    if not sel or any(plabels.get(k) != v for k, v in sel.items()):
        errs.append("spec.selector.matchLabels must be non-empty and match spec.template.metadata.labels")
    pod = tmpl.get("spec", {})
    volumes = {v.get("name") for v in pod.get("volumes", [])}
    for ci, c in enumerate(pod.get("containers", [])):
        at = f"spec.template.spec.containers[{ci}]"
        if not (DNS1123_LABEL.fullmatch(c.get("name", "")) and len(c["name"]) <= 63):
            errs.append(f"{at}.name {c.get('name')!r} is not a DNS-1123 label")
        ports = {}
        for p in c.get("ports", []):
            n = p.get("name")
            if n is not None:
                if not (IANA_SVC_NAME.fullmatch(n) and len(n) <= 15 and "--" not in n and re.search("[a-z]", n)):
                    errs.append(f"{at}.ports: {n!r} is not an IANA_SVC_NAME (≤ 15, lower case, a letter)")
                if n in ports:
                    errs.append(f"{at}.ports: name {n!r} repeats")
                ports[n] = p.get("containerPort")
        envs = [e.get("name") for e in c.get("env", [])]
        for e in envs:
            if not ENV_NAME.fullmatch(e or ""):
                errs.append(f"{at}.env: {e!r} is not a valid variable name")
        if len(set(envs)) != len(envs):
            errs.append(f"{at}.env: names repeat")
        for vm in c.get("volumeMounts", []):
            if vm.get("name") not in volumes:
                errs.append(f"{at}.volumeMounts: {vm.get('name')!r} is not a volume of the pod")
        for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
            port = ((c.get(probe) or {}).get("httpGet") or {}).get("port")
            if isinstance(port, str) and port not in ports:
                errs.append(f"{at}.{probe}.httpGet.port {port!r} is not a named port of the container")
    return errs


def check_core(o):
    errs = k8s_schema_validate(o) + check_meta(o)
    if o.get("kind") in ("Deployment", "StatefulSet", "DaemonSet") and not errs:
        errs += check_pod_template(o)
    return errs


# --------------------------------------------------------------------------
# Istio kinds: the CRDs' openAPIV3Schema, strict, with their CEL rules


def _norm(rule):
    return " ".join(rule.split())


def _is_url(s):
    """CEL's isURL (Go url.ParseRequestURI): an absolute URI or path."""
    return isinstance(s, str) and " " not in s and (
        s.startswith("/") or re.match(r"[A-Za-z][A-Za-z0-9+.-]*:", s) is not None)


def _scheme(s):
    m = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", s)
    return m.group(1).lower() if m else ""


CEL_EXACT = {
    _norm('!self.contains("*")'): lambda s: "*" not in s,
    _norm('self.all(key, !key.contains("*"))'): lambda s: all("*" not in k for k in s),
    _norm("self.all(key, key.size() != 0)"): lambda s: all(len(k) for k in s),
    _norm("self.size() == 0"): lambda s: len(s) == 0,
    _norm("0 < self && self <= 65535"): lambda s: 0 < s <= 65535,
    _norm('(has(self.valueFrom) ? self.valueFrom : "") != "HOST" || !has(self.value)'):
        lambda s: s.get("valueFrom", "") != "HOST" or "value" not in s,
    _norm('(has(self.serviceAccounts) || has(self.notServiceAccounts)) ? (!has(self.principals) && '
          '!has(self.notPrincipals) && !has(self.namespaces) && !has(self.notNamespaces)) : true'):
        lambda s: not ("serviceAccounts" in s or "notServiceAccounts" in s)
        or not any(k in s for k in ("principals", "notPrincipals", "namespaces", "notNamespaces")),
    _norm('has(self.portLevelMtls) ? (((has(self.selector) && has(self.selector.matchLabels)) ? '
          'self.selector.matchLabels : {}).size() > 0) : true'):
        lambda s: "portLevelMtls" not in s or len((s.get("selector") or {}).get("matchLabels") or {}) > 0,
    _norm("self.all(key, 0 < int(key) && int(key) <= 65535)"):
        lambda s: all(re.fullmatch(r"[0-9]+", k) and 0 < int(k) <= 65535 for k in s),
    _norm('has(self.context) ? ((self.context == "WAYPOINT") ? has(self.waypoint) : '
          '!has(self.waypoint)) : !has(self.waypoint)'):
        lambda s: (("waypoint" in s) if s.get("context") == "WAYPOINT" else "waypoint" not in s)
        if "context" in s else "waypoint" not in s,
}


GO_DURATION_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def go_duration(text):
    """Seconds of a Go duration string (CEL's duration(): "15s", "1m30s",
    "0.5ms", "0"); None when it is not one (CEL would fail the rule)."""
    if not isinstance(text, str):
        return None
    if text in ("0", "+0", "-0"):
        return 0.0
    m = re.fullmatch(r"([-+]?)((?:(?:\d+\.?\d*|\.\d+)(?:ns|us|µs|μs|ms|s|m|h))+)", text)
    if not m:
        return None
    total = sum(float(n) * GO_DURATION_UNIT[u]
                for n, u in re.findall(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)", m.group(2)))
    return -total if m.group(1) == "-" else total


def eval_cel(rule, value):
    """The CEL rules these CRDs use, in Python. None: not implemented
    (reported as an error, so a new rule is never skipped silently)."""
    r = _norm(rule)
    if r in CEL_EXACT:
        return CEL_EXACT[r](value)
    if re.fullmatch(r"\(has\(self\.\w+\) \? 1 : 0\)( \+ \(has\(self\.\w+\) \? 1 : 0\))* <= 1", r):
        return sum(f in value for f in re.findall(r"has\(self\.(\w+)\)", r)) <= 1
    m = re.fullmatch(r"duration\(self\) >= duration\('(\w+)'\)", r)
    if m:
        got, least = go_duration(value), go_duration(m.group(1))
        return got is not None and least is not None and got >= least
    m = re.fullmatch(r"has\(self\.(\w+)\) != has\(self\.(\w+)\)", r)
    if m:
        return (m.group(1) in value) != (m.group(2) in value)
    m = re.fullmatch(r'isURL\(self\) \? \(url\(self\)\.getScheme\(\) in \[([^\]]*)\]\) : '
                     r'\(isURL\("http://" \+ self\) && url\("http://" \+ self\)\.getScheme\(\) in \[([^\]]*)\]\)', r)
    if m:
        allowed = [x.strip().strip('"') for x in m.group(1).split(",")]
        if _is_url(value):
            return _scheme(value) in allowed
        return _is_url("http://" + value) and "http" in allowed
    return None


_CRD = None


def crd_validators():
    """{(apiVersion, kind): validator} for every served version."""
    global _CRD
    if _CRD is not None:
        return _CRD
    import jsonschema
    from jsonschema import ValidationError, validators

    def x_validations(validator, rules, instance, schema):
        for r in rules:
            ok = eval_cel(r["rule"], instance)
            if ok is None:
                yield ValidationError(f"CEL rule not implemented by scripts/check_deploy.py: {r['rule']!r}")
            elif not ok:
                yield ValidationError(f"{r.get('message') or 'CEL rule failed'} ({_norm(r['rule'])})")

    def x_list_map_keys(validator, keys, instance, schema):
        if isinstance(instance, list):
            seen = set()
            for item in instance:
                key = tuple(json.dumps(item.get(k)) for k in keys) if isinstance(item, dict) else None
                if key in seen:
                    yield ValidationError(f"duplicate entry for list-map keys {keys}: {item}")
                seen.add(key)

    cls = validators.extend(jsonschema.Draft4Validator, {
        "x-kubernetes-validations": x_validations,
        "x-kubernetes-list-map-keys": x_list_map_keys,
    })
    fc = jsonschema.FormatChecker()
    fc.checks("int32")(lambda v: not isinstance(v, int) or -2**31 <= v < 2**31)
    fc.checks("int64")(lambda v: not isinstance(v, int) or -2**63 <= v < 2**63)
    out = {}
    with open(CRDS) as f:
        for d in yaml.safe_load_all(f):
            if not d or d.get("kind") != "CustomResourceDefinition":
                continue
            spec = d["spec"]
            for v in spec["versions"]:
                if not v.get("served"):
                    continue
                schema = strictify(v["schema"]["openAPIV3Schema"])
                schema.setdefault("properties", {})
                schema["properties"].update({"apiVersion": {"type": "string"}, "kind": {"type": "string"},
                                             "metadata": {"type": "object"}})
                schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata"})
                cls.check_schema(schema)
                out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = (
                    cls(schema, format_checker=fc), spec["scope"])
    _CRD = out
    return out


def check_istio(o):
    key = (o.get("apiVersion"), o.get("kind"))
    entry = crd_validators().get(key)
    if entry is None:
        return [f"{key[0]} {key[1]} is not served by any CRD in {rel(CRDS)}"]
    validator, scope = entry
    errs = []
    for e in sorted(validator.iter_errors(o), key=lambda e: list(map(str, e.absolute_path))):
        path = "/".join(str(p) for p in e.absolute_path)
        errs.append(f"{path or '(top)'}: {e.message[:400]}")
    # metadata: Kubernetes' ObjectMeta schema, through a ConfigMap around it
    for e in k8s_schema_validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": o.get("metadata", {})}):
        errs.append(e)
    errs += check_meta(o)
    if scope == "Namespaced" and not (o.get("metadata") or {}).get("namespace"):
        errs.append("metadata.namespace: not set (the kustomization sets it)")
    if o.get("kind") == "EnvoyFilter":
        for i, p in enumerate((o.get("spec") or {}).get("configPatches") or []):
            value = (p.get("patch") or {}).get("value")
            t = APPLY_TO_TYPE.get(p.get("applyTo"))
            if value is None or t is None:
                continue
            try:
                parse_envoy(t, value)
            except StrictError as e:
                errs.append(f"spec/configPatches/{i}/patch/value: as {t}: {e}")
    return errs


# --------------------------------------------------------------------------
# Drift and wiring


def flags_env(settings, envs, flags):
    """The sidecar's settings from its arguments and SIDECAR_* variables:
    {--flag: value}."""
    out = {f: envs[e] for f, e in flags.items() if e and e in envs and envs[e] is not None}
    out.update(settings)
    return out


def check_sidecar_autoscaling(dep, hpas, settings, given):
    """The HorizontalPodAutoscaler of the sidecar: one, on the Deployment,
    from at least two replicas (the PodDisruptionBudget keeps one), on CPU
    and on open WebSockets per pod, scaling down one pod at a time after a
    quiet window; the Deployment leaves `replicas` to it; the shutdown's
    close spread fits the drain, which fits the grace period."""
    errs = []
    if len(hpas) != 1:
        return [f"want one HorizontalPodAutoscaler on Deployment {SIDECAR_NAME}, found {len(hpas)}"]
    h = hpas[0]["spec"]
    ref = h.get("scaleTargetRef") or {}
    if (ref.get("apiVersion"), ref.get("kind")) != ("apps/v1", "Deployment"):
        errs.append("HorizontalPodAutoscaler: scaleTargetRef must be the apps/v1 Deployment")
    if "replicas" in dep["spec"]:
        errs.append("Deployment: `replicas` is the HorizontalPodAutoscaler's (an apply would reset it)")
    if h.get("minReplicas", 1) < 2:
        errs.append("HorizontalPodAutoscaler: minReplicas below 2 (the PodDisruptionBudget keeps one available)")
    kinds = {(m.get("type"), ((m.get("resource") or {}).get("name")
                              or ((m.get("pods") or {}).get("metric") or {}).get("name")))
             for m in h.get("metrics") or []}
    for want in (("Resource", "cpu"), ("Pods", "sidecar_ws_connections")):
        if want not in kinds:
            errs.append(f"HorizontalPodAutoscaler: no {want[0]} metric {want[1]}")
    down = (h.get("behavior") or {}).get("scaleDown") or {}
    pols = down.get("policies") or []
    if down.get("stabilizationWindowSeconds", 300) < 300 or not pols or \
            any(p.get("type") != "Pods" or p.get("value", 0) > 1 for p in pols):
        errs.append("HorizontalPodAutoscaler: scaleDown must remove one pod at a time after a quiet "
                    "window of at least 300 s (a pod that goes closes its WebSockets; k8s/README.md)")
    # the custom metric: served by the adapter's rule, from a gauge the sidecar defines
    values = load_yaml(ADAPTER_VALUES) or {}
    served = {((r.get("name") or {}).get("as")): r for r in (values.get("rules") or {}).get("custom") or []}
    gauges = {m["name"] for m in metric_catalogue()["sidecar"] if m.get("type") == "gauge"}
    for m in h.get("metrics") or []:
        if m.get("type") != "Pods":
            continue
        name = ((m.get("pods") or {}).get("metric") or {}).get("name")
        rule = served.get(name)
        series = re.match(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", (rule or {}).get("seriesQuery", ""))
        if rule is None:
            errs.append(f"HorizontalPodAutoscaler: Pods metric {name} is not served by "
                        f"{rel(ADAPTER_VALUES)} (rules.custom[].name.as)")
        elif not series or series.group(1) not in gauges:
            errs.append(f"{rel(ADAPTER_VALUES)}: the rule for {name} reads "
                        f"{series.group(1) if series else '?'}, not a gauge the sidecar defines "
                        "(the metric catalogue)")
    spread = int(given.get("--close-spread") or 0)
    drain = int(given.get("--drain-timeout") or 10)
    grace = dep["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
    if spread == 0:
        errs.append("Deployment: SIDECAR_CLOSE_SPREAD unset: a pod that goes closes all its WebSockets at once")
    # a connection closed last gets the session's close timeout (5 s) to finish
    if spread + 5 > drain:
        errs.append(f"Deployment: --close-spread ({spread} s) plus the 5 s close timeout must fit "
                    f"--drain-timeout ({drain} s)")
    if drain >= grace:
        errs.append(f"Deployment: --drain-timeout ({drain} s) must be below terminationGracePeriodSeconds ({grace})")
    return errs


def sidecar_flags():
    """{--flag: SIDECAR_ENV} from sidecar/src/config.rs (clap derive)."""
    text = open(SIDECAR_CONFIG_RS).read()
    flags = {}
    for m in re.finditer(r'#\[arg\(([^\]]*?)\)\]\s*(?:///[^\n]*\n\s*)*pub (\w+):', text, re.S):
        args, field = m.group(1), m.group(2)
        if "long" not in args:
            continue
        env = re.search(r'env\s*=\s*"([A-Z0-9_]+)"', args)
        named = re.search(r'long\s*=\s*"([a-z0-9-]+)"', args)
        flag = named.group(1) if named else field.replace("_", "-")
        flags["--" + flag] = env.group(1) if env else None
    return flags


def by_kind(objs, kind):
    return [o for _, o in objs if o.get("kind") == kind]


FILTER_KINDS = ("EnvoyFilter", "WasmPlugin", "TrafficExtension")


def is_ingress_filter(o):
    return o.get("kind") in FILTER_KINDS and (o.get("metadata") or {}).get("name", "").startswith(INGRESS_PREFIX)


def is_compressor(patch):
    value = (patch.get("patch") or {}).get("value") or {}
    return patch.get("applyTo") == "HTTP_FILTER" and (get(value, "typed_config") or {}).get("@type") == COMPRESSOR_URL


def check_compressor_patches(patches, exp, context, at):
    """HTTP_FILTER patches (configPatches entries, with their indices) that
    must be envoy.yaml's compressors, in its order, INSERT_BEFORE the
    router in `context`."""
    errs = []
    for i, p in patches:
        match = p.get("match") or {}
        sub = ((((match.get("listener") or {}).get("filterChain") or {}).get("filter") or {})
               .get("subFilter") or {}).get("name")
        if match.get("context") != context:
            errs.append(f"{at} configPatches[{i}]: a compressor's match.context must be {context}")
        if (p.get("patch") or {}).get("operation") != "INSERT_BEFORE" or sub != ROUTER:
            errs.append(f"{at} configPatches[{i}]: a compressor must be INSERT_BEFORE the subFilter {ROUTER}")
    got = [(p.get("patch") or {}).get("value") for _, p in patches]
    if got != exp.compressors:
        errs.append(f"{at}: the compressors {[(g or {}).get('name') for g in got]} differ from envoy.yaml's "
                    f"{[c.get('name') for c in exp.compressors]} (names, order, configuration)")
    return errs


def check_compressor_envoyfilters(objs, exp, want, where, context, labels_, namespace=None):
    """The compressor-only EnvoyFilters of one attachment: `want` of them
    (0 or 1), selecting labels_, in namespace (when given)."""
    if len(objs) != want:
        return [f"{where}: {want} compressor EnvoyFilter(s) expected (envoy.yaml's compressors), "
                f"found {[obj_id(o) for o in objs]}"]
    errs = []
    for o in objs:
        at = f"EnvoyFilter {o['metadata'].get('name')}"
        spec = o.get("spec") or {}
        if (spec.get("workloadSelector") or {}).get("labels") != labels_:
            errs.append(f"{at}: workloadSelector.labels must be {labels_} ({where})")
        if namespace and o["metadata"].get("namespace") != namespace:
            errs.append(f"{at}: must be in {namespace} (a workloadSelector reaches only pods of its namespace)")
        patches = list(enumerate(spec.get("configPatches") or []))
        other = [i for i, p in patches if not is_compressor(p)]
        if other:
            errs.append(f"{at}: configPatches {other} are not compressors (the filters have their own resources)")
        errs += check_compressor_patches([x for x in patches if is_compressor(x[1])], exp, context, at)
    return errs


def check_filters_resources(objs, exp, want_kind, names, configs, where="workloads"):
    """The resources that attach `names` (in that order, configurations
    `configs`) to the workloads (want_kind, deploy.json workload_labels,
    inbound) or to the ingress gateway (WasmPlugins, ingress.gateway_labels,
    mode CLIENT). objs: that attachment's resources only."""
    errs = []
    kinds = [k for k in FILTER_KINDS if by_kind(objs, k)]
    if want_kind is None:
        return [f"no filters expected on the {where}, found {kinds}"] if kinds else []
    if kinds != [want_kind]:
        return [f"{want_kind} must install the filters on the {where}, found {kinds}"]
    gateway = where == "ingress gateway"
    want_labels = exp.ingress["gateway_labels"] if gateway else exp.deploy["workload_labels"]
    want_mode = "CLIENT" if gateway else "SERVER"
    if kinds == ["EnvoyFilter"]:
        efs = by_kind(objs, "EnvoyFilter")
        if len(efs) != 1:
            return [f"one EnvoyFilter expected (the patches' order is the chain's), found {len(efs)}"]
        ef = efs[0]
        spec = ef.get("spec", {})
        if (spec.get("workloadSelector") or {}).get("labels") != want_labels:
            errs.append(f"EnvoyFilter: workloadSelector.labels must be {want_labels} (k8s/deploy.json)")
        ecds, order, comp, wasm_at = {}, [], [], []
        for i, p in enumerate(spec.get("configPatches", [])):
            at = f"EnvoyFilter configPatches[{i}]"
            if is_compressor(p):
                comp.append((i, p))
                continue
            match = p.get("match") or {}
            if match.get("context") != "SIDECAR_INBOUND":
                errs.append(f"{at}: match.context must be SIDECAR_INBOUND")
            value = (p.get("patch") or {}).get("value") or {}
            if p.get("applyTo") == "EXTENSION_CONFIG":
                tc = get(value, "typed_config") or {}
                if tc.get("@type") != WASM_URL:
                    errs.append(f"{at}: typed_config must be {WASM_URL}")
                    continue
                ecds[value.get("name")] = get(tc, "config") or {}
            elif p.get("applyTo") == "HTTP_FILTER":
                sub = ((((match.get("listener") or {}).get("filterChain") or {}).get("filter") or {})
                       .get("subFilter") or {}).get("name")
                if p["patch"].get("operation") != "INSERT_BEFORE" or sub != ROUTER:
                    errs.append(f"{at}: must be INSERT_BEFORE the subFilter {ROUTER}")
                cd = get(value, "config_discovery") or {}
                if WASM_URL not in (get(cd, "type_urls") or []):
                    errs.append(f"{at}: config_discovery.type_urls must name {WASM_URL}")
                order.append(value.get("name"))
                wasm_at.append(i)
        errs += check_compressor_patches(comp, exp, "SIDECAR_INBOUND", "EnvoyFilter")
        if comp and wasm_at and min(i for i, _ in comp) < max(wasm_at):
            errs.append("EnvoyFilter: a compressor patch before a wasm filter's (INSERT_BEFORE the router in "
                        "patch order: it would run before the filters that answer locally)")
        plugin_of = {}
        for n in order:
            if n not in ecds:
                errs.append(f"EnvoyFilter: HTTP_FILTER {n!r} has no EXTENSION_CONFIG of that name")
            else:
                plugin_of[n] = get(ecds[n], "name")
        got = [plugin_of.get(n) for n in order]
        if got != names:
            errs.append(f"EnvoyFilter: filter order {got} differs from {names} (envoy.yaml's order, k8s/deploy.json)")
        for f in exp.filters:
            n = f["name"]
            if n not in names:
                continue
            cfg = next((c for c in ecds.values() if get(c, "name") == n), None)
            if cfg is None:
                errs.append(f"EnvoyFilter: no EXTENSION_CONFIG for envoy.yaml's filter {n}")
                continue
            at = f"EnvoyFilter {n}"
            local = ("code", "environment_variables")
            strip = lambda c: {k: (v if k != "vm_config" else {kk: vv for kk, vv in v.items() if kk not in local})
                               for k, v in c.items() if k != "configuration"}
            if strip(cfg) != strip(f["config"]):
                errs.append(f"{at}: the Wasm config (beside code, environment_variables and configuration) "
                            "differs from envoy.yaml's")
            env = get(get(cfg, "vm_config") or {}, "environment_variables")
            want_env = {"host_env_keys": exp.vm_env(n)} if exp.vm_env(n) else None
            if env != want_env:
                errs.append(f"{at}: vm_config.environment_variables must be {want_env} (the usage filter's "
                            "secret from the istio-proxy container's environment, k8s/deploy.json usage_secret)")
            conf = get(cfg, "configuration") or {}
            try:
                got_json = json.loads(conf.get("value", ""))
            except (TypeError, ValueError) as e:
                errs.append(f"{at}: configuration.value is not JSON: {e}")
                continue
            if got_json != configs[n]:
                errs.append(f"{at}: plugin configuration differs from envoy.yaml's (clusters mapped)")
            remote = get(get(get(cfg, "vm_config") or {}, "code") or {}, "remote") or {}
            if get(get(remote, "http_uri") or {}, "uri") != exp.url(n):
                errs.append(f"{at}: code.remote.http_uri.uri must be {exp.url(n)}")
            if get(remote, "sha256") != exp.digest(n):
                errs.append(f"{at}: code.remote.sha256 must be the pinned digest {exp.digest(n)!r}")
    else:
        kind = kinds[0]
        items = by_kind(objs, kind)
        seen = {}
        for o in items:
            spec = o.get("spec", {})
            w = spec if kind == "WasmPlugin" else spec.get("wasm", {})
            at = f"{kind} {o['metadata'].get('name')}"
            match = [f for f in exp.filters if (get(f["config"], "root_id") or f["name"]) == w.get("pluginName")]
            if not match:
                errs.append(f"{at}: pluginName {w.get('pluginName')!r} is no root_id of envoy.yaml's filters")
                continue
            n = match[0]["name"]
            if n not in names:
                errs.append(f"{at}: {n} is not one of the filters of the {where} here {names} (k8s/deploy.json)")
                continue
            if n in seen:
                errs.append(f"{at}: a second resource for filter {n}")
            seen[n] = (PHASE_RANK.get(spec.get("phase"), 3), -(spec.get("priority") or 0))
            if (spec.get("selector") or {}).get("matchLabels") != want_labels:
                errs.append(f"{at}: selector.matchLabels must be {want_labels}")
            if spec.get("match") != [{"mode": want_mode}]:
                errs.append(f"{at}: match must be [{{mode: {want_mode}}}] " + (
                    "(Istio classes a gateway's listeners as CLIENT: SERVER would never attach)" if gateway
                    else "(inbound, like SIDECAR_INBOUND)"))
            if gateway and o["metadata"].get("namespace") != exp.ingress["namespace"]:
                errs.append(f"{at}: must be in the gateway's namespace {exp.ingress['namespace']} "
                            "(a selector reaches only pods of its own namespace)")
            if w.get("pluginConfig") != configs[n]:
                errs.append(f"{at}: pluginConfig differs from envoy.yaml's {n} configuration (clusters mapped"
                            + (", k8s/deploy.json's overrides)" if configs is not exp.k8s_json else ")"))
            if w.get("vmConfig") != vm_config(exp, n):
                errs.append(f"{at}: vmConfig must be {vm_config(exp, n)} (the usage filter's secret from the "
                            "istio-proxy container's environment, k8s/deploy.json usage_secret)")
            if w.get("url") != exp.url(n):
                errs.append(f"{at}: url must be {exp.url(n)}")
            if w.get("sha256") != exp.digest(n):
                errs.append(f"{at}: sha256 must be the pinned image digest {exp.digest(n)!r}")
        missing = [n for n in names if n not in seen]
        if missing:
            errs.append(f"{kind}: no resource for {missing}")
        ranks = list(seen.values())
        if len(set(ranks)) != len(ranks):
            errs.append(f"{kind}: two filters share phase and priority (order left to creation time)")
        got = sorted(seen, key=lambda n: seen[n])
        if got != [n for n in names if n in seen]:
            errs.append(f"{kind}: phase/priority order {got} differs from envoy.yaml's {names}")
    return errs


def check_sidecar(objs, exp):
    errs = []
    deps = [o for o in by_kind(objs, "Deployment") if o["metadata"].get("name") == SIDECAR_NAME]
    svcs = [o for o in by_kind(objs, "Service") if o["metadata"].get("name") == SIDECAR_NAME]
    cms = [o for o in by_kind(objs, "ConfigMap") if o["metadata"].get("name") == POLICY_CONFIGMAP]
    if len(deps) != 1 or len(svcs) != 1 or len(cms) != 1:
        return [f"want one Deployment and Service {SIDECAR_NAME} and one ConfigMap {POLICY_CONFIGMAP}"]
    dep, svc, cm = deps[0], svcs[0], cms[0]
    ns = dep["metadata"].get("namespace")
    # the policy
    text = (cm.get("data") or {}).get(POLICY_KEY)
    try:
        policy = json.loads(text or "")
    except ValueError as e:
        return [f"ConfigMap {POLICY_CONFIGMAP}: {POLICY_KEY} is not JSON: {e}"]
    if policy != exp.policy:
        errs.append(f"ConfigMap {POLICY_CONFIGMAP}: {POLICY_KEY} differs from envoy.yaml's entitlements policy")
    tmpl = dep["spec"]["template"]
    ann = (tmpl.get("metadata") or {}).get("annotations") or {}
    if ann.get("checksum/policy") != sha256_text(text):
        errs.append("Deployment: pod annotation checksum/policy is not the sha256 of the policy "
                    "(scripts/check-deploy.sh --sync)")
    pod = tmpl["spec"]
    c = pod["containers"][0]
    # flags and environment against the sidecar's own definition
    flags = sidecar_flags()
    envs = {e["name"]: e.get("value") for e in c.get("env", [])}
    settings = {}
    for a in c.get("args", []):
        flag, eq, val = a.partition("=")
        if flag not in flags:
            errs.append(f"Deployment: argument {flag} is not a flag of sidecar/src/config.rs")
        elif not eq:
            errs.append(f"Deployment: write {flag}=VALUE as one argument")
        settings[flag] = val
    env_to_flag = {v: k for k, v in flags.items() if v}
    for name, val in envs.items():
        if name.startswith("SIDECAR_"):
            if name not in env_to_flag:
                errs.append(f"Deployment: env {name} is not a variable of sidecar/src/config.rs")
            elif env_to_flag[name] in settings:
                errs.append(f"Deployment: {name} and {env_to_flag[name]} both set")
            else:
                settings[env_to_flag[name]] = val
    if c.get("command"):
        errs.append("Deployment: use the image's entrypoint (the sidecar binary), not command")
    if c.get("image") != exp.sidecar_image():
        errs.append(f"Deployment: image {c.get('image')!r} is not k8s/deploy.json's sidecar image by digest "
                    f"{exp.sidecar_image()!r} (scripts/check-deploy.sh --sync)")
    # --policy is the ConfigMap's key where it is mounted
    pol = settings.get("--policy")
    mounts = {m["name"]: m["mountPath"].rstrip("/") for m in c.get("volumeMounts", [])}
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    ok = False
    for vname, mpath in mounts.items():
        v = vols.get(vname, {})
        if (v.get("configMap") or {}).get("name") == POLICY_CONFIGMAP and pol == f"{mpath}/{POLICY_KEY}":
            ok = True
    if not ok:
        errs.append(f"Deployment: --policy ({pol!r}) must be {POLICY_KEY} of the mounted ConfigMap {POLICY_CONFIGMAP}")
    # --auth-config is the auth filter's configuration, its clusters mapped
    if exp.auth_text is not None:
        atext = (cm.get("data") or {}).get(AUTH_KEY)
        try:
            auth = json.loads(atext or "")
        except ValueError as e:
            auth = None
            errs.append(f"ConfigMap {POLICY_CONFIGMAP}: {AUTH_KEY} is not JSON: {e}")
        if auth is not None and auth != exp.auth:
            errs.append(f"ConfigMap {POLICY_CONFIGMAP}: {AUTH_KEY} differs from envoy.yaml's auth filter configuration")
        if ann.get("checksum/auth") != sha256_text(atext or ""):
            errs.append("Deployment: pod annotation checksum/auth is not the sha256 of auth.json "
                        "(scripts/check-deploy.sh --sync)")
        apath = settings.get("--auth-config")
        if not any((vols.get(v, {}).get("configMap") or {}).get("name") == POLICY_CONFIGMAP
                   and apath == f"{m}/{AUTH_KEY}" for v, m in mounts.items()):
            errs.append(f"Deployment: --auth-config ({apath!r}) must be {AUTH_KEY} of the mounted ConfigMap "
                        f"{POLICY_CONFIGMAP} (in-band auth and refresh need the sidecar's verifier)")
        given = {}
        for item in (settings.get("--cluster") or "").split(","):
            name, eq, addr = item.partition("=")
            if eq:
                given[name.strip()] = addr.strip()
        for name, want in exp.auth_clusters.items():
            if given.get(name) != want:
                errs.append(f"Deployment: --cluster / SIDECAR_CLUSTERS must map {name}={want} "
                            f"(the auth configuration's cluster, k8s/deploy.json), not {given.get(name)!r}")
    # listen addresses, ports, probes, Service
    cports = {p.get("name"): p.get("containerPort") for p in c.get("ports", [])}

    def port_of(addr, default):
        m = re.fullmatch(r"(.*):(\d+)", addr or default)
        return (m.group(1), int(m.group(2))) if m else (None, None)
    host, http_port = port_of(settings.get("--listen"), "127.0.0.1:8081")
    if host in ("127.0.0.1", "localhost", "[::1]"):
        errs.append("Deployment: --listen on loopback is unreachable behind Istio (it forwards to the pod IP)")
    if cports.get("http") != http_port:
        errs.append(f"Deployment: container port `http` must be the --listen port {http_port}")
    if settings.get("--rls-listen"):
        if cports.get("grpc-rls") != port_of(settings["--rls-listen"], "")[1]:
            errs.append("Deployment: container port `grpc-rls` must be the --rls-listen port")
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        hg = (c.get(probe) or {}).get("httpGet") or {}
        if hg.get("path") != path or hg.get("port") not in ("http", http_port):
            errs.append(f"Deployment: {probe} must be GET {path} on the http port")
    sc = c.get("securityContext") or {}
    psc = pod.get("securityContext") or {}
    if not (sc.get("readOnlyRootFilesystem") and sc.get("allowPrivilegeEscalation") is False
            and (sc.get("runAsNonRoot") or psc.get("runAsNonRoot"))):
        errs.append("Deployment: the container must run non-root, read-only, without privilege escalation")
    # the image's own user (scripts/oci_layout.py): the Deployment and the image agree
    for key, want in (("runAsUser", oci_layout.SIDECAR_UID), ("runAsGroup", oci_layout.SIDECAR_GID)):
        got = sc.get(key, psc.get(key))
        if got != want:
            errs.append(f"Deployment: {key} is {got!r}, not the image's user {want} "
                        f"({oci_layout.SIDECAR_USER}, scripts/oci_layout.py)")
    res = c.get("resources") or {}
    if not (res.get("requests") and (res.get("limits") or {}).get("memory")):
        errs.append("Deployment: resources need requests and a memory limit")
    hpas = [o for o in by_kind(objs, "HorizontalPodAutoscaler")
            if (o["spec"].get("scaleTargetRef") or {}).get("name") == SIDECAR_NAME]
    most = max([dep["spec"].get("replicas", 1)] + [h["spec"].get("maxReplicas", 1) for h in hpas])
    if settings.get("--bus", "memory") == "memory" and most > 1:
        errs.append("Deployment: several replicas need --bus nats (the memory bus is one replica's)")
    errs += check_sidecar_autoscaling(dep, hpas, settings, flags_env(settings, envs, flags))
    plabels = (tmpl.get("metadata") or {}).get("labels") or {}
    for o in objs:
        o = o[1]
        for path, sel in selectors(o):
            if o.get("kind") in ("Service", "PodDisruptionBudget", "NetworkPolicy") and \
                    o["metadata"].get("name") == SIDECAR_NAME:
                if not sel or any(plabels.get(k) != v for k, v in sel.items()):
                    errs.append(f"{o['kind']} {SIDECAR_NAME}: {path} does not select the sidecar's pods")
    sports = {p.get("name"): p for p in svc["spec"].get("ports", [])}
    for name, want in (("http", "http"), ("grpc-rls", "grpc")):
        p = sports.get(name)
        if not p or p.get("targetPort") not in (name, cports.get(name)) or p.get("appProtocol") != want:
            errs.append(f"Service: port {name} must target the container port {name}, appProtocol {want}")
    # the clusters the filters call are this Service
    fqdn = f"{SIDECAR_NAME}.{ns}.svc.cluster.local"
    for cname, port in (("sidecar", sports.get("http", {}).get("port")),
                        ("ratelimit", sports.get("grpc-rls", {}).get("port"))):
        c2 = exp.deploy["clusters"].get(cname)
        if c2 and c2 != {"host": fqdn, "port": port}:
            errs.append(f"k8s/deploy.json clusters.{cname} must be {{host: {fqdn}, port: {port}}} (the Service)")
    # --usage-secret from the Secret the usage filter's proxies read too
    us = exp.usage_secret
    if us:
        env = next((e for e in c.get("env", []) if e.get("name") == "SIDECAR_USAGE_SECRET"), None)
        ref = ((env or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
        if env is None or "value" in env or ref.get("name") != us["secret"] or ref.get("key") != us["key"] \
                or ref.get("optional"):
            errs.append(f"Deployment: SIDECAR_USAGE_SECRET must come from secretKeyRef {us['secret']}/{us['key']} "
                        "(k8s/deploy.json usage_secret, which the usage filter's proxies read as "
                        f"{us['proxy_env']}), not optional; found {env}")
        if settings.get("--usage-secret"):
            errs.append("Deployment: --usage-secret as an argument puts the secret in the pod spec; "
                        "use SIDECAR_USAGE_SECRET from the Secret")
    # the mesh policy needs Istio's proxy in front of the sidecar, on every
    # port, and the kubelet's probes rewritten to the agent
    if ann.get("sidecar.istio.io/inject", "true") != "true":
        errs.append("Deployment: sidecar.istio.io/inject must not be false: without Istio's proxy no "
                    "PeerAuthentication or AuthorizationPolicy applies to the sidecar")
    if ann.get("sidecar.istio.io/rewriteAppHTTPProbers", "true") != "true":
        errs.append("Deployment: sidecar.istio.io/rewriteAppHTTPProbers must not be false: with STRICT mTLS "
                    "the kubelet's plain HTTP probes would be refused (Istio rewrites them to its agent)")
    http_port, rls_port = exp.ports()
    for key in ("traffic.sidecar.istio.io/excludeInboundPorts", "traffic.sidecar.istio.io/includeInboundPorts"):
        v = ann.get(key)
        if v is None:
            continue
        listed = {p.strip() for p in str(v).split(",")}
        if key.endswith("excludeInboundPorts") and listed & {str(http_port), str(rls_port)}:
            errs.append(f"Deployment: {key} {v!r} lets traffic to the sidecar's ports past Istio's proxy "
                        "(no mTLS, no AuthorizationPolicy)")
        if key.endswith("includeInboundPorts") and "*" not in listed and \
                not {str(http_port), str(rls_port)} <= listed:
            errs.append(f"Deployment: {key} {v!r} leaves a sidecar port outside Istio's proxy")
    if cports.get("http") != http_port or cports.get("grpc-rls") != rls_port:
        errs.append(f"Deployment: container ports http/grpc-rls must be {http_port}/{rls_port} "
                    "(k8s/deploy.json clusters; the AuthorizationPolicy's ports are these)")
    return errs


def selects(match_labels, pod_labels):
    """Whether a selector's matchLabels (None or {}: every pod) selects pods
    with these labels."""
    return all(pod_labels.get(k) == v for k, v in (match_labels or {}).items())


def istio_match(pattern, value):
    """Istio's string match in AuthorizationPolicy fields: exact, `x*`
    prefix, `*x` suffix, `*` anything. Path templates ({*}, {**}) are not
    generated and not followed: refused."""
    if "{" in pattern:
        raise ValueError(f"path template {pattern!r} (not generated; the check does not follow templates)")
    if pattern == "*":
        return True
    if pattern.startswith("*"):
        return value.endswith(pattern[1:])
    if pattern.endswith("*"):
        return value.startswith(pattern[:-1])
    return value == pattern


def operation_matches(op, port, path, method):
    """Whether an Istio Operation can match the request. Hosts are not
    compared (they could only narrow it: the check errs on the side of
    reach)."""
    for field, value in (("ports", str(port)), ("paths", path), ("methods", method)):
        inc, exc = op.get(field), op.get("not" + field[0].upper() + field[1:])
        if inc and not any(istio_match(str(p), value) for p in inc):
            return False
        if exc and any(istio_match(str(p), value) for p in exc):
            return False
    return True


def rule_matches(rule, port, path, method):
    to = rule.get("to") or []
    return not to or any(operation_matches(t.get("operation") or {}, port, path, method) for t in to)


def rule_sources(rule, trust_domain):
    """Who an ALLOW rule admits: [("principal", p) | ("namespace", ns) |
    ("any", why)]. `when` conditions are ignored (they could only narrow
    it); a source with principals is taken as those principals (its other
    fields AND with them)."""
    out = []
    for f in rule.get("from") or [{}]:
        src = f.get("source") or {}
        prins = list(src.get("principals") or [])
        prins += [f"{trust_domain}/ns/{v.partition('/')[0]}/sa/{v.partition('/')[2]}"
                  for v in src.get("serviceAccounts") or []]
        if prins:
            out += [("any", f"principal {p!r} is a wildcard") if "*" in p else ("principal", p) for p in prins]
        elif src.get("namespaces"):
            out += [("any", f"namespace {n!r} is a wildcard") if "*" in n else ("namespace", n)
                    for n in src["namespaces"]]
        else:
            out.append(("any", "a source without principals" if f else "no `from`: any caller"))
    return out


def check_mesh(objs, exp, profile):
    """The mesh policy of one build, as Istio and Kubernetes would apply it
    to the sidecar's pods: STRICT mTLS; every request of Expected.endpoints
    admitted by the ALLOW AuthorizationPolicies exactly from the principals
    k8s/deploy.json names for it (none: denied), never by a rule without
    principals; NetworkPolicies admitting only namespaces deploy.json names,
    by name, the filtered workloads where the filters run on them."""
    errs = []
    m, ns = exp.mesh, exp.deploy["namespace"]
    root = m["root_namespace"]
    dep = next((o for o in by_kind(objs, "Deployment") if o["metadata"].get("name") == SIDECAR_NAME), None)
    pod = ((((dep or {}).get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}
    if not pod:
        return ["mesh policy: no sidecar Deployment to apply it to"]
    nso = next((o for o in by_kind(objs, "Namespace") if o["metadata"].get("name") == ns), None)
    nsl = ((nso or {}).get("metadata") or {}).get("labels") or {}
    if nsl.get("istio-injection") != "enabled" and not nsl.get("istio.io/rev"):
        errs.append(f"Namespace {ns}: needs istio-injection: enabled (or istio.io/rev): without Istio's proxy "
                    "the sidecar has no mTLS and no AuthorizationPolicy")

    # PeerAuthentication: the most specific one decides (workload > namespace > root)
    def mode(pa):
        return (((pa.get("spec") or {}).get("mtls") or {}).get("mode")) or "UNSET"

    def sel_of(o):
        return ((o.get("spec") or {}).get("selector") or {}).get("matchLabels")
    pas = by_kind(objs, "PeerAuthentication")
    ns_pa = [p for p in pas if p["metadata"].get("namespace") == ns and not sel_of(p)]
    wl_pa = [p for p in pas if p["metadata"].get("namespace") == ns and sel_of(p) and selects(sel_of(p), pod)]
    root_pa = [p for p in pas if p["metadata"].get("namespace") == root and not sel_of(p)]
    if len(ns_pa) != 1 or mode(ns_pa[0]) != "STRICT":
        errs.append(f"PeerAuthentication: the namespace {ns} needs one without a selector in mode STRICT, found "
                    f"{[(p['metadata']['name'], mode(p)) for p in ns_pa]}")
    if len(wl_pa) > 1:
        errs.append(f"PeerAuthentication: {[p['metadata']['name'] for p in wl_pa]} all select the sidecar "
                    "(Istio takes the oldest)")
    chain = [mode(p) for p in wl_pa[:1] + ns_pa[:1] + root_pa[:1]]
    eff = next((x for x in chain if x != "UNSET"), "PERMISSIVE")  # Istio's default is PERMISSIVE
    if eff != "STRICT":
        errs.append(f"PeerAuthentication: the sidecar's pods accept {eff} (not STRICT): plain-text callers "
                    "reach it without a principal")
    http_port, rls_port = exp.ports()
    for p in wl_pa[:1]:
        for port, v in ((p.get("spec") or {}).get("portLevelMtls") or {}).items():
            if str(port) in (str(http_port), str(rls_port)) and \
                    (v or {}).get("mode", "UNSET") not in ("STRICT", "UNSET"):
                errs.append(f"PeerAuthentication {p['metadata']['name']}: portLevelMtls {port} is "
                            f"{v.get('mode')}: that port of the sidecar accepts plain text")

    # AuthorizationPolicy: what each request of the sidecar's endpoints reaches
    allow = []
    for ap in by_kind(objs, "AuthorizationPolicy"):
        spec, name = ap.get("spec") or {}, ap["metadata"].get("name")
        if ap["metadata"].get("namespace") not in (ns, root):
            continue
        if spec.get("targetRef") or spec.get("targetRefs"):
            errs.append(f"AuthorizationPolicy {name}: targetRef(s) are not generated and not followed by the check")
            continue
        if not selects(sel_of(ap), pod):
            continue
        if spec.get("action", "ALLOW") != "ALLOW":
            errs.append(f"AuthorizationPolicy {name}: action {spec.get('action')} on the sidecar is not "
                        "generated; the check reasons about ALLOW policies only")
            continue
        allow.append(ap)
    if not allow:
        errs.append("AuthorizationPolicy: none applies to the sidecar: every mTLS peer reaches every port and path")
        return errs
    want_all = exp.callers(profile)
    for e, (_, probes) in exp.endpoints().items():
        want = set(want_all[e])
        for port, path, method in probes:
            got, anys = set(), []
            req = f"{method} :{port}{path}"
            for ap in allow:
                for i, rule in enumerate((ap.get("spec") or {}).get("rules") or []):
                    at = f"AuthorizationPolicy {ap['metadata']['name']} rules[{i}]"
                    try:
                        if not rule_matches(rule, port, path, method):
                            continue
                    except ValueError as ex:
                        errs.append(f"{at}: {ex}")
                        continue
                    for kind, v in rule_sources(rule, m["trust_domain"]):
                        if kind == "principal":
                            got.add(v)
                        elif kind == "namespace" and e == "metrics" and v == m["prometheus_ns"]:
                            got |= set(m["metrics"])  # Prometheus by its namespace: accepted
                        elif kind == "namespace":
                            anys.append(f"{at} (namespace {v}, no principal)")
                        else:
                            anys.append(f"{at} ({v})")
            if anys:
                errs.append(f"AuthorizationPolicy: {req} ({e}) is reachable by an ALLOW rule without "
                            f"principals: {anys[0]}")
            if got - want:
                errs.append(f"AuthorizationPolicy: {req} ({e}) admits {sorted(got - want)}, which k8s/deploy.json "
                            f"does not name as its callers here ({sorted(want) or 'nobody'})")
            if want - got:
                errs.append(f"AuthorizationPolicy: {req} ({e}) must admit {sorted(want - got)}" +
                            (": left out of every rule" if not got and not anys else ""))

    # NetworkPolicy: a second layer, by namespace name
    wl, gw = exp.profile_filters(profile)
    allowed_ns = {ns, m["prometheus_ns"]} | {v.split("/", 1)[0] for v in m["ws_callers"] + m["publishers"]}
    if gw:
        allowed_ns.add(exp.ingress["namespace"])
    reach = []  # (peer, ports) of every admitting rule
    for np in by_kind(objs, "NetworkPolicy"):
        spec, name = np.get("spec") or {}, np["metadata"].get("name")
        psel = spec.get("podSelector") or {}
        if np["metadata"].get("namespace") != ns or \
                not (psel.get("matchExpressions") or selects(psel.get("matchLabels"), pod)):
            continue
        if "Ingress" not in (spec.get("policyTypes") or ["Ingress"]):
            continue
        for ri, rule in enumerate(spec.get("ingress") or []):
            at = f"NetworkPolicy {name} ingress[{ri}]"
            ports = {p.get("port") for p in rule.get("ports") or []}
            if not rule.get("ports"):
                errs.append(f"{at}: no `ports`: admits every port")
            if not rule.get("from"):
                errs.append(f"{at}: no `from`: admits every source, from any namespace")
            for peer in rule.get("from") or []:
                reach.append((peer, ports))
                if "ipBlock" in peer:
                    errs.append(f"{at}: ipBlock {peer['ipBlock']} admits by address, not by namespace")
                    continue
                nsel = peer.get("namespaceSelector")
                if nsel is None:
                    continue  # pods of the policy's own namespace
                ml = nsel.get("matchLabels") or {}
                if nsel.get("matchExpressions") or list(ml) != ["kubernetes.io/metadata.name"]:
                    errs.append(f"{at}: namespaceSelector {nsel} admits namespaces by something other than their "
                                "name (`{}`: every namespace); name those of k8s/deploy.json")
                elif ml["kubernetes.io/metadata.name"] not in allowed_ns:
                    errs.append(f"{at}: admits the namespace {ml['kubernetes.io/metadata.name']}, which "
                                f"k8s/deploy.json does not name here ({sorted(allowed_ns)})")

    def admitted(peer, port):
        return any(p == peer and port in ports for p, ports in reach)
    wpeer = ns_peer(ns, exp.deploy["workload_labels"])
    wpeer_local = {"podSelector": {"matchLabels": dict(exp.deploy["workload_labels"])}}
    need = sorted({rls_port if FILTER_CALLS[n] == "rls" else http_port for n in wl if n in FILTER_CALLS})
    for port in need:
        if not (admitted(wpeer, port) or admitted(wpeer_local, port)):
            errs.append(f"NetworkPolicy: none admits the workloads that run the filters ({ns}, "
                        f"{exp.deploy['workload_labels']}) to port {port} (their filters' callouts)")
    if not wl and any(p in (wpeer, wpeer_local) for p, _ in reach):
        errs.append(f"NetworkPolicy: admits the pods labelled {exp.deploy['workload_labels']}, but no filters run "
                    "on them here (a label anyone can set on a pod)")
    if not admitted(ns_peer(m["prometheus_ns"]), ISTIO_AGENT_PORT):
        errs.append(f"NetworkPolicy: none admits {m['prometheus_ns']} to Istio's merged metrics ({ISTIO_AGENT_PORT})")
    return errs


def reaches_internal(m):
    """Whether an HTTPMatchRequest of a VirtualService can match a path
    under /internal/ (compared without case, which only errs on the safe
    side); a match without `uri` matches every path."""
    uri = m.get("uri")
    if not uri:
        return True
    probe = "/internal/v1/grants"
    if "exact" in uri:
        return uri["exact"].lower().startswith("/internal")
    if "prefix" in uri:
        p = uri["prefix"].lower()
        return probe.startswith(p) or p.startswith("/internal")
    if "regex" in uri:
        try:
            return re.fullmatch(uri["regex"], probe, re.I) is not None
        except re.error:
            return True  # RE2 syntax Python does not read: assume the worst
    return True


def check_ingress(objs, exp):
    """The Gateway, the VirtualService (envoy.yaml's routes; /ws without a
    timeout; nothing reaching /internal/) and the sidecar's NetworkPolicy for
    the gateway's pods."""
    errs = []
    ing, ns = exp.ingress, exp.deploy["namespace"]
    gws = [o for o in by_kind(objs, "Gateway") if o["metadata"].get("name") == GATEWAY_NAME]
    vss = [o for o in by_kind(objs, "VirtualService") if o["metadata"].get("name") == VIRTUALSERVICE_NAME]
    if len(gws) != 1 or len(vss) != 1:
        return [f"want one Gateway {GATEWAY_NAME} and one VirtualService {VIRTUALSERVICE_NAME}"]
    gw, vs = gws[0], vss[0]
    gspec, vspec = gw.get("spec") or {}, vs.get("spec") or {}
    if gw["metadata"].get("namespace") != ing["namespace"]:
        errs.append(f"Gateway: must be in the gateway's namespace {ing['namespace']} (k8s/deploy.json ingress; "
                    "its TLS Secret is read there)")
    if gspec.get("selector") != ing["gateway_labels"]:
        errs.append(f"Gateway: selector must be {ing['gateway_labels']} (k8s/deploy.json ingress.gateway_labels)")
    want_servers = routing_objects(exp)[0]["spec"]["servers"]
    if gspec.get("servers") != want_servers:
        errs.append("Gateway: servers differ from k8s/deploy.json ingress (hosts, tls_credential_name: "
                    "HTTPS on 443 with the Secret, HTTP 80 redirecting; or HTTP 80 alone)")
    # VirtualService
    if vspec.get("gateways") != [exp.gateway_ref()]:
        errs.append(f"VirtualService: gateways must be [{exp.gateway_ref()}]")
    if vspec.get("hosts") != ing["hosts"]:
        errs.append(f"VirtualService: hosts must be the Gateway's {ing['hosts']}")
    for key in sorted(set(vspec) - {"gateways", "hosts", "http"}):
        errs.append(f"VirtualService: spec.{key} is not generated from envoy.yaml (tcp/tls routes reach past the filters)")
    http = vspec.get("http") or []
    no_timeout = {json.dumps(r["match"], sort_keys=True) for r in exp.vs_http() if "timeout" not in r}
    for i, r in enumerate(http):
        at = f"VirtualService http[{i}] ({r.get('name')})"
        matches = r.get("match") or [{}]
        if any(reaches_internal(m) for m in matches):
            errs.append(f"{at}: its match {r.get('match')} can reach /internal/ (the sidecar's grants feed "
                        "and policy are for the filters only; no gateway routes them)")
        if json.dumps(r.get("match"), sort_keys=True) in no_timeout and "timeout" in r:
            errs.append(f"{at}: the WebSocket route must have no timeout (envoy.yaml's 0s): a route timeout "
                        f"ends every stream at {r['timeout']}")
    if http != exp.vs_http():
        errs.append("VirtualService: http routes differ from envoy.yaml's routes (match, destination = the "
                    "cluster's Service in k8s/deploy.json, timeout)")
    # the gateway's pods reach the sidecar
    dep = next((o for o in by_kind(objs, "Deployment") if o["metadata"].get("name") == SIDECAR_NAME), None)
    plabels = ((((dep or {}).get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}
    sidecar_port = exp.deploy["clusters"].get("sidecar", {}).get("port")
    want_from = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": ing["namespace"]}},
                 "podSelector": {"matchLabels": ing["gateway_labels"]}}
    ok = False
    for np in by_kind(objs, "NetworkPolicy"):
        sel = ((np.get("spec") or {}).get("podSelector") or {}).get("matchLabels") or {}
        if np["metadata"].get("namespace") != ns or not sel or any(plabels.get(k) != v for k, v in sel.items()):
            continue
        for rule in np["spec"].get("ingress", []):
            ports = {p.get("port") for p in rule.get("ports", [])}
            if want_from in rule.get("from", []) and sidecar_port in ports:
                ok = True
    if not ok:
        errs.append(f"NetworkPolicy: none admits the gateway's pods ({ing['namespace']}, {ing['gateway_labels']}) "
                    f"to the sidecar's port {sidecar_port} (/ws, /admin/, usage, grants)")
    return errs


def check_build(label, objs, exp, profile):
    """Every check of one kustomize build (profile: its KUSTOMIZATIONS
    entry); returns errors."""
    errs = []
    ids = [obj_id(o) for _, o in objs]
    for dup in sorted({i for i in ids if ids.count(i) > 1}):
        errs.append(f"{label}: {dup} appears twice")
    for src, o in objs:
        at = f"{label}: {obj_id(o)} ({src})"
        api = o.get("apiVersion", "")
        if api.split("/")[0].endswith(".istio.io"):
            errs += [f"{at}: {e}" for e in check_istio(o)]
        else:
            errs += [f"{at}: {e}" for e in check_core(o)]
    if errs:
        return errs  # the wiring checks below assume well-formed objects
    workloads, gateway = profile
    if gateway is not None and exp.ingress is None:
        return errs + [f"{label}: k8s/deploy.json ingress is unusable (see its errors)"]

    def want_ns(o):
        if gateway is not None and (is_ingress_filter(o) or o.get("kind") == "Gateway"):
            return exp.ingress["namespace"]
        return exp.deploy["namespace"]
    wrong = [f"{obj_id(o)} (want {want_ns(o)})" for _, o in objs
             if o.get("kind") not in CLUSTER_SCOPED and o["metadata"].get("namespace") != want_ns(o)]
    if wrong:
        errs.append(f"{label}: wrong namespaces, k8s/deploy.json: {', '.join(wrong)}")
    att = exp.attachments(workloads, gateway)
    comp_names = (COMPRESSOR_ENVOYFILTER, INGRESS_COMPRESSOR)
    is_comp = lambda o: o.get("kind") == "EnvoyFilter" and o["metadata"].get("name") in comp_names
    comp_wl = [o for _, o in objs if is_comp(o) and not is_ingress_filter(o)]
    comp_gw = [o for _, o in objs if is_comp(o) and is_ingress_filter(o)]
    # the compressors: inside the workloads' EnvoyFilter, else beside their
    # WasmPlugins / TrafficExtensions; on the gateway beside its WasmPlugins
    errs += [f"{label}: {e}" for e in check_compressor_envoyfilters(
        comp_wl, exp, int(workloads in ("WasmPlugin", "TrafficExtension")), "workloads",
        "SIDECAR_INBOUND", exp.deploy["workload_labels"])]
    if gateway is not None or comp_gw:
        errs += [f"{label}: {e}" for e in check_compressor_envoyfilters(
            comp_gw, exp, int(gateway is not None), "ingress gateway", "GATEWAY",
            exp.ingress["gateway_labels"] if exp.ingress else None,
            exp.ingress["namespace"] if exp.ingress else None)]
    objs = [x for x in objs if not is_comp(x[1])]
    wl = [x for x in objs if not is_ingress_filter(x[1])]
    gw = [x for x in objs if is_ingress_filter(x[1])]
    names, configs = att["workloads"] or ([], {})
    errs += [f"{label}: {e}" for e in check_filters_resources(wl, exp, workloads, names, configs)]
    if gateway is not None:
        errs += [f"{label}: {e}" for e in check_filters_resources(gw, exp, "WasmPlugin", *att["gateway"],
                                                                  where="ingress gateway")]
        errs += [f"{label}: {e}" for e in check_ingress(objs, exp)]
    else:
        extra = [obj_id(o) for _, o in gw] + [obj_id(o) for _, o in objs if o.get("kind") in ("Gateway", "VirtualService")]
        if extra:
            errs.append(f"{label}: ingress resources in a kustomization without the ingress: {extra}")
    errs += [f"{label}: {e}" for e in check_sidecar(objs, exp)]
    if exp.mesh is None:
        return errs + [f"{label}: k8s/deploy.json mesh is unusable (see its errors)"]
    errs += [f"{label}: {e}" for e in check_mesh(objs, exp, profile)]
    return errs


def check_generated(exp):
    errs = []
    for path, text in generated(exp).items():
        full = os.path.join(ROOT, path)
        old = open(full).read() if os.path.exists(full) else ""
        if old != text:
            diff = "".join(list(difflib.unified_diff(old.splitlines(True), text.splitlines(True),
                                                     f"{path} (file)", f"{path} (generated)", n=1))[:40])
            errs.append(f"{path} drifted from envoy/envoy.yaml + k8s/deploy.json "
                        f"(scripts/check-deploy.sh --sync):\n{diff}")
    return errs


def sidecar_layout_errors(layout):
    """The sidecar's image (an oci_layout.Layout) against what the Deployment
    expects: oci_layout.verify_sidecar (static x86-64 entrypoint, non-root
    user in /etc/passwd, migrations, ports), that user and entrypoint, and
    sidecar/migrations/ as it is. Returns (errors, verify_sidecar's result)."""
    try:
        got = oci_layout.verify_sidecar(layout)
    except (OSError, ValueError, KeyError, EOFError) as e:
        return [str(e)], None
    errs = []
    user = f"{oci_layout.SIDECAR_UID}:{oci_layout.SIDECAR_GID}"
    if got["user"] != user:
        errs.append(f"{layout.name}: config User {got['user']!r}, but the Deployment runs as {user}")
    if got["entrypoint"] != oci_layout.SIDECAR_BIN:
        errs.append(f"{layout.name}: Entrypoint {got['entrypoint']!r}, not {oci_layout.SIDECAR_BIN}")
    want = {n: hashlib.sha256(d).hexdigest() for n, d in oci_layout.read_migrations(SIDECAR_MIGRATIONS).items()}
    if got["migrations"] != want:
        diff = sorted(n for n in set(want) | set(got["migrations"]) if want.get(n) != got["migrations"].get(n))
        errs.append(f"{layout.name}: migrations under {oci_layout.SIDECAR_MIGRATIONS} differ from "
                    f"sidecar/migrations/ ({', '.join(diff)}; scripts/package-sidecar.sh)")
    return errs, got


def check_oci(exp):
    """Layouts in target/oci (scripts/package-oci.sh, scripts/package-sidecar.sh)
    must be sound; whether the pins are this build's is only reported (a
    release pins digests, a build of other sources differs)."""
    errs = []
    for n in exp.names:
        layout = os.path.join(TARGET, "oci", n)
        wasm = os.path.join(TARGET, "wasm32-wasip1", "release", f"{n}.wasm")
        if os.path.isdir(layout):
            try:
                got = oci_layout.verify(layout)
            except (OSError, ValueError, KeyError) as e:
                errs.append(f"target/oci/{n}: {e}")
                continue
            if os.path.exists(wasm):
                with open(wasm, "rb") as f:
                    if got["wasm_sha256"] != hashlib.sha256(f.read()).hexdigest():
                        note(f"target/oci/{n} holds an older build of {n}.wasm (scripts/package-oci.sh)")
            state = "= the pin" if got["digest"] == exp.digest(n) else "!= the pin in k8s/deploy.json"
            print(f"   target/oci/{n}: OK, image sha256:{got['digest'][:16]}… {state}")
        elif os.path.exists(wasm):
            with open(wasm, "rb") as f:
                _, _, d = oci_layout.build(f.read(), n, exp.deploy["images"]["tag"])
            if d != exp.digest(n):
                note(f"{n}: an image of the built {n}.wasm would be sha256:{d[:16]}…, not the pinned one")
    layout = os.path.join(TARGET, "oci", SIDECAR_IMAGE)
    binary = os.path.join(TARGET, "x86_64-unknown-linux-musl", "release", "sidecar")
    if os.path.isdir(layout):
        try:
            lerrs, got = sidecar_layout_errors(oci_layout.Layout(layout))
        except (OSError, ValueError, KeyError) as e:
            lerrs, got = [f"{layout}: {e}"], None
        errs += [f"target/oci/{SIDECAR_IMAGE}: {e}" for e in lerrs]
        if got is not None and not lerrs:
            if os.path.exists(binary):
                with open(binary, "rb") as f:
                    if got["binary_sha256"] != hashlib.sha256(f.read()).hexdigest():
                        note(f"target/oci/{SIDECAR_IMAGE} holds an older build of the sidecar (scripts/package-sidecar.sh)")
            state = "= the pin" if got["digest"] == exp.digest(SIDECAR_IMAGE) else "!= the pin in k8s/deploy.json"
            print(f"   target/oci/{SIDECAR_IMAGE}: OK, static {got['entrypoint']}, user {got['user']}, "
                  f"{len(got['migrations'])} migrations, image sha256:{got['digest'][:16]}… {state}")
    else:
        note(f"no target/oci/{SIDECAR_IMAGE}: the sidecar's image is not verified (scripts/package-sidecar.sh)")
    return errs


# --------------------------------------------------------------------------
# Self-test: broken copies must be refused


def self_test(envoy_doc, builds, exp):
    hcm = lambda d: d["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    first_wasm = lambda d: next(f for f in hcm(d)["http_filters"] if f["typed_config"]["@type"] == WASM_URL)
    router = lambda d: hcm(d)["http_filters"][-1]["typed_config"]
    comp = lambda d, n: [f for f in hcm(d)["http_filters"] if f["typed_config"]["@type"] == COMPRESSOR_URL][n]

    def envoy_case(mutate):
        def run():
            d = copy.deepcopy(envoy_doc)
            mutate(d)
            return check_envoy_doc(d, "broken envoy.yaml")[1]
        return run

    def find(objs, kind, name=None):
        return next(o for _, o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name))

    def k8s_case(build, mutate):
        def run():
            objs = copy.deepcopy(builds[build])
            mutate(objs)
            return check_build(f"broken {build}", objs, exp, KUSTOMIZATIONS[build])
        return run

    def set_(d, k, v):
        d[k] = v

    def sidecar_env(objs, name, value):
        c = find(objs, "Deployment", SIDECAR_NAME)["spec"]["template"]["spec"]["containers"][0]
        for e in c["env"]:
            if e["name"] == name:
                e["value"] = value

    cases = [
        ("HorizontalPodAutoscaler: scaling down five pods at a time",
         k8s_case("k8s/base", lambda o: set_(find(o, "HorizontalPodAutoscaler")["spec"]["behavior"]["scaleDown"],
                                             "policies", [{"type": "Pods", "value": 5, "periodSeconds": 60}]))),
        ("HorizontalPodAutoscaler: without the WebSocket connections metric",
         k8s_case("k8s/base", lambda o: find(o, "HorizontalPodAutoscaler")["spec"]["metrics"].pop())),
        ("Deployment: replicas beside the HorizontalPodAutoscaler",
         k8s_case("k8s/base", lambda o: set_(find(o, "Deployment", SIDECAR_NAME)["spec"], "replicas", 2))),
        ("Deployment: a close spread longer than the drain",
         k8s_case("k8s/base", lambda o: sidecar_env(o, "SIDECAR_CLOSE_SPREAD", "30"))),
        ("envoy.yaml: unknown field in the HttpConnectionManager",
         envoy_case(lambda d: set_(hcm(d), "stat_prefixx", "x"))),
        ("envoy.yaml: unknown field in a Wasm filter's config",
         envoy_case(lambda d: set_(first_wasm(d)["typed_config"]["config"], "fail_opne", True))),
        ("envoy.yaml: unknown field beside the StringValue configuration",
         envoy_case(lambda d: set_(first_wasm(d)["typed_config"]["config"]["configuration"], "json", True))),
        ("envoy.yaml: unknown field in the Router",
         envoy_case(lambda d: set_(router(d), "dynamic_stat", True))),
        ("envoy.yaml: a string for an integer port",
         envoy_case(lambda d: set_(d["admin"]["address"]["socket_address"], "port_value", "admin"))),
        ("envoy.yaml: an unregistered @type",
         envoy_case(lambda d: set_(router(d), "@type", "type.googleapis.com/envoy.extensions.filters.http.router.v3.Routr"))),
        ("envoy.yaml: plugin configuration that is not JSON",
         envoy_case(lambda d: set_(first_wasm(d)["typed_config"]["config"]["configuration"], "value", "{cluster: x"))),
        ("envoy.yaml: unknown field in a compressor's common_config",
         envoy_case(lambda d: set_(comp(d, 0)["typed_config"]["response_direction_config"]["common_config"],
                                   "min_content_lenght", 1024))),
        ("envoy.yaml: a compressor before a wasm filter (it would compress their local replies)",
         envoy_case(lambda d: hcm(d)["http_filters"].insert(0, hcm(d)["http_filters"].pop(
             hcm(d)["http_filters"].index(comp(d, 0)))))),
        ("envoy.yaml: a compressor compressing requests too",
         envoy_case(lambda d: set_(comp(d, 1)["typed_config"], "request_direction_config", {}))),
        ("EnvoyFilter: a compressor patch before a wasm filter's",
         k8s_case("k8s/base", lambda o: find(o, "EnvoyFilter")["spec"]["configPatches"].sort(
             key=lambda p: not is_compressor(p)))),
        ("EnvoyFilter: a compressor's minimum size drifted from envoy.yaml",
         k8s_case("k8s/base", lambda o: set_(
             find(o, "EnvoyFilter")["spec"]["configPatches"][-1]["patch"]["value"]["typed_config"]
             ["response_direction_config"]["common_config"], "min_content_length", 10))),
        ("EnvoyFilter: unknown Envoy field in a compressor patch",
         k8s_case("k8s/base", lambda o: set_(
             find(o, "EnvoyFilter")["spec"]["configPatches"][-1]["patch"]["value"]["typed_config"],
             "chose_first", True))),
        ("wasmplugin: the compressor EnvoyFilter missing",
         k8s_case("k8s/overlays/wasmplugin", lambda o: drop(o, "EnvoyFilter", COMPRESSOR_ENVOYFILTER))),
        ("trafficextension: the compressor outbound (context SIDECAR_OUTBOUND)",
         k8s_case("k8s/overlays/trafficextension", lambda o: set_(
             find(o, "EnvoyFilter", COMPRESSOR_ENVOYFILTER)["spec"]["configPatches"][0]["match"],
             "context", "SIDECAR_OUTBOUND"))),
        ("Deployment: unknown container field",
         k8s_case("k8s/base", lambda o: set_(find(o, "Deployment")["spec"]["template"]["spec"]["containers"][0],
                                             "imagePullPolicyy", "Always"))),
        ("Service: a port that is not a number",
         k8s_case("k8s/base", lambda o: set_(find(o, "Service")["spec"]["ports"][0], "port", "http"))),
        ("PodDisruptionBudget: unknown spec field",
         k8s_case("k8s/base", lambda o: set_(find(o, "PodDisruptionBudget")["spec"], "minAvailabel", 1))),
        ("EnvoyFilter: unknown field in the CRD schema",
         k8s_case("k8s/base", lambda o: set_(find(o, "EnvoyFilter")["spec"], "workloadSelectors", {}))),
        ("EnvoyFilter: unknown Envoy field inside a patch value (preserve-unknown-fields in the CRD)",
         k8s_case("k8s/base", lambda o: set_(find(o, "EnvoyFilter")["spec"]["configPatches"][-1]["patch"]["value"],
                                             "disabled_", True))),
        ("EnvoyFilter: the filters out of envoy.yaml's order",
         k8s_case("k8s/base", lambda o: find(o, "EnvoyFilter")["spec"]["configPatches"].reverse())),
        ("EnvoyFilter: a plugin configuration drifted from envoy.yaml",
         k8s_case("k8s/base", lambda o: set_(
             find(o, "EnvoyFilter")["spec"]["configPatches"][0]["patch"]["value"]["typed_config"]["config"]
             ["configuration"], "value", json.dumps({**exp.k8s_json[exp.names[0]], "timeout_ms": 1})))),
        ("ConfigMap: the policy drifted from envoy.yaml",
         k8s_case("k8s/base", lambda o: set_(find(o, "ConfigMap")["data"], POLICY_KEY,
                                             json.dumps({**exp.policy, "default": "allow"})))),
        ("ConfigMap: the sidecar's auth.json drifted from envoy.yaml",
         k8s_case("k8s/base", lambda o: set_(find(o, "ConfigMap")["data"], AUTH_KEY,
                                             json.dumps({**exp.auth, "cache_max_entries": 1})))),
        ("Deployment: the verifier's cluster pointed elsewhere",
         k8s_case("k8s/base", lambda o: [e.update(value="idp=keycloak.elsewhere:8080") for e in
                  find(o, "Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
                  if e["name"] == "SIDECAR_CLUSTERS"])),
        ("Deployment: a flag the sidecar does not have",
         k8s_case("k8s/base", lambda o: find(o, "Deployment")["spec"]["template"]["spec"]["containers"][0]
                  ["args"].append("--max-conections=5"))),
        ("WasmPlugin: unknown spec field",
         k8s_case("k8s/overlays/wasmplugin", lambda o: set_(find(o, "WasmPlugin")["spec"], "vmId", "x"))),
        ("WasmPlugin: a phase the CRD does not have",
         k8s_case("k8s/overlays/wasmplugin", lambda o: set_(find(o, "WasmPlugin")["spec"], "phase", "AUTHENTICATION"))),
        ("WasmPlugin: priorities that reorder the filters",
         k8s_case("k8s/overlays/wasmplugin", lambda o: set_(find(o, "WasmPlugin")["spec"], "priority", 1))),
        ("WasmPlugin: sha256 not hex",
         k8s_case("k8s/overlays/wasmplugin", lambda o: set_(find(o, "WasmPlugin")["spec"], "sha256", "sha256:abc"))),
        ("TrafficExtension: selector and targetRefs together (CEL rule)",
         k8s_case("k8s/overlays/trafficextension", lambda o: set_(
             find(o, "TrafficExtension")["spec"], "targetRefs", [{"kind": "Service", "name": "x"}]))),
        ("TrafficExtension: url scheme the CRD refuses (CEL rule)",
         k8s_case("k8s/overlays/trafficextension", lambda o: set_(
             find(o, "TrafficExtension")["spec"]["wasm"], "url", "ftp://x/y.wasm"))),
        ("TrafficExtension: unknown field under wasm",
         k8s_case("k8s/overlays/trafficextension", lambda o: set_(
             find(o, "TrafficExtension")["spec"]["wasm"], "sha", "x"))),
    ]

    # the ingress overlays
    ING, BOTH = "k8s/overlays/ingress", "k8s/overlays/ingress-and-sidecar"
    vs_http = lambda o: find(o, "VirtualService")["spec"]["http"]
    ws_route = lambda o: next(r for r in vs_http(o) if r["match"] == [{"uri": {"exact": "/ws"}}])
    gw_plugin = lambda o, n: find(o, "WasmPlugin", INGRESS_PREFIX + n)
    sidecar_host = exp.deploy["clusters"]["sidecar"]["host"]

    def deploy_case(mutate):
        def run():
            d = copy.deepcopy(exp.deploy)
            mutate(d["ingress"]["with_sidecar_attachment"])
            return Expected(exp.filters, d, exp.routes, exp.compressors).errors
        return run

    def routes_case(mutate):
        def run():
            d = copy.deepcopy(envoy_doc)
            mutate(hcm(d)["route_config"]["virtual_hosts"][0]["routes"])
            return envoy_routes(d, "broken envoy.yaml")[1]
        return run

    def drop(objs, kind, name):
        objs[:] = [x for x in objs if not (x[1]["kind"] == kind and x[1]["metadata"]["name"] == name)]

    def with_base_patches(o):
        find(o, "EnvoyFilter")["spec"]["configPatches"] = copy.deepcopy(
            find(builds["k8s/base"], "EnvoyFilter")["spec"]["configPatches"])

    cases += [
        ("VirtualService: /ws with a timeout (every WebSocket ended at it)",
         k8s_case(ING, lambda o: set_(ws_route(o), "timeout", "3600s"))),
        ("VirtualService: /ws with timeout 0s (the CRD's CEL rule wants >= 1ms)",
         k8s_case(ING, lambda o: set_(ws_route(o), "timeout", "0s"))),
        ("VirtualService: a route to /internal/ (the grants feed)",
         k8s_case(ING, lambda o: vs_http(o).append({
             "name": "internal", "match": [{"uri": {"prefix": "/internal/"}}],
             "route": [{"destination": {"host": sidecar_host, "port": {"number": 8081}}}]}))),
        ("VirtualService: a catch-all route to the sidecar (reaches /internal/)",
         k8s_case(ING, lambda o: vs_http(o).append({
             "name": "rest", "route": [{"destination": {"host": sidecar_host}}]}))),
        ("VirtualService: /api/ routed to the sidecar instead of the applications",
         k8s_case(ING, lambda o: set_(vs_http(o)[-1]["route"][0]["destination"], "host", sidecar_host))),
        ("VirtualService: an unknown field (CRD schema)",
         k8s_case(ING, lambda o: set_(ws_route(o), "websocketUpgrade", True))),
        ("gateway WasmPlugin: priorities that reorder the filters",
         k8s_case(ING, lambda o: set_(gw_plugin(o, exp.names[0])["spec"], "priority", 1))),
        ("gateway WasmPlugin: match mode SERVER (never attaches to a gateway's listeners)",
         k8s_case(ING, lambda o: set_(gw_plugin(o, "auth")["spec"], "match", [{"mode": "SERVER"}]))),
        ("gateway WasmPlugin: outside the gateway's namespace (its selector misses the gateway)",
         k8s_case(ING, lambda o: set_(gw_plugin(o, "auth")["metadata"], "namespace", "elsewhere"))),
        ("gateway WasmPlugin: selecting the application pods",
         k8s_case(ING, lambda o: set_(gw_plugin(o, "auth")["spec"]["selector"], "matchLabels",
                                      dict(exp.deploy["workload_labels"])))),
        ("gateway WasmPlugin: a plugin configuration drifted from envoy.yaml",
         k8s_case(ING, lambda o: set_(gw_plugin(o, "ratelimit")["spec"], "pluginConfig",
                                      {**exp.k8s_json["ratelimit"], "on_error": "deny"}))),
        ("gateway WasmPlugin: one filter missing",
         k8s_case(ING, lambda o: drop(o, "WasmPlugin", INGRESS_PREFIX + "entitlements"))),
        ("Gateway: an unknown field (CRD schema)",
         k8s_case(ING, lambda o: set_(find(o, "Gateway")["spec"]["servers"][0], "tlsMode", "SIMPLE"))),
        ("Gateway: a selector other than the gateway's pods",
         k8s_case(ING, lambda o: set_(find(o, "Gateway")["spec"], "selector", {"istio": "egressgateway"}))),
        ("ingress: the gateway's compressor EnvoyFilter missing",
         k8s_case(ING, lambda o: drop(o, "EnvoyFilter", INGRESS_COMPRESSOR))),
        ("ingress-and-sidecar: the gateway's compressor selecting the application pods",
         k8s_case(BOTH, lambda o: set_(find(o, "EnvoyFilter", INGRESS_COMPRESSOR)["spec"]["workloadSelector"],
                                       "labels", dict(exp.deploy["workload_labels"])))),
        ("NetworkPolicy: the gateway's pods not admitted to the sidecar",
         k8s_case(ING, lambda o: drop(o, "NetworkPolicy", INGRESS_NETPOL))),
        ("ingress: the base's EnvoyFilter kept (filters on the workloads too, unplanned)",
         k8s_case(ING, lambda o: o.append(next(x for x in builds["k8s/base"] if x[1]["kind"] == "EnvoyFilter")))),
        ("ingress-and-sidecar: the gateway's auth not forwarding the token (401 at the workloads)",
         k8s_case(BOTH, lambda o: gw_plugin(o, "auth")["spec"]["pluginConfig"]["output"].pop("forward_token"))),
        ("ingress-and-sidecar: usage in the workloads' EnvoyFilter too (metered twice)",
         k8s_case(BOTH, with_base_patches)),
        ("deploy.json: usage at the gateway and at the workloads",
         deploy_case(lambda b: b.update(workload_filters=list(exp.names), gateway_filters=list(exp.names)))),
        ("deploy.json: the workloads' auth while the gateway's removes the token",
         deploy_case(lambda b: set_(b, "gateway_overrides", {}))),
        ("deploy.json: a gateway without auth (clients' x-auth-* reach the sidecar)",
         deploy_case(lambda b: set_(b, "gateway_filters", [n for n in exp.names if n != "auth"]))),
        ("deploy.json: filters out of envoy.yaml's order",
         deploy_case(lambda b: set_(b, "workload_filters", list(reversed(b["workload_filters"]))))),
        ("envoy.yaml: a route the VirtualService cannot mirror (regex match)",
         routes_case(lambda r: r.append({"match": {"safe_regex": {"regex": "/v2/.*"}},
                                         "route": {"cluster": "sidecar"}}))),
        ("envoy.yaml: a route whose cluster has no in-cluster Service",
         lambda: Expected(exp.filters, exp.deploy, exp.routes + [
             {"match": ("prefix", "/x/"), "cluster": "nowhere", "timeout": None}]).errors),
    ]
    # the sidecar's image: broken copies of a sound one, in memory, around a
    # made-up x86-64 ELF (no build needed)
    def fake_elf(interp=None, needed=()):
        phnum = 2 + (interp is not None)
        base = 64 + 56 * phnum
        strtab = b"\0" + b"".join(n.encode() + b"\0" for n in needed)
        offs, i = [], 1
        for n in needed:
            offs.append(i)
            i += len(n) + 1
        interp_b = (interp.encode() + b"\0") if interp else b""
        dyn_off = base + len(interp_b) + len(strtab)
        dyn_off += -dyn_off % 8
        dyn = b"".join(struct.pack("<qQ", 1, o) for o in offs)  # DT_NEEDED
        dyn += struct.pack("<qQ", 5, base + len(interp_b)) + struct.pack("<qQ", 0, 0)  # DT_STRTAB, DT_NULL
        size = dyn_off + len(dyn)
        ph = struct.pack("<IIQQQQQQ", 1, 5, 0, 0, 0, size, size, 0x1000)  # PT_LOAD, all of it
        if interp:
            ph += struct.pack("<IIQQQQQQ", 3, 4, base, base, base, len(interp_b), len(interp_b), 1)
        ph += struct.pack("<IIQQQQQQ", 2, 6, dyn_off, dyn_off, dyn_off, len(dyn), len(dyn), 8)
        head = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
        head += struct.pack("<HHIQQQIHHHHHH", 3, 62, 1, 0, 64, 0, 0, 64, 56, phnum, 64, 0, 0)
        body = head + ph + interp_b + strtab
        return body + bytes(dyn_off - len(body)) + dyn

    migrations = oci_layout.read_migrations(SIDECAR_MIGRATIONS)

    def image_case(mutate=lambda entries, config: None, binary=None, tamper=False):
        def run():
            entries, config, labels = oci_layout.sidecar_parts(
                fake_elf() if binary is None else binary, migrations, "0.0.0", "")
            mutate(entries, config["config"])
            blobs, index, _ = oci_layout.image(oci_layout.layer_tar(entries), config, "t", labels)
            if tamper:
                layer = json.loads(blobs[index["manifests"][0]["digest"][7:]])["layers"][0]["digest"][7:]
                blobs[layer] = blobs[layer][:-1] + bytes([blobs[layer][-1] ^ 1])
            return sidecar_layout_errors(oci_layout.Layout(blobs=blobs, index=index, name="broken sidecar image"))[0]
        return run

    sound = image_case()()
    if sound:
        print(f"   SELF-TEST FAILED: a sound sidecar image was refused: {sound[0]}")
    bin_path = oci_layout.SIDECAR_BIN.lstrip("/")
    mig_dir = oci_layout.SIDECAR_MIGRATIONS.lstrip("/")
    container = lambda o: find(o, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    cases += [
        ("sidecar image: a dynamically linked binary (PT_INTERP, libc.so)",
         image_case(binary=fake_elf("/lib/ld-musl-x86_64.so.1", ["libc.so"]))),
        ("sidecar image: a static-pie binary that still needs a library (DT_NEEDED)",
         image_case(binary=fake_elf(needed=["libgcc_s.so.1"]))),
        ("sidecar image: User root",
         image_case(lambda e, c: set_(c, "User", "0:0"))),
        ("sidecar image: User by name (runAsNonRoot cannot check a name)",
         image_case(lambda e, c: set_(c, "User", oci_layout.SIDECAR_USER))),
        ("sidecar image: a UID that /etc/passwd does not name",
         image_case(lambda e, c: set_(c, "User", "1000:1000"))),
        ("sidecar image: the Entrypoint is not the sidecar",
         image_case(lambda e, c: set_(c, "Entrypoint", ["/bin/sh"]))),
        ("sidecar image: the binary not executable",
         image_case(lambda e, c: set_(e, bin_path, (0o644, e[bin_path][1])))),
        ("sidecar image: the migrations left out",
         image_case(lambda e, c: [e.pop(k) for k in list(e) if k.startswith(mig_dir + "/")])),
        ("sidecar image: a migration that differs from sidecar/migrations/",
         image_case(lambda e, c: set_(e, f"{mig_dir}/{min(migrations)}", (0o644, b"-- changed\n")))),
        ("sidecar image: the layer blob tampered with",
         image_case(tamper=True)),
        ("Deployment: the sidecar's image by tag, not digest",
         k8s_case("k8s/base", lambda o: set_(container(o), "image", exp.sidecar_image().partition("@")[0]))),
        ("Deployment: the sidecar's image at a digest other than k8s/deploy.json's",
         k8s_case("k8s/base", lambda o: set_(container(o), "image",
                                             exp.sidecar_image().partition("@")[0] + "@sha256:" + "0" * 64))),
        ("Deployment: runAsUser other than the image's user",
         k8s_case("k8s/base", lambda o: set_(find(o, "Deployment")["spec"]["template"]["spec"]["securityContext"],
                                             "runAsUser", 1000))),
    ]
    # the mesh policy (issue 26) and the usage secret; these name the error
    # they must cause (a refusal for another reason does not count)
    ns = exp.deploy["namespace"]
    workload_p = exp.mesh["workloads"][0]
    ap = lambda o, build="k8s/base": find(o, "AuthorizationPolicy", MESH_AP[build])
    rule_for = lambda o, path, build="k8s/base": next(
        r for r in ap(o, build)["spec"]["rules"] if path in r["to"][0]["operation"]["paths"])
    pa = lambda o, name: find(o, "PeerAuthentication", name)
    netpol = lambda o, name: find(o, "NetworkPolicy", name)
    pod_ann = lambda o: find(o, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    usage_env = lambda o: next(e for e in container(o)["env"] if e["name"] == "SIDECAR_USAGE_SECRET")

    def mesh_case(mutate):
        def run():
            d = copy.deepcopy(exp.deploy)
            mutate(d["mesh"])
            return Expected(exp.filters, d, exp.routes, exp.compressors).errors
        return run
    cases += [
        ("AuthorizationPolicy: a rule without principals (no `from`) for the usage endpoint",
         k8s_case("k8s/base", lambda o: rule_for(o, exp.usage_path()).pop("from")),
         "reachable by an ALLOW rule without principals"),
        ("AuthorizationPolicy: the grants feed from a namespace, not a principal",
         k8s_case("k8s/base", lambda o: set_(rule_for(o, "/internal/*"), "from", [{"source": {"namespaces": [ns]}}])),
         "without principals"),
        ("AuthorizationPolicy: a wildcard principal on the RLS",
         k8s_case("k8s/base", lambda o: set_(rule_for(o, RLS_PATH)["from"][0]["source"], "principals", ["*"])),
         "without principals"),
        ("AuthorizationPolicy: the RLS port left out of every rule",
         k8s_case("k8s/base", lambda o: ap(o)["spec"]["rules"].remove(rule_for(o, RLS_PATH))),
         "left out of every rule"),
        ("AuthorizationPolicy: /metrics left out of every rule",
         k8s_case("k8s/base", lambda o: ap(o)["spec"]["rules"].remove(rule_for(o, "/metrics"))),
         "left out of every rule"),
        ("AuthorizationPolicy: ingress without the gateway's /ws rule",
         k8s_case(ING, lambda o: ap(o, ING)["spec"]["rules"].remove(rule_for(o, "/ws", ING))),
         "left out of every rule"),
        ("AuthorizationPolicy: /admin/ from the application pods",
         k8s_case("k8s/base", lambda o: ap(o)["spec"]["rules"].append(
             {"from": [{"source": {"principals": [workload_p]}}],
              "to": [{"operation": {"ports": ["8081"], "paths": ["/admin/*"]}}]})),
         "which k8s/deploy.json does not name"),
        ("AuthorizationPolicy: a rule without `to` (every port and path)",
         k8s_case("k8s/base", lambda o: ap(o)["spec"]["rules"].append(
             {"from": [{"source": {"principals": [workload_p]}}]})),
         "which k8s/deploy.json does not name"),
        ("AuthorizationPolicy: a namespace-wide allow-all beside the sidecar's",
         k8s_case("k8s/base", lambda o: o.append(("broken", {
             "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
             "metadata": {"name": "allow-all", "namespace": ns}, "spec": {"rules": [{}]}}))),
         "no `from`"),
        ("AuthorizationPolicy: the sidecar's deleted (no ALLOW policy: everything allowed)",
         k8s_case("k8s/base", lambda o: drop(o, "AuthorizationPolicy", MESH_AP["k8s/base"])),
         "none applies to the sidecar"),
        ("PeerAuthentication: the sidecar's PERMISSIVE",
         k8s_case("k8s/base", lambda o: set_(pa(o, SIDECAR_NAME)["spec"]["mtls"], "mode", "PERMISSIVE")),
         "accept PERMISSIVE"),
        ("PeerAuthentication: the namespace's PERMISSIVE",
         k8s_case("k8s/base", lambda o: set_(pa(o, "default")["spec"]["mtls"], "mode", "PERMISSIVE")),
         "needs one without a selector in mode STRICT"),
        ("PeerAuthentication: the RLS port DISABLE on the sidecar (portLevelMtls)",
         k8s_case("k8s/base", lambda o: set_(pa(o, SIDECAR_NAME)["spec"], "portLevelMtls",
                                             {str(exp.ports()[1]): {"mode": "DISABLE"}})),
         "accepts plain text"),
        ("NetworkPolicy: the workloads admitted from any namespace (namespaceSelector {})",
         k8s_case("k8s/base", lambda o: set_(netpol(o, MESH_NETPOL_WORKLOADS)["spec"]["ingress"][0]["from"][0],
                                             "namespaceSelector", {})),
         "every namespace"),
        ("NetworkPolicy: a namespace k8s/deploy.json does not name",
         k8s_case("k8s/base", lambda o: set_(netpol(o, MESH_NETPOL)["spec"]["ingress"][-1]["from"][0]
                                             ["namespaceSelector"]["matchLabels"], "kubernetes.io/metadata.name",
                                             "elsewhere")),
         "does not name here"),
        ("NetworkPolicy: a rule without `from`",
         k8s_case("k8s/base", lambda o: netpol(o, MESH_NETPOL)["spec"]["ingress"][0].pop("from")),
         "admits every source"),
        ("NetworkPolicy: ingress admitting the labelled application pods (no filters run on them there)",
         k8s_case(ING, lambda o: o.append(next(x for x in builds["k8s/base"] if x[1]["kind"] == "NetworkPolicy"
                                               and x[1]["metadata"]["name"] == MESH_NETPOL_WORKLOADS))),
         "no filters run"),
        ("Deployment: SIDECAR_USAGE_SECRET from another Secret than the filters'",
         k8s_case("k8s/base", lambda o: set_(usage_env(o)["valueFrom"]["secretKeyRef"], "name", "other")),
         "SIDECAR_USAGE_SECRET must come from"),
        ("Deployment: SIDECAR_USAGE_SECRET written in",
         k8s_case("k8s/base", lambda o: [usage_env(o).pop("valueFrom"), usage_env(o).update(value="s3cret")]),
         "SIDECAR_USAGE_SECRET must come from"),
        ("WasmPlugin: the usage filter's VM without the secret's variable",
         k8s_case("k8s/overlays/wasmplugin",
                  lambda o: find(o, "WasmPlugin", "access-layer-usage")["spec"].pop("vmConfig")),
         "vmConfig must be"),
        ("EnvoyFilter: the usage filter's VM without the secret's variable",
         k8s_case("k8s/base", lambda o: find(o, "EnvoyFilter")["spec"]["configPatches"][0]["patch"]["value"]
                  ["typed_config"]["config"]["vm_config"].pop("environment_variables")),
         "environment_variables must be"),
        ("gateway WasmPlugin: the usage secret written into pluginConfig",
         k8s_case(ING, lambda o: set_(gw_plugin(o, "usage")["spec"], "pluginConfig",
                                      {**{k: v for k, v in exp.k8s_json["usage"].items() if k != USAGE_SECRET_FIELD},
                                       "secret": "s3cret"})),
         "pluginConfig differs"),
        ("Deployment: sidecar.istio.io/inject false (no proxy, no mesh policy)",
         k8s_case("k8s/base", lambda o: set_(pod_ann(o), "sidecar.istio.io/inject", "false")),
         "sidecar.istio.io/inject"),
        ("Deployment: probes not rewritten (refused by STRICT mTLS)",
         k8s_case("k8s/base", lambda o: set_(pod_ann(o), "sidecar.istio.io/rewriteAppHTTPProbers", "false")),
         "rewriteAppHTTPProbers"),
        ("Deployment: the sidecar's port excluded from Istio's inbound capture",
         k8s_case("k8s/base", lambda o: set_(pod_ann(o), "traffic.sidecar.istio.io/excludeInboundPorts",
                                             str(exp.ports()[0]))),
         "past Istio's proxy"),
        ("deploy.json: mesh without the filtered workloads' service accounts",
         mesh_case(lambda m: set_(m, "filter_workloads", [])), "filter_workloads"),
        ("deploy.json: a publisher that is not namespace/serviceaccount",
         mesh_case(lambda m: set_(m, "publishers", ["curve-publisher"])), "publishers"),
    ]
    failures = 0
    for case in cases:
        name, run, want = case if len(case) == 3 else (*case, None)
        try:
            errs = run()
        except Exception as e:  # a crash is not a refusal
            errs, crash = [], e
        else:
            crash = None
        hit = [e for e in errs if want is None or want in e]
        if hit:
            print(f"   refused as it should: {name}\n      -> {hit[0].splitlines()[0][-240:]}")
        else:
            failures += 1
            print(f"   SELF-TEST FAILED: accepted {name}" + (f" (crashed: {crash!r})" if crash else "")
                  + (f" (refused, but not for {want!r}: {errs[0][:200]})" if errs else ""))
    return failures + bool(sound), len(cases)


# --------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sync", action="store_true")
    ap.add_argument("--pin", action="store_true")
    ap.add_argument("--envoy", default=os.path.join(ROOT, "envoy", "envoy.yaml"))
    args = ap.parse_args()
    t0 = time.monotonic()
    errors = []

    def step(title):
        print(f"-- {title} ({time.monotonic() - t0:.1f}s)")

    step(f"envoy: {rel(args.envoy)} as envoy.config.bootstrap.v3.Bootstrap (envoy-data-plane, strict)")
    envoy_doc = load_yaml(args.envoy)
    envoy_pool()
    filters, errs = check_envoy_doc(envoy_doc, rel(args.envoy))
    errors += errs
    if not errs:
        print(f"   OK: wasm filters {[f['name'] for f in filters]}, configurations are JSON objects")
    errors += envoy_binary(args.envoy)
    if errs:  # nothing below is meaningful without a sound envoy.yaml
        return finish(errors, t0)

    routes, errs = envoy_routes(envoy_doc, rel(args.envoy))
    errors += errs
    exp = Expected(filters, load_yaml(DEPLOY_JSON), routes, compressor_filters(envoy_doc, rel(args.envoy))[0])
    if exp.usage_secret and "usage" in exp.names and os.path.exists(USAGE_CONFIG_RS) and \
            not re.search(r"\bpub " + USAGE_SECRET_FIELD + r"\b", open(USAGE_CONFIG_RS).read()):
        note(f"the usage filter has no `{USAGE_SECRET_FIELD}` yet (filters/usage/core/src/config.rs): its k8s "
             "configurations name the variable and would be refused until it reads it (k8s/README.md)")
    if args.sync:
        step("sync: generated k8s files")
        exp = sync(exp, args.pin)
    errors += exp.errors

    step("k8s: generated files against envoy.yaml and k8s/deploy.json")
    errs = check_generated(exp)
    errors += errs
    if not errs:
        print("   OK: " + ", ".join(generated(exp)))

    builds = {}
    for kdir, profile in KUSTOMIZATIONS.items():
        step(f"k8s: {kdir}")
        kerrs = []
        objs = kustomize(os.path.join(ROOT, kdir), kerrs)
        errors += kerrs
        ref, how = kubectl_kustomize(kdir)
        if ref is None:
            note(f"{kdir}: built with the built-in resolver only ({how})")
        else:
            canon = lambda os_: sorted(json.dumps(o, sort_keys=True) for o in os_)
            if not ref:
                errors.append(f"{kdir}: {how}")
            elif canon(ref) != canon([o for _, o in objs]):
                mine = {obj_id(o): o for _, o in objs}
                theirs = {obj_id(o): o for o in ref}
                diff = sorted(i for i in set(mine) | set(theirs) if mine.get(i) != theirs.get(i))
                errors.append(f"{kdir}: {how} differs from the built-in resolver on {diff}")
            else:
                print(f"   `{how}` = the built-in resolver ({len(ref)} objects)")
        errs = check_build(kdir, objs, exp, profile)
        errors += errs
        builds[kdir] = objs
        if not errs:
            print(f"   OK: {', '.join(obj_id(o) for _, o in objs)}")

    step("OCI images (target/oci)")
    errors += check_oci(exp)

    if not errors:
        step("self-test: broken copies must be refused")
        failed, total = self_test(envoy_doc, builds, exp)
        if failed:
            errors.append(f"self-test: {failed} of {total} broken copies were accepted")
        else:
            print(f"   {total} broken copies refused")
    return finish(errors, t0)


def finish(errors, t0):
    print()
    for e in errors:
        print(f"ERROR: {e}")
    took = time.monotonic() - t0
    if errors:
        print(f"check-deploy: FAILED, {len(errors)} error(s) ({took:.1f}s)")
        return 1
    print(f"check-deploy: OK ({took:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
