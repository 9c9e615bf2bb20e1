import csv

import numpy as np
import pytest

from mubench_probe.datasets import load_dataset
from mubench_probe.datasets.hf import MUBENCH_METADATA_COLUMNS
from mubench_probe.errors import DatasetUnavailableError
from mubench_probe.tasks import derive_tasks


def test_sample_has_the_mubench_schema(sample):
    assert len(sample) == 450
    assert set(MUBENCH_METADATA_COLUMNS) <= set(sample.meta.columns)
    assert sample.meta["image_id"].duplicated().any(), "image_id is not unique in μ-Bench either"
    assert {"classification_0", "classification_1", "modality", "stain_1"} <= set(sample.captions)
    nulls = [i for i, c in enumerate(sample.captions["stain_1"]) if c is None]
    assert nulls and nulls[0] == 0
    item = sample.captions["classification_0"][5]
    assert item.options[-1] == "None of the above"
    assert sample.meta["label_name"][5] in item.options[item.answer_idx]
    assert sample.identity["fingerprint"]


def test_fine_and_coarse_tasks(sample):
    tasks = {t.name: t for t in derive_tasks(sample.meta)}
    fine = tasks["fine/bccd"]
    assert fine.classes == ("platelet", "red blood cell", "white blood cell")
    assert len(fine.rows) == 450 and np.bincount(fine.y).tolist() == [150, 150, 150]
    # the sample has one source: constant coarse attributes are not tasks
    assert not any(n.startswith("coarse/") for n in tasks)


def test_limit_keeps_first_rows(sample):
    ds = load_dataset("sample", limit=10)
    assert len(ds) == 10 and ds.identity["limit"] == "10"
    assert ds.reader.read(3) == sample.reader.read(3)
    assert all(len(v) == 10 for v in ds.captions.values())


def _write_images(root, real_crops):
    paths = []
    for i, data in enumerate(real_crops[:6]):
        cls = "a" if i % 2 else "b"
        (root / cls).mkdir(parents=True, exist_ok=True)
        p = root / cls / f"img{i}.jpg"
        p.write_bytes(data)
        paths.append((p, cls))
    return paths


def test_image_folder(tmp_path, real_crops):
    _write_images(tmp_path / "cells", real_crops)
    ds = load_dataset(str(tmp_path / "cells"))
    assert len(ds) == 6 and sorted(set(ds.meta["label_name"])) == ["a", "b"]
    assert ds.reader.read(0) == (tmp_path / "cells" / ds.meta["path"][0]).read_bytes()


def test_csv_manifest_keeps_metadata(tmp_path, real_crops):
    paths = _write_images(tmp_path, real_crops)
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "label", "modality"])
        for i, (p, cls) in enumerate(paths):
            w.writerow([p.relative_to(tmp_path), cls, "fluorescence" if i < 3 else "brightfield"])
    ds = load_dataset(str(tmp_path / "m.csv"))
    assert list(ds.meta["label_name"]) == [c for _, c in paths]
    names = {t.name for t in derive_tasks(ds.meta)}
    assert names == {"fine/m", "coarse/modality"}


def test_parquet_files(tmp_path, sample):
    import datasets

    ds = datasets.load_from_disk(str(__import__("mubench_probe").datasets.sample_path())).select(range(5))
    ds.to_parquet(str(tmp_path / "five.parquet"))
    loaded = load_dataset(str(tmp_path / "five.parquet"))
    assert len(loaded) == 5 and loaded.reader.read(2) == sample.reader.read(2)
    assert loaded.captions["modality"][0] == sample.captions["modality"][0]


@pytest.mark.parametrize("spec", ["/no/such/dir", "missing.csv", "org/not-a-dataset"])
def test_unresolvable_specs_raise_clear_errors(spec):
    with pytest.raises(DatasetUnavailableError) as exc:
        load_dataset(spec)
    assert spec.split("/")[-1].split(".")[0] in str(exc.value)
