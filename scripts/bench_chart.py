#!/usr/bin/env python3
"""Draws <target>/bench/chart.svg from the bench results under
<target>/bench/ (<target>: cargo's target directory, scripts/target-dir.sh):
for every row of every bench, the spread of its samples (min to max, the
box from the 25th to the 75th percentile, the median as a dot) on a
logarithmic axis; for the fan-out comparison, the delivery latency
percentiles (p50, p99, p99.9) of the sidecar and nchan per scenario.
Standard library only.

    python3 scripts/bench_chart.py [<target>/bench]
"""
import glob, html, json, math, os, subprocess, sys

d = sys.argv[1] if len(sys.argv) > 1 else os.path.join(
    subprocess.run([os.path.join(os.path.dirname(os.path.abspath(__file__)), "target-dir.sh")],
                   check=True, capture_output=True, text=True).stdout.strip(), "bench")
panels = []
for f in sorted(glob.glob(os.path.join(d, "*.json"))):
    name = os.path.basename(f)[:-5]
    if name in ("all", "fanout"):
        continue
    try:
        j = json.load(open(f))
    except ValueError:
        continue
    rows = []
    for r in j.get("rows", []):
        s = sorted(x for x in r.get("samples", []) if x == x and x > 0)
        if s:
            q = lambda p: s[min(len(s) - 1, int(round((len(s) - 1) * p)))]
            rows.append((r["name"], s[0], q(0.25), q(0.5), q(0.75), s[-1]))
    if rows:
        panels.append((f"{name} (µs per call; min, quartiles, median, max)", rows))

fan = os.path.join(d, "fanout.json")
if os.path.exists(fan):
    rows = []
    for e in json.load(open(fan)).get("scenarios", []):
        for t in ("sidecar", "nchan"):
            m = e.get(t)
            if not m:
                continue
            p = [m.get(k) for k in ("p50_ms", "p99_ms", "p999_ms")]
            if all(isinstance(v, (int, float)) and v == v and v > 0 for v in p):
                us = [v * 1000 for v in p]
                rows.append((f"{e['scenario']}: {t}", us[0], us[0], us[0], us[1], us[2]))
    if rows:
        panels.append(("fan-out delivery latency (µs; dot p50, box to p99, line to p99.9)", rows))

W, LABEL, ROW, PAD = 1100, 520, 20, 14
plot_w = W - LABEL - 40
height = PAD
for _, rows in panels:
    height += 30 + ROW * len(rows) + 24
height += PAD
out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{height}" font-family="sans-serif" font-size="11">',
       f'<rect width="{W}" height="{height}" fill="white"/>']
y = PAD
for title, rows in panels:
    lo = min(r[1] for r in rows)
    hi = max(r[5] for r in rows)
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if a == b:
        b += 1
    x = lambda v: LABEL + (math.log10(v) - a) / (b - a) * plot_w
    out.append(f'<text x="8" y="{y + 14}" font-weight="bold" font-size="12">{html.escape(title)}</text>')
    y += 24
    for k in range(a, b + 1):
        gx = x(10 ** k)
        out.append(f'<line x1="{gx:.1f}" y1="{y}" x2="{gx:.1f}" y2="{y + ROW * len(rows)}" stroke="#ddd"/>')
        out.append(f'<text x="{gx:.1f}" y="{y + ROW * len(rows) + 12}" text-anchor="middle" fill="#666">{10 ** k:g}</text>')
    for i, (label, mn, q1, med, q3, mx) in enumerate(rows):
        cy = y + ROW * i + ROW / 2
        out.append(f'<text x="{LABEL - 8}" y="{cy + 4:.1f}" text-anchor="end">{html.escape(label[:80])}</text>')
        out.append(f'<line x1="{x(mn):.1f}" y1="{cy:.1f}" x2="{x(mx):.1f}" y2="{cy:.1f}" stroke="#555"/>')
        out.append(f'<rect x="{x(q1):.1f}" y="{cy - 5:.1f}" width="{max(1.0, x(q3) - x(q1)):.1f}" height="10" fill="#9cc3e6" stroke="#2b6cb0"/>')
        out.append(f'<circle cx="{x(med):.1f}" cy="{cy:.1f}" r="3.5" fill="#c53030"/>')
        out.append(f'<text x="{W - 8}" y="{cy + 4:.1f}" text-anchor="end" fill="#333">{med:.3g}</text>')
    y += ROW * len(rows) + 24
out.append("</svg>")
path = os.path.join(d, "chart.svg")
open(path, "w").write("\n".join(out))
print(f"wrote {path} ({len(panels)} panels)")
