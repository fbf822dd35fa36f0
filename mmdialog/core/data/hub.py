"""Datasets in the Hugging Face Hub's layout: ``hf:OWNER/NAME`` through the Hub cache
(Hugging Face ``datasets``, Arrow, memory-mapped), and Parquet files in a local
folder of the same layout (``data/train-00000-of-00001.parquet``, the Hub's
auto-converted ``default/train/0000.parquet``), streamed a row group at a time
with pyarrow. Each row is a record for the dataset-format readers (DialogCC's
columns ``dialogue_id``, ``dialogue[…]``, ``split`` go through ``dialogcc.py``);
the split is the row's ``split`` column, else the Hub split's or the file's name.
Both packages are the ``hub`` extra's and imported only here, when used.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

from mmdialog.core.data.records import RawRecord, normalize_split
from mmdialog.core.data.report import BAD_FILE, LoadReport
from mmdialog.core.errors import ConfigError, DataError
from mmdialog.core.reading import open_file

PREFIX = "hf:"


def _need(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise DataError(f"reading this dataset needs '{module.split('.')[0]}': "
                        "pip install 'mmdialog[hub]'") from None


def parquet_records(path: Path, report: LoadReport, root: Path | None = None) -> Iterator[RawRecord]:
    """The rows of a Parquet file of the dataset folder ``root``, a row group at a time (the
    file is never whole in memory). Opened as every data file is (``reading.open_file``): a
    regular file, through links that stay inside ``root``."""
    pq = _need("pyarrow.parquet")
    try:
        f = open_file(path, "data file", root)
    except ConfigError as e:  # a link out of the folder, a FIFO, a device
        report.add_problem(BAD_FILE, str(path), None, f"cannot read file: {e}")
        return
    try:
        with f:
            row = 0
            for batch in pq.ParquetFile(f).iter_batches(batch_size=1024):
                for value in batch.to_pylist():
                    yield RawRecord(f"row {row}", value)
                    row += 1
    except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
        report.add_problem(BAD_FILE, str(path), None, f"cannot read Parquet file: {e}")


def hub_sources(source: str, split: str | None, report: LoadReport
                ) -> list[tuple[str, str | None, Callable[[], Iterator[RawRecord]]]]:
    """(label, split, records) of each split of ``hf:OWNER/NAME[:CONFIG]``, loaded through
    the Hub cache (offline with ``HF_HUB_OFFLINE=1`` once cached)."""
    datasets = _need("datasets")
    name, _, config = source.removeprefix(PREFIX).partition(":")
    try:
        splits = datasets.load_dataset(name, config or None)
    except Exception as e:  # the Hub's errors: unknown repo, offline without a cached copy, bad files
        raise DataError(f"{source}: cannot load from the Hugging Face Hub ({type(e).__name__}: "
                        f"{str(e).splitlines()[0] if str(e) else ''})", file=source) from None
    out = []
    for hub_split, rows in splits.items():
        canonical = normalize_split(hub_split)
        if split is None or canonical == split:
            out.append((f"{source}[{hub_split}]", canonical,
                        lambda rows=rows: (RawRecord(f"row {i}", row) for i, row in enumerate(rows))))
    return out
