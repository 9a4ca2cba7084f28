"""unet3plus.data.dataset: SliceDataset, load_preprocessed and the sample format, on real preprocess_dataset output."""

from __future__ import annotations

import json
import re

import nibabel as nib
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from unet3plus.config import DataConfig
from unet3plus.data.dataset import SliceDataset, load_preprocessed, load_sample, sampling_grid, save_sample
from unet3plus.data.preprocess import preprocess_dataset
from unet3plus.errors import DataError

SIZE = 64
CASE_NUMBERS = (3, 30, 31, 40)  # 3 is in the paper's LiTS test range, the others train/val
SLICES = 6


def organ(number: int) -> np.ndarray:
    """An off-centre elliptic organ in slices 1-4 of a (48, 40, 6) volume, different per case."""
    x, y = np.meshgrid(np.arange(48), np.arange(40), indexing="ij")
    plane = (((x - 14 - number % 5) / 10.0) ** 2 + ((y - 25) / 7.0) ** 2 <= 1.0).astype(np.uint8)
    label = np.zeros((48, 40, SLICES), np.uint8)
    label[:, :, 1:5] = plane[:, :, None]
    return label


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Preprocessed folder whose image channels equal the mask (HU window ends), crop mode: exact."""
    raw = tmp_path_factory.mktemp("raw")
    affine = np.array([[-0.8, 0, 0, 20.0], [0, -0.8, 0, 15.0], [0, 0, 2.0, -50.0], [0, 0, 0, 1]])
    for number in CASE_NUMBERS:
        label = organ(number)
        nib.save(nib.Nifti1Image(label.astype(np.int16) * 450 - 200, affine), raw / f"volume-{number}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), raw / f"segmentation-{number}.nii.gz")
    out = tmp_path_factory.mktemp("preprocessed")
    preprocess_dataset("lits", raw, out, DataConfig(size=SIZE, resize_mode="crop", workers=1, val_fraction=0.3))
    return out


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.bool(), b.bool()
    return float((a & b).sum() / (a | b).sum())


def centroid(mask: torch.Tensor) -> np.ndarray:
    rows, cols = np.nonzero(mask.numpy())
    return np.array([rows.mean(), cols.mean()])


def test_items_follow_the_contract(data_dir):
    manifest, cases = load_preprocessed(data_dir)
    sizes = {split: len(SliceDataset(data_dir, split)) for split in ("train", "val", "test")}
    assert sizes == {"train": 2 * SLICES, "val": SLICES, "test": SLICES}
    assert cases["cases"]["3"]["split"] == "test"
    dataset = SliceDataset(data_dir, "train")
    for index in range(len(dataset)):
        item = dataset[index]
        assert set(item) == {"image", "mask", "organ_present", "case_id", "slice_index"}
        assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
        assert item["mask"].shape == (1, SIZE, SIZE) and item["mask"].dtype == torch.float32
        assert item["organ_present"].shape == () and item["organ_present"].dtype == torch.float32
        assert isinstance(item["case_id"], str) and isinstance(item["slice_index"], int)
        assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert set(item["mask"].unique().tolist()) <= {0.0, 1.0}
        assert item["organ_present"].item() == float(item["mask"].any()) == float(1 <= item["slice_index"] <= 4)
        row = manifest[(manifest.case_id == item["case_id"]) & (manifest.slice_index == item["slice_index"])]
        assert row.split.item() == "train" and row.organ_present.item() == item["organ_present"].item()
        torch.testing.assert_close(item["image"][1], item["mask"][0], atol=1e-3, rtol=0)


def test_augmentation_moves_image_and_mask_together(data_dir):
    plain, augmented = SliceDataset(data_dir, "train"), SliceDataset(data_dir, "train", augment=True, seed=3)
    moved = 0
    for epoch in range(3):
        augmented.set_epoch(epoch)
        for index in (1, 2, 3, 4, 7, 8, 9, 10):  # slices with organ
            before, after = plain[index], augmented[index]
            mask, image_mask = after["mask"][0], after["image"][1] >= 0.5
            assert iou(mask, image_mask) >= 0.9
            assert np.abs(centroid(mask) - centroid(image_mask)).max() < 0.5
            assert set(mask.unique().tolist()) <= {0.0, 1.0} and after["organ_present"].item() == 1.0
            moved += iou(mask, before["mask"][0]) < 0.95
    assert moved >= 18  # the transform really changed most items, so the alignment check means something


def test_augmentation_is_a_function_of_seed_epoch_and_index(data_dir):
    first, same, other_seed = (SliceDataset(data_dir, "train", augment=True, seed=seed) for seed in (1, 1, 2))
    torch.testing.assert_close(first[2]["image"], same[2]["image"], rtol=0, atol=0)
    assert not torch.equal(first[2]["image"], other_seed[2]["image"])
    same.set_epoch(1)
    assert not torch.equal(first[2]["image"], same[2]["image"])


def test_dataloader_with_two_fork_workers_matches_in_process_loading(data_dir):
    dataset = SliceDataset(data_dir, "train", augment=True, seed=5)
    dataset.set_epoch(2)
    batches = [
        list(DataLoader(dataset, batch_size=4, num_workers=workers, multiprocessing_context=context))
        for workers, context in ((0, None), (2, "fork"))
    ]
    assert len(batches[1]) == 3
    for in_process, in_workers in zip(*batches):
        assert in_workers["image"].shape == (4, 3, SIZE, SIZE) and in_workers["mask"].shape == (4, 1, SIZE, SIZE)
        assert in_workers["organ_present"].shape == (4,) and len(in_workers["case_id"]) == 4
        for key in ("image", "mask", "organ_present", "slice_index"):
            torch.testing.assert_close(in_workers[key], in_process[key], rtol=0, atol=0)


def test_unknown_split_is_refused(data_dir):
    with pytest.raises(ValueError, match="'training' is not one of train, val, test"):
        SliceDataset(data_dir, "training")


@pytest.mark.parametrize("damage", ["no_manifest", "corrupt_cases", "missing_sample", "truncated_sample", "no_folder"])
def test_missing_or_corrupt_files_raise_data_error_naming_them(data_dir, tmp_path, damage):
    copy = tmp_path / "copy"
    manifest, _ = load_preprocessed(data_dir)
    copy.mkdir()
    for name in ("manifest.csv", "cases.json", *manifest.path):
        (copy / name).parent.mkdir(parents=True, exist_ok=True)
        (copy / name).write_bytes((data_dir / name).read_bytes())
    sample = copy / manifest[manifest.split == "train"].path.iloc[0]
    if damage == "no_manifest":
        (copy / "manifest.csv").unlink()
        named = copy / "manifest.csv"
    elif damage == "corrupt_cases":
        (copy / "cases.json").write_text(json.dumps({"layout": "lits"})[:-3])
        named = copy / "cases.json"
    elif damage == "missing_sample":
        sample.unlink()
        named = sample
    elif damage == "truncated_sample":
        sample.write_bytes(sample.read_bytes()[:500])
        named = sample
    else:
        copy = tmp_path / "nowhere"
        named = copy
    with pytest.raises(DataError, match=re.escape(str(named))):
        dataset = SliceDataset(copy, "train")
        [dataset[i] for i in range(len(dataset))]


def test_sampling_grid_equals_torch_affine_grid():
    matrix = ((0.93, -0.31), (0.27, 1.08))
    theta = torch.tensor([[[*matrix[0], 0.0], [*matrix[1], 0.0]]])
    expected = torch.nn.functional.affine_grid(theta, [1, 1, 24, 40], align_corners=False)
    torch.testing.assert_close(sampling_grid(matrix, 24, 40), expected)


def test_save_sample_writes_what_np_savez_would_and_load_sample_reads_it_back(tmp_path):
    """The sample writer beside its reader: the file np.savez writes for the stacked planes, read back as float32."""
    rng = np.random.default_rng(0)
    planes = [rng.random((6, 5)).astype(np.float16).T for _ in range(3)]  # non-contiguous, as a volume's slices
    mask = (rng.random((5, 6)) > 0.5).astype(np.uint8)
    save_sample(tmp_path / "ours.npz", planes, mask)
    np.savez(tmp_path / "reference.npz", image=np.stack(planes), mask=mask, organ_present=mask.max())
    with np.load(tmp_path / "ours.npz") as ours, np.load(tmp_path / "reference.npz") as reference:
        assert sorted(ours.files) == sorted(reference.files) == ["image", "mask", "organ_present"]
        for name in reference.files:
            assert (ours[name].dtype, ours[name].shape) == (reference[name].dtype, reference[name].shape), name
            np.testing.assert_array_equal(ours[name], reference[name])
    image, loaded_mask = load_sample(tmp_path / "ours.npz")
    assert (image.dtype, tuple(image.shape), tuple(loaded_mask.shape)) == (torch.float32, (3, 5, 6), (1, 5, 6))
    np.testing.assert_array_equal(image.numpy(), np.stack(planes).astype(np.float32))
    np.testing.assert_array_equal(loaded_mask[0].numpy(), mask)
