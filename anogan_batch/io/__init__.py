"""Bytes in and out, no torch: the bottom layer (may import only errors and fields).

- `columns`: every table's column names, schemas and column subsets (the one spelling).
- `storage`: local and s3:// paths alike (walk, read, write, move, open for ranged reads).
- `s3`: the S3 filesystem, endpoint and region, and the one retry policy.
- `patches`: the patch table's format (schema, ids, pixel and residual-map encodings).
- `tables`: reading and checking patch tables (schemas, footers, duplicate ids).
- `readers`: scan files read whole (PNG, JPEG, TIFF stacks, NPY, DICOM, NIfTI slab by
  slab), header-checked, and the one pixel normalisation (`to_stored`).
- `plots`: PNG and SVG encoding. `exiting`: how a command's process ends.
  `native_stderr`: native stderr lines that are not news, dropped (CLI only).
"""
