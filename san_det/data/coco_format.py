"""The COCO instances format, checked on a json's content before detectron2 reads it.

detectron2's ``load_coco_json`` trusts its input: two images sharing an ``id`` silently merge (one
image gets the other's boxes, the other vanishes), a bbox of strings or ``null`` fails hours later
in a loader worker, an annotation of an unknown category is a ``KeyError``.
:func:`check_coco_content` finds every such problem at once, each named by the image or
annotation it concerns:

- the top level is an object with ``images``, ``annotations`` and ``categories`` lists;
- categories: objects with a unique integer ``id`` and a non-empty string ``name``;
- images: objects with a unique integer ``id``, a non-empty string ``file_name`` and positive
  integer ``width`` and ``height`` (``64.0`` counts as an integer);
- annotations: objects with a unique integer ``id``, the ``image_id`` of an image and the
  ``category_id`` of a category of the file, a ``bbox`` of four finite numbers ``[x, y, w, h]``,
  ``area`` a finite number >= 0, ``iscrowd`` 0 or 1 when given, a ``segmentation`` that is a list
  of polygons or an RLE object when given. Training needs no ``area``, COCO evaluation does:
  annotations without one are listed apart (``without_area``).

Boxes with a non-positive width or height, or outside their image, are valid COCO: the training
loader drops them (:func:`san_det.data.mapper.sanitize_dataset_dicts`); the check counts the images
left with a usable box so that an empty training set is found before training starts.
"""

import math
from typing import Dict, List, NamedTuple, Set

__all__ = ["CocoContent", "ImageEntry", "Problem", "check_coco_content"]

REQUIRED_LISTS = ("images", "annotations", "categories")


class Problem(NamedTuple):
    """One thing wrong with a dataset."""

    kind: str  #: what is wrong, as a plural noun for counts ("duplicate image ids")
    text: str  #: one clause naming the image or annotation ("image id 2: ...")
    path: str = ""  #: the image file it concerns ("" for a problem of the json)


class ImageEntry(NamedTuple):
    """A well-formed entry of ``images``."""

    image_id: int
    file_name: str
    width: int
    height: int


class CocoContent(NamedTuple):
    """What :func:`check_coco_content` found."""

    problems: List[Problem]
    images: List[ImageEntry]  #: well-formed images, first of each id
    boxed_image_ids: Set[int]  #: images with a box the training loader keeps (non-crowd)
    num_boxes: int  #: non-crowd annotations with a box the training loader keeps
    without_area: List[Problem]  #: annotations without ``area`` (COCO evaluation needs it)


