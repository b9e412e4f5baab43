"""Census-Income (KDD): the adapter's raw rows, then the full build against the peer protocol.

Every figure asserted here is quoted from ``shared/peers/RESULTS-2026-11-22.md`` ("Data, split and
features"). The data is the repository's sibling ``shared/data/census_income_kdd`` (CI has it).
"""

from __future__ import annotations

import gzip
from pathlib import Path

import polars as pl
import pytest

from features.build import BuildSummary, build
from features.datasets import ADAPTERS, scan_dataset
from features.datasets.census import COLUMNS, DENSE, scan
from features.fitted import OOV, FittedTransform
from features.spec import FeatureSpec, load_spec

DATA = Path(__file__).resolve().parents[3] / "shared" / "data" / "census_income_kdd"
TRAIN = "census-income.data.gz"
TEST = "census-income.test.gz"


@pytest.fixture(scope="module")
def data() -> Path:
    for name in (TRAIN, TEST):
        if not (DATA / name).is_file():
            pytest.fail(f"census data missing: expected {str(DATA / name)!r} (the repo's sibling shared/data folder)")
    return DATA


@pytest.fixture(scope="module")
def census_spec() -> FeatureSpec:
    return load_spec("census")


@pytest.fixture(scope="module")
def raw(data: Path) -> pl.DataFrame:
    return scan(data).collect()


def _value(df: pl.DataFrame, expr: pl.Expr) -> float:
    """One aggregate of a frame as a float (typed, unlike ``Series.mean``)."""
    return float(df.select(expr).item())


# ------------------------------------------------------------------------------------------ adapter


def test_rows_split_and_row_id(raw: pl.DataFrame) -> None:
    assert raw.height == 199_523 + 99_762
    assert raw.group_by("split", maintain_order=True).len().rows() == [
        ("train", 199_523), ("val", 49_881), ("test", 49_881)
    ]  # fmt: skip
    assert raw.schema["row_id"] == pl.Int64
    assert raw["row_id"].to_list() == list(range(raw.height))
    test_file = raw.filter(pl.col("split") != "train")
    i = test_file["row_id"] - 199_523  # 0-based index in census-income.test
    assert ((i % 2 == 0) == (test_file["split"] == "val")).all()


def test_columns_stripped_and_typed(raw: pl.DataFrame) -> None:
    expected = [c for c in COLUMNS if c != "instance_weight"]
    assert [c for c in raw.columns if c in COLUMNS] == expected
    assert set(raw.columns) - set(COLUMNS) == {"row_id", "split", "never_married"}
    for c in DENSE:
        assert raw.schema[c] == pl.Float64, c
    strings = [c for c in expected if c not in DENSE and c != "income_50k"]
    assert all(raw.schema[c] == pl.String for c in strings)
    assert raw.null_count().sum_horizontal().item() == 0
    for c in strings:
        assert not raw[c].str.contains(r"^\s|\s$").any(), c
    first_test = raw.filter(pl.col("split") == "val").row(0, named=True)  # census-income.test line 1
    assert first_test["age"] == 38.0 and first_test["class_worker"] == "Private"
    assert first_test["citizenship"] == "Foreign born- Not a citizen of U S"  # trailing space stripped
    assert first_test["det_ind_code"] == "6" and first_test["year"] == "95" and first_test["mig_chg_msa"] == "?"


def test_labels(raw: pl.DataFrame) -> None:
    train = raw.filter(pl.col("split") == "train")
    assert raw.schema["income_50k"].is_integer() and raw.schema["never_married"].is_integer()
    assert train["income_50k"].value_counts(sort=True).rows() == [(0, 187_141), (1, 12_382)]  # SOURCE.md
    assert int(train["never_married"].sum()) == 86_485
    assert ((raw["marital_stat"] == "Never married") == (raw["never_married"] == 1)).all()


def test_unknown_income_string_stays_null_for_quarantine(data: Path, tmp_path: Path) -> None:
    for name in (TRAIN, TEST):
        with gzip.open(data / name, "rt") as f:
            lines = [next(f).rstrip("\n") for _ in range(4)]
        (tmp_path / name.removesuffix(".gz")).write_text("\n".join(lines) + "\n")
    text = (tmp_path / "census-income.test").read_text().split("\n")
    text[1] = text[1].replace("- 50000.", "??")
    (tmp_path / "census-income.test").write_text("\n".join(text))
    got = scan(tmp_path).filter(pl.col("split") != "train").collect()
    assert got["income_50k"].to_list() == [0, None, 0, 0]


