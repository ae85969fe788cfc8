"""A deterministic synthetic dataset in the Flickr30k Entities layout: the repository's sample.

:func:`generate_sample` draws small scenes of coloured shapes and writes, in memory, exactly the
files of the real dataset (``Annotations/<id>.xml``, ``Sentences/<id>.txt``, ``images/<id>.jpg``,
``train.txt``, ``val.txt``, ``test.txt``), so that the pipeline runs without the real data::

    [/EN#1/other The blue square on the left] is bigger than [/EN#2/other a yellow circle] .

Each phrase refers to its objects the way a person would (colour and shape, plus a size or a
position word only when colour and shape do not single the referent out), so that the chain's
boxes are exactly the objects its words describe and grounding is learnable from appearance and
position. The sample also holds every quirk of the format a few times, on a fixed schedule
(:data:`QUIRK_CYCLE`): a phrase with two types, a box shared by two chains, a chain with several
boxes, not-visual phrases (chain 0), a no-box object, a background object flagged ``<scene>``,
captions without a phrase, non-ASCII text, and one annotated image whose JPEG is missing.

The same seed gives the same bytes (on the same numpy and Pillow versions): all randomness comes
from ``numpy.random.default_rng(seed)``, one spawned stream per image, so image ``i`` does not
depend on ``n_images``.
"""

from __future__ import annotations

import io
import re
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageDraw

from grounding.data.formats.flickr30k import (
    NOT_VISUAL_CHAIN,
    Annotation,
    AnnotationObject,
    format_annotation,
    format_phrase,
)
from grounding.data.records import Box

#: Where the repository keeps the sample (``grounding sample``'s default folder, ``data.root``
#: in ``params.yaml``): a model trained on data from here knows coloured shapes, not photos.
SAMPLE_ROOT = Path("data/sample")


def is_sample_root(root: str | Path) -> bool:
    """Whether the dataset folder ``root`` (as ``data.root`` names it) is the sample's."""
    return Path(root) == SAMPLE_ROOT


def from_sample(image: Path, root: Path = SAMPLE_ROOT) -> bool:
    """Whether the image file ``image`` is one of the sample's images (a file of
    ``root / "images"`` with the same bytes, under any name); False without the sample."""
    try:
        size = image.stat().st_size
        twins = [path for path in (root / "images").iterdir() if path.stat().st_size == size]
        return any(twin.read_bytes() == image.read_bytes() for twin in twins)
    except OSError:
        return False


# --- The sample's vocabulary and layout: every word and number the generator uses. -------------

#: The id of the first image; ids are consecutive and purely numeric, as in the real dataset.
FIRST_IMAGE_ID = 100_000_001
CAPTIONS_PER_IMAGE = 5
#: Colours of the shapes (RGB), far apart from each other and from the backgrounds.
OBJECT_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 30),
    "green": (25, 150, 45),
    "blue": (30, 65, 215),
    "yellow": (250, 215, 25),
    "purple": (125, 40, 165),
    "orange": (250, 125, 15),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
}
BACKGROUND_COLOURS: dict[str, tuple[int, int, int]] = {
    "grey": (150, 150, 150),
    "beige": (220, 205, 175),
    "brown": (125, 100, 75),
}
#: "striped" backgrounds carry faint horizontal stripes, this much darker, every few rows.
TEXTURES = ("plain", "striped")
STRIPE_PERIOD = 8
STRIPE_DARKEN = 14
SHAPES = ("circle", "square", "triangle", "star", "diamond")
#: The head noun of a phrase that names a colour but no shape ("the red shape").
GENERIC_NOUN = "shape"
#: Side of a shape's box as a fraction of the image's shorter side; the gap keeps sizes apart.
SIZE_FRACTIONS: dict[str, tuple[float, float]] = {"small": (0.15, 0.21), "large": (0.30, 0.38)}
SIZE_WORDS: dict[str, tuple[str, ...]] = {"small": ("small", "little"), "large": ("large", "big")}
TRIANGLE_ASPECT = 0.87
#: Image halves named by a position word; a referent's centre must lie this fraction of the
#: image beyond the middle, and every distractor as far on the other side.
POSITION_WORDS: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "on the left side"),
    "right": ("on the right", "on the right side"),
    "top": ("at the top", "near the top"),
    "bottom": ("at the bottom", "near the bottom"),
}
OPPOSITE_POSITION = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
POSITION_MARGIN = 0.08
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five"}
NOT_VISUAL_PHRASES = ("the picture", "this image", "the drawing")
AGENT_PHRASES = ("someone", "the artist", "a child")
SHADOW_PHRASES = ("a shadow", "a soft shadow", "a dark shadow")
#: Verbs that agree with an object slot: ``{be0}`` is "is" for one object, "are" for several.
VERBS: dict[str, tuple[str, str]] = {
    "be": ("is", "are"),
    "look": ("looks", "look"),
    "cast": ("casts", "cast"),
}
OBJECT_TYPES = ("other",)
BACKGROUND_TYPES = ("scene",)
TWO_TYPES = ("other", "scene")
NOT_VISUAL_TYPES = ("notvisual",)

