"""The patch_id check on both of its paths: pyarrow in the driver, a Ray Data groupby above."""

from __future__ import annotations

import pytest

from anogan_batch.errors import InputError
from anogan_batch.io.tables import check_patch_ids, write_patch_table


def test_the_ray_id_check_finds_what_the_driver_finds(tmp_path, sample, ray_local):
    images = sample["test_images"][:40]
    ids = [f"p{i:02d}" for i in range(40)]
    clean, dup = tmp_path / "clean", tmp_path / "dup"
    write_patch_table(str(clean), images, ids=ids, scan_ids=ids, files=3)
    # p03 three times and p07 twice, across files; plus two null ids
    bad = [*ids[:30], "p03", "p03", "p07", None, None, *ids[35:]]
    write_patch_table(str(dup), images, ids=bad, scan_ids=ids, files=3)

    assert check_patch_ids(str(clean), 40, driver_rows=0) == "ray"
    assert check_patch_ids(str(clean), 40) == "driver"
    no_nulls = tmp_path / "no-nulls"
    write_patch_table(str(no_nulls), images, ids=bad[:33] + ids[33:], scan_ids=ids, files=3)
    for table, expected in (
        (dup, "2 row(s) have a null patch_id"),
        (no_nulls, "2 patch_id(s) appear more than once, e.g. 'p03' (3 rows), 'p07' (2 rows)"),
    ):
        messages = []
        for driver_rows in (0, 10**6):
            with pytest.raises(InputError) as e:
                check_patch_ids(str(table), 40, driver_rows=driver_rows)
            messages.append(str(e.value))
        assert messages[0] == messages[1]
        assert expected in messages[0]


def test_listed_ids_are_counted_alike_in_the_driver_and_on_ray(tmp_path, sample, ray_local):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from anogan_batch.io.tables import count_listed_ids

    ids = [f"p{i:02d}" for i in range(30)]
    write_patch_table(str(tmp_path / "t"), sample["test_images"][:30], ids=ids, files=2)
    listed = ["p01", "p05", "p05", "p29", "elsewhere"]  # repeats and ids of other tables
    (tmp_path / "ids").mkdir()
    pq.write_table(pa.table({"patch_id": listed}), tmp_path / "ids" / "a.parquet")
    args = (str(tmp_path / "t"), str(tmp_path / "ids"), 30, len(listed))
    assert count_listed_ids(*args) == count_listed_ids(*args, driver_rows=0) == 3
