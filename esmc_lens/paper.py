"""The paper's own numbers (LLaVA-1.5-7B), as data, always labelled as the paper's.

Source: "ESMC: MLLM-Based Embedding Selection for Explainable Multiple Clustering", Table 3
(Output / ESMC w/o MLP / ESMC, NMI and RI). Table 2 prints Flowers-Color RI as 0.8992 where
Table 3 prints 0.8982; Table 3's values are used here.
"""

from __future__ import annotations

import pandas as pd

PAPER_MODEL = "LLaVA-1.5-7B (paper)"

# dataset -> criterion -> method -> (NMI, RI)
TABLE3: dict[str, dict[str, dict[str, tuple[float, float]]]] = {
    "Stanford_Cars": {
        "color": {"Output": (0.7871, 0.9107), "ESMC w/o head": (0.7934, 0.9129),
                  "ESMC": (0.8138, 0.9235)},
        "type": {"Output": (0.6462, 0.8474), "ESMC w/o head": (0.8694, 0.9517),
                 "ESMC": (0.8817, 0.9589)},
    },
    "flower": {
        "color": {"Output": (0.6698, 0.8736), "ESMC w/o head": (0.6835, 0.8810),
                  "ESMC": (0.7283, 0.8982)},
        "species": {"Output": (0.8133, 0.9329), "ESMC w/o head": (0.8462, 0.9347),
                    "ESMC": (0.8923, 0.9726)},
    },
    "CIFAR-10": {
        "type": {"Output": (0.7505, 0.8953), "ESMC w/o head": (0.7149, 0.9137),
                 "ESMC": (0.8293, 0.9520)},
        "environment": {"Output": (0.0443, 0.4941), "ESMC w/o head": (0.5484, 0.7860),
                        "ESMC": (0.6075, 0.8282)},
    },
    "CMU_face": {
        "emotion": {"Output": (0.1498, 0.5876), "ESMC w/o head": (0.1902, 0.6346),
                    "ESMC": (0.2237, 0.6697)},
        "glass": {"Output": (0.6780, 0.8279), "ESMC w/o head": (0.6445, 0.7955),
                  "ESMC": (0.7665, 0.9259)},
        "pose": {"Output": (0.0913, 0.5631), "ESMC w/o head": (0.5498, 0.8140),
                 "ESMC": (0.6271, 0.8253)},
    },
    "Card": {
        "order": {"Output": (0.4387, 0.8348), "ESMC w/o head": (0.3895, 0.8712),
                  "ESMC": (0.4736, 0.8805)},
        "suits": {"Output": (0.2423, 0.4258), "ESMC w/o head": (0.3334, 0.6982),
                  "ESMC": (0.3586, 0.7258)},
    },
    "Fruit360": {
        "color": {"Output": (0.6071, 0.7972), "ESMC w/o head": (0.6523, 0.7584),
                  "ESMC": (0.6952, 0.8493)},
        "species": {"Output": (0.2199, 0.5080), "ESMC w/o head": (0.3806, 0.6824),
                    "ESMC": (0.5036, 0.7285)},
    },
    "Fruit": {
        "color": {"Output": (0.9308, 0.9732), "ESMC w/o head": (0.9308, 0.9732),
                  "ESMC": (0.9308, 0.9732)},
        "species": {"Output": (0.8441, 0.9337), "ESMC w/o head": (1.0, 1.0),
                    "ESMC": (1.0, 1.0)},
    },
}


def paper_scores(dataset: str, criterion: str) -> pd.DataFrame | None:
    """The paper's NMI and RI per method for one dataset and criterion (None if absent)."""
    rows = TABLE3.get(dataset, {}).get(criterion.lower())
    if rows is None:
        return None
    df = pd.DataFrame({m: {"nmi": v[0], "ri": v[1]} for m, v in rows.items()}).T
    df.index.name = "method"
    df.attrs["model"] = PAPER_MODEL
    return df
