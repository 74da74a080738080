"""A frozen BatchNorm component keeps its running statistics while the rest of the policy trains."""

import torch
from torch import nn

from craftvla.model.peft import train_mode
from tests.train.conftest import CAM, train_config


def test_train_mode_keeps_only_frozen_batchnorm_in_eval():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.1), nn.BatchNorm2d(4), nn.BatchNorm2d(4, affine=False)
    )
    model[1].requires_grad_(False)  # frozen BN: must keep its statistics
    train_mode(model.eval())
    assert [m.training for m in model] == [True, False, True, True, True]  # dropout and trainable BN train
    before = model[1].running_mean.clone()
    model(torch.randn(2, 3, 5, 5) + 3.0)
    assert torch.equal(model[1].running_mean, before)
    assert not torch.equal(model[3].running_mean, torch.zeros(4))


def test_training_with_a_frozen_batchnorm_vision_tower_leaves_its_statistics(tmp_path, tiny_dataset):
    """`craftvla train --freeze.vision` on a MobileNetV2 tower (BatchNorm): the saved checkpoint's
    BatchNorm buffers equal the initial ones, while the trained parts moved."""
    from safetensors.torch import load_file

    from craftvla.model.policy import VLAPolicy
    from craftvla.train.loop import train

    vision = [
        "--policy.vision.backbone_id",
        "mobilenet_v2",
        "--policy.vision.patch_size",
        "32",
        "--policy.vision.feature_layer",
        "-2",
    ]
    torch.manual_seed(0)
    VLAPolicy(train_config(tmp_path, *vision).policy.for_dataset([CAM], 4, 4)).save_pretrained(tmp_path / "init")
    train(
        train_config(
            tmp_path / "run",
            *vision,
            "--init_from",
            str(tmp_path / "init"),
            "--dataset.root",
            str(tiny_dataset),
            "--freeze.vision",
            "true",
            "--steps",
            "2",
            "--batch_size",
            "4",
            "--dataset.num_workers",
            "0",
            "--checkpoint.save_freq",
            "2",
            "--optim.lr",
            "1e-2",
        )
    )
    init = load_file(str(tmp_path / "init" / "model.safetensors"))
    saved = load_file(str(tmp_path / "run" / "checkpoints" / "last" / "model.safetensors"))
    stats = [k for k in saved if k.startswith("vision.") and ("running_mean" in k or "running_var" in k)]
    assert stats, "the MobileNetV2 tower has BatchNorm statistics"
    assert all(torch.equal(saved[k], init[k]) for k in stats)
    assert any(not torch.equal(saved[k], init[k]) for k in saved if k.startswith("action_head."))


def test_building_a_cnn_tower_leaves_its_batchnorm_statistics():
    """The tower probes its output shape once at construction: in eval mode, not as a training batch."""
    from torchvision.models import mobilenet_v2

    from craftvla.model.vision import IMAGENET_MEAN, IMAGENET_STD, CNNTower

    features = mobilenet_v2(weights=None).features[:-1]
    tower = CNNTower(features, 64, IMAGENET_MEAN, IMAGENET_STD)
    bn = [m for m in tower.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bn and all(torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in bn)
    assert all(int(m.num_batches_tracked) == 0 for m in bn) and tower.training
    assert (tower.embed_dim, tower.num_patches) == (320, 4)
