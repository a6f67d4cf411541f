"""The Open Clip Art retrieval set: drawings from Debian's package with their authors' titles and keywords."""

import io
import json
import tarfile

from PIL import Image

from data_prep.openclipart import caption, prepare_openclipart

SVG = """<svg xmlns="http://www.w3.org/2000/svg" xmlns:dc="http://purl.org/dc/elements/1.1/"
 xmlns:cc="{cc}" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#" width="10" height="10">
 <metadata><rdf:RDF><cc:Work rdf:about=""><dc:title>{title}</dc:title>
 <dc:subject><rdf:Bag><rdf:li>jane doe</rdf:li><rdf:li>animal</rdf:li><rdf:li>cat</rdf:li></rdf:Bag></dc:subject>
 <dc:creator><cc:Agent><dc:title>Jane Doe</dc:title></cc:Agent></dc:creator></cc:Work></rdf:RDF></metadata>
 <rect width="10" height="10" fill="red"/></svg>"""


def test_caption_is_the_title_and_keywords_without_the_author(tmp_path):
    for cc in ("http://web.resource.org/cc/", "http://creativecommons.org/ns#"):  # both namespaces in use
        path = tmp_path / "cat.svg"
        path.write_text(SVG.format(cc=cc, title="Sleeping cat"))
        assert caption(path) == "Sleeping cat: animal, cat"
    path.write_text(SVG.format(cc=cc, title="Open Clip Art Library"))
    assert caption(path) is None  # no title of its own
    path.write_text("<svg><unclosed")
    assert caption(path) is None


def test_prepared_set(tmp_path):
    summary = prepare_openclipart(tmp_path, limit=60, size=48, seed=1)
    stats = json.loads((tmp_path / "train" / "_stats.json").read_text())
    assert (
        sum(summary["train"].values())
        + sum(summary["test"].values())
        + sum(r["reason"] == "rsvg-convert could not render it" for r in stats["rejected_inputs"])
        == 60
    )
    classes = (tmp_path / "classnames.txt").read_text().splitlines()
    assert len(classes) == summary["classes"] and "animals" in classes
    keys = {}
    for split, first_shard in (("train", "000000.tar"), ("test", "0.tar")):  # test/: CLIP_benchmark's names
        with tarfile.open(tmp_path / split / first_shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                keys.setdefault(split, {}).setdefault(key, {})[ext] = tar.extractfile(member).read()
    assert not set(keys["train"]) & set(keys["test"])
    for fields in list(keys["test"].values())[:5]:
        assert Image.open(io.BytesIO(fields["png"])).size == (48, 48)
        assert fields["txt"].decode().strip() and 0 <= int(fields["cls"]) < len(classes)
