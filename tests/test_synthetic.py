import json
import os
import subprocess
import sys
import textwrap
import threading

import pytest

from captioning.data import synthetic
from captioning.data.sources import read_karpathy_json
from captioning.data.synthetic import COLORS, SHAPES, ShapesConfig, fully_correct, generate, objects_correct

from conftest import ROOT


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
    # and the seed is what decides them: another seed draws other scenes
    c = generate(tmp_path / "c", ShapesConfig(num_train=6, num_val=2, num_test=2, seed=4), progress=False)
    assert json.loads(c.read_text())["images"] != json.loads(a.read_text())["images"]
    assert (c.parent / "images" / "000000.png").read_bytes() != (a.parent / "images" / "000000.png").read_bytes()
    mtime = a.stat().st_mtime_ns
    generate(tmp_path / "a", cfg, progress=False)
    assert a.stat().st_mtime_ns == mtime  # same parameters: not regenerated
    generate(tmp_path / "a", ShapesConfig(num_train=7, num_val=2, num_test=2, seed=3), progress=False)
    assert len(json.loads(a.read_text())["images"]) == 11


def test_a_set_with_an_image_deleted_is_generated_again(tmp_path):
    """Same parameters but a deleted image: the set was taken as complete, and the run stopped at the data check
    asking whether data.image_root was right."""
    cfg = ShapesConfig(num_train=6, num_val=2, num_test=2, seed=3)
    json_path = generate(tmp_path / "a", cfg, progress=False)
    image = json_path.parent / "images" / "000003.png"
    want = image.read_bytes()
    image.unlink()
    assert generate(tmp_path / "a", cfg, progress=False) == json_path
    assert image.read_bytes() == want


def test_the_size_of_one_split_does_not_change_the_scenes_of_the_others(tmp_path):
    """Each split draws from its own seeded stream: a run with more training images is scored on the
    same validation and test images (a single stream over train, val, test made them other scenes)."""

    def scenes(root, **sizes):
        json_path = generate(root, ShapesConfig(seed=3, **sizes), progress=False)
        by_split = {}
        for im in json.loads(json_path.read_text())["images"]:
            pixels = (root / im["filepath"] / im["filename"]).read_bytes()
            by_split.setdefault(im["split"], []).append((im["objects"], [s["raw"] for s in im["sentences"]], pixels))
        return by_split

    small = scenes(tmp_path / "small", num_train=4, num_val=3, num_test=3)
    more_train = scenes(tmp_path / "more_train", num_train=9, num_val=3, num_test=3)
    more_val = scenes(tmp_path / "more_val", num_train=4, num_val=5, num_test=3)
    assert more_train["val"] == small["val"] and more_train["test"] == small["test"]
    assert more_train["train"][:4] == small["train"]  # a larger split extends the smaller one
    assert more_val["train"] == small["train"] and more_val["test"] == small["test"]
    assert more_val["val"][:3] == small["val"]
    assert small["val"] != small["test"]  # the streams differ between splits


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
    # also beside a folder whose name holds glob characters (a pattern of it matched nothing)
    (tmp_path / ".shapes[64].tmp-999999999").mkdir()
    assert generate(tmp_path / "shapes[64]", cfg, progress=False).is_file()
    assert not (tmp_path / ".shapes[64].tmp-999999999").exists()


