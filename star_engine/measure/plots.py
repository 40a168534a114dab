"""Figures of bench and eval results, drawn with matplotlib where it is installed (the
`plots` extra); without it, the functions say so and draw nothing."""

from __future__ import annotations

from pathlib import Path


def pyplot():
    """matplotlib.pyplot drawing to files, or None where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot_bench(result: dict, path: Path) -> bool:
    """Time to first token against length per strategy, star's speed-up, memory per rank.
    Returns False when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    rows = [r for r in result["rows"] if "ttft_s" in r]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for attn in dict.fromkeys(r.get("label", r["attn"]) for r in rows):
        mine = [r for r in rows if r.get("label", r["attn"]) == attn]
        x = [r["context"] for r in mine]
        axes[0].plot(x, [r["ttft_s"] for r in mine], marker="o", label=attn)
        axes[2].plot(x, [max(r["peak_mem_bytes"]) / 2**30 for r in mine], marker="o", label=attn)
    stars = dict.fromkeys(s.get("star", "star") for s in result["speedups"])
    for star in stars:
        for key, other in (("over_ring", "ring"), ("over_dense", "dense")):
            points = [(s["context"], s[key]) for s in result["speedups"] if key in s and s.get("star", "star") == star]
            if points:
                axes[1].plot(*zip(*points), marker="o", label=f"{star} / {other}")
    titles = ("time to first token (s)", "star's speed-up in time to first token (x)", "peak memory, max rank (GiB)")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    axes[0].set_yscale("log")
    fig.suptitle(f"{result['model']} on {result['ranks']} x {result['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_job(result: dict, path: Path) -> bool:
    """A job's runs (one at a time, batched): output tokens per second over
    the whole job and while decoding, and when each request was answered. Returns False
    when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    names = [f"{r['label']} {r['context']}: {r['mode']}" for r in rows]
    places = range(len(rows))
    axes[0].barh([p - 0.2 for p in places], [r["output_tokens_per_s"] for r in rows], height=0.4, label="whole job")
    axes[0].barh([p + 0.2 for p in places], [r.get("decode_tokens_per_s") or 0 for r in rows], height=0.4,
                 label="decoding")
    axes[0].set_yticks(list(places), names)
    axes[0].invert_yaxis()
    axes[0].legend(fontsize="small")
    axes[0].set_title("output tokens per second")
    for name, r in zip(names, rows):
        axes[1].plot(range(1, len(r["latency_s"]) + 1), sorted(r["latency_s"]), marker=".", label=name)
    axes[1].set_xlabel("requests answered")
    axes[1].set_title("time from the job's start (s)")
    axes[1].legend(fontsize="small")
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle(f"{result['model']} on {result['ranks']} x {result['device']}, {rows[0]['requests']} requests, "
                 f"{rows[0]['questions_per_context']} a context")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_eval(summary: list[dict], title: str, path: Path) -> bool:
    """Mean accuracy over the tasks against length, one line per method."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method in dict.fromkeys(s["method"] for s in summary):
        by_length: dict[int, list[float]] = {}
        for s in summary:
            if s["method"] == method:
                by_length.setdefault(s["length"], []).append(s["accuracy"])
        xs = sorted(by_length)
        ax.plot(xs, [sum(by_length[x]) / len(by_length[x]) for x in xs], marker="o", label=method)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("accuracy, mean over tasks")
    ax.set_ylim(0, 1.05)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_mixed_job(result: dict, path: Path) -> bool:
    """A timeline of each way a job of mixed lengths was served: hosts against time, a bar
    for each request from when its group took it to its answer, coloured by its length.
    Returns False when matplotlib is not installed."""
    plt = pyplot()
    if plt is None:
        return False
    rows = result["rows"]
    lengths = sorted({r["context"] for row in rows for r in row["requests"]})
    colours = {n: plt.cm.viridis(i / max(1, len(lengths) - 1)) for i, n in enumerate(lengths)}
    hosts = max(h for row in rows for r in row["requests"] for h in r["hosts"]) + 1
    end = max(row["wall_s"] for row in rows)
    fig, axes = plt.subplots(len(rows), 1, figsize=(12, 1.2 + 0.5 * hosts * len(rows)), sharex=True, squeeze=False)
    lanes = result["batch"]  # a host's row holds a lane for each request its group decodes at once
    for ax, row in zip(axes[:, 0], rows):
        free_from: dict[int, list[float]] = {h: [0.0] * lanes for h in range(hosts)}
        for r in sorted(row["requests"], key=lambda r: r["started_s"]):
            ends = free_from[r["hosts"][0]]
            lane = min(range(lanes), key=lambda k: (ends[k] > r["started_s"] + 1e-9, k))
            for h in r["hosts"]:
                free_from[h][lane] = r["finished_s"]
                ax.broken_barh([(r["started_s"], r["finished_s"] - r["started_s"])],
                               (h - 0.4 + 0.8 * lane / lanes, 0.8 / lanes), facecolor=colours[r["context"]],
                               edgecolor="white", linewidth=0.3)
        busy = ", ".join(f"{b:.0%}" for b in row["busy_fraction"])
        ax.set_title(f"--hosts-per-request {row['hosts_per_request']}: {row['wall_s']:.1f} s, "
                     f"{row['requests_per_hour']:.0f} requests/hour; each rank busy {busy}", fontsize="medium")
        ax.set_yticks(range(hosts), [f"host {h}" for h in range(hosts)])
        ax.set_ylim(hosts - 0.5, -0.5)
        ax.set_xlim(0, end * 1.01)
        ax.grid(axis="x", alpha=0.3)
    handles = [plt.Rectangle((0, 0), 1, 1, facecolor=colours[n]) for n in lengths]
    axes[0, 0].legend(handles, [f"{n} tokens" for n in lengths], fontsize="small", loc="upper right")
    axes[-1, 0].set_xlabel("time from the job's start (s)")
    fig.suptitle(f"{result['model']} on {result['ranks']} x {result['device']}: {sum(result['mix'])} parts "
                 f"{':'.join(map(str, result['mix']))} of {', '.join(map(str, result['lengths']))} tokens, "
                 f"batch {result['batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
