"""The data format (shared.dataset) and `fleetlearn partition`: splits, determinism, errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fleetlearn.cli import main
from fleetlearn.device.agent import ArrayData
from fleetlearn.firmware_sim.partition import PartitionError, partition
from fleetlearn.shared import dataset
from fleetlearn.shared.dataset import DataError, Dataset


def labelled(n: int = 2000, classes: int = 5, features: int = 4, seed: int = 1) -> Dataset:
    rng = np.random.default_rng(seed)
    y = rng.integers(classes, size=n).astype(np.int32)
    x = (rng.normal(size=(n, features)) + y[:, None]).astype(np.float32)
    groups = np.asarray([f"site-{i % 13}" for i in range(n)])
    return Dataset(x, y, groups, tuple(f"f{i}" for i in range(features)))


def label_skew(data: Dataset, parts: list[np.ndarray]) -> float:
    """Mean over devices of the share of its most common label (1/classes when iid, 1 when
    every device holds one class)."""
    assert data.y is not None
    return float(np.mean([np.bincount(data.y[p]).max() / p.size for p in parts]))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "group"])
def test_every_row_goes_to_exactly_one_device(scheme: str) -> None:
    data = labelled()
    parts = partition(data, 10, scheme=scheme, alpha=0.3, seed=3)  # type: ignore[arg-type]
    assert len(parts) == 10
    assert all(p.size >= 1 for p in parts)
    joined = np.concatenate(parts)
    assert np.array_equal(np.sort(joined), np.arange(len(data)))
    again = partition(data, 10, scheme=scheme, alpha=0.3, seed=3)  # type: ignore[arg-type]
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(data, 10, scheme=scheme, alpha=0.3, seed=4)  # type: ignore[arg-type]
    assert any(not np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_shares_are_even_and_dirichlet_skew_grows_as_alpha_shrinks() -> None:
    data = labelled(n=5000)
    iid = partition(data, 20, scheme="iid")
    assert max(p.size for p in iid) - min(p.size for p in iid) <= 1
    skew = {
        a: np.mean(
            [
                label_skew(data, partition(data, 20, scheme="dirichlet", alpha=a, seed=s))
                for s in range(3)
            ]
        )
        for a in (100.0, 1.0, 0.1)
    }
    assert label_skew(data, iid) < 0.3  # 5 classes: about 0.2 each
    assert skew[100.0] < skew[1.0] < skew[0.1]
    assert skew[0.1] > 0.6


def test_dirichlet_gives_every_device_min_rows_even_with_tiny_alpha() -> None:
    data = labelled(n=300)
    parts = partition(data, 50, scheme="dirichlet", alpha=0.01, seed=0, min_rows=4)
    assert min(p.size for p in parts) >= 4
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(300))


def test_group_scheme_never_splits_a_group() -> None:
    data = labelled()
    parts = partition(data, 5, scheme="group", seed=0)
    assert data.groups is not None
    owner: dict[str, int] = {}
    for device, rows in enumerate(parts):
        for g in set(data.groups[rows].tolist()):
            assert owner.setdefault(g, device) == device
    assert len(owner) == 13
    with pytest.raises(PartitionError, match="13 groups cannot fill 14 devices"):
        partition(data, 14, scheme="group")


def test_partition_refusals_say_what_is_missing() -> None:
    data = labelled(n=20)
    with pytest.raises(PartitionError, match="20 rows cannot give 21 devices"):
        partition(data, 21)
    with pytest.raises(PartitionError, match="no labels"):
        partition(Dataset(data.x, None), 2, scheme="dirichlet")
    with pytest.raises(PartitionError, match="needs groups"):
        partition(Dataset(data.x, data.y), 2, scheme="group")
    with pytest.raises(PartitionError, match="alpha"):
        partition(data, 2, scheme="dirichlet", alpha=0.0)


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_csv_and_npz_read_the_same_examples(tmp_path: Path) -> None:
    csv_path = write_csv(
        tmp_path / "plant.csv",
        "vib,temp,label,site\n0.5,40,0,a\n1.5,41.5,2,b\n\n2.5,43,1,a\n",
    )
    got = dataset.load(csv_path, group="site")
    assert got.features == ("vib", "temp")
    assert got.x.dtype == np.float32
    assert got.x.shape == (3, 2)
    assert got.y is not None
    assert got.y.tolist() == [0, 2, 1]
    assert got.groups is not None
    assert got.groups.tolist() == ["a", "b", "a"]
    dataset.save_npz(tmp_path / "plant.npz", got)
    back = dataset.load(tmp_path / "plant.npz")
    assert np.array_equal(back.x, got.x)
    assert back.y is not None
    assert np.array_equal(back.y, got.y)
    assert back.features == got.features
    unlabelled = dataset.load(write_csv(tmp_path / "u.csv", "vib,temp\n1,2\n3,4\n"))
    assert unlabelled.y is None
    assert unlabelled.x.shape == (2, 2)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.csv", "", "empty file"),
        ("header-only.csv", "a,b,label\n", "holds no examples"),
        ("ragged.csv", "a,b,label\n1,2,0\n1,2\n", "line 3: 2 cells, the header has 3"),
        ("text.csv", "a,b,label\n1,x,0\n", "line 2, column 'b': 'x' is not a number"),
        ("blank.csv", "a,b,label\n1,,0\n", "line 2, column 'b': '' is not a number"),
        ("nan.csv", "a,b,label\n1,nan,0\n", "line 2, column 'b': 'nan' is not finite"),
        ("badlabel.csv", "a,b,label\n1,2,1.5\n", "label '1.5' is not a class number"),
        ("neglabel.csv", "a,b,label\n1,2,-1\n", "label '-1' is not a class number"),
        ("dup.csv", "a,a,label\n1,2,0\n", "duplicate column names"),
        ("only-label.csv", "label\n1\n", "no feature columns"),
        ("latin1.csv", b"a,b\n\xe9,2\n", "not UTF-8"),
        ("data.txt", "a\n1\n", r"unknown data format '\.txt'"),
        ("notzip.npz", b"PK\x03\x04 garbage", r"not a readable \.npz"),
        ("missing.npz", None, "no such file"),
    ],
)
def test_bad_files_are_one_clear_error(
    tmp_path: Path, name: str, content: str | bytes | None, message: str
) -> None:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        dataset.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"y": np.zeros(3, np.int64)}, "needs an array 'x'"),
        ({"x": np.zeros(3)}, "'x' must be 2-D"),
        ({"x": np.array([["a"]])}, "'x' must be numeric"),
        ({"x": np.array([[1.0, np.inf]])}, "row 0 is not finite"),
        ({"x": np.array([[1e39]])}, "row 0 is not finite"),
        ({"x": np.zeros((2, 2)), "y": np.zeros(3, np.int64)}, "one label per row"),
        ({"x": np.zeros((2, 2)), "y": np.array(["a", "b"])}, "integer class labels or float"),
        ({"x": np.zeros((2, 2)), "y": np.array([0.5, np.nan])}, "'y' row 1 is not finite"),
        ({"x": np.zeros((2, 2)), "y": np.array([0, -3])}, "class numbers"),
        ({"x": np.zeros((0, 2))}, "holds no examples"),
        ({"x": np.zeros((2, 2)), "groups": np.zeros(3, np.int64)}, "one group per row"),
        ({"x": np.zeros((2, 2)), "features": np.array(["a"])}, "name each of the 2 columns"),
    ],
)
def test_bad_npz_is_one_clear_error(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=message):
        dataset.load(path)


def test_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "pickled.npz"
    np.savez(path, x=np.array([[1, {"a": 1}]], dtype=object))
    with pytest.raises(DataError, match=r"not a readable \.npz"):
        dataset.load(path)


def test_float_targets_load_for_regression_and_are_not_split_by_label(tmp_path: Path) -> None:
    path = tmp_path / "rul.npz"
    np.savez(path, x=np.zeros((4, 2)), y=np.array([1.5, 1.0, 0.5, 0.0]))
    data = dataset.load(path)
    assert data.targets
    assert data.y is not None
    assert data.y.dtype == np.float32
    assert data.classes == 0
    with pytest.raises(PartitionError, match="float targets"):
        partition(data, 2, scheme="dirichlet", alpha=0.5, seed=0, min_rows=1)
    assert [p.size for p in partition(data, 2, scheme="iid", seed=0, min_rows=1)] == [2, 2]


def test_device_refuses_unlabelled_data(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "u.csv", "vib,temp\n1,2\n")
    with pytest.raises(DataError, match="has no labels"):
        ArrayData.load(path)
    ok = ArrayData.load(write_csv(tmp_path / "l.csv", "vib,temp,label\n1,2,0\n3,4,1\n"))
    assert len(ok) == 2


def test_partition_command_writes_device_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = labelled(n=600)
    rows = ["f0,f1,f2,f3,label,site"] + [
        ",".join([*(f"{v:.4f}" for v in data.x[i]), str(int(data.y[i])), str(data.groups[i])])
        for i in range(len(data))
        if data.y is not None and data.groups is not None
    ]
    source = write_csv(tmp_path / "plant.csv", "\n".join(rows) + "\n")
    out = tmp_path / "parts"
    argv = [
        "partition",
        "--data",
        str(source),
        "--devices",
        "8",
        "--scheme",
        "dirichlet",
        "--alpha",
        "0.5",
        "--seed",
        "7",
        "--out",
        str(out),
        "--min-rows",
        "5",
        "--group-column",
        "site",
    ]
    assert main(argv) == 0
    assert "600 rows, 4 features, 5 classes -> 8 files" in capsys.readouterr().out
    files = sorted(out.glob("dev-*.npz"))
    assert [f.name for f in files] == [f"dev-{i:04d}.npz" for i in range(1, 9)]
    report = json.loads((out / "partition.json").read_text())
    assert report["scheme"] == "dirichlet"
    assert report["alpha"] == 0.5
    assert report["seed"] == 7
    assert sum(d["rows"] for d in report["devices"]) == 600
    loaded = [ArrayData.load(f) for f in files]
    assert sum(len(d) for d in loaded) == 600
    assert all(len(d) >= 5 for d in loaded)
    assert [sum(d["labels"]) for d in report["devices"]] == [len(d) for d in loaded]
    # By site: 13 sites over 4 devices, none split.
    assert (
        main(
            [
                "partition",
                "--data",
                str(source),
                "--devices",
                "4",
                "--scheme",
                "group",
                "--group-column",
                "site",
                "--out",
                str(tmp_path / "by-site"),
            ]
        )
        == 0
    )
    sites = [
        set(dataset.load(f).groups.tolist())  # type: ignore[union-attr]
        for f in sorted((tmp_path / "by-site").glob("dev-*.npz"))
    ]
    assert sum(len(s) for s in sites) == 13


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--devices", "0"], "--devices must be 1.."),
        (["--devices", "601"], "600 rows cannot give 601 devices"),
        (["--devices", "3", "--scheme", "group"], "--group-column"),
        (["--devices", "3", "--scheme", "group", "--group-column", "nope"], "no group column"),
        (["--devices", "3", "--prefix", "bad/id"], "--prefix"),
        (["--devices", "3", "--seed", "-1"], "--seed must be a non-negative"),
        (["--devices", "3", "--min-rows", "0"], "--min-rows must be at least 1"),
        (["--devices", "3", "--scheme", "dirichlet", "--alpha", "nan"], "--alpha"),
    ],
)
def test_partition_command_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    data = labelled(n=600)
    assert data.y is not None
    rows = ["a,b,c,d,label"] + [
        ",".join([*(str(v) for v in data.x[i]), str(int(data.y[i]))]) for i in range(600)
    ]
    source = write_csv(tmp_path / "d.csv", "\n".join(rows) + "\n")
    code = main(["partition", "--data", str(source), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


def test_sim_data_dir_problems_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fleetlearn.broker import provision as prov

    fleet = tmp_path / "fleet"
    prov.provision(fleet, "plant-7", prov.device_ids(3))
    parts = tmp_path / "parts"
    parts.mkdir()
    base = [
        "sim",
        "--broker",
        "mqtt://127.0.0.1:1",
        "--fleet",
        "plant-7",
        "--fleet-dir",
        str(fleet),
        "--devices",
        "3",
        "--data",
        str(parts),
    ]

    def error() -> str:
        assert main(base) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        return err

    assert "dev-0001.npz is missing" in error()
    for i in (1, 2, 3):
        np.savez(
            parts / f"dev-{i:04d}.npz",
            x=np.zeros((4, 16 if i < 3 else 8), np.float32),
            y=np.zeros(4, np.int64),
        )
    assert "dev-0003.npz has 8 features, the others 16" in error()
    (parts / "dev-0003.npz").unlink()
    (parts / "dev-0003.csv").write_text("a,b\n1,2\n")
    assert "dev-0003.csv: has no labels" in error()
    assert main([*base[:-1], str(tmp_path / "nowhere")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_demo_refuses_unlabelled_data_before_starting_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def demo(data: Path) -> int:
        out = str(tmp_path / "out")
        return main(["demo", "--data", str(data), "--devices", "3", "--cohort", "3", "--out", out])

    assert demo(write_csv(tmp_path / "u.csv", "a,b\n1,2\n3,4\n5,6\n")) == 2
    err = capsys.readouterr().err
    assert "has no labels" in err
    assert len(err.strip().splitlines()) == 1
    assert demo(tmp_path / "none.csv") == 2
    assert "none.csv: no such file" in capsys.readouterr().err
