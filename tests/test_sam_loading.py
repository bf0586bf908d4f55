"""SAM loader: tiny folders and official vit_b/l/h state dicts, read weights-only."""
import pytest
import torch

from models.sam import _build_official, load_sam


class NotATensor:
    """A pickled object that a weights-only load must refuse."""


def test_official_vit_b_loads_from_state_dict(tmp_path):
    reference = _build_official("vit_b")
    path = tmp_path / "sam_vit_b.pth"
    torch.save(reference.state_dict(), path)
    loaded = load_sam("vit_b", path)
    assert loaded.image_encoder.img_size == 1024
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_checkpoint_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"weights": NotATensor()}, path)
    with pytest.raises(ValueError, match="not a weights-only SAM state dict"):
        load_sam("vit_b", path)


def test_wrong_architecture_is_named(tiny_workspace, tmp_path):
    tiny_sam = tiny_workspace["tiny"]["path"] + "/sam/sam.pt"
    with pytest.raises(ValueError, match="does not match SAM vit_l"):
        load_sam("vit_l", tiny_sam)


def test_unknown_variant_and_missing_file(tmp_path):
    with pytest.raises(ValueError, match="unknown SAM variant 'vit_x'"):
        load_sam("vit_x", None)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_sam("vit_h", tmp_path / "nope.pth")


def test_a_tiny_sam_folder_loads_from_safetensors_and_a_damaged_file_is_named(tmp_path):
    from safetensors.torch import save_file

    from models.sam import TinySamSpec, build_tiny_sam, save_tiny_sam

    torch.manual_seed(0)
    reference = build_tiny_sam(TinySamSpec())
    folder = save_tiny_sam(reference, TinySamSpec(), tmp_path / "sam")
    (folder / "sam.pt").unlink()
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, folder / "model.safetensors")
    loaded = load_sam("tiny", folder)
    assert all(torch.equal(a, b) for a, b in zip(reference.state_dict().values(), loaded.state_dict().values()))
    (folder / "model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(ValueError, match="model.safetensors: not a SAM safetensors file"):
        load_sam("tiny", folder)


def test_an_official_sam_folder_loads_as_the_variant_it_names(tmp_path):
    """An export's sam/ of SAM vit_b: safetensors + its variant, read as vit_b whatever the config says."""
    from models.sam import sam_image_size, save_sam_folder

    reference = _build_official("vit_b")
    folder = save_sam_folder(reference, "vit_b", tmp_path / "sam")
    loaded = load_sam("vit_h", folder)
    assert len(loaded.image_encoder.blocks) == 12 and sam_image_size("tiny", folder) == 1024
    for (name, a), (_, b) in zip(reference.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
