"""Ingest's own layer: scan files as sources that read regions, never a whole level.

- `sources`: a file as a `Source` (its levels with their real downsample factors, pixel size,
  `read_region` in level-0 coordinates, a bounded tile cache); tiled and pyramidal TIFF
  (generic, OME-TIFF, SVS, NDPI) through tifffile's segments, small files through
  io/readers.
- `levels`: which level a read uses for `--mpp` / `--level`, and the area downsampling
  between native levels.
- `masks`: foreground masks (saturation or intensity Otsu, closing, specks dropped).
- `plan`: a large scan's overview (the mask's input, from a low-resolution level) and its
  patch grid cut into work units (scan, chunk of patch rows), so one slide spreads over every
  worker.
- `regions`: a slide's plan and its units cut into patch rows.
- `series`: DICOM headers grouped and ordered into volumes.

May import io/ and the package's root modules (errors, fields); job/ runs it.
"""
