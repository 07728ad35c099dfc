"""Where the long-lived warehouse tables live: `WarehouseTarget`, the config of `publish` and
of `score --table-format iceberg|delta` (its flags are theirs).

Light on purpose: the CLI reads these defaults for `--help`.
"""

from __future__ import annotations

from dataclasses import dataclass

from anogan_batch.errors import ConfigError
from anogan_batch.fields import option


@dataclass(frozen=True)
class WarehouseTarget:
    """Where the long-lived tables live. Iceberg: a pyiceberg catalog by name and a namespace;
    for the zero-configuration SQLite catalog (used when pyiceberg has no configuration for the
    name), the warehouse folder and the SQLite file. Delta: `<warehouse>/<namespace>/<table>`.
    Each table is named `<table_prefix><name>` (name: patch_scores, scan_scores, quarantine,
    jobs), so that several sets can share a namespace."""

    catalog: str = option(
        "anogan", "pyiceberg catalog name (~/.pyiceberg.yaml or PYICEBERG_CATALOG__* vars)"
    )
    namespace: str = option("anogan", "namespace of the tables (Iceberg; a folder for Delta)")
    warehouse: str | None = option(
        None,
        "the tables' folder, local or s3://: Delta's, or the zero-configuration Iceberg catalog's",
        default_text="none: Iceberg's catalog by name; Delta needs one",
    )
    catalog_db: str | None = option(
        None,
        "the zero-configuration catalog's SQLite file",
        default_text="WAREHOUSE/catalog.sqlite",
    )
    table_prefix: str = option(
        "", "names the tables <prefix>patch_scores, ... <prefix>jobs", default_text="none"
    )

    def __post_init__(self) -> None:
        for name in ("catalog", "namespace"):
            value = getattr(self, name)
            if not value or not all(c.isalnum() or c in "_-" for c in value):
                raise ConfigError(name, value, "use letters, digits, '_' and '-'")
        prefix = self.table_prefix
        if len(prefix) > 64 or not all(c.isascii() and (c.isalnum() or c == "_") for c in prefix):
            raise ConfigError("table_prefix", prefix, "use at most 64 letters, digits and '_'")

    def table(self, name: str) -> str:
        """The name of one of the tables (warehouse/job_rows.TABLE_ORDER) in this target."""
        return self.table_prefix + name