# Caption templates: words separated by single spaces, ending in " .". ``{0}`` is an object slot
# (definite or indefinite), ``{a0}`` an indefinite one, ``{be0}`` a verb agreeing with slot 0,
# ``{bg}`` the background, ``{nv}`` / ``{agent}`` a not-visual phrase, ``{shadow}`` the no-box
# shadow. The second item names the relation between slots 0 and 1 that must hold in the image.
Template = tuple[str, str | None]
CAPTION_TEMPLATES: tuple[Template, ...] = (
    ("There {be0} {a0} .", None),
    ("I can see {a0} here .", None),
    ("{0} {be0} next to {1} .", None),
    ("There {be0} {a0} next to {1} .", None),
    ("{0} {be0} near {1} .", None),
    ("You can see {a0} and {a1} .", None),
    ("{0} {be0} bigger than {1} .", "bigger"),
    ("{0} {be0} smaller than {1} .", "smaller"),
    ("{0} {be0} above {1} .", "above"),
    ("{0} {be0} below {1} .", "below"),
    ("{0} {be0} to the left of {1} .", "left_of"),
    ("{0} {be0} to the right of {1} .", "right_of"),
    ("{0} and {1} are drawn on {bg} .", None),
    ("{0} {be0} on {bg} .", None),
    ("Here we see {a0} , {a1} and {a2} .", None),
    ("{0} , {1} and {2} are scattered over {bg} .", None),
)
BACKGROUND_TEMPLATES: tuple[Template, ...] = (
    ("{0} {be0} on {bg} .", None),
    ("{0} and {1} are drawn on {bg} .", None),
    ("{bg} is behind {0} and {1} .", None),
    ("There {be0} {a0} in front of {bg} .", None),
)
NOT_VISUAL_TEMPLATES: tuple[Template, ...] = (
    ("{nv} shows {a0} and {a1} .", None),
    ("In {nv} , {0} {be0} next to {1} .", None),
    ("{agent} drew {a0} above {a1} .", "above"),
    ("{agent} painted {a0} on {bg} .", None),
)
NON_ASCII_TEMPLATES: tuple[Template, ...] = (
    ("{0} {look0} like a sign outside a café .", None),
    ("A naïve drawing : {a0} and {a1} .", None),
    ("{0} and {1} are arranged like tables in a café .", None),
)
SHADOW_TEMPLATES: tuple[Template, ...] = (
    ("{0} {cast0} {shadow} .", None),
    ("{0} {cast0} {shadow} on {bg} .", None),
    ("Below {0} there is {shadow} .", None),
)
#: Always satisfiable: the fallback when no other template fits the scene.
FALLBACK_TEMPLATE: Template = ("There {be0} {a0} .", None)
NO_PHRASE_CAPTIONS = (
    "Nothing much is happening here .",
    "A simple computer drawing .",
    "Abstract art in a naïve style .",
    "This could be a poster in a café .",
)
#: Quirks forced on image ``i``: ``QUIRK_CYCLE[i % len(QUIRK_CYCLE)]``.
QUIRK_CYCLE: tuple[tuple[str, ...], ...] = (
    (),
    ("shared_box",),
    ("two_types",),
    ("not_visual",),
    ("no_box",),
    (),
    ("shared_box", "non_ascii"),
    ("scene_flag",),
    (),
    ("no_phrase",),
    (),
    ("shared_box",),
    ("two_types", "no_box"),
    ("not_visual",),
    (),
    (),
    ("shared_box", "no_box"),
    (),
    ("non_ascii",),
    (),
)
#: Which caption (before the captions are shuffled) each quirk takes over.
QUIRK_CAPTION = {
    "two_types": 2,
    "scene_flag": 2,
    "not_visual": 3,
    "non_ascii": 3,
    "no_box": 4,
    "no_phrase": 4,
}
#: Chance that a new shape copies the colour and shape of one already drawn (groups, distractors).
REPEAT_PROBABILITY = 0.35
BORDER = 4
OBJECT_GAP = 6
SHADOW_OFFSET = 3
SHADOW_DARKEN = 0.6
PLACEMENT_ATTEMPTS = 40
SCENE_ATTEMPTS = 200
TEMPLATE_ATTEMPTS = 20

