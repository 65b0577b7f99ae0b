"""The built-in synthetic "shapes" dataset: the default that trains with no downloads.

Each scene is a light, slightly noisy background with 1-3 non-overlapping objects (circle,
square, triangle; 5 colours; 2 sizes). Every image gets 5 reference captions drawn from varied
templates: single objects, spatial relations for two ("a small blue square to the left of a
large red circle"), left-to-right lists for three. Objects keep their shape, colour, size and
bounding box, so attention can be checked against where the objects really are.

The set is written once as PNG files plus a Karpathy-format JSON (with an extra ``objects`` list
per image), so training reads it through the same reader as COCO and Flickr. It is regenerated
only when its parameters change, never under another process reading it (see :func:`generate`).

This file also owns the shapes caption grammar: :func:`parse_caption` reads the objects and the
relation back out of a generated caption for the object / full accuracy metrics.
"""

from __future__ import annotations

import fcntl
import glob
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from captioning.data.tempfiles import file_lock, locked_temp, remove_orphans
from captioning.errors import InputError
from captioning.vocab import tokenize

SHAPES = ("circle", "square", "triangle")
COLORS = {
    "red": (215, 35, 35),
    "green": (30, 160, 50),
    "blue": (35, 75, 215),
    "yellow": (225, 185, 0),
    "purple": (135, 45, 175),
}
SIZES = ("small", "large")
#: 2: one random stream per split (1 drew train, val and test from one stream)
FORMAT_VERSION = 2
JSON_NAME = "dataset_shapes.json"

SINGLE_TEMPLATES = (
    "a {A}",
    "there is a {A}",
    "a {A} in the picture",
    "an image of a {A}",
    "one {A} on a light background",
    "a picture with a {A}",
)
# {L} is the left object, {R} the right one.
PAIR_TEMPLATES = (
    "a {L} to the left of a {R}",
    "a {R} to the right of a {L}",
    "a {L} left of a {R}",
    "a {R} right of a {L}",
    "a {L} on the left and a {R} on the right",
    "there is a {L} to the left of a {R}",
)
# Objects listed left to right.
TRIPLE_TEMPLATES = (
    "a {0} , a {1} and a {2}",
    "a {0} , a {1} and a {2} from left to right",
    "from left to right a {0} , a {1} and a {2}",
    "three shapes : a {0} , a {1} and a {2}",
    "there is a {0} , a {1} and a {2}",
    "a {0} , a {1} , and a {2}",
)


#: the smallest image whose scenes say what they draw: from 25 px every small object is narrower than every large
#: one (widths round(0.19 s) +- 1 against round(0.31 s) +- 1). Below, the two classes shared widths, so a caption's
#: size word could not be read off the image, and from 7 px down a small circle could be drawn with no pixel
MIN_SHAPES_SIZE = 25


@dataclass(frozen=True)
class ShapesConfig:
    """Parameters of the generated set; a change of any of them regenerates it."""

    num_train: int = 4000
    num_val: int = 500
    num_test: int = 500
    image_size: int = 64
    seed: int = 0
    noise_std: float = 6.0


def _phrase(obj: dict) -> str:
    return f"{obj['size']} {obj['color']} {obj['shape']}"


def _draw_object(draw: ImageDraw.ImageDraw, shape: str, box: list[int], rgb: tuple[int, int, int]) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=rgb)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=rgb)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=rgb)


def _overlaps(a: list[int], b: list[int], gap: int) -> bool:
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def make_scene(rng: random.Random, image_size: int, noise_std: float) -> tuple[Image.Image, list[dict]]:
    """Draw one scene; returns the RGB image and its objects sorted left to right."""
    s = image_size
    side = {"small": round(0.19 * s), "large": round(0.31 * s)}
    n = rng.choice((1, 2, 2, 3, 3))
    min_dx = round(0.12 * s)  # centres this far apart horizontally, so left/right is unambiguous
    while True:
        objects: list[dict] = []
        for _ in range(200):
            size = rng.choice(SIZES)
            w = side[size] + rng.randint(-1, 1)
            x0, y0 = rng.randint(1, s - w - 2), rng.randint(1, s - w - 2)
            box = [x0, y0, x0 + w, y0 + w]
            cx = x0 + w / 2
            if any(_overlaps(box, o["box"], 2) or abs(cx - (o["box"][0] + o["box"][2]) / 2) < min_dx for o in objects):
                continue
            objects.append({"shape": rng.choice(SHAPES), "color": rng.choice(list(COLORS)), "size": size, "box": box})
            if len(objects) == n:
                break
        if len(objects) == n:
            break
    bg = tuple(rng.randint(215, 245) for _ in range(3))
    img = Image.new("RGB", (s, s), bg)
    draw = ImageDraw.Draw(img)
    for o in objects:
        jitter = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in COLORS[o["color"]])
        _draw_object(draw, o["shape"], o["box"], jitter)
    arr = np.asarray(img, dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, noise_std, arr.shape)
    img = Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))
    objects.sort(key=lambda o: (o["box"][0] + o["box"][2]) / 2)
    return img, objects


