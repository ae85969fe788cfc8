"""Tests of the synthetic sample: format round trip, quirks, determinism, unambiguous phrases."""

from __future__ import annotations

import io
from collections import Counter

import pytest
from conftest import REPO_ROOT
from PIL import Image

from grounding.data.formats.flickr30k import (
    NOT_VISUAL_CHAIN,
    Annotation,
    CaptionLine,
    check_boxes,
    parse_annotation,
    parse_sentences,
)
from grounding.data.records import Box
from grounding.data.sample import (
    FIRST_IMAGE_ID,
    GENERIC_NOUN,
    NUMBER_WORDS,
    OBJECT_COLOURS,
    QUIRK_CYCLE,
    SHAPES,
    SIZE_WORDS,
    SampleDataset,
    SampleImage,
    Scene,
    SceneObject,
    generate_images,
    generate_sample,
)

#: Two whole quirk cycles: every forced quirk shows up twice.
N_IMAGES = 2 * len(QUIRK_CYCLE)
COMMITTED_SAMPLE = REPO_ROOT / "data" / "sample"
#: Words of an object phrase that name no attribute.
FUNCTION_WORDS = {"a", "an", "the", "on", "at", "near", "side"}
POSITIONS = {"left", "right", "top", "bottom"}
SPLITS = ("train", "val", "test")

Parsed = dict[str, tuple[Annotation, list[CaptionLine]]]


@pytest.fixture(scope="module")
def sample() -> SampleDataset:
    return generate_sample(seed=0, n_images=N_IMAGES)


@pytest.fixture(scope="module")
def images() -> list[SampleImage]:
    return generate_images(seed=0, n_images=N_IMAGES)


@pytest.fixture(scope="module")
def parsed(sample: SampleDataset) -> Parsed:
    """Every image's files parsed back: id -> (annotation, captions)."""
    ids = [str(FIRST_IMAGE_ID + i) for i in range(N_IMAGES)]
    return {
        image_id: (
            parse_annotation(sample.files[f"Annotations/{image_id}.xml"], image_id),
            parse_sentences(sample.files[f"Sentences/{image_id}.txt"], image_id),
        )
        for image_id in ids
    }


def chain_boxes(annotation: Annotation) -> dict[int, set[Box]]:
    """Chain id -> the boxes of the objects that name it."""
    boxes: dict[int, set[Box]] = {}
    for obj in annotation.objects:
        for chain in obj.chain_ids:
            found = boxes.setdefault(chain, set())
            if obj.box is not None:
                found.add(obj.box)
    return boxes


def quirk_total(quirk: str, n_images: int) -> int:
    """How many of the first ``n_images`` images the schedule forces ``quirk`` on."""
    return sum(quirk in QUIRK_CYCLE[i % len(QUIRK_CYCLE)] for i in range(n_images))


def test_files_are_laid_out_as_the_dataset(sample: SampleDataset) -> None:
    ids = [str(FIRST_IMAGE_ID + i) for i in range(N_IMAGES)]
    expected = {f"Annotations/{i}.xml" for i in ids} | {f"Sentences/{i}.txt" for i in ids}
    jpegs = {path for path in sample.files if path.startswith("images/")}
    splits = {name: sample.files[f"{name}.txt"].decode().splitlines() for name in SPLITS}
    assert set(sample.files) == expected | jpegs | {f"{name}.txt" for name in SPLITS}
    assert sorted(id_ for ids_ in splits.values() for id_ in ids_) == ids
    assert [len(splits[name]) for name in SPLITS] == [28, 6, 6]
    missing = [i for i in ids if f"images/{i}.jpg" not in jpegs]
    assert len(missing) == 1 and len(jpegs) == N_IMAGES - 1
    assert any(missing[0] in split for split in splits.values())


def test_captions_are_tokenised_as_the_dataset(sample: SampleDataset) -> None:
    for path, content in sample.files.items():
        if not path.startswith("Sentences/"):
            continue
        text = content.decode("utf-8")
        assert text.endswith("\n") and "\r" not in text
        lines = text.splitlines()
        assert len(lines) == 5
        for line in lines:
            assert line == " ".join(line.split()) and line.endswith(" .")
            assert line[0].isupper() or line.startswith("[/EN#")


