"""How far can a prior-sized box rule go on the real NIH boxes (issue 11)? Its box is the
finding's median box-val box size; centred exactly on a box-test lesion, how often does it reach
IoU >= 0.3 with that lesion? An upper bound (perfect centring) for the ``*-prior`` rules, which the
phantoms cannot give: several phantom findings are drawn at one size, where the bound is 1.

    python bench/prior_ceiling.py [--nih ../shared/nih]

Uses the project's own pieces: the NIH parsers, the patient split into box-val and box-test, and
``box_size_priors``; box coordinates are in the 1024 px PNGs' pixels (NIH's convention).
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_NIH = Path(__file__).resolve().parents[2] / "shared" / "nih"
PNG_SIDE = 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nih", type=Path, default=DEFAULT_NIH)
    args = parser.parse_args()
    if not (args.nih / "BBox_List_2017.csv.gz").exists():
        raise SystemExit(f"{args.nih}: no BBox_List_2017.csv.gz; pass --nih")

    from cxr_miner.miner.tuning import box_size_priors
    from cxr_miner.storage.inputs.nih import read_bbox_list, read_data_entry
    from cxr_miner.storage.stages.box_splits import BOX_VAL, box_splits

    boxes = read_bbox_list(args.nih / "BBox_List_2017.csv.gz")
    patients = {row.image_id: row.patient_id for row in read_data_entry(args.nih / "Data_Entry_2017_v2020.csv.gz")}
    truth: dict[str, dict[str, list[list[float]]]] = {}
    for b in boxes:
        truth.setdefault(b.image_id, {}).setdefault(b.finding, []).append([b.x_min, b.y_min, b.x_max, b.y_max])
    halves = box_splits(patients, truth)
    side = {image: (PNG_SIDE, PNG_SIDE) for image in truth}
    priors = box_size_priors(truth, [i for i, h in halves.items() if h == BOX_VAL], side)
    print(
        f"{'finding':14s} {'box-val boxes':>13s} {'median w x h (of the image)':>28s} {'box-test boxes':>14s} {'IoU >= 0.3 at the true centre':>30s}"
    )
    for finding, (w, h) in priors.items():
        tests = [
            (b[2] - b[0], b[3] - b[1]) for i, f in truth.items() if halves[i] != BOX_VAL for b in f.get(finding, [])
        ]
        fitted = sum(len(f.get(finding, [])) for i, f in truth.items() if halves[i] == BOX_VAL)
        pw, ph = w * PNG_SIDE, h * PNG_SIDE
        reach = [min(pw, tw) * min(ph, th) / (pw * ph + tw * th - min(pw, tw) * min(ph, th)) >= 0.3 for tw, th in tests]
        print(f"{finding:14s} {fitted:13d} {w:13.3f} x {h:.3f}{'':8s} {len(tests):14d} {sum(reach) / len(reach):30.2f}")


if __name__ == "__main__":
    main()
