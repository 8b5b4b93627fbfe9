"""LiTS label values: every label map here holds 0 background, 1 liver, 2 tumour.

Tumour lies inside the liver, so the liver of a label map is every voxel >= LIVER and its tumour
every voxel == TUMOUR.
"""

BACKGROUND, LIVER, TUMOUR = 0, 1, 2
LABEL_NAMES = {BACKGROUND: "background", LIVER: "liver", TUMOUR: "tumour"}