_PLACEHOLDER = re.compile(r"\{([a-z]*)(\d?)\}")
_BACKGROUND = "background"
_SHADOW = "shadow"
_T = TypeVar("_T")


@dataclass(frozen=True)
class SceneObject:
    """One drawn shape: its words and its box (canonical: 0-based pixels, exclusive ends)."""

    colour: str
    shape: str
    size: str
    box: Box


@dataclass(frozen=True)
class Scene:
    """One synthetic image before rendering: size in pixels, background and shapes."""

    width: int
    height: int
    background: str
    texture: str
    shadows: bool
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class SampleImage:
    """One generated image: its scene, annotation, five caption lines and forced quirks."""

    image_id: str
    scene: Scene
    annotation: Annotation
    captions: tuple[str, ...]
    quirks: tuple[str, ...]


@dataclass(frozen=True)
class SampleDataset:
    """The files of the sample: relative path (``"Annotations/100000001.xml"``) to content."""

    files: dict[str, bytes]


@dataclass(frozen=True)
class Description:
    """The attributes a phrase names; ``None`` leaves an attribute out."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None


# --- Public entry points. ----------------------------------------------------------------------


def generate_sample(
    seed: int = 0,
    n_images: int = 300,
    *,
    min_side: int = 160,
    max_side: int = 224,
    min_objects: int = 2,
    max_objects: int = 5,
    jpeg_quality: int = 80,
    train_fraction: float = 0.7,
    val_fraction: float = 0.15,
) -> SampleDataset:
    """Generate the sample's files in memory.

    ``n_images`` images of ``min_side..max_side`` pixels a side with ``min_objects..max_objects``
    shapes each; ids shuffled into train / val / test by ``train_fraction`` and ``val_fraction``
    (test takes the rest). One train image keeps its annotation and captions but has no JPEG.
    Returns the files keyed by path relative to the dataset's root.
    """
    if not (train_fraction >= 0 and val_fraction >= 0 and train_fraction + val_fraction <= 1):
        raise ValueError(f"bad split fractions: train {train_fraction}, val {val_fraction}")
    images = generate_images(
        seed,
        n_images,
        min_side=min_side,
        max_side=max_side,
        min_objects=min_objects,
        max_objects=max_objects,
    )
    # The parent stream: spawning the per-image streams in generate_images does not advance it.
    rng = np.random.default_rng(seed)
    splits = split_ids([image.image_id for image in images], rng, train_fraction, val_fraction)
    missing = _choice(rng, splits["train"] or splits["val"] or splits["test"])
    files: dict[str, bytes] = {}
    for image in images:
        files[f"Annotations/{image.image_id}.xml"] = format_annotation(
            image.annotation, f"{image.image_id}.jpg"
        ).encode("utf-8")
        files[f"Sentences/{image.image_id}.txt"] = ("\n".join(image.captions) + "\n").encode(
            "utf-8"
        )
        if image.image_id != missing:
            files[f"images/{image.image_id}.jpg"] = encode_jpeg(
                render_scene(image.scene), jpeg_quality
            )
    for name, ids in splits.items():
        files[f"{name}.txt"] = "".join(f"{image_id}\n" for image_id in ids).encode("ascii")
    return SampleDataset(files=dict(sorted(files.items())))


def generate_images(
    seed: int = 0,
    n_images: int = 300,
    *,
    min_side: int = 160,
    max_side: int = 224,
    min_objects: int = 2,
    max_objects: int = 5,
) -> list[SampleImage]:
    """Draw ``n_images`` scenes with their annotations and captions (no pixels, no files).

    Image ``i`` has id ``FIRST_IMAGE_ID + i``, the quirks ``QUIRK_CYCLE[i % 20]`` and its own
    random stream spawned from ``default_rng(seed)``.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}")
    if not 2 <= min_objects <= max_objects:
        raise ValueError(f"need 2 <= min_objects <= max_objects, got {min_objects}, {max_objects}")
    if not 0 < min_side <= max_side:
        raise ValueError(f"need 0 < min_side <= max_side, got {min_side}, {max_side}")
    streams = np.random.default_rng(seed).spawn(n_images)
    return [
        _generate_image(
            rng,
            str(FIRST_IMAGE_ID + index),
            QUIRK_CYCLE[index % len(QUIRK_CYCLE)],
            min_side=min_side,
            max_side=max_side,
            min_objects=min_objects,
            max_objects=max_objects,
        )
        for index, rng in enumerate(streams)
    ]


