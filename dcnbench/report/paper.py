"""The paper's numbers: ``results/paper/table<N>.csv``, one row per number (``table,row,column,value``).

Row and column labels are the paper's own (Table 3's "a / b" cells are split into the two metric
columns of Table 1; Table 2's "mean ± std" cells into ``<category> mean`` and ``<category> std``).
A cell the paper marks "N.A." has no row. Values are kept as the paper prints them (the text gives
the number of decimals to show).

Table 5's backbone cell is merged over the last six rows in the paper; those rows are labelled
"R-FCN, Aligned-Inception-ResNet, M" / "..., M, B" (multi-scale testing / box voting) as the
paper's text describes them (section 4.3).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "results"
PAPER_DIR = RESULTS_DIR / "paper"
PAPER_TABLES = (1, 2, 3, 4, 5, 7)
COLUMNS = ["table", "row", "column", "value"]

TITLES = {
    1: "Deformable convolution in the last 1, 2, 3 and 6 convolutional layers (of 3x3 filter), ResNet-101",
    2: "Effective dilation of deformable filters on three layers and four categories (mean ± std)",
    3: "Deformable modules and atrous convolution, ResNet-101",
    4: "Model complexity and runtime of deformable ConvNets and their plain counterparts, ResNet-101",
    5: "Object detection, deformable vs plain ConvNets, COCO test-dev",
    7: "Aligned-Inception-ResNet vs ResNet-101 and Inception-ResNet-v2, ImageNet-1K val",
}


@dataclass(frozen=True)
class PaperValue:
    value: float
    text: str  # as printed, e.g. "69.7" or "0.610"

    @property
    def decimals(self) -> int:
        return len(self.text.split(".", 1)[1]) if "." in self.text else 0


@dataclass
class PaperTable:
    table: int
    rows: list[str]  # in the paper's order
    columns: list[str]  # in the paper's order
    values: dict[tuple[str, str], PaperValue]

    def get(self, row: str, column: str) -> float | None:
        v = self.values.get((row, column))
        return None if v is None else v.value

    def decimals(self, column: str, default: int = 1) -> int:
        found = [v.decimals for (_, c), v in self.values.items() if c == column]
        return max(found) if found else default


def paper_csv(table: int, directory: Path | None = None) -> Path:
    return (directory or PAPER_DIR) / f"table{table}.csv"


def load_paper_table(table: int, directory: Path | None = None) -> PaperTable:
    """Parse ``table<N>.csv``; raises FileNotFoundError / ValueError on a missing or malformed file."""
    path = paper_csv(table, directory)
    if not path.is_file():
        raise FileNotFoundError(f"no paper numbers for table {table}: expected {path}")
    rows: list[str] = []
    columns: list[str] = []
    values: dict[tuple[str, str], PaperValue] = {}
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames != COLUMNS:
            raise ValueError(f"{path}: header must be {','.join(COLUMNS)}, got {reader.fieldnames}")
        for line, rec in enumerate(reader, start=2):
            if str(rec["table"]).strip() != str(table):
                raise ValueError(f"{path}:{line}: table {rec['table']!r}, expected {table}")
            row, column, text = rec["row"], rec["column"], rec["value"].strip()
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"{path}:{line}: value {text!r} is not a number") from None
            if (row, column) in values:
                raise ValueError(f"{path}:{line}: duplicate cell ({row!r}, {column!r})")
            values[(row, column)] = PaperValue(value, text)
            if row not in rows:
                rows.append(row)
            if column not in columns:
                columns.append(column)
    return PaperTable(table, rows, columns, values)
