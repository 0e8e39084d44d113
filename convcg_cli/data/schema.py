"""The data contract in one import: its objects (``contract``), the checks (``checks``), the file IO
(``tables``).

``from convcg_cli.data.schema import load_tables`` and the like keep working; new code may import from
the module that defines a name. :func:`load_tables` is the single entry point the rest of the package
reads data through: it raises :class:`~convcg_cli.errors.DataValidationError` listing every violation,
or returns frames whose columns have exactly the schema's names, order and dtypes.
"""

from convcg_cli.data.checks import (
    DANGLING_REFERENCE,
    DUPLICATE_KEY,
    EMPTY_TABLE,
    MISSING_COLUMN,
    MISSING_DIR,
    MISSING_FILE,
    NOT_ALLOWED,
    NOT_FINITE,
    NULLS,
    OUT_OF_RANGE,
    RULE_BROKEN,
    UNREADABLE_FILE,
    WRONG_DTYPE,
    WRONG_LENGTH,
    Violation,
    conform_frames,
    conform_table,
    validate_frames,
)
from convcg_cli.data.contract import (
    DTYPES,
    SCHEMA_DIR,
    VECTOR,
    ColumnSchema,
    Condition,
    ImplicationRule,
    PresenceRule,
    Rule,
    TableSchema,
    load_schemas,
)
from convcg_cli.data.tables import METADATA_FILE, load_tables, missing_file, validate_tables, write_tables

__all__ = [
    "DANGLING_REFERENCE",
    "DTYPES",
    "DUPLICATE_KEY",
    "EMPTY_TABLE",
    "METADATA_FILE",
    "MISSING_COLUMN",
    "MISSING_DIR",
    "MISSING_FILE",
    "NOT_ALLOWED",
    "NOT_FINITE",
    "NULLS",
    "OUT_OF_RANGE",
    "RULE_BROKEN",
    "SCHEMA_DIR",
    "UNREADABLE_FILE",
    "VECTOR",
    "WRONG_DTYPE",
    "WRONG_LENGTH",
    "ColumnSchema",
    "Condition",
    "ImplicationRule",
    "PresenceRule",
    "Rule",
    "TableSchema",
    "Violation",
    "conform_frames",
    "conform_table",
    "load_schemas",
    "load_tables",
    "missing_file",
    "validate_frames",
    "validate_tables",
    "write_tables",
]
