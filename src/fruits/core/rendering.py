"""The report's documents: sections of paragraphs, tables, figures and banners, rendered by Jinja2
templates as self-contained HTML (figures embedded, everything escaped) and as Markdown (figures
linked, table cells escaped), and the figures themselves (matplotlib)."""

from __future__ import annotations

import base64
import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

TEMPLATES = "templates"  # package data beside this module: report.html.j2, report.md.j2


@dataclass
class Section:
    title: str
    # ("p", text) | ("table", headers, rows) | ("img", file, alt) | ("banner", text)
    # | ("thumbs", [(caption, [(name, JPEG bytes or None), ...]), ...]): photos in a row, embedded in HTML
    blocks: list[tuple] = field(default_factory=list)


def environment():
    """Jinja2 templates of this package; HTML autoescaped, Markdown table cells escaped by a filter."""
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("fruits.core", TEMPLATES), autoescape=select_autoescape(["html.j2"]),
                      keep_trailing_newline=True, trim_blocks=True, lstrip_blocks=True)
    env.filters["md_cell"] = lambda value: str(value).replace("|", "\\|").replace("\n", " ")
    env.filters["base64"] = lambda path: base64.b64encode(Path(path).read_bytes()).decode()
    env.filters["b64bytes"] = lambda content: base64.b64encode(content).decode()
    return env


def render_markdown(title: str, sections: list[Section], folder: Path) -> str:
    """Markdown; figures linked relative to folder (where the Markdown file is)."""
    sections = [Section(s.title, [("img", os.path.relpath(b[1], folder), b[2]) if b[0] == "img" else b
                                  for b in s.blocks]) for s in sections]
    return environment().get_template("report.md.j2").render(title=title, sections=sections)


def render_html(title: str, sections: list[Section]) -> str:
    """Self-contained: the figures are embedded."""
    return environment().get_template("report.html.j2").render(title=title, sections=sections)


def plot_variance(curve_csv: Path, k: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(curve_csv) as stream:
        rows = list(csv.DictReader(stream))
    components = [int(r["component"]) for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(components, [float(r["explained_variance"]) for r in rows], color="#9ab", label="per component")
    ax.plot(components, [float(r["cumulative_explained_variance"]) for r in rows], color="#c30", label="cumulative")
    ax.axvline(k, color="black", linestyle="--", label=f"k = {k}")
    ax.set_xlabel("component")
    ax.set_ylabel("explained variance share")
    ax.set_ylim(0, 1.02)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_scatter(points: list[tuple[float, float, str]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({p[2] for p in points})
    colours = plt.get_cmap("tab20")
    fig, ax = plt.subplots(figsize=(7, 5))
    for i, label in enumerate(labels):
        xs = [p[0] for p in points if p[2] == label]
        ys = [p[1] for p in points if p[2] == label]
        ax.scatter(xs, ys, s=12, color=colours(i % 20), label=label)
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
