"""Masks: the `mask` job (`masking`), the text detector and Segment Anything that find
objects (`detector`, `segmenter`), numpy-only mask operations (`ops`) and writing the
mask files and their preview (`files`).
May import: scenes, families and the ground modules."""