def test_spec_never_uses_labels_weight_or_keys(census_spec: FeatureSpec) -> None:
    inputs = {f.raw for f in census_spec.sparse} | {d.raw for d in census_spec.dense}
    assert len(census_spec.sparse) == 32 and len(census_spec.dense) == 7
    assert not inputs & {"marital_stat", "instance_weight", "income_50k", "never_married", "row_id", "split"}
    assert inputs == set(COLUMNS) - {"marital_stat", "instance_weight", "income_50k"}
    assert sum(f.embedding_dim for f in census_spec.sparse) + len(census_spec.dense) == 135
    assert {f.source for f in census_spec.sparse} == {"user"}
    assert [t.name for t in census_spec.tasks] == ["income", "never_married"]
    assert census_spec.validation.unique == ("row_id",)


def test_registry_and_layout_errors(data: Path, tmp_path: Path) -> None:
    assert ADAPTERS["census"] is scan
    with pytest.raises(ValueError, match="census-income folder not found"):
        scan_dataset("census", tmp_path / "nope")
    (tmp_path / TRAIN).symlink_to(data / TRAIN)
    with pytest.raises(ValueError, match=r"missing census file 'census-income\.test'"):
        scan(tmp_path)
    (tmp_path / "census-income.test").write_text("1, 2, 3\n")
    with pytest.raises(ValueError, match=r"'census-income\.test' has 3 columns, expected 42"):
        scan(tmp_path)
    (tmp_path / TEST).symlink_to(data / TEST)
    with pytest.raises(ValueError, match=r"'census-income\.test' is given twice"):
        scan(tmp_path)


# ------------------------------------------------------------------- full build vs the protocol tables

ROWS = {"train": 199_523, "val": 49_881, "test": 49_881}
RATES_PCT = {  # income > 50K / never married, in %
    "train": (6.206, 43.346),
    "val": (6.277, 43.307),
    "test": (6.125, 43.185),
}
VOCAB_SIZES = {
    "class_worker": 10, "det_ind_code": 53, "det_occ_code": 48, "education": 18, "hs_college": 4,
    "major_ind_code": 25, "major_occ_code": 16, "race": 6, "hisp_origin": 11, "sex": 3, "union_member": 4,
    "unemp_reason": 7, "full_or_part_emp": 9, "tax_filer_stat": 7, "region_prev_res": 7, "state_prev_res": 52,
    "det_hh_fam_stat": 39, "det_hh_summ": 9, "mig_chg_msa": 11, "mig_chg_reg": 10, "mig_move_reg": 11,
    "mig_same": 4, "mig_prev_sunbelt": 5, "fam_under_18": 6, "country_father": 44, "country_mother": 44,
    "country_self": 44, "citizenship": 6, "own_or_self": 4, "vet_question": 4, "vet_benefits": 4, "year": 3,
}  # fmt: skip
DENSE_MAX = {"age": 90, "wage_per_hour": 9999, "capital_gains": 99999, "capital_losses": 4608,
             "stock_dividends": 99999, "num_emp": 6, "weeks_worked": 52}  # fmt: skip


@pytest.fixture(scope="module")
def built(data: Path, census_spec: FeatureSpec, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuildSummary]:
    out = tmp_path_factory.mktemp("census_build")
    return out, build(scan(data), census_spec, out)


@pytest.fixture(scope="module")
def splits(built: tuple[Path, BuildSummary]) -> dict[str, pl.DataFrame]:
    out, _ = built
    return {s: pl.read_parquet(out / f"{s}.parquet") for s in ROWS}


def test_build_rows_vocab_sizes_and_rates(built: tuple[Path, BuildSummary], splits: dict[str, pl.DataFrame]) -> None:
    _, summary = built
    assert summary.rows == ROWS
    assert summary.quarantined == {} and summary.rows_in == 299_285
    assert summary.vocab_sizes == VOCAB_SIZES
    for split, (income, married) in RATES_PCT.items():
        df = splits[split]
        assert round(100 * _value(df, pl.col("y_income").mean()), 3) == income, split
        assert round(100 * _value(df, pl.col("y_never_married").mean()), 3) == married, split


def test_build_no_oov_in_val_or_test(splits: dict[str, pl.DataFrame]) -> None:
    for split, df in splits.items():
        assert not any((df[c] == OOV).any() for c in df.columns if c.startswith("s_")), split


def test_build_dense_train_minmax_and_no_clipping_needed(
    built: tuple[Path, BuildSummary], splits: dict[str, pl.DataFrame]
) -> None:
    out, _ = built
    fitted = FittedTransform.load(out / "transform.json")
    assert {k: (v.min, v.max) for k, v in fitted.numeric.items()} == {k: (0.0, float(m)) for k, m in DENSE_MAX.items()}
    for name in DENSE_MAX:
        col = pl.col(f"d_{name}")
        assert (_value(splits["train"], col.min()), _value(splits["train"], col.max())) == (0.0, 1.0), name
        for split in ("val", "test"):  # val/test never leave the train range
            df = splits[split]
            assert _value(df, col.min()) >= 0.0 and _value(df, col.max()) <= 1.0, (split, name)