def test_round_trip_gives_boxes_to_every_visual_chain(parsed: Parsed) -> None:
    for image_id, (annotation, captions) in parsed.items():
        check_boxes(annotation, image_id)
        boxes = chain_boxes(annotation)
        boxless = {
            chain
            for obj in annotation.objects
            if obj.box is None and (obj.nobndbox or obj.scene)
            for chain in obj.chain_ids
        }
        mentioned = {m.chain_id for c in captions for m in c.mentions}
        assert NOT_VISUAL_CHAIN not in boxes
        assert set(boxes) == mentioned - {NOT_VISUAL_CHAIN}
        for caption in captions:
            for mention in caption.mentions:
                if mention.chain_id == NOT_VISUAL_CHAIN:
                    assert mention.types == ("notvisual",)
                elif mention.chain_id in boxless:
                    assert not boxes[mention.chain_id]
                else:
                    assert boxes[mention.chain_id], (image_id, mention)


def test_images_match_their_annotations(sample: SampleDataset, images: list[SampleImage]) -> None:
    for image in images:
        path = f"images/{image.image_id}.jpg"
        if path not in sample.files:
            continue
        pixels = Image.open(io.BytesIO(sample.files[path]))
        assert pixels.size == (image.annotation.width, image.annotation.height)
        assert pixels.format == "JPEG" and "exif" not in pixels.info
        rgb = pixels.convert("RGB")
        for obj in image.scene.objects:
            centre = ((obj.box.x1 + obj.box.x2) // 2, (obj.box.y1 + obj.box.y2) // 2)
            drawn = rgb.getpixel((int(centre[0]), int(centre[1])))
            expected = OBJECT_COLOURS[obj.colour]
            assert max(abs(a - b) for a, b in zip(drawn, expected, strict=True)) <= 40, obj


def test_every_quirk_is_present(sample: SampleDataset, parsed: Parsed) -> None:
    mentions = [m for _, captions in parsed.values() for c in captions for m in c.mentions]
    objects = [obj for annotation, _ in parsed.values() for obj in annotation.objects]
    captions = [c for _, captions in parsed.values() for c in captions]
    multi_box_chains = sum(
        len(found) >= 2
        for annotation, _ in parsed.values()
        for found in chain_boxes(annotation).values()
    )
    quirks = Counter(
        two_types=sum(len(m.types) >= 2 for m in mentions),
        shared_box=sum(obj.box is not None and len(obj.chain_ids) >= 2 for obj in objects),
        multi_box_chain=multi_box_chains,
        not_visual=sum(m.chain_id == NOT_VISUAL_CHAIN for m in mentions),
        no_box=sum(obj.box is None and obj.nobndbox for obj in objects),
        scene_flag=sum(obj.box is None and obj.scene for obj in objects),
        no_phrase=sum(not c.mentions for c in captions),
        non_ascii=sum(not c.text.isascii() for c in captions),
    )
    missing = [i for i in parsed if f"images/{i}.jpg" not in sample.files]
    assert len(missing) == 1
    # Forced only by the schedule, so exact; one phrase / object / caption per forced image.
    assert quirks["not_visual"] == quirk_total("not_visual", len(parsed))
    assert quirks["no_box"] == quirk_total("no_box", len(parsed))
    assert quirks["scene_flag"] == quirk_total("scene_flag", len(parsed))
    assert quirks["no_phrase"] == quirk_total("no_phrase", len(parsed))
    images_with_two_types = sum(
        any(len(m.types) >= 2 for c in captions for m in c.mentions)
        for _, captions in parsed.values()
    )
    assert images_with_two_types == quirk_total("two_types", len(parsed))
    # Also arising by chance, so at least the forced number.
    assert quirks["two_types"] >= quirk_total("two_types", len(parsed))
    assert quirks["shared_box"] >= quirk_total("shared_box", len(parsed))
    assert quirks["multi_box_chain"] >= quirk_total("shared_box", len(parsed))
    assert quirks["non_ascii"] >= quirk_total("non_ascii", len(parsed))
    assert min(quirks.values()) >= 2


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    first = generate_sample(seed=3, n_images=6)
    assert generate_sample(seed=3, n_images=6) == first
    other = generate_sample(seed=4, n_images=6)
    assert other.files["Sentences/100000001.txt"] != first.files["Sentences/100000001.txt"]


def test_an_image_does_not_depend_on_how_many_are_drawn() -> None:
    assert generate_images(seed=5, n_images=3) == generate_images(seed=5, n_images=7)[:3]


def resolve(text: str, scene: Scene) -> tuple[set[Box], int | None, bool]:
    """The boxes of the scene's objects that an object phrase's words describe.

    A position word names a half of the image (the object's box centre lies in it). Returns the
    boxes, the number the phrase states ("two", "both") if any, and whether its noun is plural.
    """
    colour = shape = size = position = None
    count: int | None = None
    plural = False
    sizes = {word: size for size, words in SIZE_WORDS.items() for word in words}
    numbers = {word: n for n, word in NUMBER_WORDS.items()} | {"both": 2}
    for word in text.lower().split():
        if word in OBJECT_COLOURS:
            colour = word
        elif word in SHAPES or word == GENERIC_NOUN:
            shape = word if word in SHAPES else None
        elif word.endswith("s") and (word[:-1] in SHAPES or word[:-1] == GENERIC_NOUN):
            shape, plural = (word[:-1] if word[:-1] in SHAPES else None), True
        elif word in sizes:
            size = sizes[word]
        elif word in POSITIONS:
            position = word
        elif word in numbers:
            count = numbers[word]
        else:
            assert word in FUNCTION_WORDS, f"unexpected word {word!r} in {text!r}"
    found = set()
    for obj in scene.objects:
        cx = (obj.box.x1 + obj.box.x2) / 2 / scene.width
        cy = (obj.box.y1 + obj.box.y2) / 2 / scene.height
        halves = {"left": cx < 0.5, "right": cx > 0.5, "top": cy < 0.5, "bottom": cy > 0.5}
        if (
            colour in (None, obj.colour)
            and shape in (None, obj.shape)
            and size in (None, obj.size)
            and (position is None or halves[position])
        ):
            found.add(obj.box)
    return found, count, plural


def test_every_phrase_names_exactly_its_boxes(images: list[SampleImage], parsed: Parsed) -> None:
    checked = 0
    for image in images:
        annotation, captions = parsed[image.image_id]
        boxes = chain_boxes(annotation)
        for caption in captions:
            for mention in caption.mentions:
                if "scene" in mention.types:
                    whole = Box(0.0, 0.0, float(image.scene.width), float(image.scene.height))
                    assert boxes[mention.chain_id] in ({whole}, set())
                    continue
                if mention.chain_id == NOT_VISUAL_CHAIN or "shadow" in mention.text:
                    continue
                found, count, plural = resolve(mention.text, image.scene)
                assert found == boxes[mention.chain_id], (image.image_id, mention.text)
                assert len(found) == (count or len(found))
                assert (len(found) > 1) == plural, mention.text
                checked += 1
    assert checked > 5 * N_IMAGES


def test_resolve_reads_position_and_size_words() -> None:
    scene = Scene(
        width=100,
        height=100,
        background="grey",
        texture="plain",
        shadows=False,
        objects=(
            SceneObject("red", "circle", "small", Box(5, 5, 25, 25)),
            SceneObject("red", "circle", "large", Box(60, 60, 95, 95)),
        ),
    )
    assert resolve("the red circle on the left", scene)[0] == {Box(5, 5, 25, 25)}
    assert resolve("a big red circle", scene)[0] == {Box(60, 60, 95, 95)}
    assert resolve("both circles", scene) == ({Box(5, 5, 25, 25), Box(60, 60, 95, 95)}, 2, True)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="n_images"):
        generate_images(seed=0, n_images=0)
    with pytest.raises(ValueError, match="split fractions"):
        generate_sample(seed=0, n_images=2, train_fraction=0.9, val_fraction=0.2)


def test_committed_sample_is_the_default_sample() -> None:
    if not COMMITTED_SAMPLE.is_dir():
        pytest.skip(f"no committed sample at {COMMITTED_SAMPLE}")
    committed = {
        path.relative_to(COMMITTED_SAMPLE).as_posix(): path.read_bytes()
        for path in sorted(COMMITTED_SAMPLE.rglob("*"))
        if path.is_file()
    }
    generated = generate_sample().files
    assert sorted(committed) == sorted(generated)
    changed = [path for path in generated if committed[path] != generated[path]]
    assert not changed, f"{len(changed)} files differ from generate_sample(), e.g. {changed[:3]}"
