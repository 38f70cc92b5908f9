#!/usr/bin/env bash
# Prints an access token from the local stack's dev identity provider
# (127.0.0.1:8090, started by scripts/dev.sh), signed with the key it
# generated at start; the gateway accepts it until it expires.
#
#   scripts/token.sh [--sub alice] [--tenant acme] [--roles trader]
#                    [--markets EU-ETS,CAISO] [--ttl 3600] [--idp URL]
#
#   --sub      the subject (sub claim)                      default alice
#   --tenant   the tenant claim ("" for none)                default acme
#   --roles    realm roles, comma-separated                  default trader
#   --markets  entitled markets (entitlements.markets)       default EU-ETS,CAISO
#   --ttl      lifetime in seconds (1..86400)                default 3600
#   --idp      the identity provider                        default http://127.0.0.1:8090
set -euo pipefail
sub=alice tenant=acme roles=trader markets=EU-ETS,CAISO ttl=3600 idp=http://127.0.0.1:8090
while [ $# -gt 0 ]; do
    case "$1" in
        --sub) sub="$2"; shift 2 ;;
        --tenant) tenant="$2"; shift 2 ;;
        --roles) roles="$2"; shift 2 ;;
        --markets) markets="$2"; shift 2 ;;
        --ttl) ttl="$2"; shift 2 ;;
        --idp) idp="$2"; shift 2 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "token.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
exec python3 - "$idp" "$sub" "$tenant" "$roles" "$markets" "$ttl" <<'PY'
import sys, urllib.parse, urllib.request, urllib.error
idp, sub, tenant, roles, markets, ttl = sys.argv[1:]
q = urllib.parse.urlencode({"sub": sub, "tenant": tenant, "roles": roles,
                            "markets": markets, "ttl": ttl, "format": "raw"})
try:
    with urllib.request.urlopen(f"{idp}/dev/token?{q}", timeout=5) as r:
        sys.stdout.write(r.read().decode())
except urllib.error.HTTPError as e:
    sys.exit(f"token.sh: {e.code} {e.read().decode()}")
except OSError as e:
    sys.exit(f"token.sh: cannot reach the identity provider at {idp} ({e}); is scripts/dev.sh running?")
PY