def split_ids(
    ids: Sequence[str], rng: np.random.Generator, train_fraction: float, val_fraction: float
) -> dict[str, list[str]]:
    """Shuffle ``ids`` into ``{"train", "val", "test"}`` lists (each sorted) by the fractions."""
    order = [ids[i] for i in rng.permutation(len(ids))]
    n_train = round(train_fraction * len(ids))
    n_val = round(val_fraction * len(ids))
    return {
        "train": sorted(order[:n_train]),
        "val": sorted(order[n_train : n_train + n_val]),
        "test": sorted(order[n_train + n_val :]),
    }


# --- Scenes. -----------------------------------------------------------------------------------


def _generate_image(
    rng: np.random.Generator,
    image_id: str,
    quirks: tuple[str, ...],
    *,
    min_side: int,
    max_side: int,
    min_objects: int,
    max_objects: int,
) -> SampleImage:
    """Draw one image's scene, then its captions, then the annotation of the chains they use."""
    scene = draw_scene(
        rng,
        width=int(rng.integers(min_side, max_side + 1)),
        height=int(rng.integers(min_side, max_side + 1)),
        n_objects=int(rng.integers(min_objects, max_objects + 1)),
        plant_group="shared_box" in quirks,
        shadows="no_box" in quirks,
    )
    chains: dict[Hashable, int] = {}
    background_types = TWO_TYPES if "two_types" in quirks else BACKGROUND_TYPES
    captions = _write_captions(scene, quirks, chains, background_types, rng)
    order = rng.permutation(len(captions))
    annotation = _annotation(scene, chains, background_box="scene_flag" not in quirks)
    return SampleImage(
        image_id=image_id,
        scene=scene,
        annotation=annotation,
        captions=tuple(captions[i] for i in order),
        quirks=quirks,
    )


def draw_scene(
    rng: np.random.Generator,
    *,
    width: int,
    height: int,
    n_objects: int,
    plant_group: bool = False,
    shadows: bool = False,
) -> Scene:
    """Place ``n_objects`` non-touching shapes in a ``width x height`` image.

    Every shape can be referred to on its own (:func:`singular_descriptions` is not empty); with
    ``plant_group`` the first two share colour and shape, so the scene has a group. Raises
    ``ValueError`` if no such scene is found (shapes too many for the image).
    """
    background = _choice(rng, tuple(BACKGROUND_COLOURS))
    texture = _choice(rng, TEXTURES)
    for _ in range(SCENE_ATTEMPTS):
        objects = _place_objects(rng, width, height, n_objects, plant_group)
        if objects is None:
            continue
        scene = Scene(width, height, background, texture, shadows, objects)
        if all(singular_descriptions(scene, index) for index in range(n_objects)):
            return scene
    raise ValueError(f"cannot place {n_objects} distinguishable shapes in {width}x{height} pixels")


def _place_objects(
    rng: np.random.Generator, width: int, height: int, n_objects: int, plant_group: bool
) -> tuple[SceneObject, ...] | None:
    """Draw attributes and free positions for the shapes; ``None`` when one does not fit."""
    objects: list[SceneObject] = []
    shorter = min(width, height)
    for index in range(n_objects):
        if index == 1 and plant_group:
            colour, shape = objects[0].colour, objects[0].shape
        elif objects and rng.random() < REPEAT_PROBABILITY:
            model = _choice(rng, objects)
            colour, shape = model.colour, model.shape
        else:
            colour, shape = _choice(rng, tuple(OBJECT_COLOURS)), _choice(rng, SHAPES)
        size = _choice(rng, tuple(SIZE_FRACTIONS))
        low, high = SIZE_FRACTIONS[size]
        side = round(rng.uniform(low, high) * shorter)
        box_height = round(side * TRIANGLE_ASPECT) if shape == "triangle" else side
        box = _free_box(rng, width, height, side, box_height, [o.box for o in objects])
        if box is None:
            return None
        objects.append(SceneObject(colour, shape, size, box))
    return tuple(objects)


def _free_box(
    rng: np.random.Generator, width: int, height: int, w: int, h: int, taken: list[Box]
) -> Box | None:
    """A ``w x h`` box inside the image's border, ``OBJECT_GAP`` away from ``taken``, or None."""
    if w > width - 2 * BORDER or h > height - 2 * BORDER:
        return None
    for _ in range(PLACEMENT_ATTEMPTS):
        x1 = int(rng.integers(BORDER, width - BORDER - w + 1))
        y1 = int(rng.integers(BORDER, height - BORDER - h + 1))
        box = Box(float(x1), float(y1), float(x1 + w), float(y1 + h))
        if not any(_near(box, other, OBJECT_GAP) for other in taken):
            return box
    return None


