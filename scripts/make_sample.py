"""Regenerate the bundled μ-Bench-format sample from the BCCD blood-cell crops.

Usage: python scripts/make_sample.py [--source ../shared/data/bccd-cell-crops] [--per-class 150]

The output (mubench_probe/data/sample/) is a `datasets.save_to_disk` folder with the μ-Bench
test-split schema: image, image_id (deliberately not unique: the source photo's name),
label/label_name, dataset, the coarse attribute columns, and per-image `captions` and
`questions` dicts whose options are a shuffled subset of candidates plus "None of the above".
Every 25th row's `stain_1` caption is null, as μ-Bench entries can be.
Deterministic: the same source and arguments give the same rows.
"""

from __future__ import annotations

import argparse
import csv
import random
import shutil
from pathlib import Path

import datasets

from mubench_probe.datasets.hf import MUBENCH_METADATA_COLUMNS, NESTED

HERE = Path(__file__).resolve().parent
OUT = HERE.parent / "mubench_probe" / "data" / "sample"
NONE = "None of the above"

# Constant attributes of BCCD, with distractor pools standing in for other μ-Bench sources.
ATTRS = {
    "domain": ("pathology", ["biology"]),
    "subdomain": ("hematology", ["histopathology", "cell biology", "neurobiology", "cytology"]),
    "modality": ("light microscopy", ["fluorescence microscopy", "electron microscopy"]),
    "submodality": (
        "brightfield microscopy",
        [
            "phase contrast microscopy",
            "confocal microscopy",
            "widefield fluorescence microscopy",
            "transmission electron microscopy",
            "scanning electron microscopy",
        ],
    ),
    "stain": (
        "Romanowsky-type stain",
        ["hematoxylin and eosin", "immunohistochemistry", "DAPI", "Papanicolaou stain", "unstained"],
    ),
}
CLASS_TEXT = {
    "platelet": "platelet",
    "red_blood_cell": "red blood cell",
    "white_blood_cell": "white blood cell",
}
CAPTION_TEMPLATES = {
    "classification": ("An image of a {}.", "A light micrograph of a blood smear showing a {}."),
    "domain": ("A {} image.", "A microscopy image from the field of {}."),
    "subdomain": ("A {} image.", "A microscopy image from {}."),
    "modality": ("A {} image.", "An image acquired with {}."),
    "submodality": ("A {} image.", "An image acquired with {}."),
    "stain": ("An image stained with {}.", "A micrograph of a sample prepared with {}."),
}
QUESTIONS = {
    "classification": "What is shown in this image?",
    "domain": "Which domain does this image belong to?",
    "subdomain": "Which subdomain does this image belong to?",
    "modality": "Which microscopy modality was used?",
    "submodality": "Which microscopy submodality was used?",
    "stain": "Which stain was used?",
}


def _options(rng: random.Random, answer: str, pool: list[str], n_distractors: int):
    distractors = rng.sample(pool, min(n_distractors, len(pool)))
    opts = [answer, *distractors]
    rng.shuffle(opts)
    opts.append(NONE)
    return opts, opts.index(answer)


def build(source: Path, per_class: int, seed: int = 0) -> datasets.Dataset:
    with open(source / "labels.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    classes = sorted({r["label"] for r in rows})
    rng = random.Random(seed)
    picked = []
    for c in classes:
        members = sorted((r for r in rows if r["label"] == c), key=lambda r: r["path"])
        picked += rng.sample(members, min(per_class, len(members)))
    picked.sort(key=lambda r: r["path"])
    rng.shuffle(picked)  # classes interleaved, so any --limit prefix has every class

    records: dict[str, list] = {k: [] for k in ("image", *MUBENCH_METADATA_COLUMNS, *NESTED)}
    for i, r in enumerate(picked):
        row_rng = random.Random(f"{seed}-{r['path']}")
        records["image"].append({"bytes": (source / r["path"]).read_bytes(), "path": None})
        records["image_id"].append(r["source_image"])
        records["label"].append(classes.index(r["label"]))
        records["label_name"].append(CLASS_TEXT[r["label"]])
        records["dataset"].append("bccd")
        for k, (value, _) in ATTRS.items():
            records[k].append(value)
        records["ncbitaxon_name"].append("Homo sapiens")
        records["microns_per_pixel"].append(None)
        records["split"].append(r["split"])
        records["synthetic"].append(False)
        records["license"].append("MIT")
        captions, questions = {}, {}
        for key in CAPTION_TEMPLATES:
            if key == "classification":
                answer = CLASS_TEXT[r["label"]]
                pool = [CLASS_TEXT[c] for c in classes if CLASS_TEXT[c] != answer]
                opts, idx = _options(row_rng, answer, pool, len(pool))
            else:
                answer, pool = ATTRS[key]
                opts, idx = _options(row_rng, answer, pool, 2)
            names = ("classification_0", "classification_1") if key == "classification" else (key, f"{key}_1")
            for name, tmpl in zip(names, CAPTION_TEMPLATES[key], strict=True):
                sentences = [NONE if o == NONE else tmpl.format(o) for o in opts]
                null = name == "stain_1" and i % 25 == 0
                captions[name] = None if null else {"options": sentences, "answer_idx": idx}
            questions[key] = {"question": QUESTIONS[key], "options": opts, "answer": answer, "answer_idx": idx}
        records["captions"].append(captions)
        records["questions"].append(questions)

    opt = {"options": datasets.Sequence(datasets.Value("string")), "answer_idx": datasets.Value("int32")}
    qopt = {
        "question": datasets.Value("string"),
        "options": datasets.Sequence(datasets.Value("string")),
        "answer": datasets.Value("string"),
        "answer_idx": datasets.Value("int32"),
    }
    cap_keys = ["classification_0", "classification_1"] + [
        f"{k}{s}" for k in CAPTION_TEMPLATES if k != "classification" for s in ("", "_1")
    ]
    q_keys = list(CAPTION_TEMPLATES)
    s = datasets.Value("string")
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "image_id": s,
            "label": datasets.ClassLabel(names=[CLASS_TEXT[c] for c in classes]),
            "label_name": s,
            "dataset": s,
            "domain": s,
            "subdomain": s,
            "modality": s,
            "submodality": s,
            "stain": s,
            "ncbitaxon_name": s,
            "microns_per_pixel": datasets.Value("float32"),
            "split": s,
            "synthetic": datasets.Value("bool"),
            "license": s,
            "captions": {k: opt for k in cap_keys},
            "questions": {k: qopt for k in q_keys},
        }
    )
    return datasets.Dataset.from_dict(records, features=features)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=HERE.parent.parent / "shared/data/bccd-cell-crops")
    ap.add_argument("--per-class", type=int, default=150)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()
    ds = build(args.source, args.per_class)
    if args.out.exists():
        shutil.rmtree(args.out)
    ds.save_to_disk(str(args.out))
    for name in ("LICENSE-BCCD_Dataset.txt", "SOURCE.md"):
        shutil.copyfile(args.source / name, args.out / name)
    (args.out / "SAMPLE.md").write_text(
        "# Bundled sample\n\nBuilt by `scripts/make_sample.py` from bccd-cell-crops (see SOURCE.md,\n"
        f"licence LICENSE-BCCD_Dataset.txt): {len(ds)} crops, {args.per_class} per class, in the\n"
        "μ-Bench test-split schema. The coarse attributes are constant (one source); their caption\n"
        "options add distractors from other modalities. Every 25th row's `stain_1` caption is null.\n"
    )
    print(f"wrote {len(ds)} rows to {args.out}")


if __name__ == "__main__":
    main()
