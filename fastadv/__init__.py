"""fastadv: fused kernels for adversarial training and DP-SGD, drop-in for the
usual reference classes (swap one import)."""
__version__ = "0.1.0"

from ._backend import BackendUnavailable  # noqa: E402
from .ops._live import StorageMoved  # noqa: E402
from .adversarial import AWP, FGM, PGD  # noqa: E402
from .averaging import ModelEMA, ema_multi_avg_fn, swa_multi_avg_fn  # noqa: E402
from .optim import SAM  # noqa: E402
from .adversarial.fgsm import adversarial_train_step  # noqa: E402
from .ops.fgsm import fgsm_perturb  # noqa: E402
from . import attacks, noise, sift  # noqa: E402
# every op is in torch.ops.fastadv after `import fastadv` (the DP ghost ops' users load lazily)
from .ops import dp_ghost as _dp_ghost_ops  # noqa: E402,F401
# seed 000's total-norm optimizer (NOT per-sample DP: that is fastadv.dp.DPOptimizer); it warns
# on its first use, see fastadv/dp/seed.py
from .dp.seed import _TopLevelDPOptimizer as DPOptimizer  # noqa: E402

__all__ = ["FGM", "PGD", "AWP", "SAM", "ModelEMA", "swa_multi_avg_fn", "ema_multi_avg_fn", "fgsm_perturb", "adversarial_train_step", "attacks", "noise", "sift", "DPOptimizer", "BackendUnavailable", "StorageMoved", "__version__"]
