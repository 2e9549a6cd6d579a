"""The images a face_expression pipeline is measured with: the harness's photos, the astronaut (one
face) and a group image of 8 real faces on one canvas (`group_image`).

No photo of a group ships with the project's dependencies, so the group is made the way the
integration tests make theirs: the face of scikit-image's `astronaut.png` (Eileen Collins) cut out
and pasted 8 times onto a plain canvas, at several sizes, every other one mirrored, in a 4 x 2
grid. Each is a real face the detector finds and the classifier classifies; made in memory, once
per run, encoded as JPEG like the other photos.
"""

from __future__ import annotations

import io

from PIL import Image

from bench.images import DEFAULT_QUALITY, BenchImage, as_jpeg, default_images
from visionserve.photos import packaged_photo

ONE_FACE_PHOTO = "astronaut.png"
"""The packaged photo with one face."""
FACE_REGION = (150, 30, 300, 210)
"""The cut of astronaut.png around her face (x1, y1, x2, y2) pasted into the group image."""
GROUP_FACES = 8
"""Faces in the group image."""
GROUP_SIZE = (800, 480)
"""The group image's width and height: a 4 x 2 grid of 200 x 240 cells."""
GROUP_SCALES = (0.9, 0.75, 1.0, 0.8, 0.85, 1.0, 0.7, 0.95)
"""Each face's size against the cut (150 x 180 px): faces of about 70 to 95 px across."""
GROUP_BACKGROUND = (96, 110, 120)
GROUP_NAME = f"group-{GROUP_FACES}-faces.jpg"


def one_face_image() -> BenchImage:
    """The astronaut as the harness sends every photo (600 px JPEG): one face."""
    return as_jpeg(packaged_photo(ONE_FACE_PHOTO))


def group_image(*, quality: int = DEFAULT_QUALITY) -> BenchImage:
    """`GROUP_FACES` copies of the astronaut's face on one canvas, as a JPEG."""
    path = packaged_photo(ONE_FACE_PHOTO)
    with Image.open(path) as opened:
        cut = opened.convert("RGB").crop(FACE_REGION)
    canvas = Image.new("RGB", GROUP_SIZE, GROUP_BACKGROUND)
    columns = GROUP_FACES // 2
    cell_width, cell_height = GROUP_SIZE[0] // columns, GROUP_SIZE[1] // 2
    for number, scale in enumerate(GROUP_SCALES[:GROUP_FACES]):
        row, column = divmod(number, columns)
        size = (round(cut.width * scale), round(cut.height * scale))
        piece = cut.resize(size, Image.Resampling.BILINEAR)
        if number % 2:
            piece = piece.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        left = column * cell_width + (cell_width - piece.width) // 2
        top = row * cell_height + (cell_height - piece.height) // 2
        canvas.paste(piece, (left, top))
    buffer = io.BytesIO()
    canvas.save(buffer, format="JPEG", quality=quality)
    return BenchImage(
        name=GROUP_NAME,
        data=buffer.getvalue(),
        width=GROUP_SIZE[0],
        height=GROUP_SIZE[1],
        format="JPEG",
        source=f"the face of {path} ({FACE_REGION}) pasted {GROUP_FACES} times onto a "
        f"{GROUP_SIZE[0]}x{GROUP_SIZE[1]} canvas, JPEG quality {quality}",
    )


def face_photos() -> list[BenchImage]:
    """What a face_expression model is sent: every packaged photo (as `default_images`; the
    astronaut among them) and the group image."""
    return [*default_images(), group_image()]
