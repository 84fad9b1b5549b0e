"""`mnres predict --report`: one self-contained HTML page, checked as HTML and in a browser."""

import html.parser
import os
import re
import shutil
import subprocess

import numpy as np
import pytest

from mnres import run_folder
from mnres.__main__ import main
from mnres.data import sample
from mnres.deploy import commands, slide_report
from mnres.weights import shipped

BROWSER_PACKAGE = "chromium"  # Debian's package; .ci/run installs it


class _Collect(html.parser.HTMLParser):
    """Every URL-bearing attribute, the style text, and the ids and classes of the page."""

    def __init__(self):
        super().__init__()
        self.urls, self.styles, self.ids, self.overlays, self.in_style = [], [], set(), 0, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        for name in ("src", "href", "srcset", "action", "poster", "data"):
            if name in attrs and attrs[name] is not None:
                self.urls.append(attrs[name])
        if "style" in attrs:
            self.styles.append(attrs["style"])
        if "id" in attrs:
            self.ids.add(attrs["id"])
        self.overlays += tag == "img" and attrs.get("class") == "overlay"
        self.in_style = tag == "style"

    def handle_data(self, data):
        if self.in_style:
            self.styles.append(data)

    def handle_endtag(self, tag):
        self.in_style = False


@pytest.fixture(scope="module")
def sample_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("report") / "report.html"
    assert main(["predict", "--sample", "--quiet", "--json", "--report", str(path)]) == 0
    return path


def _flagged_count():
    from mnres.data.folders import slide_id

    counts = {}
    for p in sample.sample_cells():
        counts[slide_id(p)] = counts.get(slide_id(p), 0) + 1
    return sum(min(n, slide_report.MAX_FLAGGED) for n in counts.values())


def test_the_page_references_nothing_outside_itself(sample_report):
    page = _Collect()
    page.feed(sample_report.read_text())
    assert page.urls and all(u.startswith("data:") or u.startswith("#") for u in page.urls), [
        u[:40] for u in page.urls if not u.startswith(("data:", "#"))]  # fmt: skip
    assert not any(re.search(r"url\s*\(", s) for s in page.styles)
    assert "<script" not in sample_report.read_text().lower()
    assert {"slides", "unreadable", "misclassified"} <= page.ids
    # The shipped model has feature maps: one overlay per flagged crop.
    assert page.overlays == _flagged_count()
    assert sample_report.stat().st_size < 20e6


def test_names_and_errors_are_escaped(tmp_path):
    cells = tmp_path / "cells"
    cells.mkdir()
    evil = "<img src=x onerror=alert(1)>.png"
    shutil.copy(sorted(sample.sample_cells())[0], cells / evil)
    (cells / "<b>broken.png").write_bytes(b"not an image")
    path = tmp_path / "r.html"
    assert main(["predict", str(cells), "--quiet", "--report", str(path)]) == 0
    text = path.read_text()
    assert "<img src=x onerror" not in text and "&lt;img src=x onerror=alert(1)&gt;" in text
    assert "<b>broken" not in text and "&lt;b&gt;broken.png" in text


def test_a_report_into_a_missing_folder_is_refused_before_any_crop_is_read(tmp_path, capsys):
    page = tmp_path / "no_such_folder" / "r.html"
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--sample", "--quiet", "--report", str(page)])
    assert exit_info.value.code == 2
    err = capsys.readouterr()
    assert f"no folder {page.parent} to write it in" in err.err and not err.out


def test_a_report_into_a_folder_that_cannot_be_written_is_refused_before_any_crop_is_read(
    tmp_path, capsys, monkeypatch
):
    def no_write(dir):  # the tests run as root, which writes anywhere: the refusal is faked
        raise PermissionError(13, "Permission denied")

    def no_crops(args):
        raise AssertionError("the crops were read before the report's folder was checked")

    monkeypatch.setattr(commands.tempfile, "TemporaryFile", no_write)
    monkeypatch.setattr(commands, "_model_and_images", no_crops)
    page = tmp_path / "r.html"
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--sample", "--quiet", "--report", str(page)])
    assert exit_info.value.code == 2
    err = capsys.readouterr()
    assert (
        f"cannot write --report {page} to {tmp_path} (Permission denied): "
        "give --report a path in a folder that can be written"
    ) in err.err
    assert not err.out and not page.exists()


