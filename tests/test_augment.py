from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fer.data.augment import BatchAugment, affine_grid, to_float


def faces(n=16, size=32) -> torch.Tensor:
    x = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    x[:, :, :, : size // 4] = 255  # a bright stripe on the left: flips and shifts move it
    return x


def test_output_is_float_in_unit_range_and_same_shape():
    out = BatchAugment()(faces())
    assert out.dtype == torch.float32 and out.shape == (16, 1, 32, 32)
    assert 0.0 <= out.min() and out.max() <= 1.0


def test_identity_when_everything_is_off():
    aug = BatchAugment(hflip=0, rotate_degrees=0, scale=(1, 1), translate=0, erase_p=0)
    x = faces()
    assert torch.equal(aug(x), to_float(x))


def test_flip_mirrors_each_flipped_sample_exactly():
    aug = BatchAugment(hflip=1.0, rotate_degrees=0, scale=(1, 1), translate=0, erase_p=0)
    x = faces()
    assert torch.allclose(aug(x), to_float(x).flip(-1), atol=1e-5)


def test_parameters_differ_per_sample():
    torch.manual_seed(0)
    aug = BatchAugment(hflip=0.5, rotate_degrees=20, erase_p=0)
    x = faces(n=32).expand(32, 1, 32, 32).clone()
    out = aug(x)
    distinct = {tuple(o.flatten()[::37].tolist()) for o in out}
    assert len(distinct) > 16


def test_random_erasing_touches_only_chosen_samples():
    torch.manual_seed(0)
    aug = BatchAugment(hflip=0, rotate_degrees=0, scale=(1, 1), translate=0, erase_p=0.5)
    x = torch.zeros(64, 1, 32, 32, dtype=torch.uint8)
    changed = (aug(x) != 0).flatten(1).any(1)
    assert 10 < int(changed.sum()) < 54


def test_seeded_runs_repeat():
    aug = BatchAugment()
    torch.manual_seed(3)
    a = aug(faces())
    torch.manual_seed(3)
    b = aug(faces())
    assert torch.equal(a, b)


def test_output_size_samples_the_same_warp_on_a_coarser_grid():
    x = faces(size=64)
    flip = BatchAugment(hflip=1.0, rotate_degrees=0, scale=(1, 1), translate=0, erase_p=0, output_size=48)
    out = flip(x)
    assert out.shape == (16, 1, 48, 48)
    # the stripe covers the left quarter of the input, so the right quarter of the mirrored output
    assert out[..., -10:].min() > 0.99 and out[..., :34].max() < 0.01
    off = BatchAugment(hflip=0, rotate_degrees=0, scale=(1, 1), translate=0, erase_p=0, output_size=48)
    assert off(x).shape == (16, 1, 48, 48)  # resized even when no warp runs
    # the same picture as the warped path, up to the resampling at the stripe's edge
    assert (off(x).flip(-1) - out).abs().mean() < 0.02


def test_affine_grid_matches_torch_on_non_square_batches():
    theta = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = affine_grid(theta, 5, 7)
    torch.testing.assert_close(ours, F.affine_grid(theta, [3, 1, 5, 7], align_corners=False))
    shared = theta[:1].expand(4, 2, 3)  # one matrix for a whole batch, as test-time rotation passes it
    torch.testing.assert_close(affine_grid(shared, 6, 6), F.affine_grid(shared, [4, 1, 6, 6], align_corners=False))


def still(**kwargs) -> BatchAugment:
    """Only the photometric jitter: no warp, no erasing."""
    return BatchAugment(hflip=0, rotate_degrees=0, scale=(1, 1), translate=0, erase_p=0, **kwargs)


def test_brightness_scales_each_face_by_its_own_factor_within_the_range():
    torch.manual_seed(0)
    x = torch.full((64, 1, 8, 8), 100, dtype=torch.uint8)
    out = still(brightness=0.3)(x)
    factors = out.flatten(1).mean(1) / (100 / 255)
    assert torch.allclose(out, out[:, :, :1, :1].expand_as(out))  # one factor per face, not per pixel
    assert factors.min() >= 0.7 - 1e-5 and factors.max() <= 1.3 + 1e-5
    assert factors.max() - factors.min() > 0.4  # spread over the range, not one shared draw


def test_contrast_scales_the_spread_about_each_faces_mean_and_keeps_the_mean():
    torch.manual_seed(0)
    x = torch.randint(80, 176, (64, 1, 16, 16), dtype=torch.uint8)  # mid-grey: no clamping at +-40%
    before = to_float(x)
    out = still(contrast=0.4)(x)
    torch.testing.assert_close(out.mean((1, 2, 3)), before.mean((1, 2, 3)), atol=1e-5, rtol=0)
    ratio = out.std((1, 2, 3)) / before.std((1, 2, 3))
    assert ratio.min() >= 0.6 - 1e-4 and ratio.max() <= 1.4 + 1e-4 and ratio.max() - ratio.min() > 0.5


def test_jitter_stays_in_the_image_range():
    out = still(brightness=1.0, contrast=1.0)(faces())
    assert 0.0 <= out.min() and out.max() <= 1.0


@pytest.mark.parametrize("key", ["brightness", "contrast"])
def test_jitter_amounts_outside_unit_range_name_their_key(key):
    with pytest.raises(ValueError, match=rf"data\.augment\.{key}=1\.5"):
        still(**{key: 1.5})
