"""CARLA's semantic classes: the ids its CameraMask frames store, their names and display colours."""

import numpy as np

# Index = class id, as written in the R channel of a CARLA CameraMask PNG.
CLASS_NAMES = (
    "unlabeled", "building", "fence", "other", "pedestrian", "pole", "road_line", "road",
    "sidewalk", "vegetation", "vehicle", "wall", "traffic_sign", "sky", "ground", "bridge",
    "rail_track", "guard_rail", "traffic_light", "static", "dynamic", "water", "terrain",
)
CLASS_IDS = {name: class_id for class_id, name in enumerate(CLASS_NAMES)}
N_CLASSES = len(CLASS_NAMES)


def class_names(n_classes):
    """Names of a model's classes: CARLA's for a 23-class model, else the ids as text (a model
    trained on other labels gives its ids no CARLA meaning)."""
    return list(CLASS_NAMES) if n_classes == N_CLASSES else [str(i) for i in range(n_classes)]


# CARLA's own Cityscapes-like palette, so our previews look like the simulator's.
PALETTE = np.array(
    [
        (0, 0, 0), (70, 70, 70), (100, 40, 40), (55, 90, 80), (220, 20, 60), (153, 153, 153),
        (157, 234, 50), (128, 64, 128), (244, 35, 232), (107, 142, 35), (0, 0, 142),
        (102, 102, 156), (220, 220, 0), (70, 130, 180), (81, 0, 81), (150, 100, 100),
        (230, 150, 140), (180, 165, 180), (250, 170, 30), (110, 190, 160), (170, 120, 50),
        (45, 60, 150), (145, 170, 100),
    ],
    dtype=np.uint8,
)
