"""Numbers printed in the papers, for side-by-side tables. Only numbers read from a paper
or its official repository are here, each with the setting it was measured in; a
notebook shows them labelled as such, never as our results.

``KARIM2024_TABLE1``: NFT (Karim et al., ECCV 2024), Table 1, CIFAR-10 part, as shown in
the official repository's ``assets/nft_results.png``: ASR / ACC in percent, no DER or RA.
The table does not state architecture or poisoning rate (the paper's t-SNE figure uses
PreAct-ResNet18 at 10 %). Rows are keyed by our attack names where an attack of ours
matches the paper's (``Troj-one`` = TrojanNN all-to-one, ``Dyn-one`` = Input-aware,
``CLB`` = label-consistent, ``ISSBA`` = SSBA, ``BPPA`` = BppAttack).
"""
from __future__ import annotations

KARIM2024_SETTING = "NFT paper, Table 1, CIFAR-10 (architecture and poison rate not stated in the table)"
KARIM2024_DEFENSES = {"none": "No Defense", "anp": "ANP", "ibau": "I-BAU", "ftsam": "FT-SAM", "rnp": "RNP",
                      "nft": "NFT"}  # AWM, the table's other column, is not in backdoorlab

# attack -> defense -> (ASR %, ACC %)
KARIM2024_TABLE1: dict[str, dict[str, tuple[float, float]]] = {
    "badnets": {"none": (100, 92.96), "anp": (4.87, 85.92), "ibau": (2.84, 85.96), "ftsam": (4.34, 86.17),
                "rnp": (2.75, 88.46), "nft": (1.74, 90.82)},
    "blended": {"none": (100, 94.11), "anp": (4.77, 87.61), "ibau": (3.81, 89.10), "ftsam": (2.13, 88.93),
                "rnp": (0.91, 91.53), "nft": (0.31, 93.17)},
    "trojannn": {"none": (100, 89.57), "anp": (3.78, 82.18), "ibau": (5.47, 86.20), "ftsam": (5.41, 86.45),
                 "rnp": (3.84, 87.39), "nft": (1.64, 87.71)},
    "sig": {"none": (100, 88.64), "anp": (1.04, 81.92), "ibau": (0.37, 83.60), "ftsam": (0.90, 85.38),
            "rnp": (0.51, 86.46), "nft": (0.12, 87.16)},
    "inputaware": {"none": (100, 92.52), "anp": (4.73, 88.61), "ibau": (1.78, 87.26), "ftsam": (3.35, 88.41),
                   "rnp": (8.61, 90.05), "nft": (1.37, 90.81)},
    "lc": {"none": (100, 92.78), "anp": (0.83, 87.41), "ibau": (1.41, 85.07), "ftsam": (1.89, 84.18),
           "rnp": (6.12, 90.38), "nft": (1.04, 90.37)},
    "wanet": {"none": (98.64, 92.29), "anp": (5.81, 86.70), "ibau": (3.18, 89.24), "ftsam": (2.96, 88.45),
              "rnp": (8.10, 90.26), "nft": (2.38, 89.65)},
    "ssba": {"none": (99.80, 92.78), "anp": (6.76, 85.42), "ibau": (3.82, 89.20), "ftsam": (4.57, 89.59),
             "rnp": (7.58, 88.62), "nft": (4.24, 90.18)},
    "lira": {"none": (99.25, 92.15), "anp": (7.34, 87.41), "ibau": (4.51, 89.61), "ftsam": (3.86, 89.22),
             "rnp": (11.83, 87.59), "nft": (1.53, 90.57)},
    "bpp": {"none": (99.70, 93.82), "anp": (9.94, 90.23), "ibau": (10.46, 90.57), "ftsam": (10.60, 90.88),
            "rnp": (9.74, 91.37), "nft": (5.04, 91.78)},
}


def karim2024_rows() -> list[dict]:
    """NFT's Table 1 (CIFAR-10) as tidy rows with fractions: attack, defense, asr, acc, source."""
    return [{"attack": a, "defense": d, "asr": asr / 100, "acc": acc / 100, "source": KARIM2024_SETTING}
            for a, cells in KARIM2024_TABLE1.items() for d, (asr, acc) in cells.items()]


__all__ = ["KARIM2024_SETTING", "KARIM2024_DEFENSES", "KARIM2024_TABLE1", "karim2024_rows"]
