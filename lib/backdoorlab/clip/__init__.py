"""CLIP contrastive backdoors: a tiny CLIP trained offline (``open_clip``), procedural
caption data, BadCLIP and baseline triggers, CleanCLIP and fine-tuning defenses, and the
re-activation attacks of ``backdoorlab.reactivation`` applied to CLIP.

Needs the ``clip`` extra (``pip install 'backdoorlab[clip]'``)."""
from . import badclip, captions, evaluate, losses, models, poisoning, protocol, training
from .captions import CLASSES, CaptionSet, generate
from .evaluate import zero_shot
from .models import ClipModel, ZeroShot, create, tokenize
from .protocol import backdoor, defend, trigger_for
from .training import SCALES, cleanclip_loss, data_for, finetune, pretrain, splits

__all__ = ["CLASSES", "CaptionSet", "ClipModel", "SCALES", "ZeroShot", "backdoor", "badclip", "captions",
           "cleanclip_loss", "create", "data_for", "defend", "evaluate", "finetune", "generate", "losses", "models",
           "poisoning", "pretrain", "protocol", "splits", "tokenize", "training", "trigger_for", "zero_shot"]
