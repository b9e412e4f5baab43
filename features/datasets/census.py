"""UCI Census-Income (KDD) adapter: the two official files -> one lazy frame with a split column.

Implements the data part of the peer protocol (``shared/peers/RESULTS-2026-11-22.md``, "Data,
split and features"; ``shared/peers/prep_census.py``), the MMoE paper's task pair:

* both files read without a header, 42 columns named as in the protocol, every field a string
  stripped of surrounding whitespace;
* labels: ``income_50k`` = 1 for ``"50000+."``, 0 for ``"- 50000."``; ``never_married`` = 1 when
  ``marital_stat == "Never married"`` else 0 (Int8; any other income string stays null so the
  build quarantines the row instead of guessing). ``marital_stat`` is kept as the label's source
  only: a spec must never use it as a feature;
* ``instance_weight`` (a CPS sampling weight; the UCI .names file says it is not a feature) is
  dropped;
* dense columns (``age, wage_per_hour, capital_gains, capital_losses, stock_dividends, num_emp,
  weeks_worked``) as Float64; every other column stays its stripped string;
* ``split``: ``"train"`` for every row of census-income.data; census-income.test by 0-based row
  index ``i`` in file order: ``"val"`` for even ``i``, ``"test"`` for odd ``i``;
* ``row_id``: Int64, 0..199,522 for the data file then 199,523.. for the test file (a unique key).

Example:
    >>> data = "path/to/census_income_kdd"  # the dataset's official files
    >>> scan(data).group_by("split", maintain_order=True).len().collect().rows()  # doctest: +SKIP
    [('train', 199523), ('val', 49881), ('test', 49881)]
"""

from __future__ import annotations

from pathlib import Path

import polars as pl

TRAIN_FILE = "census-income.data"
TEST_FILE = "census-income.test"

COLUMNS = (
    "age", "class_worker", "det_ind_code", "det_occ_code", "education", "wage_per_hour", "hs_college",
    "marital_stat", "major_ind_code", "major_occ_code", "race", "hisp_origin", "sex", "union_member",
    "unemp_reason", "full_or_part_emp", "capital_gains", "capital_losses", "stock_dividends",
    "tax_filer_stat", "region_prev_res", "state_prev_res", "det_hh_fam_stat", "det_hh_summ",
    "instance_weight", "mig_chg_msa", "mig_chg_reg", "mig_move_reg", "mig_same", "mig_prev_sunbelt",
    "num_emp", "fam_under_18", "country_father", "country_mother", "country_self", "citizenship",
    "own_or_self", "vet_question", "vet_benefits", "weeks_worked", "year", "income_50k",
)  # fmt: skip
DENSE = ("age", "wage_per_hour", "capital_gains", "capital_losses", "stock_dividends", "num_emp", "weeks_worked")
DROPPED = ("instance_weight",)
INCOME = {"50000+.": 1, "- 50000.": 0}
NEVER_MARRIED = "Never married"


def scan(path: str | Path) -> pl.LazyFrame:
    """Scan a folder with ``census-income.data[.gz]`` and ``census-income.test[.gz]``.

    Args:
        path: the folder.

    Returns:
        A lazy frame, data-file rows then test-file rows, each in file order: the 41 kept raw
        columns (strings, the 7 dense ones Float64; ``income_50k`` as the 0/1 label), plus
        ``never_married`` (Int8), ``split`` (train / val / test) and ``row_id`` (Int64).

    Raises:
        ValueError: the folder or a file is missing, given twice, or has not 42 columns.
    """
    root = Path(path)
    if not root.is_dir():
        raise ValueError(f"census-income folder not found: {str(root)!r}")
    train = _read(_find(root, TRAIN_FILE)).with_columns(pl.lit("train").alias("split"))
    test = _read(_find(root, TEST_FILE)).with_columns(
        pl.when(pl.int_range(pl.len()) % 2 == 0).then(pl.lit("val")).otherwise(pl.lit("test")).alias("split")
    )
    return pl.concat([train, test]).with_row_index("row_id").pipe(_typed)


def _find(root: Path, name: str) -> Path:
    found = [f for f in (root / name, root / f"{name}.gz") if f.is_file()]
    if not found:
        raise ValueError(f"missing census file {name!r} (or {name + '.gz'!r}) in {str(root)!r}")
    if len(found) > 1:
        raise ValueError(f"census file {name!r} is given twice in {str(root)!r}: plain and gzip")
    return found[0]


def _read(file: Path) -> pl.LazyFrame:
    """Headerless CSV -> 42 named, stripped string columns."""
    lf = pl.scan_csv(file, has_header=False, infer_schema=False)
    n = len(lf.collect_schema())
    if n != len(COLUMNS):
        raise ValueError(f"{file.name!r} has {n} columns, expected {len(COLUMNS)} (census-income KDD layout)")
    return lf.rename(dict(zip(lf.collect_schema().names(), COLUMNS, strict=True))).with_columns(
        pl.all().str.strip_chars()
    )


def _typed(lf: pl.LazyFrame) -> pl.LazyFrame:
    """Stripped strings -> labels, dense floats; drop the sampling weight."""
    return lf.with_columns(
        pl.col("row_id").cast(pl.Int64),
        *(pl.col(c).cast(pl.Float64) for c in DENSE),
        pl.col("income_50k").replace_strict(INCOME, default=None, return_dtype=pl.Int8),
        (pl.col("marital_stat") == NEVER_MARRIED).cast(pl.Int8).alias("never_married"),
    ).drop(DROPPED)
