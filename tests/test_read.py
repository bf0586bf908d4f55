"""READ: similarity map, Similarity as Points, DtoC, SAM decode, false premise, threshold search."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from models.read import (
    DEFAULT_SIGMA,
    MapPlacement,
    ReadParams,
    read_prompts,
    refine_points,
    select_cells,
    similarity_map,
    similarity_to_points,
    upsample_map,
)

# 3×3 map, cell index = row-major position; image (H, W) = (30, 60) → cells 10 px tall, 20 px wide.
SIM_3X3 = np.array(
    [
        [0.90, 0.10, 0.50],
        [0.00, 1.00, 0.85],
        [0.20, 0.60, 0.15],
    ]
)


# ----------------------------------------------------------------- similarity map


def test_similarity_map_is_min_max_dot_product_on_any_grid():
    torch.manual_seed(0)
    seg = torch.randn(6)
    image = torch.randn(15, 6)
    sim = similarity_map(seg, image, (3, 5))
    dots = image @ seg
    expected = ((dots - dots.min()) / (dots.max() - dots.min())).reshape(3, 5)
    assert sim.shape == (3, 5)
    torch.testing.assert_close(sim, expected)
    assert sim.min() == 0 and sim.max() == 1


def test_similarity_map_is_row_major():
    seg = torch.tensor([1.0, 0.0])
    image = torch.stack([torch.tensor([float(i), 1.0]) for i in range(6)])  # dot = token index
    sim = similarity_map(seg, image, (2, 3))
    torch.testing.assert_close(sim, torch.tensor([[0.0, 0.2, 0.4], [0.6, 0.8, 1.0]]))


def test_similarity_map_constant_is_zeros_not_nan():
    sim = similarity_map(torch.ones(4), torch.ones(6, 4), (2, 3))
    assert torch.equal(sim, torch.zeros(2, 3))


def test_similarity_map_gradient_and_shape_errors():
    seg = torch.randn(4, requires_grad=True)
    image = torch.randn(6, 4, requires_grad=True)
    (similarity_map(seg, image, (2, 3)) * torch.arange(6.0).reshape(2, 3)).sum().backward()
    assert seg.grad.abs().sum() > 0 and image.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="grid 2x2 needs 4 image tokens"):
        similarity_map(torch.randn(4), torch.randn(6, 4), (2, 2))
    with pytest.raises(ValueError, match="seg_hidden"):
        similarity_map(torch.randn(3), torch.randn(6, 4), (2, 3))


# ------------------------------------------------------------- similarity as points


def test_similarity_to_points_exact_order_labels_and_coords():
    coords, labels = similarity_to_points(SIM_3X3, 9, 0.8, 0.2, (30, 60))
    # positives desc: 1.00 (c4), 0.90 (c0), 0.85 (c5); negatives asc: 0.00 (c3), 0.10 (c1), 0.15 (c8), 0.20 (c6)
    # neutrals in cell order: 0.50 (c2), 0.60 (c7)
    cells = [4, 0, 5, 3, 1, 8, 6, 2, 7]
    assert labels.tolist() == [1, 1, 1, 0, 0, 0, 0, -1, -1]
    expected = [[(c % 3 + 0.5) * 20, (c // 3 + 0.5) * 10] for c in cells]
    np.testing.assert_allclose(coords, expected)
    assert coords.dtype == np.float64 and labels.dtype == np.int64


def test_budget_takes_positives_then_negatives():
    coords, labels = similarity_to_points(SIM_3X3, 5, 0.8, 0.2, (30, 60))
    assert labels.tolist() == [1, 1, 1, 0, 0]
    np.testing.assert_allclose(coords[-1], [30.0, 5.0])  # c1
    _, labels = similarity_to_points(SIM_3X3, 2, 0.8, 0.2, (30, 60))
    assert labels.tolist() == [1, 1]


def test_neutrals_fill_the_budget():
    sim = np.full((2, 3), 0.5)
    sim[0, 0] = 1.0
    cells, labels = select_cells(sim, 4, 0.8, 0.2)
    assert labels.tolist() == [1, -1, -1, -1]
    assert cells.tolist() == [0, 1, 2, 3]


def test_point_count_capped_by_cells():
    coords, labels = similarity_to_points(SIM_3X3, 30, 0.8, 0.2, (30, 60))
    assert coords.shape == (9, 2) and labels.shape == (9,)


def test_ties_keep_row_major_order_and_equal_thresholds_prefer_positive():
    sim = np.array([[0.5, 0.9, 0.5], [0.9, 0.5, 0.1]])
    cells, labels = select_cells(sim, 6, 0.5, 0.5)
    assert cells.tolist() == [1, 3, 0, 2, 4, 5]
    assert labels.tolist() == [1, 1, 1, 1, 1, 0]
    _, labels = select_cells(np.array([[0.2, 0.8]], dtype=np.float32), 2, 0.8, 0.2)  # float32 at the thresholds
    assert labels.tolist() == [1, 0]


def test_coords_are_clamped_inside_small_images():
    coords, _ = similarity_to_points(np.linspace(0, 1, 16).reshape(4, 4), 16, 0.8, 0.2, (2, 3))
    assert coords[:, 0].max() == 2.0 and coords[:, 1].max() == 1.0
    assert coords.min() >= 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sim": np.zeros(4)}, "sim must be a non-empty 2-D"),
        ({"sim": np.array([[0.1, np.nan]])}, "sim contains NaN"),
        ({"num_points": 0}, "num_points"),
        ({"t_pos": 0.2, "t_neg": 0.8}, "t_neg"),
        ({"image_size": (0, 10)}, "image_size"),
        ({"image_size": (10,)}, "image_size"),
    ],
)
def test_similarity_to_points_validates(kwargs, match):
    args = {"sim": SIM_3X3, "num_points": 3, "t_pos": 0.8, "t_neg": 0.2, "image_size": (30, 60)} | kwargs
    with pytest.raises(ValueError, match=match):
        similarity_to_points(**args)


@settings(max_examples=50, deadline=None)
@given(
    sim=hnp.arrays(np.float64, hnp.array_shapes(min_dims=2, max_dims=2, max_side=6), elements=st.floats(0, 1)),
    num_points=st.integers(1, 40),
    thresholds=st.tuples(st.floats(0, 1), st.floats(0, 1)).map(sorted),
    image_size=st.tuples(st.integers(1, 80), st.integers(1, 80)),
)
def test_similarity_to_points_properties(sim, num_points, thresholds, image_size):
    t_neg, t_pos = thresholds
    cells, labels = select_cells(sim, num_points, t_pos, t_neg)
    coords, labels_again = similarity_to_points(sim, num_points, t_pos, t_neg, image_size)
    values = sim.ravel()[cells]
    assert len(cells) == len(labels) == len(coords) == min(num_points, sim.size)
    assert len(set(cells.tolist())) == len(cells)
    assert np.array_equal(labels, labels_again)
    assert (values[labels == 1] >= t_pos).all()
    assert (values[labels == 0] <= t_neg).all() and (values[labels == 0] < t_pos).all()
    assert ((values[labels == -1] > t_neg) & (values[labels == -1] < t_pos)).all()
    rank = np.select([labels == 1, labels == 0], [0, 1], 2)
    assert (np.diff(rank) >= 0).all()
    assert (np.diff(values[labels == 1]) <= 0).all() and (np.diff(values[labels == 0]) >= 0).all()
    n_pos, n_neg = int((sim >= t_pos).sum()), int(((sim <= t_neg) & (sim < t_pos)).sum())
    assert (labels == 1).sum() == min(len(cells), n_pos)
    assert (labels == 0).sum() == min(len(cells) - min(len(cells), n_pos), n_neg)
    height, width = image_size
    assert (coords[:, 0] >= 0).all() and (coords[:, 0] <= width - 1).all()
    assert (coords[:, 1] >= 0).all() and (coords[:, 1] <= height - 1).all()


# ------------------------------------------------------------------------ DtoC


def naive_refine(point, sim, image_size, sigma):
    full = upsample_map(sim, image_size)
    ys, xs = np.mgrid[0 : image_size[0], 0 : image_size[1]]
    softmax = np.exp(full) / np.exp(full).sum()
    weight = np.exp(-((xs - point[0]) ** 2 + (ys - point[1]) ** 2) / (2 * sigma**2)) * softmax
    return np.array([(weight * xs).sum(), (weight * ys).sum()]) / weight.sum()


@pytest.mark.parametrize("sigma", [1 / np.sqrt(2), 2.0, 5.0])
def test_refine_matches_full_image_weighted_mean(sigma):
    rng = np.random.default_rng(0)
    sim = rng.random((3, 4))
    coords = np.array([[1.0, 2.0], [6.3, 0.0], [10.0, 6.0]])
    refined = refine_points(coords, np.array([1, 0, 1]), sim, (7, 11), sigma)
    for point, got in zip(coords, refined):
        np.testing.assert_allclose(got, naive_refine(point, sim, (7, 11), sigma), atol=1e-9)


def test_refine_moves_toward_nearby_peak_and_stays_close():
    sim = np.zeros((4, 4))
    sim[1, 2] = 1.0  # peak in the cell right of the point; cells are 10 px on a 40×40 image
    point = np.array([[19.0, 15.0]])
    for sigma in (DEFAULT_SIGMA, 2.0):
        moved = refine_points(point, np.array([1]), sim, (40, 40), sigma)[0]
        assert moved[0] > point[0, 0] and abs(moved[1] - point[0, 1]) < 0.1
        assert np.linalg.norm(moved - point[0]) < 2.0
    coords, labels = similarity_to_points(sim, 16, 0.8, 0.2, (40, 40))
    assert np.abs(refine_points(coords, labels, sim, (40, 40)) - coords).max() < 2.0
    corner = refine_points(np.array([[39.0, 0.0]]), np.array([0]), sim, (40, 40), sigma=5.0)[0]
    assert 0 <= corner[0] <= 39 and 0 <= corner[1] <= 39


def test_refine_leaves_neutrals_and_handles_tiny_sigma():
    sim = np.random.default_rng(1).random((3, 3))
    coords = np.array([[3.3, 4.4], [7.7, 1.1]])
    out = refine_points(coords, np.array([-1, -1]), sim, (10, 10))
    assert np.array_equal(out, coords)
    out = refine_points(coords, np.array([-1, 1]), sim, (10, 10), sigma=1e-4)
    assert np.array_equal(out[0], coords[0]) and np.isfinite(out).all()
    with pytest.raises(ValueError, match="sigma"):
        refine_points(coords, np.array([1, 1]), sim, (10, 10), sigma=0.0)


def test_read_prompts_pipeline_and_downsample():
    torch.manual_seed(0)
    seg, image = torch.randn(8), torch.randn(24, 8)
    prompts = read_prompts(seg, image, (4, 6), MapPlacement.of((45, 90), False), ReadParams(num_points=10))
    assert prompts.sim.shape == (4, 6) and prompts.coords.shape == (10, 2)
    raw, _ = similarity_to_points(prompts.sim.numpy(), 10, 0.8, 0.2, (45, 90))
    assert np.abs(prompts.coords - raw).max() < 2.0
    coarse = read_prompts(seg, image, (4, 6), MapPlacement.of((45, 90), False),
                          ReadParams(num_points=100, downsample=2, refine=False))
    assert coarse.coords.shape == (6, 2)  # 2×3 cells after downsampling
    with pytest.raises(ValueError, match="downsample"):
        ReadParams(downsample=0)


# ------------------------------------------------------------ the map in SAM's frame

frames = st.tuples(st.integers(1, 1024), st.integers(1, 1024))


@settings(max_examples=200, deadline=None)
@given(frames, st.booleans(), st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=20))
def test_placed_points_always_lie_inside_the_image(input_size, padded, fractions):
    placement = MapPlacement.of(input_size, padded)
    extent_h, extent_w = placement.size
    coords = np.array([(fx * (extent_w - 1), fy * (extent_h - 1)) for fx, fy in fractions])
    placed = placement.to_image(coords)
    h, w = input_size
    assert placed.shape == coords.shape
    assert (placed[:, 0] >= 0).all() and (placed[:, 0] <= w - 1).all()
    assert (placed[:, 1] >= 0).all() and (placed[:, 1] <= h - 1).all()


@given(frames)
def test_a_padded_squares_centre_is_the_images_centre_and_a_whole_image_map_is_the_image(input_size):
    h, w = input_size
    padded, whole = MapPlacement.of(input_size, True), MapPlacement.of(input_size, False)
    side = max(h, w)
    assert padded.size == (side, side) and whole.size == (h, w) and whole.offset == (0.0, 0.0)
    centre = padded.to_image(np.array([[side / 2, side / 2]]))[0]
    np.testing.assert_allclose(centre, [min(w / 2, w - 1), min(h / 2, h - 1)])
    if h == w:  # a square image: both layouts are the frame itself
        assert padded == whole


def test_a_peak_on_a_padded_grid_is_placed_where_it_lies_in_the_image():
    """A 32 x 20 (w x h) image in a 32-pixel SAM frame; LLaVA's tower saw it centred in a 32-pixel
    square, 6 pixels of padding above and below. The token at row 4, column 2 of its 8 x 8 grid
    covers square pixels x 8-12, y 16-20: image pixels x 8-12, y 10-14."""
    seg = torch.zeros(8)
    seg[0] = 1.0
    image = torch.zeros(64, 8)
    image[4 * 8 + 2, 0] = 1.0
    params = ReadParams(num_points=3, refine=False)
    padded = read_prompts(seg, image, (8, 8), MapPlacement.of((20, 32), True), params)
    assert padded.labels.tolist() == [1, 0, 0]
    np.testing.assert_allclose(padded.coords[0], [10.0, 12.0])
    whole = read_prompts(seg, image, (8, 8), MapPlacement.of((20, 32), False), params)
    np.testing.assert_allclose(whole.coords[0], [10.0, 11.25])  # the grid stretched over the image instead
    assert (padded.coords[:, 1] <= 19).all() and (padded.coords[:, 1] >= 0).all()
