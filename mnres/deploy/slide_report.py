"""A slide report a person checks by eye: `mnres predict ... --report report.html`.

One self-contained HTML page: styles inline, every image a `data:` URI, no script, font or
image fetched from anywhere, so it opens offline and can be mailed. It shows the verdicts with
their evidence, a histogram of each slide's P(parasitized), each slide's most suspicious crops
beside their Grad-CAM overlay (`mnres.reporting.gradcam`: where the model looked; an
ensemble's is the mean of its members' maps), the crops
that could not be read, and, for crops in class folders, the misclassified ones. Every file
name and error text is HTML-escaped. The page is bounded: at most `MAX_FLAGGED` crops a slide
and `MAX_SHOWN` in all with their overlays, `MAX_MISCLASSIFIED` of each kind, each crop at its
own size (64 px for the shipped model), shown at THUMB pixels.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import os

import numpy as np

MAX_FLAGGED = 8  # the most suspicious crops shown per slide
MAX_SHOWN = 400  # crops shown with an overlay in all, slide by slide: the page stays small
MAX_MISCLASSIFIED = 24  # per kind: uninfected called parasitized, and the reverse
THUMB = 96  # pixels on a side of a shown crop
BINS = 20

_STYLE = """
body{font-family:sans-serif;margin:1.5em;color:#222;max-width:1100px}
h1{font-size:1.4em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse}td,th{padding:2px 8px;text-align:left;font-size:.9em}
.slide{border:1px solid #ddd;padding:.6em;margin:.8em 0}
.infected{color:#b00020;font-weight:bold}.not-infected{color:#1b5e20;font-weight:bold}
.insufficient{color:#666;font-weight:bold}
.crop{display:inline-block;margin:4px;text-align:center;font-size:.75em;width:196px;
vertical-align:top;word-break:break-all}
.crop img{display:inline-block}
.crop img{image-rendering:pixelated}.note{color:#555;font-size:.9em}
"""


def _png(image: np.ndarray) -> str:
    """A `data:` URI of a uint8 [H, W, 3] crop as a PNG at its own size (the page scales it)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buffer, format="PNG", compress_level=6)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The crop with its heat map blended over it (jet, half and half), uint8 [S, S, 3]."""
    from matplotlib import colormaps

    colour = colormaps["jet"](np.clip(heat, 0.0, 1.0))[..., :3] * 255.0
    return (0.5 * image + 0.5 * colour).astype(np.uint8)


def histogram_svg(probs, threshold: float, q: float | None) -> str:
    """An inline SVG histogram of P(parasitized) in BINS bins, the threshold drawn (and q)."""
    width, height = 200, 50
    counts, _ = np.histogram(np.asarray(probs, np.float64), bins=BINS, range=(0.0, 1.0))
    top = max(int(counts.max()), 1)
    bar = width / BINS
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + 12}" '
             'role="img" aria-label="histogram of P(parasitized)">']  # fmt: skip
    for i, c in enumerate(counts):
        h = height * c / top
        parts.append(f'<rect x="{i * bar:.1f}" y="{height - h:.1f}" width="{bar - 1:.1f}" '
                     f'height="{h:.1f}" fill="#5c6bc0"/>')  # fmt: skip
    lines = [(threshold, "#b00020")] + ([(q, "#ef6c00")] if q not in (None, threshold) else [])
    for value, colour in lines:
        x = width * value
        parts.append(f'<line x1="{x:.1f}" y1="0" x2="{x:.1f}" y2="{height}" '
                     f'stroke="{colour}" stroke-width="1.5"/>')  # fmt: skip
    y = height + 11
    parts.append(f'<text x="0" y="{y}" font-size="9">0</text>'
                 f'<text x="{width - 6}" y="{y}" font-size="9">1</text></svg>')  # fmt: skip
    return "".join(parts)


def _crop_figure(image_uri: str, caption: str, overlay_uri: str | None = None) -> str:
    heat = ""
    if overlay_uri is not None:
        heat = f'<img class="overlay" src="{overlay_uri}" alt="Grad-CAM" width="{THUMB}">'
    return (f'<div class="crop"><img class="cell" src="{image_uri}" alt="crop" width="{THUMB}">'
            f"{heat}{caption}</div>")  # fmt: skip


def _legend(threshold: float, q: float | None) -> str:
    """What the histogram's lines are: the cell threshold, and the rule's q where it is another
    value (the fraction rule's q is the threshold itself: one line)."""
    if q is None:
        return "red line: the cell threshold"
    if q == threshold:
        return "red line: the cell threshold, which is also the rule's q"
    return "red line: the cell threshold, orange: the rule's q"


def render(out: dict, *, version: str, read_crop, explain=None, why_no_maps: str | None = None,
           maps_of: str = "", truths=None) -> str:  # fmt: skip
    """The page, from predict's output (`out`: its JSON) and the crops.

    Args:
      out: what `mnres predict --json` prints (model, threshold, images, slides, verdict_rule).
      version: the mnres version.
      read_crop: path -> uint8 [S, S, 3] crop at the model's size.
      explain: uint8 crops [N, S, S, 3] -> heat maps [N, S, S] in [0, 1]; None: no overlays.
      why_no_maps: the one line saying why there are no overlays (with explain None).
      maps_of: what a map is of, beyond one network's own (e.g. an ensemble's mean map).
      truths: per image row, 1 / 0 for a crop in a Parasitized/ or Uninfected/ folder, else None.
    """
    from mnres.deploy import crops as crops_lib
    from mnres.deploy import slides as slides_lib
    from mnres.deploy.predict import shown_path

    esc = lambda text: html.escape(str(text), quote=True)  # noqa: E731
    rows, threshold = out["images"], out["threshold"]
    read = [r for r in rows if r["error"] is None and r.get("prob_parasitized") is not None]
    unreadable = [r for r in rows if r["error"] is not None]
    record = out.get("verdict_rule")
    q = record["rule"]["q"] if record else None
    flagged = []  # (slide, row) of the crops shown with an overlay
    by_slide = {}
    for r in read:
        if r["slide_id"]:
            by_slide.setdefault(r["slide_id"], []).append(r)
    for slide, members in sorted(by_slide.items()):
        members.sort(key=lambda r: -r["prob_parasitized"])
        flagged += [(slide, r) for r in members[: min(MAX_FLAGGED, MAX_SHOWN - len(flagged))]]
    images = {id(r): read_crop(r["file"]) for _, r in flagged}
    heat = {}
    if explain is not None and flagged:
        maps = explain(np.stack([images[id(r)] for _, r in flagged]))
        heat = {id(r): m for (_, r), m in zip(flagged, maps, strict=True)}

    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    rule = slides_lib.describe(record) if record else "none stored with the model: no verdicts"
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<title>mnres slide report</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>mnres slide report</h1>",
        "<table class='header'>",
        f"<tr><th>model</th><td>{esc(out['model'])}</td></tr>",
        f"<tr><th>mnres</th><td>{esc(version)}</td></tr>",
        f"<tr><th>cell call</th><td>parasitized iff p &gt;= {threshold:.4g}</td></tr>",
        f"<tr><th>slide verdict</th><td>{esc(rule)}</td></tr>",
        f"<tr><th>date</th><td>{now}</td></tr>",
        f"<tr><th>crops</th><td>{len(read)} read, {len(unreadable)} could not be</td></tr>",
        "</table>",
        "<p class='note'>Not a diagnostic device. Heat maps: Grad-CAM of P(parasitized)"
        + (f", {esc(maps_of)}" if explain is not None and maps_of else "")
        + f"; {_legend(threshold, q)}.</p>",  # fmt: skip
    ]
    if explain is None:
        parts.append(f"<p class='note'>No Grad-CAM overlays: {esc(why_no_maps or '')}</p>")
    parts.append("<h2 id='slides'>Slides</h2>")
    slides = out.get("slides") or []
    if not slides:
        parts.append("<p>No slides: no crop carries a slide id (--group-by).</p>")
    for s in slides:
        verdict = s.get("verdict") or "no verdict"
        members = by_slide.get(s["slide_id"], [])
        parts.append(f"<div class='slide' id='slide-{esc(s['slide_id'])}'>")
        parts.append(f"<h3>{esc(s['slide_id'])}: <span class='{verdict.replace(' ', '-')}'>"
                     f"{esc(verdict)}</span></h3>")  # fmt: skip
        if s.get("verdict") is not None:
            parts.append(
                f"<p>{s['cells']} crop(s), {s['called']} called parasitized, {s['confident']} with "
                f"p &gt;= {q:g}; estimated parasitized fraction {s['estimate']:.3f} (95% CI "
                f"{s['estimate_low']:.3f}-{s['estimate_high']:.3f})"
                + (f"; {esc(s['reason'])}" if s.get("reason") else "") + "</p>")  # fmt: skip
        else:
            parts.append(f"<p>{s['cells']} crop(s), {s['called']} called parasitized</p>")
        parts.append(histogram_svg([r["prob_parasitized"] for r in members], threshold, q))
        parts.append("<div class='flagged'>")
        shown = [r for r in members[:MAX_FLAGGED] if id(r) in images]
        if len(shown) < min(len(members), MAX_FLAGGED):
            parts.append(f"<p class='note'>crops not shown: the page shows {MAX_SHOWN} in all</p>")
        for r in shown:
            uri = _png(images[id(r)])
            over = _png(overlay(images[id(r)], heat[id(r)])) if id(r) in heat else None
            caption = f"p = {r['prob_parasitized']:.3f}<br>{esc(os.path.basename(r['file']))}"
            parts.append(_crop_figure(uri, caption, over))
        parts.append("</div></div>")
    parts.append("<h2 id='unreadable'>Crops that could not be read</h2>")
    if unreadable:
        parts.append("<table>" + "".join(
            f"<tr><td>{esc(crops_lib.printable(shown_path(r['file'])))}</td>"
            f"<td>{esc(r['error'])}</td></tr>" for r in unreadable) + "</table>")  # fmt: skip
    else:
        parts.append("<p>None.</p>")
    if truths is not None and any(t is not None for t in truths):
        parts += _misclassified(rows, truths, threshold, read_crop, esc)
    parts.append("</body></html>")
    return "\n".join(parts)


def _misclassified(rows, truths, threshold, read_crop, esc) -> list[str]:
    known = [(r, t) for r, t in zip(rows, truths, strict=True)
             if t is not None and r["error"] is None]  # fmt: skip
    right = sum(int(r["prob_parasitized"] >= threshold) == t for r, t in known)
    accuracy = f"{100 * right / len(known):.1f}% ({right} of {len(known)})"
    parts = ["<h2 id='misclassified'>Crops in class folders</h2>", f"<p>Accuracy {accuracy}.</p>"]
    for truth, title in ((0, "Uninfected crops called parasitized"),
                         (1, "Parasitized crops called uninfected")):  # fmt: skip
        wrong = [r for r, t in known if t == truth and int(r["prob_parasitized"] >= threshold) != t]
        wrong.sort(key=lambda r: abs(r["prob_parasitized"] - threshold), reverse=True)
        parts.append(f"<h3>{title}: {len(wrong)}</h3><div>")
        for r in wrong[:MAX_MISCLASSIFIED]:
            caption = f"p = {r['prob_parasitized']:.3f}<br>{esc(os.path.basename(r['file']))}"
            parts.append(_crop_figure(_png(read_crop(r["file"])), caption))
        if len(wrong) > MAX_MISCLASSIFIED:
            parts.append(f"<p class='note'>the {MAX_MISCLASSIFIED} most confident shown</p>")
        parts.append("</div>")
    return parts
