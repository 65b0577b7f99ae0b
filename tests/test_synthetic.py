import json

import pytest

from captioning.data.sources import read_karpathy_json
from captioning.data.synthetic import COLORS, SHAPES, ShapesConfig, fully_correct, generate, objects_correct


def _overlap(a, b):
    return not (a[2] < b[0] or b[2] < a[0] or a[3] < b[1] or b[3] < a[1])


def test_karpathy_format_and_scene_content(tiny_shapes):
    data = json.loads(tiny_shapes.read_text())
    assert {im["split"] for im in data["images"]} == {"train", "val", "test"}
    for im in data["images"]:
        assert {"filename", "filepath", "split", "imgid", "sentids", "sentences", "objects"} <= im.keys()
        assert len(im["sentences"]) == 5 and len({s["raw"] for s in im["sentences"]}) == 5
        assert all(s["tokens"] and s["raw"] for s in im["sentences"])
        objs = im["objects"]
        assert 1 <= len(objs) <= 3
        assert all(o["shape"] in SHAPES and o["color"] in COLORS and o["size"] in ("small", "large") for o in objs)
        assert not any(_overlap(a["box"], b["box"]) for i, a in enumerate(objs) for b in objs[i + 1 :])
        assert (tiny_shapes.parent / im["filepath"] / im["filename"]).is_file()


def test_every_reference_caption_parses_as_fully_correct(tiny_shapes):
    """The metrics' caption grammar agrees with the generator on every template."""
    for r in read_karpathy_json(tiny_shapes):
        for toks in r.tokens:
            assert objects_correct(toks, r.objects), toks
            assert fully_correct(toks, r.objects), toks


def test_wrong_captions_are_not_counted_correct(tiny_shapes):
    recs = [r for r in read_karpathy_json(tiny_shapes) if len(r.objects) == 2]
    r = recs[0]
    left, right = r.objects
    phrase = lambda o: f"{o['size']} {o['color']} {o['shape']}"
    swapped = f"a {phrase(right)} to the left of a {phrase(left)}"
    assert objects_correct(swapped.split(), r.objects)
    if (left["size"], left["color"], left["shape"]) != (right["size"], right["color"], right["shape"]):
        assert not fully_correct(swapped.split(), r.objects)
    assert not objects_correct(["a", "small", "red", "circle"] * 3, r.objects)


def test_generation_is_seeded_and_only_reruns_on_parameter_change(tmp_path):
    cfg = ShapesConfig(num_train=6, num_val=2, num_test=2, seed=3)
    a = generate(tmp_path / "a", cfg, progress=False)
    b = generate(tmp_path / "b", cfg, progress=False)
    assert json.loads(a.read_text())["images"] == json.loads(b.read_text())["images"]
    assert (a.parent / "images" / "000000.png").read_bytes() == (b.parent / "images" / "000000.png").read_bytes()
    mtime = a.stat().st_mtime_ns
    generate(tmp_path / "a", cfg, progress=False)
    assert a.stat().st_mtime_ns == mtime  # same parameters: not regenerated
    generate(tmp_path / "a", ShapesConfig(num_train=7, num_val=2, num_test=2, seed=3), progress=False)
    assert len(json.loads(a.read_text())["images"]) == 11


def test_generation_never_replaces_a_folder_that_holds_other_files(tmp_path, monkeypatch):
    """Generating replaces its folder: a data_dir holding anything but an earlier shapes set is refused,
    untouched, instead of deleted (e.g. --data.data_dir data, next to COCO downloads, or '.')."""
    cfg = ShapesConfig(num_train=2, num_val=1, num_test=1, seed=3)
    mine = tmp_path / "data"
    (mine / "coco").mkdir(parents=True)
    (mine / "coco" / "dataset_coco.json").write_text("{}")
    with pytest.raises(ValueError, match=r"data: refusing to generate the shapes set here.*coco"):
        generate(mine, cfg, progress=False)
    assert (mine / "coco" / "dataset_coco.json").read_text() == "{}"
    monkeypatch.chdir(mine)
    with pytest.raises(ValueError, match="refusing"):
        generate(".", cfg, progress=False)
    assert (mine / "coco" / "dataset_coco.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["data"]  # no temporary folder left beside it
    # an empty folder, or an earlier shapes set, is replaced as before; a killed run's leftovers go
    (tmp_path / "empty").mkdir()
    (tmp_path / ".empty.tmp-999999999").mkdir()  # no such process
    assert generate(tmp_path / "empty", cfg, progress=False).is_file()
    assert not (tmp_path / ".empty.tmp-999999999").exists()
    generate(tmp_path / "empty", ShapesConfig(num_train=3, num_val=1, num_test=1, seed=3), progress=False)
    assert len(list((tmp_path / "empty" / "images").iterdir())) == 5