def _near(a: Box, b: Box, gap: float) -> bool:
    """Whether boxes ``a`` and ``b`` come closer than ``gap`` pixels on both axes."""
    return a.x1 < b.x2 + gap and b.x1 < a.x2 + gap and a.y1 < b.y2 + gap and b.y1 < a.y2 + gap


# --- Referring expressions. --------------------------------------------------------------------


def describes(description: Description, obj: SceneObject, scene: Scene) -> bool:
    """Whether ``obj`` has every attribute of ``description`` (a position: the image half)."""
    return (
        (description.colour is None or description.colour == obj.colour)
        and (description.shape is None or description.shape == obj.shape)
        and (description.size is None or description.size == obj.size)
        and (
            description.position is None or in_region(obj, description.position, scene, margin=0.0)
        )
    )


def in_region(obj: SceneObject, position: str, scene: Scene, margin: float) -> bool:
    """Whether the centre of ``obj`` lies in the ``position`` half, ``margin`` past the middle."""
    cx = (obj.box.x1 + obj.box.x2) / 2 / scene.width
    cy = (obj.box.y1 + obj.box.y2) / 2 / scene.height
    return {
        "left": cx < 0.5 - margin,
        "right": cx > 0.5 + margin,
        "top": cy < 0.5 - margin,
        "bottom": cy > 0.5 + margin,
    }[position]


def referents(description: Description, scene: Scene) -> frozenset[int]:
    """Indices of the scene's objects that ``description`` describes."""
    return frozenset(
        index for index, obj in enumerate(scene.objects) if describes(description, obj, scene)
    )


def _fits(description: Description, target: frozenset[int], scene: Scene) -> bool:
    """Whether ``description`` picks out exactly ``target``, with a position word only if clear.

    A position is clear when the targets lie ``POSITION_MARGIN`` inside the named half and every
    object that matches the other words lies as far inside the opposite half.
    """
    if referents(description, scene) != target:
        return False
    position = description.position
    if position is None:
        return True
    unplaced = Description(description.colour, description.shape, description.size)
    return all(
        in_region(scene.objects[index], position, scene, POSITION_MARGIN)
        if index in target
        else in_region(scene.objects[index], OPPOSITE_POSITION[position], scene, POSITION_MARGIN)
        for index in referents(unplaced, scene)
    )


def singular_descriptions(scene: Scene, index: int) -> tuple[Description, ...]:
    """Ways to refer to object ``index`` alone, most natural first; empty if there is none.

    Colour and shape when they are unique (or a unique shape or colour alone); otherwise colour
    and shape plus the size or a position, or both when neither alone is enough.
    """
    obj = scene.objects[index]
    target = frozenset({index})
    base = Description(obj.colour, obj.shape)
    if _fits(base, target, scene):
        shorter = (Description(shape=obj.shape), Description(colour=obj.colour))
        return (base, *(d for d in shorter if _fits(d, target, scene)))
    refined = (
        Description(obj.colour, obj.shape, obj.size),
        *(Description(obj.colour, obj.shape, position=p) for p in POSITION_WORDS),
    )
    found = tuple(d for d in refined if _fits(d, target, scene))
    if found:
        return found
    both = (Description(obj.colour, obj.shape, obj.size, p) for p in POSITION_WORDS)
    return tuple(d for d in both if _fits(d, target, scene))


def group_descriptions(scene: Scene) -> dict[frozenset[int], tuple[Description, ...]]:
    """Groups of two or more objects that a plural phrase names, with the ways to name each.

    A group is every object of one colour and shape ("two green triangles"), of one shape
    ("the circles") or of one colour ("the red shapes").
    """
    groups: dict[frozenset[int], list[Description]] = {}
    for obj in scene.objects:
        for description in (
            Description(obj.colour, obj.shape),
            Description(shape=obj.shape),
            Description(colour=obj.colour),
        ):
            target = referents(description, scene)
            found = groups.setdefault(target, []) if len(target) >= 2 else None
            if found is not None and description not in found:
                found.append(description)
    return {target: tuple(found) for target, found in groups.items()}


