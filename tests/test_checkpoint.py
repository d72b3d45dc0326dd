"""Checkpoint loading in the three official layouts, strictness and error messages."""

import argparse
import os

import pytest
import torch

from conftest import random_episode
from fssam.errors import CheckpointError, ConfigError
from fssam.model import build, describe_weights
from fssam.model.dino import interpolate_pos_embed


def hub_dino_state(model, seed=0):
    """A DINOv2 hub-format state dict (518-px style pos_embed grid, mask_token) from the model's ViT."""
    cfg = model.config.dino
    g = torch.Generator().manual_seed(seed)
    state = {k[len("dino.vit.") :]: v.clone() for k, v in model.state_dict().items() if k.startswith("dino.vit.")}
    grid = cfg.checkpoint_image_size // cfg.patch_size
    state["pos_embed"] = torch.randn(1, 1 + grid * grid, cfg.embed_dim, generator=g)
    state["mask_token"] = torch.zeros(1, cfg.embed_dim)
    return state


def fssam_file(model, path, prefix="module."):
    state = {prefix + k: v.clone() for k, v in model.state_dict().items() if k.startswith("sam2.")}
    state.update({prefix + "dino." + k: v for k, v in hub_dino_state(model).items()})
    torch.save({"state_dict": state}, path)
    return state


def expected_pos_embed(model):
    return interpolate_pos_embed(hub_dino_state(model)["pos_embed"], model.config.dino_grid)


@pytest.fixture(scope="module")
def source():
    return build("tiny", seed=123)


def _assert_same_weights(model, source):
    ours = model.state_dict()
    for key, value in source.state_dict().items():
        if key == "dino.vit.pos_embed":
            torch.testing.assert_close(ours[key], expected_pos_embed(source))
        else:
            torch.testing.assert_close(ours[key], value, msg=key)


def test_fssam_training_checkpoint_loads_strictly(tmp_path, source):
    path = str(tmp_path / "best.pth")
    fssam_file(source, path)
    model = build("tiny", checkpoint=path, seed=7)
    _assert_same_weights(model, source)
    assert model.random_init_seed is None
    assert "fssam checkpoint" in describe_weights(model) and "RANDOM" not in describe_weights(model)
    query, supports, masks = random_episode(1, 1, 64)
    with torch.no_grad():
        reference = build("tiny", seed=123)
        reference.dino.vit.pos_embed.copy_(expected_pos_embed(source))
        torch.testing.assert_close(model(query, supports, masks), reference(query, supports, masks))


def test_sam2_and_dinov2_checkpoints_load(tmp_path, source):
    sam2_path, dino_path = str(tmp_path / "sam2_hiera_tiny.pt"), str(tmp_path / "dinov2.pth")
    torch.save({"model": source.sam2.state_dict()}, sam2_path)
    torch.save(hub_dino_state(source), dino_path)
    model = build("tiny", checkpoint=[sam2_path, dino_path], seed=7)
    _assert_same_weights(model, source)
    assert model.random_init_seed is None
    only_sam2 = build("tiny", checkpoint=sam2_path, seed=7)
    assert only_sam2.random_init_seed == 7
    assert "RANDOM-INIT" in describe_weights(only_sam2) and "sam2 checkpoint" in describe_weights(only_sam2)


def test_pos_embed_resampling_is_identity_on_same_grid():
    pos = torch.randn(1, 1 + 16, 8)
    assert interpolate_pos_embed(pos, 4) is pos
    constant = torch.ones(1, 1 + 37 * 37, 8)
    torch.testing.assert_close(interpolate_pos_embed(constant, 40), torch.ones(1, 1 + 1600, 8))


def test_random_init_says_so():
    model = build("tiny", seed=5)
    assert model.random_init_seed == 5
    assert describe_weights(model).startswith("RANDOM-INIT model (seed 5)")


@pytest.mark.parametrize("defect", ["missing", "unexpected", "shape"])
def test_strict_errors_list_the_keys(tmp_path, source, defect):
    path = str(tmp_path / "bad.pth")
    state = fssam_file(source, path, prefix="")
    if defect == "missing":
        del state["sam2.no_obj_ptr"]
        match = "missing keys: sam2.no_obj_ptr"
    elif defect == "unexpected":
        state["sam2.extra_thing"] = torch.zeros(1)
        match = "unexpected keys: sam2.extra_thing"
    else:
        state["sam2.no_obj_ptr"] = torch.zeros(3, 3)
        match = r"shape mismatches: sam2.no_obj_ptr: file \(3, 3\)"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=match):
        build("tiny", checkpoint=path)


def test_wrong_config_lists_shape_mismatches(tmp_path, source):
    path = str(tmp_path / "tiny.pth")
    torch.save({"model": source.sam2.state_dict()}, path)
    with pytest.raises(CheckpointError, match="does not fit config 'small'.*shape mismatches"):
        build("small", checkpoint=path)