def make_captions(rng: random.Random, objects: list[dict], k: int = 5) -> list[str]:
    """``k`` distinct captions for a scene whose ``objects`` are sorted left to right."""
    phrases = [_phrase(o) for o in objects]
    if len(objects) == 1:
        return [t.format(A=phrases[0]) for t in rng.sample(SINGLE_TEMPLATES, k)]
    if len(objects) == 2:
        return [t.format(L=phrases[0], R=phrases[1]) for t in rng.sample(PAIR_TEMPLATES, k)]
    return [t.format(*phrases) for t in rng.sample(TRIPLE_TEMPLATES, k)]


def _check_replaceable(root: Path) -> None:
    """Refuse to write the set over a folder that holds anything but an earlier shapes set (its JSON and
    ``images/``): generating replaces the whole folder, and must never delete a user's files."""
    if not root.exists():
        return
    if not root.is_dir():
        raise InputError(f"{root}: exists and is not a folder; the shapes set needs a folder of its own")
    entries = {p.name for p in root.iterdir()}
    if entries and not (JSON_NAME in entries and entries <= {JSON_NAME, "images"}):
        others = sorted(entries - {JSON_NAME, "images"}) or sorted(entries)
        raise InputError(
            f"{root}: refusing to generate the shapes set here: the folder holds other files ({', '.join(others[:5])}"
            f"{', ...' if len(others) > 5 else ''}) and generating replaces the whole folder; point data_dir at an "
            "empty or new folder, or at an earlier shapes set"
        )


def _write_set(folder: Path, config: ShapesConfig, params: dict, progress: bool, desc: str) -> None:
    """Draw the scenes of ``config`` and write them (``images/`` and the JSON) into the empty ``folder``."""
    (folder / "images").mkdir()
    sizes = {"train": config.num_train, "val": config.num_val, "test": config.num_test}
    # one seeded stream per split (a str seed is hashed with SHA-512: the same on every run and machine), so
    # that the size of one split does not change the scenes of another: a run with more training images is
    # scored on the same validation and test images
    rngs = {split: random.Random(f"shapes/{config.seed}/{split}") for split in sizes}
    splits = [split for split, n in sizes.items() for _ in range(n)]
    images, sent_id = [], 0
    iterator = enumerate(splits)
    if progress:
        from tqdm import tqdm

        iterator = tqdm(iterator, total=len(splits), desc=desc, leave=False)
    for i, split in iterator:
        rng = rngs[split]
        img, objects = make_scene(rng, config.image_size, config.noise_std)
        filename = f"{i:06d}.png"
        img.save(folder / "images" / filename, compress_level=1)
        raws = make_captions(rng, objects)
        sentences = [{"raw": r, "tokens": tokenize(r), "imgid": i, "sentid": sent_id + j} for j, r in enumerate(raws)]
        images.append(
            {
                "filepath": "images",
                "filename": filename,
                "imgid": i,
                "split": split,
                "sentids": [s["sentid"] for s in sentences],
                "sentences": sentences,
                "objects": objects,
            }
        )
        sent_id += len(sentences)
    (folder / JSON_NAME).write_text(json.dumps({"dataset": "shapes", "params": params, "images": images}))


#: root -> fd of the set's JSON on which this process holds a shared lock, kept open for its lifetime
_READING: dict[Path, int] = {}


def _matches(json_path: Path, params: dict) -> bool:
    """A complete set of ``params`` is at ``json_path`` (the JSON is written last, so it marks completion) with
    every image it lists: with some deleted since, the run stopped at the data check with "is data.image_root
    right?", which no option of the shapes set could answer; now the set is generated again."""
    try:
        data = json.loads(json_path.read_text())
        if data.get("params") != params:
            return False
        folder = json_path.parent
        return all((folder / img["filepath"] / img["filename"]).is_file() for img in data["images"])
    except (json.JSONDecodeError, OSError, AttributeError, KeyError, TypeError):
        return False  # missing or unreadable: regenerate


