"""Exact tests of the mask clean-up (numpy only)."""

import numpy as np
import pytest

from scenebreak.masks.ops import bounding_box, clean, dilate, fill_holes, label, overlaps, remove_specks


def grid(text: str) -> np.ndarray:
    return np.array([[c == "#" for c in row] for row in text.split()], np.uint8)


def test_label_counts_components_with_either_connectivity():
    mask = grid("""
        ##...#
        ##..#.
        ......
        #.###.
        """)
    labels, count = label(mask)
    assert count == 4  # the diagonal pair at the top right is one piece
    assert labels[0, 5] == labels[1, 4] and labels[0, 0] == labels[1, 1] != labels[3, 0] != labels[3, 2]
    assert sorted(np.bincount(labels.ravel())[1:]) == [1, 2, 3, 4]
    assert label(mask, connectivity=4)[1] == 5
    assert label(np.zeros((3, 3)))[1] == 0


def test_label_matches_a_flood_fill_on_random_masks():
    rng = np.random.default_rng(0)
    for _ in range(5):
        mask = rng.random((30, 40)) > 0.55
        labels, count = label(mask)
        # every 8-neighbour pair of inside pixels shares a label; the count is exact
        ys, xs = np.nonzero(mask)
        for y, x in zip(ys, xs):
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    if 0 <= y + dy < 30 and 0 <= x + dx < 40 and mask[y + dy, x + dx]:
                        assert labels[y, x] == labels[y + dy, x + dx]
        assert (labels > 0).sum() == mask.sum() and set(np.unique(labels)) == set(range(count + 1))


def test_fill_holes_fills_enclosed_outside_only():
    ring = grid("""
        .......
        .#####.
        .#...#.
        .#.#.#.
        .#####.
        .....#.
        """)
    filled = fill_holes(ring)
    assert filled[2:4, 2:5].all() and filled.sum() == ring.sum() + 5
    # an opening to the border keeps the bay open; a diagonal gap does not leak
    bay = grid("""
        ##.##
        #...#
        #####
        """)
    assert (fill_holes(bay) == bay).all()
    diagonal = grid("""
        .##..
        #..#.
        #..#.
        .##..
        """)
    assert fill_holes(diagonal)[1:3, 1:3].all()


def test_remove_specks_keeps_big_pieces_and_always_the_largest():
    mask = grid("""
        ###...#
        ###....
        ###..##
        """)
    assert (remove_specks(mask, 3) == grid("""
        ###....
        ###....
        ###....
        """)).all()
    assert remove_specks(mask, 2).sum() == 11
    assert remove_specks(mask, 100).sum() == 9  # the largest piece survives any threshold
    assert remove_specks(np.zeros((2, 2)), 5).sum() == 0
    # A piece under a click stays, however small: it is the object clicked.
    assert remove_specks(mask, 3, keep_at=[(6.4, 0.5)]).sum() == 10
    assert remove_specks(mask, 3, keep_at=[(4, 1)]).sum() == 9  # (a click outside every piece keeps nothing more)


def test_dilate_by_a_disk():
    dot = np.zeros((7, 7), np.uint8)
    dot[3, 3] = 1
    assert (dilate(dot, 1) == grid("""
        .......
        .......
        ...#...
        ..###..
        ...#...
        .......
        .......
        """)).all()
    assert dilate(dot, 2).sum() == 13 and dilate(dot, 3).sum() == 29
    corner = np.zeros((4, 4), np.uint8)
    corner[0, 0] = 1
    assert dilate(corner, 2).sum() == 6  # clipped at the edges
    assert (dilate(dot, 0) == dot).all()


def test_clean_and_helpers():
    mask = np.zeros((40, 40), np.uint8)  # (the hole: 0.6% of it, a small one)
    mask[2:12, 2:12] = 1
    mask[5:8, 5:8] = 0  # a hole
    mask[18, 18] = 1  # a speck
    cleaned = clean(mask, min_area=4, grow=1)
    assert cleaned[5:8, 5:8].all() and cleaned[18, 18] == 0
    assert cleaned.sum() == 100 + 4 * 10
    assert bounding_box(cleaned) == (1, 1, 13, 13) and bounding_box(np.zeros((3, 3))) is None
    a, b, c = (np.zeros((10, 10), np.uint8) for _ in range(3))
    a[:, :5] = 1
    b[:, 3:6] = 1
    c[:, 8:] = 1
    assert overlaps([a, b, c]) == [(0, 1, pytest.approx(2 / 3))]
    assert overlaps([a, b, c], limit=0.9) == []


def test_dilate_holds_about_one_image_whatever_the_radius():
    """Each row width of the disk was kept as a full-size image: ~radius of them (7 GB at
    12 megapixels and --dilate 1024). A radius past the image's height works too."""
    import tracemalloc

    rng = np.random.default_rng(0)
    mask = rng.random((60, 70)) > 0.995
    for radius in (0, 1, 5, 59, 60, 61, 100):
        ys, xs = np.nonzero(mask)
        yy, xx = np.mgrid[:60, :70]
        expected = np.zeros((60, 70), bool)
        for y, x in zip(ys, xs):
            expected |= (yy - y) ** 2 + (xx - x) ** 2 <= radius * radius
        assert (dilate(mask, radius).astype(bool) == expected).all(), radius
    big = np.zeros((1000, 1000), bool)
    big[500, 500] = True
    tracemalloc.start()
    dilate(big, 400)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 40 * 2**20, peak  # a few images of 1 to 8 MB; the cache of widths took 300+ MB


def test_the_clean_up_fills_small_holes_but_not_an_enclosed_region_that_is_something_else():
    """A bowl seen from above encloses its contents: filled, the bowl's handle learned them too."""
    bowl = np.zeros((100, 100), np.uint8)
    bowl[20:80, 20:80] = 1
    bowl[30:70, 30:70] = 0  # its contents: 16% of the photo
    bowl[22:24, 22:24] = 0  # a highlight SAM left out: 4 pixels
    cleaned = clean(bowl, min_area=1)
    assert cleaned[22:24, 22:24].all() and not cleaned[30:70, 30:70].any()
    assert fill_holes(bowl)[30:70, 30:70].all()  # (fill_holes alone fills every hole)


def test_auto_segments_inside_one_kept_or_asked_for_are_not_distinct_objects():
    """A part inside a whole (a shirt of a person), or the same segment twice once its
    holes were filled, came back as another object."""
    from scenebreak.config import MaskConfig
    from scenebreak.masks.masking import _largest_segments

    person, shirt, cup, given = (np.zeros((100, 100), np.uint8) for _ in range(4))
    person[10:90, 10:50] = 1
    shirt[30:60, 15:45] = 1
    cup[20:40, 60:80] = 1
    given[20:40, 60:80] = 1
    found = _largest_segments([(shirt, 0.9), (person, 0.9), (cup, 0.9)], MaskConfig(), 1, (100, 100))
    assert [int(r.mask.sum()) for r in found] == [int(person.sum()), int(cup.sum())]
    found = _largest_segments([(shirt, 0.9), (person, 0.9), (cup, 0.9)], MaskConfig(), 1, (100, 100), [given])
    assert [int(r.mask.sum()) for r in found] == [int(person.sum())]  # the cup was asked for already
