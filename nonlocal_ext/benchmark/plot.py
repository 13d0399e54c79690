"""``--plot``: median time and peak memory against N, one column of panels per kernel.

Log–log axes; one colour per backend, one line style per pass; rows with an error are left out
(so a line stops where a backend ran out of memory). Uses matplotlib's Agg backend (no display).
"""

from __future__ import annotations

from collections import defaultdict

_PASS_STYLE = {"fwd": "-", "bwd": ":", "fwd+bwd": "--"}
_MARKERS = "osD^v<>ph*"
# the case fields besides kernel and N that, when they vary, tell two lines apart
_SERIES_FIELDS = ("normalize", "update", "dtype", "device", "D", "C", "batch", "M")


def _varying(rows, fields):
    return [f for f in fields if len({row[f] for row in rows}) > 1]


def plot_rows(rows, path, title=""):
    """Write the figure to ``path`` (PNG); returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    timed = [row for row in rows if row["error"] is None and row["median_ms"] is not None]
    kernels = list(dict.fromkeys(row["kernel"] for row in rows)) or ["(none)"]
    with_memory = any(row["peak_mem_mb"] is not None for row in timed)
    panels = ["time"] + (["memory"] if with_memory else [])
    same_m = all(row["M"] == row["N"] for row in rows)
    series_fields = [f for f in _varying(rows, _SERIES_FIELDS) if not (f == "M" and same_m)]
    sizes = sorted({row["N"] for row in rows})
    backends = list(dict.fromkeys(row["backend"] for row in rows))
    colours = {name: plt.cm.tab10(i % 10) for i, name in enumerate(backends)}
    markers = {name: _MARKERS[i % len(_MARKERS)] for i, name in enumerate(backends)}

    fig, axes = plt.subplots(len(panels), len(kernels), figsize=(5.2 * len(kernels), 3.9 * len(panels)),
                             squeeze=False, constrained_layout=True)
    handles = {}
    for col, kernel in enumerate(kernels):
        lines = defaultdict(list)
        for row in timed:
            if row["kernel"] == kernel:
                key = (row["backend"], row["pass"]) + tuple(row[f] for f in series_fields)
                lines[key].append(row)
        for r, panel in enumerate(panels):
            ax = axes[r][col]
            for key, points in lines.items():
                backend, pass_ = key[:2]
                points = sorted(points, key=lambda p: p["N"])
                ys = [p["median_ms"] if panel == "time" else p["peak_mem_mb"] for p in points]
                xs = [p["N"] for p, y in zip(points, ys) if y is not None and y > 0]
                ys = [y for y in ys if y is not None and y > 0]
                if not xs:
                    continue
                extra = ", ".join(f"{f}={v}" for f, v in zip(series_fields, key[2:]))
                label = f"{backend} {pass_}" + (f" ({extra})" if extra else "")
                (line,) = ax.plot(xs, ys, _PASS_STYLE.get(pass_, "-"), color=colours[backend],
                                  marker=markers[backend], markersize=4, label=label)
                handles.setdefault(label, line)
            ax.set_xscale("log", base=2)
            ax.set_xticks(sizes, [str(n) for n in sizes])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.grid(True, which="minor", alpha=0.1)
            ax.set_xlabel("N (= M)" if "M" not in series_fields else "N")
            ax.set_ylabel("median time (ms)" if panel == "time" else "peak memory growth (MB)")
            what = "time" if panel == "time" else "peak memory"
            ax.set_title(f"{kernel} kernel: {what}", fontsize=11)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncol=min(len(handles), 4), fontsize=9, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
