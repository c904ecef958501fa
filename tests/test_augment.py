"""Training augmentation: whole-pixel shifts move content without inventing pixels, draws are seeded."""
import torch
from torch.nn import functional as F

from distill.augment import augment_images, shift_images, step_generator


def _grid_sample_shift(x: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
    """The reference: nearest-neighbour resampling on a translated affine grid with border padding."""
    b, _, h, w = x.shape
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = 2.0 * dx.float() / w
    theta[:, 1, 2] = 2.0 * dy.float() / h
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=False)


def test_shift_equals_grid_sample_reference() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 12, 10, generator=g)
    dx = torch.randint(-3, 4, (16,), generator=g)
    dy = torch.randint(-3, 4, (16,), generator=g)
    assert torch.equal(shift_images(x, dx, dy), _grid_sample_shift(x, dx, dy))


def test_shift_moves_content_and_repeats_the_border() -> None:
    x = torch.arange(5.0).view(1, 1, 1, 5).expand(1, 1, 3, 5).contiguous()  # columns 0..4
    right = shift_images(x, torch.tensor([1]), torch.tensor([0]))  # samples one column to the right
    assert right[0, 0, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 4.0]
    left = shift_images(x, torch.tensor([-2]), torch.tensor([0]))
    assert left[0, 0, 0].tolist() == [0.0, 0.0, 0.0, 1.0, 2.0]
    assert torch.equal(shift_images(x, torch.tensor([0]), torch.tensor([2])), x)  # rows are all equal here


def test_augmentation_is_a_function_of_seed_and_step() -> None:
    x = torch.zeros(4, 3, 8, 8)
    a = augment_images(x, step_generator(0, 5))
    assert torch.equal(a, augment_images(x, step_generator(0, 5)))  # resume replays the same view
    assert not torch.equal(a, augment_images(x, step_generator(0, 6)))
    assert abs(float(a.std()) - 0.05) < 0.03  # noise_std and brightness at their defaults
