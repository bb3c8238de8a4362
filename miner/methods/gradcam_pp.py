"""Method ``gradcam-pp``: Grad-CAM++ (Chattopadhay et al. 2018, arXiv:1710.11063) on the step-1 classifier.

The features X the CAM baseline weights by the classifier's w_c (Eq. 7 of Cai et al.) are here
weighted by Grad-CAM++'s w_k^c instead, from the gradient of the finding's logit S^c with respect
to X. The method is the proof that a gradient method is one module: it asks for autograd through
``needs_gradients`` and is trained, evaluated, tuned and harvested like the others.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cxr_miner.miner.cam import normalize_maps
from cxr_miner.miner.methods.registry import LocalizationMethod, Select, register_method
from cxr_miner.miner.models import CamClassifier

# Added to the denominator of alpha (Eq. 19), as pytorch-grad-cam does: where the gradient is 0
# alpha is 0 regardless (the paper's ReLU of Eq. 7 makes those terms vanish anyway).
ALPHA_EPS = 1e-6


def grad_cam_plus_plus(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """Grad-CAM++ maps of one class: activations A^k and gradients dS^c/dA^k, both (N, K, h, w),
    float -> ReLU(sum_k w_k^c A^k) (N, h, w), on the activations' grid (not normalised).

    Eq. 19 (the exponential score Y^c = exp(S^c), whose higher derivatives are powers of the
    first for a piecewise-linear network): alpha_ij^kc = g^2 / (2 g^2 + sum_ab A_ab^k g^3), g the
    gradient at (i, j); Eq. 7: w_k^c = sum_ij alpha_ij^kc ReLU(g_ij) (exp(S^c), a positive factor
    common to every k, is left out: the map is normalised afterwards); the map is ReLU(sum_k w_k^c A^k).
    """
    squared = gradients**2
    summed = activations.sum(dim=(2, 3), keepdim=True)
    alpha = squared / (2 * squared + summed * squared * gradients + ALPHA_EPS)
    alpha = torch.where(gradients != 0, alpha, torch.zeros_like(alpha))
    weights = (alpha * torch.relu(gradients)).sum(dim=(2, 3), keepdim=True)
    return torch.relu((weights * activations).sum(dim=1))


@register_method
class GradCamPlusPlus(LocalizationMethod[CamClassifier]):
    name = "gradcam-pp"
    description = "Grad-CAM++ on the step-1 classifier's features (Chattopadhay et al. 2018)"
    needs_gradients = True

    @property
    def label(self) -> str:
        return "Grad-CAM++"

    def checkpoints(self) -> tuple[str, ...]:
        return ("step1",)

    def heatmaps(
        self, models: Sequence[CamClassifier], images: torch.Tensor, select: Select | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Grad-CAM++ of every finding a selected pair has, normalised to [0, 1]: (N, C, h, w)
        (0 for findings no image selects); step-1 logits (N, C). One gradient per finding over the
        whole batch: in eval mode an image's logits depend on that image's features alone."""
        features = models[0].forward_features(images)
        x, logits = features.features, features.logits
        wanted = select(logits) if select is not None else torch.ones_like(logits, dtype=torch.bool)
        maps = torch.zeros(x.shape[0], logits.shape[1], *x.shape[2:], device=x.device)
        for finding in wanted.any(dim=0).nonzero().flatten().tolist():
            (gradients,) = torch.autograd.grad(logits[:, finding].sum(), x, retain_graph=True)
            maps[:, finding] = grad_cam_plus_plus(x.detach().float(), gradients.float())
        return normalize_maps(maps), logits.detach()