def phrase_words(
    description: Description, count: int, indefinite: bool, rng: np.random.Generator
) -> str:
    """The words of a phrase naming ``count`` objects, e.g. "the small red circle on the left"."""
    words = []
    if description.size is not None:
        words.append(_choice(rng, SIZE_WORDS[description.size]))
    if description.colour is not None:
        words.append(description.colour)
    noun = description.shape or GENERIC_NOUN
    if count == 1:
        words.append(noun)
        if description.position is not None:
            words.append(_choice(rng, POSITION_WORDS[description.position]))
        definite = not indefinite and (description.position is not None or rng.random() < 0.5)
        return " ".join([_determiner(words[0], definite), *words])
    words.append(noun + "s")
    number = NUMBER_WORDS[count]
    options = [number] if indefinite else [number, f"the {number}", "the"]
    if count == 2 and not indefinite:
        options.append("both")
    return " ".join([_choice(rng, options), *words])


def _determiner(next_word: str, definite: bool) -> str:
    """ "the", or "a" / "an" by the sound of ``next_word``."""
    if definite:
        return "the"
    return "an" if next_word[0] in "aeiou" else "a"


def _background_words(scene: Scene, rng: np.random.Generator) -> str:
    """A phrase for the background, e.g. "a striped grey background"."""
    words = [scene.background, "background"]
    if rng.random() < 0.4:
        words.insert(0, scene.texture)
    return " ".join([_choice(rng, ("a", "the")), *words])


# --- Captions. ---------------------------------------------------------------------------------

#: A caption before chain ids are given: plain words and phrases ``(referent, types, words)``,
#: the referent being a set of object indices, "background", "shadow", or None (not visual).
Piece = str | tuple[Hashable | None, tuple[str, ...], str]


@dataclass(frozen=True)
class _Referables:
    """What one scene's captions can mention: each referent with the ways to describe it."""

    scene: Scene
    candidates: dict[frozenset[int], tuple[Description, ...]]
    background_types: tuple[str, ...]


def _write_captions(
    scene: Scene,
    quirks: tuple[str, ...],
    chains: dict[Hashable, int],
    background_types: tuple[str, ...],
    rng: np.random.Generator,
) -> list[str]:
    """Five distinct captions of ``scene``; ``chains`` gets a chain id per referent mentioned."""
    candidates: dict[frozenset[int], tuple[Description, ...]] = {
        frozenset({index}): singular_descriptions(scene, index)
        for index in range(len(scene.objects))
    }
    candidates.update(group_descriptions(scene))
    referables = _Referables(scene, candidates, background_types)
    mentions: dict[Hashable, int] = dict.fromkeys(candidates, 0)
    forced: dict[int, frozenset[int]] = {}
    if "shared_box" in quirks:
        group = _choice(rng, sorted((t for t in candidates if len(t) > 1), key=sorted))
        forced = {0: group, 1: frozenset({_choice(rng, sorted(group))})}
    special = {QUIRK_CAPTION[quirk]: quirk for quirk in quirks if quirk in QUIRK_CAPTION}
    drafts: list[tuple[Piece, ...]] = []
    for number in range(CAPTIONS_PER_IMAGE):
        quirk = special.get(number)
        for _ in range(TEMPLATE_ATTEMPTS):
            if quirk == "no_phrase":
                draft: tuple[Piece, ...] = (_choice(rng, NO_PHRASE_CAPTIONS),)
            else:
                draft = _draft_caption(
                    referables, _templates_for(quirk), forced.get(number), mentions, rng
                )
            if draft not in drafts:
                break
        drafts.append(draft)
        for piece in draft:
            if isinstance(piece, tuple) and piece[0] in mentions:
                mentions[piece[0]] += 1
    return [_render_caption(draft, chains) for draft in drafts]


def _templates_for(quirk: str | None) -> tuple[Template, ...]:
    """The templates a caption draws from, given the quirk it must show (if any)."""
    return {
        "two_types": BACKGROUND_TEMPLATES,
        "scene_flag": BACKGROUND_TEMPLATES,
        "not_visual": NOT_VISUAL_TEMPLATES,
        "non_ascii": NON_ASCII_TEMPLATES,
        "no_box": SHADOW_TEMPLATES,
    }.get(quirk or "", CAPTION_TEMPLATES)


def _draft_caption(
    referables: _Referables,
    templates: tuple[Template, ...],
    first: frozenset[int] | None,
    mentions: dict[Hashable, int],
    rng: np.random.Generator,
) -> tuple[Piece, ...]:
    """A caption from one of ``templates`` whose slot 0 (if given) refers to ``first``.

    Falls back to :data:`FALLBACK_TEMPLATE` when no template fits the scene.
    """
    for _ in range(TEMPLATE_ATTEMPTS):
        template = _choice(rng, templates)
        slots = _choose_slots(referables, template, first, mentions, rng)
        if slots is not None:
            return _fill(referables, template[0], slots, rng)
    slots = _choose_slots(referables, FALLBACK_TEMPLATE, first, mentions, rng)
    assert slots is not None  # one slot and no relation: any referent fits
    return _fill(referables, FALLBACK_TEMPLATE[0], slots, rng)