def _is_int(value) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _show(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plural(kind: str) -> str:
    return "categories" if kind == "category" else f"{kind}s"


def _where(kind: str, index: int, entry) -> str:
    """``image id 3`` or, without a usable id, ``images[2]`` (the position in the list)."""
    if isinstance(entry, dict) and _is_int(entry.get("id")):
        return f"{kind} id {int(entry['id'])}"
    return f"{_plural(kind)}[{index}]"


def _check_ids(entries: List, kind: str, problems: List[Problem]) -> Dict[int, int]:
    """``{id: index}`` of the objects of ``entries`` with an integer id; bad and repeated ids
    are problems."""
    first: Dict[int, int] = {}
    kinds = _plural(kind)
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            problems.append(
                Problem(f"malformed {kinds}", f"{kinds}[{index}] is {_show(entry)}, not an object")
            )
            continue
        if "id" not in entry:
            problems.append(Problem(f"{kinds} without id", f"{kinds}[{index}] has no 'id'"))
            continue
        if not _is_int(entry["id"]):
            problems.append(
                Problem(
                    f"malformed {kind} ids",
                    f"{kinds}[{index}]: id {_show(entry['id'])} is not an integer",
                )
            )
            continue
        key = int(entry["id"])
        if key in first:
            earlier = entries[first[key]]
            names = ""
            if kind == "image":
                names = f" ({earlier.get('file_name')!r} and {entry.get('file_name')!r})"
            elif kind == "category":
                names = f" ({earlier.get('name')!r} and {entry.get('name')!r})"
            problems.append(
                Problem(
                    f"duplicate {kind} ids",
                    f"{kind} id {key} is used twice{names}, at {kinds}[{first[key]}] and "
                    f"{kinds}[{index}]",
                )
            )
            continue
        first[key] = index
    return first


def _check_categories(categories: List, problems: List[Problem]) -> Set[int]:
    if not categories:
        problems.append(Problem("empty category lists", "'categories' is empty"))
    ids = _check_ids(categories, "category", problems)
    for key, index in ids.items():
        name = categories[index].get("name")
        if not isinstance(name, str) or not name:
            problems.append(
                Problem(
                    "malformed categories",
                    f"category id {key}: name {_show(name)} is not a non-empty string",
                )
            )
    return set(ids)


def _check_images(images: List, problems: List[Problem]):
    """``({id: ImageEntry} of the well-formed images, every image id)``."""
    entries: Dict[int, ImageEntry] = {}
    ids = _check_ids(images, "image", problems)
    for key, index in ids.items():
        image = images[index]
        where = f"image id {key}"
        file_name = image.get("file_name")
        ok = True
        if not isinstance(file_name, str) or not file_name:
            problems.append(
                Problem(
                    "malformed images",
                    f"{where}: file_name {_show(file_name)} is not a non-empty string",
                )
            )
            ok = False
        for side in ("width", "height"):
            if side not in image:
                problems.append(Problem("malformed images", f"{where}: no '{side}'"))
                ok = False
            elif not _is_int(image[side]) or image[side] <= 0:
                problems.append(
                    Problem(
                        "malformed images",
                        f"{where}: {side} {_show(image[side])} is not a positive integer",
                    )
                )
                ok = False
        if ok:
            entries[key] = ImageEntry(key, file_name, int(image["width"]), int(image["height"]))
    return entries, set(ids)


def _bbox_problem(bbox) -> str:
    if not isinstance(bbox, (list, tuple)):
        return f"bbox {_show(bbox)} is not a list [x, y, width, height]"
    if len(bbox) != 4:
        return f"bbox {_show(bbox)} has {len(bbox)} numbers, not 4 [x, y, width, height]"
    if not all(_is_number(v) for v in bbox):
        return f"bbox {_show(bbox)} holds a value that is not a number"
    if not all(math.isfinite(v) for v in bbox):
        return f"bbox {_show(bbox)} holds NaN or infinity"
    return ""


def _segmentation_ok(segmentation) -> bool:
    if isinstance(segmentation, dict):
        return "counts" in segmentation and "size" in segmentation
    if isinstance(segmentation, list):
        return all(
            isinstance(poly, list) and all(_is_number(v) for v in poly) for poly in segmentation
        )
    return False


def _usable_box(bbox, image: ImageEntry) -> bool:
    """Whether the training loader keeps the box (positive size, some area inside the image)."""
    x, y, w, h = bbox
    x0, y0 = min(max(x, 0.0), image.width), min(max(y, 0.0), image.height)
    x1, y1 = min(max(x + w, 0.0), image.width), min(max(y + h, 0.0), image.height)
    return x1 > x0 and y1 > y0


def _reference_problem(ann: dict, key: str, ids, one: str, many: str):
    """``(kind, text)`` if ``ann[key]`` is missing or not one of ``ids`` (those of the file's
    ``many``, e.g. "images"; ``one``: "an image"), else ``None``."""
    value = ann.get(key)
    if key not in ann:
        return ("malformed annotations", f"no '{key}'")
    if not _is_int(value) or int(value) not in ids:
        text = f"{key} {_show(value)} is not the id of {one} of the file"
        return (f"annotations of unknown {many}", text)
    return None


def _check_annotations(annotations, images, image_ids, category_ids, problems) -> CocoContent:
    boxed: Set[int] = set()
    num_boxes = 0
    without_area: List[Problem] = []
    ids = _check_ids(annotations, "annotation", problems)
    for index, ann in enumerate(annotations):
        if not isinstance(ann, dict) or ids.get(_int_or_none(ann.get("id"))) != index:
            continue  # reported by _check_ids
        where = _where("annotation", index, ann)
        found = [
            p
            for p in (
                _reference_problem(ann, "image_id", image_ids, "an image", "images"),
                _reference_problem(ann, "category_id", category_ids, "a category", "categories"),
            )
            if p is not None
        ]
        bbox_problem = "no 'bbox'" if "bbox" not in ann else _bbox_problem(ann["bbox"])
        if bbox_problem:
            found.append(("malformed boxes", bbox_problem))
        area = ann.get("area")
        if "area" not in ann:
            text = f"{where}: no 'area' (COCO evaluation reads each annotation's area)"
            without_area.append(Problem("annotations without area", text))
        elif not _is_number(area) or not math.isfinite(area) or area < 0:
            found.append(("malformed annotations", f"area {_show(area)} is not a number >= 0"))
        crowd = ann.get("iscrowd", 0)
        if crowd not in (0, 1):
            found.append(("malformed annotations", f"iscrowd {_show(crowd)} is not 0 or 1"))
        segmentation = ann.get("segmentation")
        if segmentation and not _segmentation_ok(segmentation):
            text = f"segmentation {_show(segmentation)} is neither a list of polygons nor an RLE"
            found.append(("malformed annotations", text + " object"))
        problems.extend(Problem(kind, f"{where}: {text}") for kind, text in found)
        image = images.get(int(ann["image_id"])) if not found else None
        if image is not None and not crowd and _usable_box(ann["bbox"], image):
            boxed.add(int(ann["image_id"]))
            num_boxes += 1
    return CocoContent(problems, list(images.values()), boxed, num_boxes, without_area)


def _int_or_none(value):
    return int(value) if _is_int(value) else None


def check_coco_content(data) -> CocoContent:
    """Check the parsed json of a COCO instances file (see the module docstring).

    Returns:
        Every problem found, in file order, and the well-formed images and box counts.
    """
    problems: List[Problem] = []
    if not isinstance(data, dict):
        text = f"the file holds a {type(data).__name__}, not an object with images, annotations "
        problems.append(Problem("not COCO instances", text + "and categories"))
        return CocoContent(problems, [], set(), 0, [])
    for key in REQUIRED_LISTS:
        if key not in data:
            text = f"no {key!r} key (a COCO instances json has 'images', 'annotations' and "
            problems.append(Problem("missing keys", text + "'categories' lists)"))
        elif not isinstance(data[key], list):
            text = f"{key!r} is a {type(data[key]).__name__}, not a list"
            problems.append(Problem("missing keys", text))
    if problems:
        return CocoContent(problems, [], set(), 0, [])
    category_ids = _check_categories(data["categories"], problems)
    images, image_ids = _check_images(data["images"], problems)
    return _check_annotations(data["annotations"], images, image_ids, category_ids, problems)
