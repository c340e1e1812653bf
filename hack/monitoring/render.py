"""Draw the Grafana dashboard (charts/libvirt-operator/files/dashboard.json) as a PNG, from real data.

Grafana is not needed: every panel's targets are evaluated as range queries against a Prometheus
(the same expressions Grafana would send, with its variables substituted as below) and drawn with
matplotlib on a grid laid out by each panel's gridPos, rows as headers, legends from legendFormat
and y-axis units from the panel's fieldConfig unit, in a dark Grafana-like theme.

    python hack/monitoring/render.py --prometheus http://127.0.0.1:9090 --last 15m --out dashboard.png

The integration test tests/integration/test_prometheus_scenario.py renders the picture in the README
(docs/images/dashboard.png) against its own Prometheus when LIBVIRT_OPERATOR_DASHBOARD_PNG is set
(`make dashboard-picture`). matplotlib comes with the `dashboard` extra; only `render()` needs it, so
the query helpers below import without it (the test uses `panel_queries`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import re
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "libvirt-operator" / "files" / "dashboard.json"

# Grafana-like dark theme and its classic series palette.
PAGE_BG, PANEL_BG, BORDER = "#111217", "#181b1f", "#2c3235"
TEXT, MUTED, GRID = "#d8d9da", "#8e8e8e", "#2a2d33"
PALETTE = ["#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2", "#b877d9", "#6ed0e0",
           "#d8d9da", "#37872d", "#c15c17", "#705da0", "#fade2a", "#447ebc", "#890f02", "#6d1f62"]


# --------------------------------------------------------------------------------------------
# Queries: Grafana's variables, legends
# --------------------------------------------------------------------------------------------

def expand(expr: str, rate_interval: str, variables: dict[str, str] | None = None) -> str:
    """The expression Grafana would send: `$__rate_interval` (and `$__interval`) → rate_interval,
    `$name` / `${name}` / `[[name]]` → variables[name] (e.g. datasource, job, namespace)."""
    out = expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
    for name, val in (variables or {}).items():
        out = out.replace("${%s}" % name, val).replace("[[%s]]" % name, val)
        out = re.sub(r"\$%s\b" % re.escape(name), lambda _m: val, out)
    return out


def panel_queries(dashboard: dict[str, Any], rate_interval: str,
                  variables: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(panel title, expanded expression) for every target of every non-row panel."""
    return [(p["title"], expand(t["expr"], rate_interval, variables))
            for p in dashboard["panels"] if p["type"] != "row" for t in p.get("targets", [])]


def legend(fmt: str | None, labels: dict[str, str]) -> str:
    """Grafana's legendFormat: `{{label}}` → the series' label value; no format → the series' labels."""
    if not fmt:
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        return f"{labels.get('__name__', '')}{{{inner}}}" if inner or "__name__" not in labels else labels["__name__"]
    return re.sub(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}", lambda m: labels.get(m.group(1), ""), fmt).strip()


