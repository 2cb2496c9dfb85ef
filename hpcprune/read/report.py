"""`hpcprune report`: one self-contained HTML page with a run's summary and figures.

    hpcprune report runs/quickstart.h5 --out runs/quickstart.html

The page needs nothing but a browser: the figures are PNGs embedded as base64 data URIs, the style
is inline, and there is no script. Its tables are the ones `hpcprune inspect` prints (summary, and
the last round's layers with their score statistics, and a block-sequential run's evaluation and
blocks); its figures are `hpcprune inspect plot`'s.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from hpcprune.archive.atomic import refuse_existing, replace_atomically
from hpcprune.archive.reader import open_archive, refuse_writing_over
from hpcprune.read.plots import figures
from hpcprune.read.sequential_summary import render_sequential
from hpcprune.read.summary import (
    event_table,
    layer_table,
    layers,
    number,
    percent,
    round_table,
    score_verdict,
    summary,
    table,
)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1250px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { padding: 0.25em 0.7em; white-space: nowrap; border-bottom: 1px solid #e4e4e4; text-align: right; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2em 1em; } dt { font-weight: 600; }
figure { margin: 1.2em 0; } img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.9em; color: #555; } .note { color: #8a4b00; }
"""


def write_report(path: str | Path, out: str | Path, *, force: bool = False) -> dict[str, Any]:
    """Write the report page of archive `path` to `out`; returns what went into it."""
    refuse_writing_over(open_archive(path), out)
    refuse_existing(out, force)
    facts = summary(path)
    last = layers(path) if facts["rounds"] else None
    drawn = figures(path)
    try:
        images = {name: _png_data_uri(figure) for name, figure in drawn.figures.items()}
    finally:
        drawn.close()
    page = _page(facts, last, images, drawn.skipped)
    with replace_atomically(Path(out)) as temporary:
        temporary.write_text(page, encoding="utf-8")
    return {"archive": str(path), "out": str(out), "figures": list(images), "skipped": drawn.skipped}


def _png_data_uri(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _page(facts: dict[str, Any], last: dict[str, Any] | None, images: dict[str, str], skipped: dict[str, str]) -> str:
    name = Path(facts["path"]).name
    dense = facts["dense"]
    provenance = {
        "archive": f"{facts['path']} (format {facts['format_version']})",
        "hpcprune": facts["hpcprune_version"],
        "world": f"{facts['world_size']} rank(s), {facts['backend']} backend, host {facts['host']}",
        "started": facts["started"], "finished": facts["finished"] or "not recorded",
        "resumes / interruptions": f"{facts['resumes']} / {facts['interruptions']}",
        "model": f"{facts['model']}, {facts['num_params']} parameters",
        "dense model": "not recorded" if dense is None else
        f"test accuracy {percent(dense['accuracy'])}, loss {number(dense['loss'])}",
        "config (not default)": " ".join(f"{key}={value}" for key, value in facts["config_changes"].items()) or "all defaults",
    }
    parts = [f"<h1>hpcprune run: {_text(name)}</h1>", "<h2>Provenance</h2><dl>"]
    parts += [f"<dt>{_text(key)}</dt><dd>{_text(value)}</dd>" for key, value in provenance.items()] + ["</dl>"]
    if facts["events"]:
        parts += ["<h2>Events</h2>", _html_table(*event_table(facts), {0, 1, 2})]
    parts.append("<h2>Rounds</h2>")
    parts.append(_html_table(*round_table(facts), {1, 2}) if facts["rounds"] else "<p>No complete round.</p>")
    if facts.get("sequential"):  # schedule sequential: perplexity (or cosine), dense and pruned; the blocks
        lines = render_sequential(facts["sequential"], table, percent, number)
        parts += ["<h2>Block by block</h2>", f"<pre>{_text(chr(10).join(lines))}</pre>"]
    if last is not None:
        parts.append(f"<h2>Layers of round {last['round']}</h2>")
        parts.append(_html_table(*layer_table(last["layers"]), {0, 1}))
        parts.append(f"<p>{_text(score_verdict(last))}</p>")
    parts.append("<h2>Figures</h2>")
    parts += [f'<figure><img src="{uri}" alt="{_text(title)}"><figcaption>{_text(title)}</figcaption></figure>'
              for title, uri in images.items()]
    parts += [f"<p class=note>{_text(title)} left out: {_text(reason)}</p>" for title, reason in skipped.items()]
    return (f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>hpcprune: {_text(name)}</title>"
            f"<style>{STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n")


def _html_table(header: list[str], rows: list[list[str]], text_columns: set[int]) -> str:
    def cells(tag: str, values: list[str]) -> str:
        return "".join(f"<{tag}{' class=text' if i in text_columns else ''}>{_text(v)}</{tag}>" for i, v in enumerate(values))

    return "<table><tr>" + cells("th", header) + "</tr>" + "".join(f"<tr>{cells('td', row)}</tr>" for row in rows) + "</table>"


def _text(value: Any) -> str:
    return html.escape(str(value))
