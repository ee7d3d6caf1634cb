"""CLIP contrastive backdoors: a tiny CLIP trained offline (``open_clip``), procedural
caption data, BadCLIP and baseline triggers, CleanCLIP and fine-tuning defenses, and the
re-activation attacks of ``backdoorlab.reactivation`` applied to CLIP.

Needs the ``clip`` extra (``pip install 'backdoorlab[clip]'``)."""
from . import badclip, captions, evaluate, losses, models, poisoning, training
from .captions import CLASSES, CaptionSet, generate
from .evaluate import zero_shot
from .models import ClipModel, ZeroShot, create, tokenize
from .training import SCALES, cleanclip_loss, data_for, finetune, pretrain, splits

__all__ = ["CLASSES", "CaptionSet", "ClipModel", "SCALES", "ZeroShot", "badclip", "captions", "cleanclip_loss",
           "create", "data_for", "evaluate", "finetune", "generate", "losses", "models", "poisoning", "pretrain",
           "splits", "tokenize", "training", "zero_shot"]
