"""The synthetic scene of the Slicer self-test: its sphere has the size and place its parameters give."""

from __future__ import annotations

import numpy as np

from SAMMed3DLib import synthetic


def test_the_sphere_has_the_volume_of_its_radius_and_is_centred_on_its_centre():
    sphere = synthetic.sphere_mask(synthetic.CENTER_IJK)
    voxel_volume = abs(np.linalg.det(synthetic.oblique_ijk_to_ras()[:3, :3]))
    expected = 4 / 3 * np.pi * synthetic.RADIUS_MM**3 / voxel_volume
    assert abs(int(sphere.sum()) - expected) < 0.02 * expected
    i, j, k = synthetic.CENTER_IJK
    assert sphere[k, j, i] == 1 and sphere[0, 0, 0] == 0
    np.testing.assert_allclose(np.argwhere(sphere).mean(axis=0), (k, j, i), atol=0.1)


def test_the_image_is_soft_tissue_with_a_bright_sphere():
    image, sphere = synthetic.bright_sphere_image(), synthetic.sphere_mask(synthetic.CENTER_IJK).astype(bool)
    assert image.dtype == np.int16 and image.shape == synthetic.SHAPE_KJI
    assert abs(image[~sphere].mean() - synthetic.TISSUE_HU) < 1 and abs(image[sphere].mean() - synthetic.SPHERE_HU) < 2
    np.testing.assert_array_equal(image, synthetic.bright_sphere_image())  # deterministic from its seed