def query_range(url: str, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
    params = urllib.parse.urlencode({"query": expr, "start": start, "end": end, "step": step})
    with urllib.request.urlopen(f"{url.rstrip('/')}/api/v1/query_range?{params}", timeout=30) as r:
        body = json.load(r)
    if body.get("status") != "success":
        raise RuntimeError(f"{expr}: {body}")
    return body["data"]["result"]


def fetch(dashboard: dict[str, Any], url: str, start: float, end: float, step: float, rate_interval: str,
          variables: dict[str, str] | None = None) -> dict[int, list[tuple[str, list[float], list[float]]]]:
    """Panel id → [(legend, timestamps, values)] for every series of every target."""
    data: dict[int, list[tuple[str, list[float], list[float]]]] = {}
    for p in dashboard["panels"]:
        if p["type"] == "row":
            continue
        series = data.setdefault(p["id"], [])
        for t in p.get("targets", []):
            for s in query_range(url, expand(t["expr"], rate_interval, variables), start, end, step):
                ts = [float(x) for x, _ in s["values"]]
                vs = [float(v) for _, v in s["values"]]
                series.append((legend(t.get("legendFormat"), s["metric"]), ts, vs))
    return data


# --------------------------------------------------------------------------------------------
# Units (Grafana's names)
# --------------------------------------------------------------------------------------------

def _si(v: float, base: float, prefixes: list[str], unit: str) -> str:
    """1234 → "1.23K ops/s" (prefixes[0] is the plain one)."""
    i = 0
    while abs(v) >= base and i < len(prefixes) - 1:
        v, i = v / base, i + 1
    return f"{v:.3g}{prefixes[i]}{unit}"


def fmt_value(v: float, unit: str | None) -> str:
    if math.isnan(v):
        return ""
    if unit == "s":
        if v == 0:
            return "0 s"
        if abs(v) < 1e-3:
            return f"{v * 1e6:.3g} µs"
        if abs(v) < 1:
            return f"{v * 1e3:.3g} ms"
        if abs(v) < 60:
            return f"{v:.3g} s"
        return f"{v / 60:.3g} min"
    if unit == "bytes":
        return _si(v, 1024, [" B", " KiB", " MiB", " GiB", " TiB"], "")
    if unit == "Bps":
        return _si(v, 1000, [" B", " kB", " MB", " GB", " TB"], "/s")
    if unit == "percentunit":
        return f"{v * 100:.3g}%"
    if unit == "ops":
        return _si(v, 1000, ["", "K", "M", "G"], " ops/s")
    if unit == "reqps":
        return _si(v, 1000, ["", "K", "M", "G"], " req/s")
    if unit == "bool":
        return {0.0: "false", 1.0: "true"}.get(v, f"{v:.3g}")
    return _si(v, 1000, ["", "K", " Mil", " Bil"], "")  # short


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------

def render(dashboard: dict[str, Any], url: str, start: float, end: float, out: Path, *,
           rate_interval: str = "1m", step: float | None = None, variables: dict[str, str] | None = None,
           width_in: float = 15.0, dpi: int = 96, max_legend: int = 12) -> Path:
    """Query `url` over [start, end] and write the dashboard picture to `out`."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyBboxPatch
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    step = step or max(1.0, round((end - start) / 240))
    data = fetch(dashboard, url, start, end, step, rate_interval, variables)
    panels = dashboard["panels"]
    rows_h = max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels)
    unit_w = width_in / 24.0            # one grid column
    unit_h = width_in * 0.022           # one grid row (Grafana: 30 px of ~1400 px width)
    header = 0.55                       # dashboard title band
    height_in = header + rows_h * unit_h + 0.15
    fig = plt.figure(figsize=(width_in, height_in), dpi=dpi, facecolor=PAGE_BG)
    gap = 0.06                          # inches between panels

    def box(gp: dict[str, int]) -> tuple[float, float, float, float]:
        """Figure fraction (left, bottom, width, height) of a gridPos, with the gap."""
        x0 = gp["x"] * unit_w + gap
        y_top = header + gp["y"] * unit_h + gap
        w = gp["w"] * unit_w - 2 * gap
        h = gp["h"] * unit_h - 2 * gap
        return x0 / width_in, 1 - (y_top + h) / height_in, w / width_in, h / height_in

    when = (f"{dt.datetime.fromtimestamp(start, dt.timezone.utc):%Y-%m-%d %H:%M:%S} – "
            f"{dt.datetime.fromtimestamp(end, dt.timezone.utc):%H:%M:%S} UTC")
    fig.text(0.1 / width_in, 1 - 0.3 / height_in, dashboard.get("title", "dashboard"), color=TEXT,
             fontsize=15, fontweight="bold", va="center")
    fig.text(1 - 0.1 / width_in, 1 - 0.3 / height_in,
             f"{when}   ·   step {step:g}s, $__rate_interval={rate_interval}   ·   drawn by hack/monitoring/render.py",
             color=MUTED, fontsize=9, va="center", ha="right")

    tz = dt.timezone.utc
    for p in panels:
        left, bottom, w, h = box(p["gridPos"])
        if p["type"] == "row":
            fig.text(left, bottom + h / 2, "▾ " + p.get("title", ""), color=TEXT, fontsize=12.5,
                     fontweight="bold", va="center")
            continue
        defaults = (p.get("fieldConfig") or {}).get("defaults") or {}
        unit, custom = defaults.get("unit"), defaults.get("custom") or {}
        fill = float(custom.get("fillOpacity") or 0) / 100
        line_w = float(custom.get("lineWidth") or 1) * 1.2
        fig.patches.append(FancyBboxPatch((left, bottom), w, h, boxstyle="round,pad=0,rounding_size=0.002",
                                          transform=fig.transFigure, facecolor=PANEL_BG, edgecolor=BORDER,
                                          linewidth=0.8, zorder=-1))
        title_h = 0.28 / height_in
        fig.text(left + 0.1 / width_in, bottom + h - title_h / 2 - 0.02 / height_in, p.get("title", ""),
                 color=TEXT, fontsize=10, fontweight="bold", va="center")
        series = [s for s in data.get(p["id"], []) if any(not math.isnan(v) for v in s[2])]
        series.sort(key=lambda s: s[0])
        n_leg = min(len(series), max_legend) + (1 if len(series) > max_legend else 0)
        ncol = 3 if all(len(s[0]) <= 20 for s in series) else 2
        leg_rows = math.ceil(n_leg / ncol) if n_leg else 0
        leg_h = (leg_rows * 0.16 + 0.06) / height_in if leg_rows else 0
        ax_left = left + 0.72 / width_in
        ax = fig.add_axes((ax_left, bottom + leg_h + 0.22 / height_in, left + w - ax_left - 0.12 / width_in,
                           h - title_h - leg_h - 0.3 / height_in))
        ax.set_facecolor(PANEL_BG)
        for side in ax.spines.values():
            side.set_visible(False)
        ax.grid(True, color=GRID, linewidth=0.6)
        ax.tick_params(colors=MUTED, labelsize=7.5, length=0)
        ax.set_xlim(dt.datetime.fromtimestamp(start, tz), dt.datetime.fromtimestamp(end, tz))
        ax.xaxis.set_major_locator(MaxNLocator(6))
        ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S", tz=tz))
        ax.yaxis.set_major_locator(MaxNLocator(5))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _pos, unit=unit: fmt_value(v, unit)))
        if not series:
            ax.set_ylim(0, 1)
            ax.text(0.5, 0.5, "No data", color=MUTED, fontsize=11, ha="center", va="center", transform=ax.transAxes)
            continue
        handles = []
        for i, (name, ts, vs) in enumerate(series):
            color = PALETTE[i % len(PALETTE)]
            xs = [dt.datetime.fromtimestamp(t, tz) for t in ts]
            # Prometheus leaves gaps where a series is absent: draw them as gaps, like Grafana.
            full_x, full_y = [], []
            for j, (x, y) in enumerate(zip(xs, vs)):
                if j and ts[j] - ts[j - 1] > step * 1.5:
                    full_x.append(x)
                    full_y.append(float("nan"))
                full_x.append(x)
                full_y.append(y)
            (line,) = ax.plot(full_x, full_y, color=color, linewidth=line_w, label=name)
            if fill:
                ax.fill_between(full_x, full_y, color=color, alpha=fill, linewidth=0)
            handles.append(line)
        lo = min(0.0, *(v for s in series for v in s[2] if not math.isnan(v)))
        hi = max(v for s in series for v in s[2] if not math.isnan(v))
        if unit == "bool":
            ax.set_ylim(-0.05, 1.1)
            ax.set_yticks([0, 1])
        else:
            ax.set_ylim(lo, hi * 1.1 if hi > lo else lo + 1)
        shown = handles[:max_legend]
        labels = [h_.get_label() for h_ in shown]
        if len(handles) > max_legend:
            from matplotlib.lines import Line2D
            shown.append(Line2D([], [], color=PANEL_BG))
            labels.append(f"… {len(handles) - max_legend} more series")
        labels = [lb if len(lb) <= 40 else lb[:38] + "…" for lb in labels]
        fig.legend(shown, labels, loc="upper left", ncol=ncol, frameon=False, fontsize=7.5, labelcolor=TEXT,
                   handlelength=1.2, columnspacing=1.2, borderaxespad=0, handletextpad=0.5,
                   bbox_to_anchor=(left + 0.1 / width_in, bottom + leg_h + 0.02 / height_in), labelspacing=0.25)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi, facecolor=PAGE_BG, pil_kwargs={"optimize": True})
    plt.close(fig)
    from PIL import Image  # matplotlib's own dependency: drop the alpha channel (a third smaller)
    with Image.open(out) as im:
        rgb = im.convert("RGB")
    rgb.save(out, optimize=True)
    return out


def _duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a duration like 90s, 15m, 1h: {text}")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prometheus", required=True, help="Prometheus base URL, e.g. http://127.0.0.1:9090")
    ap.add_argument("--dashboard", type=Path, default=DASHBOARD)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--last", type=_duration, default=_duration("1h"), help="window ending now (default 1h)")
    ap.add_argument("--start", type=float, help="window start (unix seconds; overrides --last)")
    ap.add_argument("--end", type=float, help="window end (unix seconds; default now)")
    ap.add_argument("--rate-interval", default="1m", help="value of $__rate_interval (default 1m)")
    ap.add_argument("--step", type=float, help="query step in seconds (default: window/240)")
    ap.add_argument("--var", action="append", default=[], metavar="NAME=VALUE",
                    help="a dashboard template variable (repeatable), e.g. datasource=Prometheus")
    ap.add_argument("--dpi", type=int, default=96)
    args = ap.parse_args(argv)
    end = args.end or time.time()
    start = args.start or end - args.last
    variables = dict(v.split("=", 1) for v in args.var)
    out = render(json.loads(args.dashboard.read_text()), args.prometheus, start, end, args.out,
                 rate_interval=args.rate_interval, step=args.step, variables=variables, dpi=args.dpi)
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