def _choose_slots(
    referables: _Referables,
    template: Template,
    first: frozenset[int] | None,
    mentions: dict[Hashable, int],
    rng: np.random.Generator,
) -> list[frozenset[int]] | None:
    """Disjoint referents for the template's object slots, or None if the scene has none.

    Slots 0 and 1 must stand in the template's relation; referents mentioned less so far are
    more likely, so that captions spread over the scene.
    """
    text, relation = template
    n_slots = 1 + max((int(slot) for _, slot in _PLACEHOLDER.findall(text) if slot), default=-1)
    slots: list[frozenset[int]] = []
    for index in range(n_slots):
        used = frozenset().union(*slots)
        options = [
            target
            for target in referables.candidates
            if not target & used
            and (
                index != 1
                or relation is None
                or _relation_holds(relation, slots[0], target, referables.scene)
            )
        ]
        if index == 0 and first is not None:
            options = [first]
        if not options:
            return None
        weights = np.array([1.0 / (1 + mentions[target]) for target in options])
        slots.append(options[int(rng.choice(len(options), p=weights / weights.sum()))])
    return slots


def _fill(
    referables: _Referables, text: str, slots: list[frozenset[int]], rng: np.random.Generator
) -> tuple[Piece, ...]:
    """Replace the placeholders of ``text``; the caption's first word is capitalised."""
    pieces: list[Piece] = []
    for token in text.split(" "):
        match = _PLACEHOLDER.fullmatch(token)
        pieces.append(token if match is None else _piece(referables, *match.groups(), slots, rng))
    first = pieces[0]
    if isinstance(first, str):
        pieces[0] = first[:1].upper() + first[1:]
    else:
        pieces[0] = (first[0], first[1], first[2][:1].upper() + first[2][1:])
    return tuple(pieces)


def _piece(
    referables: _Referables,
    name: str,
    slot: str,
    slots: list[frozenset[int]],
    rng: np.random.Generator,
) -> Piece:
    """One placeholder (``name`` and ``slot`` of ``{a0}``) as a phrase or a plain word."""
    if name in VERBS:
        return VERBS[name][len(slots[int(slot)]) > 1]
    if name in ("", "a"):
        target = slots[int(slot)]
        description = _choice(rng, referables.candidates[target])
        return target, OBJECT_TYPES, phrase_words(description, len(target), name == "a", rng)
    if name == "bg":
        words = _background_words(referables.scene, rng)
        return _BACKGROUND, referables.background_types, words
    if name == "shadow":
        return _SHADOW, OBJECT_TYPES, _choice(rng, SHADOW_PHRASES)
    phrases = NOT_VISUAL_PHRASES if name == "nv" else AGENT_PHRASES
    return None, NOT_VISUAL_TYPES, _choice(rng, phrases)


def _render_caption(draft: tuple[Piece, ...], chains: dict[Hashable, int]) -> str:
    """The caption line of ``draft``; chains are numbered 1, 2, ... in order of first mention."""
    words = []
    for piece in draft:
        if isinstance(piece, str):
            words.append(piece)
            continue
        key, types, text = piece
        chain = NOT_VISUAL_CHAIN if key is None else chains.setdefault(key, len(chains) + 1)
        words.append(format_phrase(chain, types, text))
    return " ".join(words)


def _relation_holds(
    relation: str, first: frozenset[int], second: frozenset[int], scene: Scene
) -> bool:
    """Whether every object of ``first`` stands in ``relation`` to every object of ``second``."""
    a = [scene.objects[i] for i in first]
    b = [scene.objects[i] for i in second]
    if relation in ("bigger", "smaller"):
        big, small = (a, b) if relation == "bigger" else (b, a)
        return all(o.size == "large" for o in big) and all(o.size == "small" for o in small)
    if relation in ("above", "below"):
        upper, lower = (a, b) if relation == "above" else (b, a)
        return max(o.box.y2 for o in upper) <= min(o.box.y1 for o in lower)
    if relation in ("left_of", "right_of"):
        left, right = (a, b) if relation == "left_of" else (b, a)
        return max(o.box.x2 for o in left) <= min(o.box.x1 for o in right)
    raise ValueError(f"unknown relation {relation!r}")