def _generate_in_subprocess(root, cfg: ShapesConfig, **popen) -> subprocess.Popen:
    """Another process calling generate(root, cfg); it prints how many scenes it drew, and its error if any."""
    script = textwrap.dedent(
        f"""
        from captioning.data import synthetic
        drawn = []
        make_scene = synthetic.make_scene
        synthetic.make_scene = lambda *a: drawn.append(1) or make_scene(*a)
        try:
            synthetic.generate({str(root)!r}, synthetic.{cfg!r}, progress=False)
        except (RuntimeError, ValueError) as e:
            print(type(e).__name__ + ":", e, "(after", len(drawn), "scenes)", flush=True)
        else:
            print("drew", len(drawn), "scenes", flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env, **popen)


def _contents(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_set_is_not_replaced_while_another_process_reads_it(tmp_path):
    """This process reads a set; another asks for other parameters in the same folder: it is refused,
    naming the folder and why, instead of deleting and redrawing the images under this reader."""
    root = tmp_path / "shapes"
    generate(root, ShapesConfig(num_train=4, num_val=1, num_test=1, seed=3), progress=False)
    before = _contents(root)
    other = _generate_in_subprocess(root, ShapesConfig(num_train=5, num_val=1, num_test=1, seed=4))
    out, _ = other.communicate(timeout=120)
    # an InputError: one line from train.py (a RuntimeError was a 50-line traceback)
    assert out.startswith(f"InputError: {root.resolve()}: holds a shapes set with other parameters that another runn")
    assert out.endswith("(after 0 scenes)\n")  # refused before drawing anything
    assert _contents(root) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shapes.lock", "shapes"]  # no temporary folder left


def test_concurrent_generations_of_one_set_wait_for_one_instead_of_replacing_it(tmp_path, monkeypatch):
    """A generation is under way (held mid-scene here) when a second process asks for the same set: it
    says it waits, then reads the finished set without drawing a scene or touching a file."""
    root, cfg = tmp_path / "shapes", ShapesConfig(num_train=4, num_val=1, num_test=1, seed=3)
    started, resume = threading.Event(), threading.Event()
    make_scene = synthetic.make_scene

    def paused_scene(*args):
        started.set()
        assert resume.wait(timeout=120)
        return make_scene(*args)

    monkeypatch.setattr(synthetic, "make_scene", paused_scene)
    first = threading.Thread(target=generate, args=(root, cfg), kwargs={"progress": False})
    first.start()
    second = None
    try:
        assert started.wait(timeout=120)
        second = _generate_in_subprocess(root, cfg)
        said = second.stdout.readline()  # the first thing it says, whatever happens
    finally:
        resume.set()
        first.join()
    written = _contents(root)
    rest, _ = second.communicate(timeout=120)
    assert said.startswith(f"shapes set: waiting for another process generating {root.resolve()}")
    assert rest == "drew 0 scenes\n"
    assert _contents(root) == written and len(json.loads((root / "dataset_shapes.json").read_text())["images"]) == 6


def test_from_the_smallest_size_allowed_every_object_is_drawn_and_its_size_word_can_be_read_off_it(tmp_path):
    """Down to 6 px were allowed: up to 24 px small and large objects shared widths (a size word the image could not
    back), and at 6-7 px a small circle could be 0 px wide, named in every caption but drawn with no pixel."""
    import random

    import numpy as np

    for size in range(synthetic.MIN_SHAPES_SIZE, 70):
        rng = random.Random(size)
        widths = {"small": set(), "large": set()}
        for _ in range(30):
            image, objects = synthetic.make_scene(rng, size, noise_std=0.0)
            pixels = np.asarray(image, dtype=np.int16)
            background = pixels[0, 0]
            for o in objects:
                x0, y0, x1, y1 = o["box"]
                widths[o["size"]].add(x1 - x0)
                drawn = np.abs(pixels[y0 : y1 + 1, x0 : x1 + 1] - background).sum(-1) > 30
                assert drawn.any(), (size, o)
        assert max(widths["small"]) < min(widths["large"]), (size, widths)
    with pytest.raises(ValueError, match=f"at least {synthetic.MIN_SHAPES_SIZE}, got 24"):
        generate(tmp_path / "shapes", ShapesConfig(image_size=24), progress=False)
    assert not (tmp_path / "shapes").exists()


def test_a_set_that_cannot_be_written_says_where_and_leaves_nothing(tmp_path, monkeypatch):
    """On a full disk PIL's write error named no file: the run ended in a traceback ending 'No space left on
    device'. It now names the set's folder (train.py prints such an OSError as one line)."""
    import errno

    from PIL import Image

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    with pytest.raises(OSError) as info:
        generate(tmp_path / "shapes", ShapesConfig(num_train=2, num_val=1, num_test=1), progress=False)
    assert info.value.filename == str((tmp_path / "shapes").resolve()) and info.value.errno == errno.ENOSPC
    assert "the shapes set was not written" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".shapes.lock"]  # the temporary folder removed
