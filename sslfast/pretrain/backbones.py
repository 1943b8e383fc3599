"""Backbones by name: torchvision ResNets, any timm model, and a tiny CNN for
smoke tests. Each returns features (classifier removed)."""

from torch import nn

TORCHVISION_RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


def tiny_convnet(width=32):
    """Four conv-BN-ReLU stages and global pooling (4·width features): the
    embedded data's default (32² images on a CPU) and the tests' backbone."""
    layers, c_in = [], 3
    for i in range(4):
        c_out = width * 2 ** min(i, 2)
        layers += [nn.Conv2d(c_in, c_out, 3, stride=1 if i == 0 else 2, padding=1, bias=False),
                   nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
        c_in = c_out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())


def check_backbone(name):
    """The builder for ``name`` (raises a ValueError naming it when unknown)."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"--backbone must be a model name, got {name!r}")
    if name == "tiny":
        return tiny_convnet
    if name in TORCHVISION_RESNETS:
        return lambda: _torchvision_resnet(name)
    timm_name = name[5:] if name.startswith("timm:") else name
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(timm_name):
        return lambda: _timm_model(timm, timm_name)
    raise ValueError(
        f"--backbone: unknown model {name!r}; use one of {', '.join(TORCHVISION_RESNETS)}, "
        f"'tiny', or a timm model name{'' if timm is not None else ' (timm is not installed)'}")


def _timm_model(timm, name):
    # ViTs fix their input size unless asked not to (DINO's local crops are smaller).
    try:
        return timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    except TypeError:  # models without that option
        return timm.create_model(name, pretrained=False, num_classes=0)


def _torchvision_resnet(name):
    import torchvision

    model = getattr(torchvision.models, name)(weights=None)
    model.fc = nn.Identity()
    return model


def build_backbone(name):
    """``"resnet18"`` ... ``"resnet152"`` (torchvision, random init, ``fc``
    removed), ``"tiny"``, or a timm model name (``"timm:vit_small_patch16_224"``
    or a bare name timm knows; ``num_classes=0``)."""
    return check_backbone(name)()
