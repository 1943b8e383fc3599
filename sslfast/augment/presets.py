"""The methods' augmentation presets: callables that turn one batch of images
into all the views of the method, each view with its own per-sample parameters
(SEMANTICS.md §6)."""

from sslfast.augment.config import byol_configs, dino_configs, mocov2_config, simclr_config
from sslfast.augment.params import sample_params
from sslfast.ops.augment import _image_list, augment


class ViewsAugment:
    """``views = preset(images, generator=None)``: one augmented batch per view
    config, parameters drawn per sample on the images' device (from
    ``generator`` when given, else the preset's own, else the default)."""

    def __init__(self, configs, generator=None):
        self.configs = list(configs)
        self.generator = generator

    def __call__(self, images, generator=None):
        imgs = _image_list(images)
        sizes = [(int(x.shape[-2]), int(x.shape[-1])) for x in imgs]
        gen = generator if generator is not None else self.generator
        device = imgs[0].device
        views = []
        for cfg in self.configs:
            params = sample_params(len(imgs), sizes, cfg, gen, device=device)
            views.append(augment(imgs, params, cfg))
        return views

    def __repr__(self):
        return f"{type(self).__name__}({len(self.configs)} views)"


class SimCLRAugment(ViewsAugment):
    """Two views of SimCLR's pipeline."""

    def __init__(self, output_size=224, generator=None, **changes):
        cfg = simclr_config(output_size, **changes)
        super().__init__([cfg, cfg], generator)


class MoCoV2Augment(ViewsAugment):
    """Two views of MoCo v2's (and SimSiam's) pipeline."""

    def __init__(self, output_size=224, generator=None, **changes):
        cfg = mocov2_config(output_size, **changes)
        super().__init__([cfg, cfg], generator)


class BYOLAugment(ViewsAugment):
    """BYOL's view 1 and view 2, each with its own probabilities."""

    def __init__(self, output_size=224, generator=None, **changes):
        super().__init__(byol_configs(output_size, **changes), generator)


class DINOAugment(ViewsAugment):
    """DINO: two global views (``global_size``) and ``n_local_views`` local ones
    (``local_size``, crop scale ``local_crop_scale``, default (0.05, 0.4); a
    ``crop_scale`` change is the global views')."""

    def __init__(self, n_local_views=8, global_size=224, local_size=96, generator=None,
                 **changes):
        if isinstance(n_local_views, bool) or not isinstance(n_local_views, int) or \
                n_local_views < 0:
            raise ValueError(f"n_local_views must be an int >= 0, got {n_local_views!r}")
        g1, g2, local = dino_configs(global_size, local_size, **changes)
        super().__init__([g1, g2] + [local] * n_local_views, generator)