def _hold(root: Path) -> None:
    """Mark the set under ``root`` as read by this process for as long as it lives: a shared flock on its
    JSON (inherited by forked data-loader workers), which a process about to replace the set must take
    over exclusively first."""
    _release(root)
    fd = os.open(root / JSON_NAME, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _READING[root] = fd


def _release(root: Path) -> None:
    fd = _READING.pop(root, None)
    if fd is not None:
        os.close(fd)


def _take_over(root: Path) -> int | None:
    """Make sure no other process reads the set at ``root`` before it is replaced (its records name image
    files by path, which would become other scenes under it, or disappear): an exclusive lock on its
    JSON, held until the replacement is done; its fd (None when there is no JSON to hold)."""
    _release(root)  # this process asked for other parameters: it is done with the old set
    try:
        fd = os.open(root / JSON_NAME, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(  # one line, as other refusals of data options: it was a 50-line traceback
            f"{root}: holds a shapes set with other parameters that another running process is reading; "
            "generating this one there would replace its images under it: wait for that run to end, or "
            "point data_dir at another folder"
        ) from None
    return fd


def _swap(root: Path, new: Path) -> None:
    """Put the finished set ``new`` at ``root``. The old set is moved aside first, not deleted in place:
    the new one appears in one rename, and a kill in between leaves a temporary-named folder, unlocked,
    that the next generation removes as an orphan."""
    if not root.exists():
        new.rename(root)
        return
    aside = root.parent / f".{root.name}.tmp-replaced-{os.getpid()}"
    root.rename(aside)
    new.rename(root)
    shutil.rmtree(aside, ignore_errors=True)


def generate(root: str | Path, config: ShapesConfig = ShapesConfig(), progress: bool = True) -> Path:
    """Write the dataset under ``root`` (unless an identical one is there); returns the JSON path.

    Written to a temporary folder first and renamed into place, so an interrupted run never
    leaves a half-written set that looks complete. Safe to call from several processes at once
    (DDP ranks, nodes or jobs sharing the folder): one generates while the others wait for it
    (on a lock file ``.{root name}.lock`` beside ``root``) and then read its set. A set is never
    replaced while another process reads it: this process holds a shared lock on the JSON of the
    set it returns for as long as it runs, and replacing a set needs that lock exclusively.
    """
    if config.image_size < MIN_SHAPES_SIZE:
        raise InputError(f"shapes image_size must be at least {MIN_SHAPES_SIZE}, got {config.image_size}")
    root = Path(root)
    json_path = root / JSON_NAME
    params = {"format_version": FORMAT_VERSION, **asdict(config)}
    found = _matches(json_path, params)
    if not found:
        _check_replaceable(root)  # before the lock file: a refused folder gets nothing written beside it
    root = root.resolve()  # "." has no name to put beside it
    if found and not os.access(root.parent, os.W_OK):
        return json_path  # a read-only copy: nothing can replace it, so nothing to coordinate
    lock = root.parent / f".{root.name}.lock"
    with file_lock(lock, wait_message=f"shapes set: waiting for another process generating {root} ({lock})"):
        if _matches(json_path, params):  # there already, or generated by the process we waited for
            _hold(root)
            return json_path
        _check_replaceable(root)
        old = _take_over(root)
        try:
            remove_orphans(root.parent, f".{glob.escape(root.name)}.tmp-*")  # folders of generations that were killed
            # locked while we write it, so another process's clean-up above never takes it for a killed run's
            with locked_temp(root.parent, f".{root.name}.tmp-", directory=True) as tmp:
                try:
                    _write_set(tmp, config, params, progress, f"generating shapes in {root}")
                except OSError as e:  # a full disk: PIL's write error names no file, nor does the traceback's end
                    if e.filename is not None or e.errno is None:
                        raise
                    raise OSError(e.errno, f"{e.strerror}: the shapes set was not written", str(root)) from e
                _swap(root, tmp)
        finally:
            if old is not None:
                os.close(old)
        _hold(root)
    return json_path


# ---------------------------------------------------------------------------------------------
# Reading captions back: the grammar of the templates above.


@dataclass
class Mention:
    """An object named in a caption: its attributes (None where not said), the noun's index and
    the colour word's index (None where no colour is said)."""

    size: str | None
    color: str | None
    shape: str
    position: int
    color_position: int | None = None


def parse_caption(tokens: list[str]) -> tuple[list[Mention], str | None]:
    """Objects named in ``tokens`` (in order) and the first relation word after the first noun.

    Adjectives attach to the next shape noun, which is how every template is written.
    """
    mentions: list[Mention] = []
    size = color = color_at = None
    relation = None
    for i, tok in enumerate(tokens):
        if tok in SIZES:
            size = tok
        elif tok in COLORS:
            color, color_at = tok, i
        elif tok in SHAPES:
            mentions.append(Mention(size, color, tok, i, color_at))
            size = color = color_at = None
        elif tok in ("left", "right") and mentions and relation is None:
            relation = tok
    return mentions, relation


def objects_correct(tokens: list[str], objects: list[dict]) -> bool:
    """The caption names exactly the right multiset of (colour, shape) pairs."""
    mentions, _ = parse_caption(tokens)
    return sorted((m.color or "", m.shape) for m in mentions) == sorted((o["color"], o["shape"]) for o in objects)


def fully_correct(tokens: list[str], objects: list[dict]) -> bool:
    """Colour, shape and size of every object right, and their left-to-right arrangement.

    Two objects: the relation word must put them in the right order ("A left of B" or "B right
    of A"). Three: the list must run left to right, as every template does. ``objects`` must be
    sorted left to right (as the generator stores them).
    """
    mentions, relation = parse_caption(tokens)
    said = [(m.size, m.color, m.shape) for m in mentions]
    truth = [(o["size"], o["color"], o["shape"]) for o in objects]
    if len(said) != len(truth):
        return False
    if len(truth) == 2:
        if relation == "left":
            return said == truth
        if relation == "right":
            return said == truth[::-1]
        return False
    return said == truth