def test_a_model_without_feature_maps_gives_a_report_that_says_why():
    row = {"file": "a/C1_thinF_cell_1.png", "slide_id": "C1", "label": "parasitized",
           "prob_parasitized": 0.9, "error": None}  # fmt: skip
    out = {"model": "m.tflite", "threshold": 0.5, "images": [row], "verdict_rule": None,
           "slides": [{"slide_id": "C1", "cells": 1, "called": 1, "verdict": None}]}  # fmt: skip
    text = slide_report.render(out, version="x", read_crop=lambda p: np.zeros((8, 8, 3), np.uint8),
                               why_no_maps="a tflite file holds no feature maps")  # fmt: skip
    assert "No Grad-CAM overlays: a tflite file holds no feature maps" in text
    assert 'class="overlay"' not in text and 'class="cell"' in text


def test_the_maps_are_called_an_ensembles_only_when_an_ensemble_ships(sample_report):
    import mnres

    note = sample_report.read_text().split("Heat maps:", 1)[1].split("</p>", 1)[0]
    ensemble = hasattr(mnres.load_pretrained("malaria").model, "members")
    assert ("the mean of the ensemble members" in note) == ensemble


def _browser():
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if os.environ.get("CI") == "true":
        pytest.fail(f"no browser: CI installs Debian's {BROWSER_PACKAGE} package (.ci/run)")
    pytest.skip(f"no browser: apt-get install {BROWSER_PACKAGE} to render the report")


def test_the_legend_names_the_lines_the_histograms_draw():
    row = {"file": "a/C1_thinF_cell_1.png", "slide_id": "C1", "label": "parasitized",
           "prob_parasitized": 0.9, "error": None}  # fmt: skip
    slide = {"slide_id": "C1", "cells": 1, "called": 1, "verdict": None}
    for q, lines, orange in ((None, 1, False), (0.5, 1, False), (0.8, 2, True)):
        record = None
        if q is not None:  # the shipped rule with this q
            record = run_folder.read_json(shipped.shipped_folder() / run_folder.VERDICT_RULE_JSON)
            record["rule"]["q"] = q
        assert slide_report.histogram_svg([0.9], 0.5, q).count("<line") == lines
        out = {"model": "m", "threshold": 0.5, "images": [row], "verdict_rule": record,
               "slides": [slide]}  # fmt: skip
        note = slide_report.render(out, version="x", read_crop=lambda p: np.zeros((8, 8, 3)),
                                   why_no_maps="none")  # fmt: skip
        assert ("orange: the rule's q" in note) == orange, q
        assert ("also the rule's q" in note) == (q == 0.5), q


def test_the_report_renders_in_a_browser(sample_report, tmp_path):
    browser = _browser()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    url = sample_report.as_uri()
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True,
                         timeout=120).stdout  # fmt: skip
    page = _Collect()
    page.feed(dom)
    assert {"slides", "unreadable", "misclassified"} <= page.ids
    assert page.overlays == _flagged_count()
    shot = tmp_path / "shot.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1100,1400", url],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("L"))
    assert (pixels < 240).mean() > 0.05  # a substantial share is not background


def test_the_page_shows_at_most_max_shown_crops_in_all():
    rows = [
        {
            "file": f"C{i}_thinF_cell_1.png",
            "slide_id": f"C{i}",
            "label": "parasitized",
            "prob_parasitized": 0.9,
            "error": None,
        }
        for i in range(slide_report.MAX_SHOWN + 50)
    ]
    out = {"model": "m", "threshold": 0.5, "images": rows, "verdict_rule": None,
           "slides": [{"slide_id": r["slide_id"], "cells": 1, "called": 1, "verdict": None}
                      for r in rows]}  # fmt: skip
    text = slide_report.render(out, version="x", read_crop=lambda p: np.zeros((8, 8, 3), np.uint8),
                               explain=lambda images: np.zeros(images.shape[:3]))  # fmt: skip
    assert text.count('class="overlay"') == slide_report.MAX_SHOWN
    assert "crops not shown: the page shows" in text
