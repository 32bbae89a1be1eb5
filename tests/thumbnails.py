"""Template-browser thumbnails: workflows/<name>.jpg from the frontend screenshot
docs/images/<name>.png; and the registry icon, docs/images/icon.png, from the digits demo grid.

ComfyUI's template browser shows ``/api/workflow_templates/<pack>/<name>.jpg`` for each
template of a custom node pack (the server serves the pack's ``workflows/`` folder there) and
draws it whole (object-contain, at most 256 px high) in a square card. A graph crop alone is a
thin strip that looks like every other one, so each thumbnail is square: the template's title
and tags (web/templates.json) on its family's colour, above the graph. tests/test_frontend.py calls
``write_thumbnail`` next to each screenshot it writes (DMD2_WRITE_SCREENSHOTS=1);
``python tests/thumbnails.py`` rebuilds every thumbnail from the screenshots at hand, and the
icon ([tool.comfy] Icon in pyproject.toml): digits 1-9 of the pack's own 4-step DMD2 student.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

REPO = Path(__file__).resolve().parent.parent
TEMPLATES = REPO / "web" / "templates.json"
WIDTH = 512
BAND = 216  # the title band's height; the graph fills the rest of the square
FAMILY_COLOURS = {"DMD2": (38, 92, 178), "Training": (176, 74, 36), "Lightning": (170, 120, 0),
                  "Hyper-SD": (118, 62, 176), "LCM": (34, 130, 78)}
CANVAS = (34, 34, 34)
QUALITY = 85
MARGIN = 24  # canvas kept around the nodes, in screenshot pixels
BLOCK = 8  # the graph's extent is found on 8x8 blocks that are mostly not canvas


def graph_box(image: Image.Image) -> tuple[int, int, int, int]:
    """The box around the nodes: blocks mostly unlike the canvas colour (the most common one).
    Thin things (links, the corner menu button) do not fill a block, node bodies do."""
    pixels = np.asarray(image.convert("RGB")).astype(np.int16)
    colours, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    canvas = colours[counts.argmax()]
    mask = np.abs(pixels - canvas).sum(-1) > 24
    h, w = (mask.shape[0] // BLOCK) * BLOCK, (mask.shape[1] // BLOCK) * BLOCK
    full = mask[:h, :w].reshape(h // BLOCK, BLOCK, w // BLOCK, BLOCK).mean(axis=(1, 3)) > 0.5
    ys, xs = np.nonzero(full)
    if len(xs) == 0:
        return 0, 0, image.width, image.height
    return (max(0, xs.min() * BLOCK - MARGIN), max(0, ys.min() * BLOCK - MARGIN),
            min(image.width, (xs.max() + 1) * BLOCK + MARGIN), min(image.height, (ys.max() + 1) * BLOCK + MARGIN))


def template_meta(name: str) -> dict:
    """The template's title, tags and family from web/templates.json (what the browser shows)."""
    return json.loads(TEMPLATES.read_text())[name]


def wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def write_thumbnail(screenshot: Path, dest: Path, width: int = WIDTH, quality: int = QUALITY) -> Path:
    """A square JPEG of tens of KB: the title on the family's colour, the graph below it."""
    meta = template_meta(dest.stem)
    with Image.open(screenshot) as image:
        graph = image.convert("RGB").crop(graph_box(image))
    card = Image.new("RGB", (width, width), CANVAS)
    draw = ImageDraw.Draw(card)
    draw.rectangle((0, 0, width, BAND), fill=FAMILY_COLOURS[meta["family"]])
    pad, badge = 24, 104  # the step count, large, at the band's right: 1-step and 4-step differ at a glance
    label, title, tags, big = (ImageFont.load_default(size=s) for s in (24, 44, 26, 110))
    steps = next((tag.split()[0] for tag in meta["tags"] if re.fullmatch(r"\d+ steps?", tag)), None)
    if steps:
        draw.text((width - pad - badge // 2, BAND // 2 - 10), steps, font=big, fill="white", anchor="mm")
        draw.text((width - pad - badge // 2, BAND // 2 + 56), "steps" if steps != "1" else "step", font=label,
                  fill="white", anchor="mm")
    draw.text((pad, pad), meta["family"].upper(), font=label, fill=(255, 255, 255, 200))
    y = pad + 34
    for line in wrap(draw, meta["title"], title, width - 2 * pad - (badge if steps else 0))[:2]:
        draw.text((pad, y), line, font=title, fill="white")
        y += 50
    draw.text((pad, y + 10), " · ".join(meta["tags"]), font=tags, fill=(235, 235, 235))
    room = (width - 2 * 8, width - BAND - 2 * 8)
    scale = min(room[0] / graph.width, room[1] / graph.height)
    size = (max(1, round(graph.width * scale)), max(1, round(graph.height * scale)))
    graph = graph.resize(size, Image.Resampling.LANCZOS)
    card.paste(graph, ((width - size[0]) // 2, BAND + (width - BAND - size[1]) // 2))
    card.save(dest, "JPEG", quality=quality, optimize=True)
    return dest


# docs/images/digits_demo_grid.png (training/digits/demo.py _grid): a 110 px label column, then
# 52 px cells holding 8x8 digits drawn 6x at +2,+2; rows real, teacher 50/4/1, DMD2 1-step, 4-step.
GRID_LABEL, GRID_CELL, GRID_SCALE, GRID_ROW_DMD2_4STEP = 110, 52, 6, 5
ICON_BACKGROUND, ICON_INK = (23, 23, 23), (120, 200, 255)


def grid_digit(grid: np.ndarray, row: int, column: int) -> np.ndarray:
    """The 8x8 ink of one digit of the demo grid (0 = none, 1 = full)."""
    y0, x0 = row * GRID_CELL + 2 + GRID_SCALE // 2, GRID_LABEL + column * GRID_CELL + 2 + GRID_SCALE // 2
    tile = grid[y0:y0 + 8 * GRID_SCALE:GRID_SCALE, x0:x0 + 8 * GRID_SCALE:GRID_SCALE]
    return 1.0 - tile.astype(np.float32) / 255.0


def write_icon(grid_png: Path, dest: Path, size: int = 256) -> Path:
    """A square icon: digits 1-9 of the 4-step DMD2 row, 3x3, light on ComfyUI's canvas colour."""
    grid = np.asarray(Image.open(grid_png).convert("L"))
    scale, gap = 9, 12
    margin = (size - 3 * 8 * scale - 2 * gap) // 2
    ink = np.zeros((size, size), np.float32)
    for i, digit in enumerate(range(1, 10)):
        y, x = margin + (i // 3) * (8 * scale + gap), margin + (i % 3) * (8 * scale + gap)
        ink[y:y + 8 * scale, x:x + 8 * scale] = np.kron(grid_digit(grid, GRID_ROW_DMD2_4STEP, digit), np.ones((scale, scale)))
    rgb = np.array(ICON_BACKGROUND) + ink[..., None] * (np.array(ICON_INK) - np.array(ICON_BACKGROUND))
    Image.fromarray(rgb.round().astype(np.uint8), "RGB").save(dest, optimize=True)
    return dest


def main() -> None:
    images = REPO / "docs" / "images"
    icon = write_icon(images / "digits_demo_grid.png", images / "icon.png")
    print(f"{icon.relative_to(REPO)}: {icon.stat().st_size // 1024} KB")
    for workflow in sorted((REPO / "workflows").glob("*.json")):
        screenshot = REPO / "docs" / "images" / f"{workflow.stem}.png"
        dest = write_thumbnail(screenshot, workflow.with_suffix(".jpg"))
        print(f"{dest.relative_to(REPO)}: {dest.stat().st_size // 1024} KB")


if __name__ == "__main__":
    main()
