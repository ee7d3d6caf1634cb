"""Dormant backdoors in purified models: measuring them (BEC), waking them (white-box,
query-based and transfer re-activation, the retuning attack and QRA), and the loss
landscape between backdoored and purified models (linear mode connectivity).

Papers: Zhu, Liang, Wu, "Breaking the False Sense of Security in Backdoor Defense through
Re-Activation Attack" (NeurIPS 2024); Min, Qin, Zhang, Shen, Cheng, "Uncovering,
Explaining, and Mitigating the Superficial Safety of Backdoor Defense" (NeurIPS 2024).
PAM, the latter's defense, is in ``backdoorlab.defenses`` (``defenses.create("pam")``).
"""
from .common import apply_delta, asr_under, budget_of, poisoned_samples, project
from .bec import (NORMALISATIONS, backdoor_layers, backdoor_neuron_scores, bec, bec_for, existence_similarity,
                  layer_features, paired_test_images, top_channels)
from .cka import linear_cka
from .lmc import interpolate, path_metrics, recompute_bn
from .oracle import exact_purification
from .qra import QRAGenerator, evaluate_qra, qra
from .retune import retune, retuning_set
from .square import SquareLog, square_reactivation
from .whitebox import transfer_reactivation, whitebox_reactivation

__all__ = [
    # shared
    "apply_delta", "asr_under", "budget_of", "poisoned_samples", "project",
    # backdoor existence
    "NORMALISATIONS", "backdoor_layers", "backdoor_neuron_scores", "bec", "bec_for", "existence_similarity",
    "layer_features", "linear_cka", "paired_test_images", "top_channels",
    # re-activation by a universal perturbation
    "SquareLog", "square_reactivation", "transfer_reactivation", "whitebox_reactivation",
    # retuning, QRA, the EP oracle, linear paths
    "QRAGenerator", "evaluate_qra", "exact_purification", "interpolate", "path_metrics", "qra", "recompute_bn",
    "retune", "retuning_set",
]
