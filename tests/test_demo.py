"""`agepipe demo` as a newcomer runs it: faces where there are faces, none on the face-free photos, and a
closing table of what was found that Ray's logs do not bury."""

from __future__ import annotations

from pathlib import Path

from helpers import run_cli


def test_demo_ends_with_a_table_of_each_photos_faces_and_the_report(tmp_path) -> None:
    result = run_cli("demo", "--output", str(tmp_path / "demo"))
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    table = lines[lines.index(next(line for line in lines if line.startswith("photo"))) :]
    rows = {}
    for line in table[1:]:
        if line.startswith("report: "):
            break
        if line.strip():
            name, *rest = line.split()
            rows.setdefault(name, []).append(rest)
    assert set(rows) == {"astronaut.jpg", "camera.jpg", "chelsea.jpg", "coffee.jpg"}
    for face_free in ("chelsea.jpg", "coffee.jpg"):
        assert rows[face_free] == [["-", "no_face"]], rows[face_free]
    astronaut = rows["astronaut.jpg"]
    assert len(astronaut) == 1 and astronaut[0][0] == "0" and 15 < float(astronaut[0][1]) < 70
    low, high = map(float, astronaut[0][2].split("-"))  # the age's calibrated interval
    assert low <= float(astronaut[0][1]) <= high and high - low > 2
    report = Path(lines[-1].removeprefix("report: "))
    assert lines[-1].startswith("report: ") and report.is_file()
    # Nothing from Ray between the table and the end, and no start-up chatter on stdout at all.
    assert "INFO" not in result.stdout and "Started a local Ray instance" not in result.stdout