def _annotation(scene: Scene, chains: dict[Hashable, int], background_box: bool) -> Annotation:
    """The XML content for the chains mentioned: one ``<object>`` per box, its chains sorted.

    The background gets a whole-image box, or with ``background_box=False`` the ``<scene>``
    flag and no box; the shadow is an object with ``<nobndbox>1``.
    """
    names: dict[int, list[int]] = {}
    for key, chain in chains.items():
        if isinstance(key, frozenset):
            for index in key:
                names.setdefault(index, []).append(chain)
    entries: list[tuple[int, AnnotationObject]] = [
        (min(chain_ids), AnnotationObject(tuple(sorted(chain_ids)), scene.objects[index].box))
        for index, chain_ids in names.items()
    ]
    if _BACKGROUND in chains:
        whole = Box(0.0, 0.0, float(scene.width), float(scene.height))
        background = (
            AnnotationObject((chains[_BACKGROUND],), whole)
            if background_box
            else AnnotationObject((chains[_BACKGROUND],), None, scene=True)
        )
        entries.append((chains[_BACKGROUND], background))
    if _SHADOW in chains:
        entries.append((chains[_SHADOW], AnnotationObject((chains[_SHADOW],), None, nobndbox=True)))
    entries.sort(key=lambda entry: entry[0])
    return Annotation(scene.width, scene.height, 3, tuple(obj for _, obj in entries))


# --- Pixels. -----------------------------------------------------------------------------------


def render_scene(scene: Scene) -> Image.Image:
    """Draw ``scene`` as an RGB image of ``scene.width x scene.height`` pixels."""
    background = BACKGROUND_COLOURS[scene.background]
    image = Image.new("RGB", (scene.width, scene.height), background)
    draw = ImageDraw.Draw(image)
    if scene.texture == "striped":
        stripe = tuple(max(0, c - STRIPE_DARKEN) for c in background)
        for y in range(0, scene.height, STRIPE_PERIOD):
            draw.rectangle((0, y, scene.width - 1, y + STRIPE_PERIOD // 2 - 1), fill=stripe)
    if scene.shadows:
        shadow = tuple(round(c * SHADOW_DARKEN) for c in background)
        for obj in scene.objects:
            box = obj.box
            moved = Box(
                box.x1 + SHADOW_OFFSET,
                box.y1 + SHADOW_OFFSET,
                box.x2 + SHADOW_OFFSET,
                box.y2 + SHADOW_OFFSET,
            )
            _draw_shape(draw, obj.shape, moved, shadow)
    for obj in scene.objects:
        _draw_shape(draw, obj.shape, obj.box, OBJECT_COLOURS[obj.colour])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: Box, fill: tuple[int, ...]) -> None:
    """Fill ``shape`` so that it touches every side of ``box`` (exclusive ends)."""
    x1, y1, x2, y2 = int(box.x1), int(box.y1), int(box.x2) - 1, int(box.y2) - 1
    if shape == "circle":
        draw.ellipse((x1, y1, x2, y2), fill=fill)
    elif shape == "square":
        draw.rectangle((x1, y1, x2, y2), fill=fill)
    else:
        points = [(x1 + u * (x2 - x1), y1 + v * (y2 - y1)) for u, v in _unit_polygon(shape)]
        draw.polygon(points, fill=fill)


def _unit_polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices of ``shape`` spanning the unit square ``[0, 1] x [0, 1]`` (y down)."""
    if shape == "triangle":
        return [(0.0, 1.0), (1.0, 1.0), (0.5, 0.0)]
    if shape == "diamond":
        return [(0.5, 0.0), (1.0, 0.5), (0.5, 1.0), (0.0, 0.5)]
    if shape == "star":
        angles = np.pi * (np.arange(10) / 5 - 0.5)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.4)
        xs, ys = radii * np.cos(angles), radii * np.sin(angles)
        xs = (xs - xs.min()) / (xs.max() - xs.min())
        ys = (ys - ys.min()) / (ys.max() - ys.min())
        return [(float(x), float(y)) for x, y in zip(xs, ys, strict=True)]
    raise ValueError(f"unknown shape {shape!r}")


def encode_jpeg(image: Image.Image, quality: int) -> bytes:
    """``image`` as baseline JPEG bytes (no EXIF, no timestamp: same pixels, same bytes)."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality, optimize=True)
    return buffer.getvalue()


def _choice(rng: np.random.Generator, options: Sequence[_T]) -> _T:
    """One item of ``options``, uniformly."""
    return options[int(rng.integers(len(options)))]