def test_corrupt_missing_and_unknown_files(tmp_path):
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match="cannot be read: corrupt"):
        build("tiny", checkpoint=str(corrupt))
    with pytest.raises(CheckpointError, match="does not exist"):
        build("tiny", checkpoint=str(tmp_path / "nope.pt"))
    unknown = tmp_path / "unknown.pt"
    torch.save({"weights": {"a": torch.zeros(1)}}, unknown)
    with pytest.raises(CheckpointError, match="unrecognised checkpoint layout"):
        build("tiny", checkpoint=str(unknown))
    truncated = tmp_path / "truncated.pt"
    torch.save({"model": {"a": torch.zeros(100)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="corrupt"):
        build("tiny", checkpoint=str(truncated))


def test_pickled_objects_are_refused(tmp_path):
    """weights_only=True: a file holding arbitrary Python objects is not executed."""
    path = tmp_path / "evil.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "args": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError, match="weights_only=True refuses"):
        build("tiny", checkpoint=str(path))


def test_unknown_config_and_options():
    with pytest.raises(ConfigError, match="unknown config 'huge'"):
        build("huge")
    with pytest.raises(ConfigError, match="scma_mode"):
        build("tiny", scma_mode="fancy")
    with pytest.raises(ConfigError, match="refine_version"):
        build("tiny", refine_version="v9")


@pytest.mark.parametrize("defect", ["int", "nan", "inf"])
def test_non_tensor_and_non_finite_values_are_refused(tmp_path, source, defect):
    path = str(tmp_path / "bad.pth")
    state = fssam_file(source, path, prefix="")
    if defect == "int":
        state["sam2.no_obj_ptr"] = 3
        match = r"not tensors where tensors are expected: sam2\.no_obj_ptr \(int\) \(1 in all\)"
    else:
        state["sam2.no_obj_ptr"] = state["sam2.no_obj_ptr"].clone()
        state["sam2.no_obj_ptr"].view(-1)[0] = float(defect)
        match = r"NaN or Inf values: sam2\.no_obj_ptr \(1 in all\)"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError, match=match) as info:
        build("tiny", checkpoint=path)
    assert path in str(info.value)


def test_many_bad_keys_are_counted(tmp_path, source):
    path = str(tmp_path / "nan.pth")
    torch.save({"model": {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                          for k, v in source.sam2.state_dict().items()}}, path)
    with pytest.raises(CheckpointError, match=r"NaN or Inf values: .*, \.\.\. \(\d+ in all\)"):
        build("tiny", checkpoint=path)


def test_loaded_checkpoint_is_recorded_by_name_and_hash(tmp_path, source):
    path = tmp_path / "fssam.pth"
    fssam_file(source, str(path))
    model = build("tiny", checkpoint=str(path))
    assert [set(e) for e in model.checkpoints] == [{"file", "format", "sha256"}]
    assert model.checkpoints[0]["file"] == "fssam.pth"
    assert str(tmp_path) not in describe_weights(model)


def test_a_tensor_of_the_wrong_rank_is_one_error(tmp_path, source):
    """A DINOv2 file whose pos_embed is 1-D (or any tensor the key mapping cannot index) is a
    CheckpointError naming the file, not an IndexError traceback."""
    state = hub_dino_state(source)
    state["pos_embed"] = torch.zeros(5)
    path = tmp_path / "dino_bad.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="dino_bad.pth.*wrong shape or kind"):
        build("tiny", checkpoint=[str(path)])


@pytest.mark.parametrize("layout", ["fssam", "sam2"])
def test_non_floating_tensors_for_floating_parameters_are_refused(tmp_path, source, layout):
    """Right shapes but int64 / bool values where the model has float weights: load_state_dict would
    cast them silently into meaningless weights; one CheckpointError names the keys and dtypes."""
    path = str(tmp_path / "ints.pth")
    if layout == "fssam":
        state = fssam_file(source, path, prefix="")
        prefix = "sam2."
    else:
        state = {k: v.clone() for k, v in source.sam2.state_dict().items()}
        prefix = ""
    state[prefix + "no_obj_ptr"] = state[prefix + "no_obj_ptr"].round().long()
    state[prefix + "maskmem_tpos_enc"] = state[prefix + "maskmem_tpos_enc"] > 0
    torch.save({"state_dict": state} if layout == "fssam" else {"model": state}, path)
    with pytest.raises(CheckpointError, match=r"non-floating tensors for floating parameters: "
                       r"sam2\.maskmem_tpos_enc: file bool vs model float32, sam2\.no_obj_ptr: file int64 vs model float32$"):
        build("tiny", checkpoint=path)
    state[prefix + "no_obj_ptr"] = state[prefix + "no_obj_ptr"].half()  # another floating dtype is converted
    state[prefix + "maskmem_tpos_enc"] = state[prefix + "maskmem_tpos_enc"].double()
    torch.save({"state_dict": state} if layout == "fssam" else {"model": state}, path)
    assert build("tiny", checkpoint=path).sam2.no_obj_ptr.dtype == torch.float32
