"""Label Studio labelling configs (XML): the review project's and the concept backend's.

Review project (:func:`review_config`), one task per exported (image, phrase) pair::

    <Header value="$phrase"/>                 the pair's noun phrase, and the verifiers' flags below it
    <Image name="image" value="$image"/>
    <BrushLabels name="mask">                 one Label per phrase of the review set (a region's label is
                                              its phrase: relabelling moves it to that phrase's query)
    <Choices name="status" perRegion>         kept | rejected: the engine's verdict on a proposed mask
    <Choices name="exhaustive">               exhaustive | not exhaustive: every instance is marked

Concept backend project (:func:`concept_config`): a TextArea for the noun phrase, RectangleLabels for
exemplar boxes, BrushLabels for the masks the backend returns (sam3_train.engine.label_studio.backend).
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from collections.abc import Iterable
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

IMAGE = "image"
MASK = "mask"
STATUS = "status"
EXHAUSTIVE = "exhaustive"
KEPT, REJECTED = "kept", "rejected"
COMPLETE, INCOMPLETE = "exhaustive", "not exhaustive"
PHRASE = "phrase"
EXEMPLAR = "exemplar"


def review_config(phrases: Iterable[str]) -> str:
    """The review project's labelling config; ``phrases``: the review set's categories, in order."""
    labels = "\n".join(f"    <Label value={quoteattr(p)}/>" for p in phrases)
    return f"""<View>
  <Header value="$phrase"/>
  <Header value="$flags" size="6"/>
  <Image name="{IMAGE}" value="$image" zoom="true" zoomControl="true"/>
  <BrushLabels name="{MASK}" toName="{IMAGE}">
{labels}
  </BrushLabels>
  <Choices name="{STATUS}" toName="{IMAGE}" perRegion="true" choice="single-radio" showInline="true">
    <Choice value="{KEPT}"/>
    <Choice value="{REJECTED}"/>
  </Choices>
  <Choices name="{EXHAUSTIVE}" toName="{IMAGE}" choice="single-radio" showInline="true">
    <Choice value="{COMPLETE}"/>
    <Choice value="{INCOMPLETE}"/>
  </Choices>
</View>"""


def concept_config(labels: Iterable[str] = ("object",)) -> str:
    """A project config for the concept backend: type a phrase and/or draw exemplar boxes, get masks."""
    options = "\n".join(f"    <Label value={quoteattr(label)}/>" for label in labels)
    return f"""<View>
  <Image name="{IMAGE}" value="$image" zoom="true"/>
  <TextArea name="{PHRASE}" toName="{IMAGE}" editable="true" maxSubmissions="1" rows="1"
            placeholder="a noun phrase, e.g. yellow school bus"/>
  <RectangleLabels name="{EXEMPLAR}" toName="{IMAGE}" smart="true">
    <Label value="{EXEMPLAR}"/>
  </RectangleLabels>
  <BrushLabels name="{MASK}" toName="{IMAGE}" smart="true">
{options}
  </BrushLabels>
</View>"""


@dataclass(frozen=True)
class ControlNames:
    """The tag names the concept backend reads and writes in a project's config (None: absent)."""

    image: str
    image_value: str  # the task data field holding the image URL ($image -> "image")
    brush: str
    brush_labels: tuple[str, ...]
    phrase: str | None = None
    exemplar: str | None = None


def control_names(config: str) -> ControlNames:
    """Find the Image, BrushLabels, TextArea and RectangleLabels tags of a labelling config.

    Raises ValueError naming what is missing: the backend needs an Image and a BrushLabels tag (with
    at least one Label) to answer with masks.
    """
    try:
        root = ET.fromstring(config)
    except ET.ParseError as exn:
        raise ValueError(f"the labelling config is not valid XML: {exn}") from None
    tags: dict[str, list[ET.Element]] = {}
    for element in root.iter():
        tags.setdefault(element.tag.lower(), []).append(element)
    image = next(iter(tags.get("image", [])), None)
    brush = next(iter(tags.get("brushlabels", [])), None)
    if image is None or brush is None:
        raise ValueError("the labelling config needs an <Image> and a <BrushLabels> tag for the SAM 3 backend's masks")
    labels = tuple(label.get("value", "") for label in brush.iter() if label.tag.lower() == "label")
    if not labels:
        raise ValueError(f"<BrushLabels name={brush.get('name')!r}> has no <Label>: add one for the masks")
    phrase = next((e.get("name") for e in tags.get("textarea", [])), None)
    exemplar = next((e.get("name") for e in tags.get("rectanglelabels", []) + tags.get("rectangle", [])), None)
    return ControlNames(image=image.get("name", ""), image_value=image.get("value", "").lstrip("$"), brush=brush.get("name", ""), brush_labels=labels, phrase=phrase, exemplar=exemplar)
